//! The overhead benchmark behind `cargo xtask bench`: connection churn on loopback under each
//! tracer, in interleaved rounds, compared as ratios to the untraced rate measured in the same run.
//!
//! bench FINWAIT_TRACE CHURN [--rounds R] [--seconds S] [--threads N] [--json PATH] [--soak MINUTES]
//!       [--peer-wait SECONDS] [--baseline FINWAIT_TRACE]
// Test and bench crates share the package's dependencies (the library is where unused ones
// show); their drivers are long by nature.
#![allow(
    unused_crate_dependencies,
    clippy::too_many_lines,
    clippy::needless_pass_by_value
)]
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

const TCPSTATES: &str = "/usr/sbin/tcpstates";

struct Mode {
    name: &'static str,
    /// Command line of the tracer; None: untraced.
    cmd: Option<Vec<String>>,
    finwait: bool,
}

#[derive(Default, Clone)]
struct Sample {
    conn_per_s: f64,
    connections: u64,
    /// The tracer's CPU (user + system) during the churn.
    cpu_s: f64,
    /// Its CPU before the churn: attaching (BTF parsing, loading), once per run.
    startup_cpu_s: f64,
    rss_kib: i64,
    /// The tracer's BPF maps (memlock in its map fds' fdinfo), at the end of the churn.
    map_bytes: u64,
    records: u64,
    transitions: u64,
    lost: u64,
    /// finwait's per-program `{"runs", "ns_per_run"}` (only with `kernel.bpf_stats_enabled`).
    kernel_run_time: serde_json::Value,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (finwait, churn) = (args[1].clone(), args[2].clone());
    let opt = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .map_or(default.to_string(), |i| args[i + 1].clone())
    };
    let rounds: usize = opt("--rounds", "3").parse().unwrap();
    let seconds: f64 = opt("--seconds", "5").parse().unwrap();
    let threads = opt("--threads", "1");
    let json_path = opt("--json", "target/bench/overhead.json");
    let soak: f64 = opt("--soak", "0").parse().unwrap();
    let peer_wait = Duration::from_secs_f64(opt("--peer-wait", "2.5").parse().unwrap());
    if soak > 0.0 {
        return run_soak(&finwait, &churn, &threads, soak);
    }
    // The sockets a real host holds (idle connections): the tracers' maps are measured with
    // them open.
    let host_sockets: usize = opt("--host-sockets", "20000").parse().unwrap();
    let _held = hold_sockets(host_sockets);

    // An idle process for the excluding --pid filter.
    let mut idle = Command::new("sleep").arg("100000").spawn().unwrap();
    let fw = |extra: &[&str]| -> Option<Vec<String>> {
        let mut v = vec![
            finwait.clone(),
            "--no-snapshot".into(),
            "--stats-every".into(),
            "3600".into(),
        ];
        v.extend(extra.iter().map(ToString::to_string));
        Some(v)
    };
    let idle_pid = idle.id().to_string();
    // Where the kernel allows precise mode, the default runs it: measure correlated beside it.
    let precise = Command::new(&finwait)
        .args(["--mode", "precise", "--no-snapshot", "--duration", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut modes = vec![
        Mode {
            name: "untraced",
            cmd: None,
            finwait: false,
        },
        Mode {
            name: if precise {
                "finwait (default: precise)"
            } else {
                "finwait (default: correlated)"
            },
            cmd: fw(&[]),
            finwait: true,
        },
    ];
    if precise {
        modes.push(Mode {
            name: "finwait --mode correlated",
            cmd: fw(&["--mode", "correlated"]),
            finwait: true,
        });
        // Where the syscall wrappers' fentry/fexit pairs are the default: the classic syscall
        // tracepoints beside them (`env` execs the tracer, so its pid is the one measured).
        let mut classic = vec![
            "env".to_string(),
            "FINWAIT_FORCE_SYSCALL_TRACEPOINTS=1".into(),
        ];
        classic.extend(fw(&[]).unwrap());
        modes.push(Mode {
            name: "finwait, syscall tracepoints",
            cmd: Some(classic),
            finwait: true,
        });
    }
    // An earlier build, in the same rounds: a change's before and after.
    let baseline = opt("--baseline", "");
    if !baseline.is_empty() {
        let mut cmd = fw(&[]).unwrap();
        cmd[0] = baseline;
        modes.push(Mode {
            name: "finwait (baseline build)",
            cmd: Some(cmd),
            finwait: true,
        });
    }
    modes.extend([
        Mode {
            name: "finwait --all",
            cmd: fw(&["--all"]),
            finwait: true,
        },
        Mode {
            name: "finwait --pid (other)",
            cmd: fw(&["--pid", &idle_pid]),
            finwait: true,
        },
        Mode {
            name: "no-op programs (floor)",
            cmd: fw(&["--bench-noop"]),
            finwait: true,
        },
    ]);
    // The peers, where installed (a VM guest has tcpstates at most).
    if std::path::Path::new(TCPSTATES).exists() {
        modes.push(Mode {
            name: "tcpstates (libbpf-tools)",
            cmd: Some(vec![TCPSTATES.into()]),
            finwait: false,
        });
    } else {
        eprintln!("bench: no {TCPSTATES}; not compared");
    }
    if Command::new("bpftrace")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        modes.push(Mode {
            name: "bpftrace one-liner",
            cmd: Some(vec![
                "bpftrace".into(),
                "-e".into(),
                "tracepoint:sock:inet_sock_set_state { printf(\"%d %d %d\\n\", pid, args->oldstate, args->newstate); }".into(),
            ]),
            finwait: false,
        });
    } else {
        eprintln!("bench: no bpftrace; not compared");
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        // Rotate the order each round so no mode always follows the same one.
        for k in 0..modes.len() {
            let i = (k + round) % modes.len();
            let s = measure(&modes[i], &churn, &threads, seconds, peer_wait);
            eprintln!(
                "round {} {:<26} {:>9.0} conn/s",
                round + 1,
                modes[i].name,
                s.conn_per_s
            );
            samples[i].push(s);
        }
    }
    let _ = idle.kill();
    let _ = idle.wait();
    report(&modes, &samples, &json_path, rounds, seconds, &threads);
    let costed: Vec<&Mode> = modes
        .iter()
        .filter(|m| {
            m.name.starts_with("finwait (default")
                || m.name.contains("baseline")
                || m.name.contains("--mode")
                || m.name.contains("syscall tracepoints")
        })
        .collect();
    kernel_cost(&costed, &churn, &threads, seconds, peer_wait);
    maps_of_a_default_run(&finwait, host_sockets);
}

