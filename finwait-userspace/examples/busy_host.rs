//! The busy-host benchmark behind `cargo xtask bench --busy-host`: in a network namespace of its
//! own, a CLOSE_WAIT-leaking back-end and a closing back-end under a steady connection churn,
//! traced by `finwait-trace --json --port ...`, first on an empty host, then with thousands of
//! idle processes holding 100,000 socket fds. Reports, per host: CLOSE_WAIT entries and how many
//! named the right owner (pid and fd, as the back-end itself logged them), owner lookups timed
//! out, full /proc scans, finwait's CPU per connection (user and system, during the churn) and
//! peak RSS.
//!
//! busy_host FINWAIT_TRACE [--processes 2000] [--fds 50] [--rate 400] [--seconds 16]
// Test and bench crates share the package's dependencies (the library is where unused ones
// show); their drivers are long by nature.
#![allow(
    unused_crate_dependencies,
    clippy::too_many_lines,
    clippy::needless_pass_by_value
)]
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::{AsRawFd, IntoRawFd},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

struct Opts {
    finwait: String,
    processes: usize,
    fds: usize,
    rate: f64,
    seconds: f64,
}

#[derive(Default)]
struct Result {
    close_waits: u64,
    right_owner: u64,
    wrong_owner: u64,
    no_owner: u64,
    connections: u64,
    user_s: f64,
    sys_s: f64,
    rss_kib: i64,
    startup_s: f64,
    stats: Value,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .map_or(default.to_string(), |i| args[i + 1].clone())
    };
    let o = Opts {
        finwait: args.get(1).expect("usage: busy_host FINWAIT_TRACE").clone(),
        processes: opt("--processes", "2000").parse().unwrap(),
        fds: opt("--fds", "50").parse().unwrap(),
        rate: opt("--rate", "400").parse().unwrap(),
        seconds: opt("--seconds", "16").parse().unwrap(),
    };
    // SAFETY: single-threaded here; the namespace is ours alone.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare(CLONE_NEWNET) needs root"
    );
    sh(&["ip", "link", "set", "lo", "up"]);
    raise_nofile();

    let empty = run(&o);
    let holders = build_host(o.processes, o.fds);
    let ss = Command::new("ss").args(["-tanH"]).output().unwrap();
    let sockets = String::from_utf8_lossy(&ss.stdout).lines().count();
    let busy = run(&o);
    for pid in holders {
        // SAFETY: our children.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait(pid);
    }
    println!(
        "Busy host: {} idle processes holding {} socket fds ({sockets} TCP sockets in the namespace); a leaking and a closing back-end at {} conn/s for {} s, traced with --json --port.\n",
        o.processes,
        o.processes * o.fds,
        o.rate,
        o.seconds
    );
    println!(
        "| host | connections | CLOSE_WAIT entries | right owner (pid, fd) | wrong | none | lookups timed out | owner scans | owners verified | finwait CPU per conn (user + sys) | peak RSS | start-up |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, r) in [("empty", &empty), ("busy", &busy)] {
        let per_conn = |s: f64| s / r.connections.max(1) as f64 * 1e6;
        println!(
            "| {name} | {} | {} | {} ({:.1}%) | {} | {} | {} | {} | {} | {:.1} µs ({:.1} + {:.1}) | {:.1} MiB | {:.2} s |",
            r.connections,
            r.close_waits,
            r.right_owner,
            100.0 * r.right_owner as f64 / r.close_waits.max(1) as f64,
            r.wrong_owner,
            r.no_owner,
            r.stats["owner_lookups_timed_out"],
            r.stats["owner_scans"],
            r.stats["owners_verified"],
            per_conn(r.user_s + r.sys_s),
            per_conn(r.user_s),
            per_conn(r.sys_s),
            r.rss_kib as f64 / 1024.0,
            r.startup_s,
        );
    }
    let ratio = |f: fn(&Result) -> f64| f(&busy) / f(&empty).max(1e-12);
    println!(
        "\nbusy / empty: CPU per connection {:.2}, peak RSS {:.2}",
        ratio(|r| (r.user_s + r.sys_s) / r.connections.max(1) as f64),
        ratio(|r| r.rss_kib as f64),
    );
}