/// The kernel side alone: one more churn per mode with `kernel.bpf_stats_enabled` on (not part
/// of the ratios above: the kernel's accounting costs two clock reads per run), and each
/// program's runs per connection and mean time per run.
fn kernel_cost(modes: &[&Mode], churn: &str, threads: &str, seconds: f64, peer_wait: Duration) {
    const KNOB: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let Ok(before) = std::fs::read_to_string(KNOB) else {
        return eprintln!("bench: no {KNOB}; kernel time per program not measured");
    };
    if std::fs::write(KNOB, "1").is_err() {
        return eprintln!("bench: cannot write {KNOB}; kernel time per program not measured");
    }
    println!("\nKernel time per program ({KNOB}=1, one churn of {seconds} s per mode):\n");
    println!("| mode | program | runs per connection | ns per run |");
    println!("|---|---|---:|---:|");
    for mode in modes {
        let s = measure(mode, churn, threads, seconds, peer_wait);
        let Some(progs) = s.kernel_run_time.as_object() else {
            continue;
        };
        let mut progs: Vec<_> = progs.iter().collect();
        progs.sort_by_key(|(p, _)| p.as_str());
        let mut total_ns = 0.0;
        for (prog, v) in progs {
            let runs = v["runs"].as_f64().unwrap_or(0.0);
            let per_conn = runs / s.connections.max(1) as f64;
            let ns = v["ns_per_run"].as_f64().unwrap_or(0.0);
            total_ns += per_conn * ns;
            println!("| {} | {prog} | {per_conn:.2} | {ns} |", mode.name);
        }
        println!(
            "| {} | **all programs: kernel time per connection** | | {:.0} |",
            mode.name, total_ns
        );
    }
    let _ = std::fs::write(KNOB, before.trim());
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn report(
    modes: &[Mode],
    samples: &[Vec<Sample>],
    json_path: &str,
    rounds: usize,
    seconds: f64,
    threads: &str,
) {
    let base = median(samples[0].iter().map(|s| s.conn_per_s).collect());
    let tcpstates_ratio = modes
        .iter()
        .position(|m| m.name.starts_with("tcpstates"))
        .map(|i| median(samples[i].iter().map(|s| s.conn_per_s).collect()) / base);
    println!(
        "Loopback churn, {threads} thread(s), {rounds} interleaved rounds of {seconds} s; untraced median {base:.0} conn/s.\n"
    );
    println!(
        "| mode | conn/s (median) | ratio to untraced | x tcpstates' ratio | events delivered | lost | records/conn | transitions/conn | tracer CPU per event | tracer CPU per conn | start-up CPU | peak RSS | BPF maps |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (m, ss) in modes.iter().zip(samples) {
        let rate = median(ss.iter().map(|s| s.conn_per_s).collect());
        let ratio = rate / base;
        let conns: u64 = ss.iter().map(|s| s.connections).sum();
        let records: u64 = ss.iter().map(|s| s.records).sum();
        let transitions: u64 = ss.iter().map(|s| s.transitions).sum();
        let lost: u64 = ss.iter().map(|s| s.lost).sum();
        let cpu: f64 = ss.iter().map(|s| s.cpu_s).sum();
        let startup = ss.iter().map(|s| s.startup_cpu_s).sum::<f64>() / ss.len().max(1) as f64;
        let rss = ss.iter().map(|s| s.rss_kib).max().unwrap_or(0);
        let maps = ss.iter().map(|s| s.map_bytes).max().unwrap_or(0);
        let dash = || "-".to_string();
        let per_event = if m.finwait && records > 0 {
            format!("{:.2} µs", cpu / records as f64 * 1e6)
        } else {
            dash()
        };
        let per_conn = if m.cmd.is_some() && conns > 0 {
            format!("{:.2} µs", cpu / conns as f64 * 1e6)
        } else {
            dash()
        };
        let tpc = if m.finwait && conns > 0 {
            format!("{:.2}", transitions as f64 / conns as f64)
        } else {
            dash()
        };
        let rpc = if m.finwait && conns > 0 {
            format!("{:.3}", records as f64 / conns as f64)
        } else {
            dash()
        };
        let startup_col = if m.cmd.is_some() {
            format!("{startup:.2} s")
        } else {
            dash()
        };
        println!(
            "| {} | {:.0} | {:.3} | {} | {} | {} | {rpc} | {} | {} | {} | {startup_col} | {} | {} |",
            m.name,
            rate,
            ratio,
            match tcpstates_ratio {
                Some(t) if m.cmd.is_some() => format!("{:.2}", ratio / t),
                _ => dash(),
            },
            if m.finwait {
                records.to_string()
            } else {
                dash()
            },
            if m.finwait { lost.to_string() } else { dash() },
            tpc,
            per_event,
            per_conn,
            if m.cmd.is_some() {
                format!("{:.1} MiB", rss as f64 / 1024.0)
            } else {
                dash()
            },
            if m.cmd.is_some() {
                format!("{:.1} MiB", maps as f64 / f64::from(1 << 20))
            } else {
                dash()
            },
        );
        rows.push(serde_json::json!({
            "mode": m.name,
            "conn_per_s": rate,
            "ratio": ratio,
            "connections": conns,
            "records": records,
            "transitions": transitions,
            "lost": lost,
            "cpu_s": cpu,
            "startup_cpu_s": startup,
            "peak_rss_kib": rss,
            "bpf_map_bytes": maps,
            "samples": ss.iter().map(|s| s.conn_per_s).collect::<Vec<_>>(),
        }));
    }
    if let Some(dir) = std::path::Path::new(json_path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let json = serde_json::json!({
        "threads": threads,
        "rounds": rounds,
        "seconds": seconds,
        "untraced_conn_per_s": base,
        "modes": rows,
    });
    let json = format!("{json:#}\n");
    std::fs::write(json_path, json).unwrap();
    println!("\nJSON: {json_path}");
}

/// `n` idle TCP sockets (n/2 loopback connections), held while the value lives: the client ends
/// here, the server ends in a forked child (each process under its own open-files limit).
fn hold_sockets(n: usize) -> Held {
    // SAFETY: plain rlimit calls on this process: the soft limit up to the hard one.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // SAFETY: the child only accepts and sleeps until its parent is gone.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: as above.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        let held: Vec<_> = (0..n / 2).map_while(|_| listener.accept().ok()).collect();
        loop {
            thread::sleep(Duration::from_secs(3600));
            let _ = &held;
        }
    }
    drop(listener);
    let clients = (0..n / 2)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect (open-files limit?)"))
        .collect();
    // Until the child has accepted them all, some are still in its accept queue.
    thread::sleep(Duration::from_secs(1));
    Held { clients, child }
}

/// The held sockets: the client ends, and the child holding the server ends.
struct Held {
    #[allow(dead_code)]
    clients: Vec<std::net::TcpStream>,
    child: i32,
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe {
            libc::kill(self.child, libc::SIGKILL);
            libc::waitpid(self.child, std::ptr::null_mut(), 0);
        }
    }
}

/// A default run (snapshot and seeding included) with the held sockets open: each map's memory,
/// beside the same run with the hash maps preallocated and beside the sizes before they came
/// from the host (262,144 owners, 16,384 per thread, a 4 MiB ring, all preallocated).
fn maps_of_a_default_run(finwait: &str, host_sockets: usize) {
    println!("\nBPF maps of a default run with {host_sockets} TCP sockets open on the host:\n");
    println!("| run | total | per map |");
    println!("|---|---:|---|");
    let runs: [(&str, &[&str]); 2] = [
        ("default", &[]),
        ("hash maps preallocated", &["--preallocate-maps"]),
    ];
    for (name, extra) in runs {
        let mut cmd = vec![finwait.to_string(), "--stats-every".into(), "3600".into()];
        cmd.extend(extra.iter().map(ToString::to_string));
        let (child, lines) = start_tracer(&cmd, true, Duration::ZERO);
        thread::sleep(Duration::from_secs(2));
        let (_, _, stats) = stop(child, lines);
        let Some(stats) = stats.and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        else {
            println!("| {name} | no stats | |");
            continue;
        };
        let maps = stats["bpf_map_bytes"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let total: u64 = maps.values().filter_map(serde_json::Value::as_u64).sum();
        let mut big: Vec<(String, u64)> = maps
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .filter(|(_, b)| *b >= 64 << 10)
            .collect();
        big.sort_by_key(|b| std::cmp::Reverse(b.1));
        let per_map: Vec<String> = big
            .iter()
            .map(|(k, b)| format!("{k} {:.2}", *b as f64 / f64::from(1 << 20)))
            .collect();
        println!(
            "| {name} | {:.2} MiB | {} (MiB; maps under 64 KiB left out) |",
            total as f64 / f64::from(1 << 20),
            per_map.join(", ")
        );
    }
}

/// The BPF maps a process holds: the sum of `memlock` over its map fds.
fn map_bytes_of(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter(|info| info.contains("map_id:"))
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Starts the tracer (if any), waits until it is attached, runs the churn, stops the tracer.
fn measure(mode: &Mode, churn: &str, threads: &str, seconds: f64, peer_wait: Duration) -> Sample {
    let mut tracer = mode
        .cmd
        .as_ref()
        .map(|cmd| start_tracer(cmd, mode.finwait, peer_wait));
    let startup_cpu = tracer.as_ref().map_or(0.0, |(c, _)| cpu_of(c.id()));
    let out = Command::new(churn)
        .args(["--threads", threads, "--seconds", &seconds.to_string()])
        .output()
        .unwrap();
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("churn output");
    let mut s = Sample {
        conn_per_s: result["per_second"].as_f64().unwrap(),
        connections: result["connections"].as_u64().unwrap(),
        ..Default::default()
    };
    if let Some((child, stderr_lines)) = tracer.take() {
        s.map_bytes = map_bytes_of(child.id());
        let (cpu, rss, stats) = stop(child, stderr_lines);
        s.cpu_s = cpu - startup_cpu;
        s.startup_cpu_s = startup_cpu;
        s.rss_kib = rss;
        if let Some(stats) = stats.and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        {
            let num = |k: &str| stats[k].as_u64().unwrap_or(0);
            s.records = num("records");
            s.transitions = num("transitions");
            s.lost = num("lost_ring_full") + num("kernel_skipped_nested");
            s.kernel_run_time = stats["kernel_run_time"].clone();
        }
    }
    s
}

/// Starts a tracer and returns once it is attached: finwait prints its first line then (a fixed
/// sleep is too short on an emulated machine); the peers' output is block-buffered in a pipe, so
/// for them it waits `peer_wait`. The rest of the output is read and dropped.
fn start_tracer(
    cmd: &[String],
    finwait: bool,
    peer_wait: Duration,
) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", cmd[0]));
    let (attached_tx, attached) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = lines.next();
        let _ = attached_tx.send(());
        lines.map_while(Result::ok).for_each(drop);
    });
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    if finwait {
        attached
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("{} did not start", cmd[0]));
    } else {
        thread::sleep(peer_wait);
    }
    (child, rx)
}