/// One traced run: back-ends, finwait, churn; then the counts.
fn run(o: &Opts) -> Result {
    let leaky = Backend::start(false);
    let closing = Backend::start(true);
    let started = Instant::now();
    let mut tracer = Command::new(&o.finwait)
        .args(["--json", "--port"])
        .arg(leaky.port.to_string())
        .arg("--port")
        .arg(closing.port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<Value>();
    let stdout = tracer.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    // Attached at the start line; then the start-up snapshot runs before events are drained:
    // wait for its end (its summary line) before the churn.
    let first = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("finwait did not start");
    assert_eq!(first["event"], "start", "{first}");
    let mut seen = vec![first];
    while let Ok(v) = rx.recv_timeout(Duration::from_secs(120)) {
        let done = v["event"] == "snapshot_summary";
        seen.push(v);
        if done {
            break;
        }
    }
    let startup_s = started.elapsed().as_secs_f64();
    let (user0, sys0) = cpu_of(tracer.id());
    let connections = churn(&[leaky.port, closing.port], o.rate, o.seconds);
    thread::sleep(Duration::from_millis(1500)); // the last FINs, and finwait drains them
    let (user1, sys1) = cpu_of(tracer.id());
    // The tracer's own high-water mark: wait4's ru_maxrss would also count the forked copy of
    // this (by now large) driver that existed before the exec.
    let rss_kib = peak_rss_kib(tracer.id());
    // SAFETY: our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let _ = wait_rusage(&mut tracer);
    seen.extend(rx.iter());
    let fds = [leaky.stop(), closing.stop()];

    let mut r = Result {
        connections,
        user_s: user1 - user0,
        sys_s: sys1 - sys0,
        rss_kib,
        startup_s,
        stats: seen.last().cloned().unwrap_or_default(),
        ..Default::default()
    };
    assert_eq!(
        r.stats["event"], "stats",
        "finwait's last line: {}",
        r.stats
    );
    for v in seen
        .iter()
        .filter(|v| v["event"] == "transition" && v["to"] == "CLOSE_WAIT")
    {
        r.close_waits += 1;
        let lport = v["lport"].as_u64().unwrap() as u16;
        let rport = v["rport"].as_u64().unwrap() as u16;
        let Some((pid, table)) = fds.iter().find(|(_, t)| t.port == lport) else {
            continue;
        };
        let want = table
            .fds
            .get(&rport)
            .map(|&fd| (i64::from(*pid), i64::from(fd)));
        let got = v["owner"]["pid"].as_i64().zip(v["owner"]["fd"].as_i64());
        match got {
            g if g == want => r.right_owner += 1,
            None => r.no_owner += 1,
            _ => r.wrong_owner += 1,
        }
        if got != want && r.close_waits - r.right_owner <= 3 {
            eprintln!("busy_host: expected owner {want:?}: {v}");
        }
    }
    r
}

/// A back-end process: accepts, reads to EOF, then closes (or never does: a CLOSE_WAIT leak).
/// It logs each connection's peer port and fd, so the bench knows the right owner.
struct Backend {
    pid: i32,
    port: u16,
    log: i32,
}

struct FdTable {
    port: u16,
    fds: HashMap<u16, i32>,
}

impl Backend {
    fn start(closes: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (rd, wr) = pipe();
        // SAFETY: the child serves in plain blocking code and leaves through _exit.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: our copy of the read end.
                unsafe { libc::close(rd) };
                let mut log = std::io::BufWriter::new(unsafe {
                    <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(wr)
                });
                let mut buf = [0u8; 64];
                loop {
                    let Ok((mut s, peer)) = listener.accept() else {
                        unsafe { libc::_exit(0) }
                    };
                    while s.read(&mut buf).is_ok_and(|n| n > 0) {}
                    let _ = writeln!(log, "{} {}", peer.port(), s.as_raw_fd());
                    let _ = log.flush();
                    if closes {
                        drop(s);
                    } else {
                        let _ = s.into_raw_fd(); // leaked: CLOSE_WAIT forever
                    }
                }
            }
            pid => {
                // SAFETY: our copy of the write end.
                unsafe { libc::close(wr) };
                drop(listener);
                Backend { pid, port, log: rd }
            }
        }
    }

    /// Stops the back-end; returns its pid and the fds it logged by peer port.
    fn stop(self) -> (i32, FdTable) {
        // SAFETY: our child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        wait(self.pid);
        // SAFETY: the read end is ours; the File closes it.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(self.log) };
        let mut fds = HashMap::new();
        for line in BufReader::new(file)
            .lines()
            .map_while(std::result::Result::ok)
        {
            let mut it = line.split(' ').map(|x| x.parse::<i32>().unwrap());
            let (port, fd) = (it.next().unwrap(), it.next().unwrap());
            fds.insert(port as u16, fd);
        }
        (
            self.pid,
            FdTable {
                port: self.port,
                fds,
            },
        )
    }
}

/// Connects to each port in turn at `rate` per second: writes, shuts down, closes.
fn churn(ports: &[u16], rate: f64, seconds: f64) -> u64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let port = ports[n as usize % ports.len()];
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = c.write_all(b"x");
            let _ = c.shutdown(Shutdown::Write);
            drop(c);
            n += 1;
        }
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    n
}

/// `processes` idle processes holding `fds` socket fds each (half of each pair they made).
fn build_host(processes: usize, fds: usize) -> Vec<i32> {
    let (rd, wr) = pipe();
    let mut pids = Vec::new();
    for _ in 0..processes {
        // SAFETY: the child makes its sockets in plain code, then sleeps until killed.
        match unsafe { libc::fork() } {
            0 => {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let mut kept = Vec::new();
                for _ in 0..fds / 2 {
                    let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                    let (b, _) = listener.accept().unwrap();
                    kept.push(a.into_raw_fd());
                    kept.push(b.into_raw_fd());
                }
                drop(listener);
                // SAFETY: one byte to our pipe, then sleep until killed.
                unsafe {
                    libc::write(wr, b"r".as_ptr().cast(), 1);
                    loop {
                        libc::pause();
                    }
                }
            }
            pid => pids.push(pid),
        }
    }
    let mut b = [0u8; 1];
    for _ in 0..processes {
        // SAFETY: one byte from our pipe.
        unsafe { libc::read(rd, b.as_mut_ptr().cast(), 1) };
    }
    pids
}

/// User and system CPU seconds of a running process, from /proc/PID/stat.
fn cpu_of(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split(' ').collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (
        f[11].parse::<f64>().unwrap() / hz,
        f[12].parse::<f64>().unwrap() / hz,
    )
}

/// VmHWM of a running process (its peak RSS since exec), KiB.
fn peak_rss_kib(pid: u32) -> i64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn wait_rusage(child: &mut Child) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: zeroed rusage is valid; our child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    (status, ru.ru_maxrss)
}

fn wait(pid: i32) {
    let mut status = 0;
    // SAFETY: our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: valid array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[0], fds[1])
}

fn raise_nofile() {
    let r = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // SAFETY: valid pointer. The leaking back-end holds thousands of fds.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
}

fn sh(cmd: &[&str]) {
    assert!(
        Command::new(cmd[0])
            .args(&cmd[1..])
            .status()
            .unwrap()
            .success(),
        "{cmd:?}"
    );
}