/// User + system CPU seconds of a running process so far, from /proc/PID/stat.
fn cpu_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let f: Vec<&str> = stat[stat.rfind(')').unwrap_or(0) + 2..]
        .split(' ')
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / hz
}

/// SIGINT, then (CPU seconds, peak RSS KiB, last stats line).
fn stop(child: Child, lines: mpsc::Receiver<String>) -> (f64, i64, Option<String>) {
    let pid = child.id() as i32;
    // Its own high-water mark (ru_maxrss would also count the pre-exec copy of this driver).
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<i64>().ok())
        });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let mut status = 0;
    // SAFETY: zeroed rusage is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let cpu = ru.ru_utime.tv_sec as f64
        + ru.ru_utime.tv_usec as f64 / 1e6
        + ru.ru_stime.tv_sec as f64
        + ru.ru_stime.tv_usec as f64 / 1e6;
    let stats = lines
        .iter()
        .filter(|l| l.contains("\"event\":\"stats\""))
        .last();
    (cpu, hwm.unwrap_or(ru.ru_maxrss), stats)
}

/// Churn for `minutes` under finwait (default mode) serving `--metrics`, scraped every second
/// as Prometheus would: its RSS, records, losses and series over time, one row a minute.
fn run_soak(finwait: &str, churn: &str, threads: &str, minutes: f64) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(finwait)
        .args(["--no-snapshot", "--quiet", "--stats-every", "10"])
        .args(["--metrics", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let start = Instant::now();
    let reader = thread::spawn(move || soak_rows(stderr, start));
    thread::sleep(Duration::from_millis(2500));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = {
        let done = done.clone();
        thread::spawn(move || scrape_every_second(port, &done))
    };
    let out = Command::new(churn)
        .args([
            "--threads",
            threads,
            "--seconds",
            &(minutes * 60.0).to_string(),
        ])
        .output()
        .unwrap();
    println!("churn: {}", String::from_utf8_lossy(&out.stdout).trim());
    println!("soak: {:.0} s", start.elapsed().as_secs_f64());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (scrapes, failed, series) = scraper.join().unwrap();
    println!("scrapes: {scrapes} ok, {failed} failed; series in the last: {series}");
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    println!("finwait-trace stopped by SIGTERM: {status}");
    let _ = reader.join();
}

/// One row a minute from the `--stats-every` lines: the tracer's memory and losses over time.
fn soak_rows(stderr: std::process::ChildStderr, start: Instant) {
    println!(
        "{:>6} {:>9} {:>12} {:>6} {:>8} {:>8}",
        "t_s", "rss_kib", "records", "lost", "skipped", "tracked"
    );
    let row = |t: f64, v: &serde_json::Value| {
        println!(
            "{t:>6.0} {:>9} {:>12} {:>6} {:>8} {:>8}",
            v["rss_kib"],
            v["records"],
            v["lost_ring_full"],
            v["kernel_skipped_nested"],
            v["tracked_sockets"]
        );
    };
    let (mut last_row, mut last) = (-60.0, None);
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            println!("{line}");
            continue;
        };
        let t = start.elapsed().as_secs_f64();
        if t - last_row >= 60.0 || v["lost_ring_full"] != 0 {
            last_row = t;
            row(t, &v);
            last = None;
        } else {
            last = Some((t, v));
        }
    }
    // The counters at exit.
    if let Some((t, v)) = last {
        row(t, &v);
    }
}

/// GETs /metrics every second until `done`: (answered, failed, series in the last answer).
fn scrape_every_second(port: u16, done: &std::sync::atomic::AtomicBool) -> (u64, u64, usize) {
    use std::io::{Read, Write};
    let (mut ok, mut failed, mut series) = (0, 0, 0);
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        let body = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            let mut b = String::new();
            s.read_to_string(&mut b)?;
            Ok(b)
        });
        match body {
            Ok(b) if b.starts_with("HTTP/1.0 200") || b.starts_with("HTTP/1.1 200") => {
                ok += 1;
                series = b.lines().filter(|l| l.starts_with("finwait_")).count();
            }
            _ => failed += 1,
        }
        thread::sleep(Duration::from_secs(1));
    }
    (ok, failed, series)
}
