//! Builds a host with ~100,000 TCP sockets and thousands of processes, then times
//! `finwait-trace snapshot` there (wall time and peak RSS) beside `ss -tanpoe` in the same run.
//! Two layouts: 20 namespaces of ~5,000 sockets each (as pods on a node; `ss` sees only its own
//! namespace there, so it is not timed), and every socket in one new network namespace. Each
//! command runs from a small process forked at the start, so its peak RSS is its own.
//!
//! Usage (root): snapshot_load FINWAIT_TRACE [HOLDERS] [PAIRS_PER_HOLDER] [IDLE_PROCESSES]
// Test and bench crates share the package's dependencies (the library is where unused ones
// show); their drivers are long by nature.
#![allow(
    unused_crate_dependencies,
    clippy::too_many_lines,
    clippy::needless_pass_by_value
)]
use std::{
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::IntoRawFd,
    process::Command,
    time::Instant,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bin = args
        .get(1)
        .expect("usage: snapshot_load FINWAIT_TRACE [HOLDERS] [PAIRS] [IDLE]")
        .clone();
    let holders: usize = args.get(2).map_or(12, |s| s.parse().unwrap());
    let pairs: usize = args.get(3).map_or(4200, |s| s.parse().unwrap());
    let idle: usize = args.get(4).map_or(2000, |s| s.parse().unwrap());

    // SAFETY: single-threaded here; the namespace is ours alone.
    assert_eq!(
        unsafe { libc::unshare(libc::CLONE_NEWNET) },
        0,
        "unshare(CLONE_NEWNET) needs root"
    );
    assert!(
        Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success()
    );

    // The commands run from a process forked now, while this one is small: exec records the
    // exec'ing process's peak RSS as the new program's, so a child of this process (which
    // grows with 100,000 sockets) would report this process's peak, not its own.
    // One runner per measured command: a process's children's peaks add up in it (a runner
    // that reaped a large `ss` would report that peak for the next command).
    let mut runners: Vec<Runner> = (0..5).map(|_| Runner::start()).collect();
    // 20 namespaces of ~5,000 sockets first: their sockets go with their namespaces, where the
    // one namespace's would stay in TIME_WAIT in this process's for a minute.
    let children = populate(20, 2500, idle, true);
    measure(&mut runners, "20 namespaces", &bin, 20 + idle + 1, false);
    kill_all(children);
    // One namespace: `holders` processes of `pairs` connections each.
    let children = populate(holders, pairs, idle, false);
    measure(
        &mut runners,
        "one namespace",
        &bin,
        holders + idle + 1,
        true,
    );
    kill_all(children);
}

/// A small process that runs commands for the benchmark and reports each one's exit status,
/// peak RSS, wall time and output lines.
struct Runner {
    to: std::fs::File,
    from: std::io::BufReader<std::fs::File>,
}

impl Runner {
    fn start() -> Self {
        use std::os::fd::FromRawFd;
        let (to_w, to_r) = pipe();
        let (from_w, from_r) = pipe();
        // SAFETY: single-threaded here; the child runs plain Rust until it exits.
        if unsafe { libc::fork() } == 0 {
            // Only its own ends: it ends when the benchmark closes the request pipe.
            unsafe {
                libc::close(to_w);
                libc::close(from_r);
            }
            let requests = std::io::BufReader::new(unsafe { std::fs::File::from_raw_fd(to_r) });
            let mut replies = unsafe { std::fs::File::from_raw_fd(from_w) };
            for line in std::io::BufRead::lines(requests) {
                let Ok(line) = line else { break };
                let argv: Vec<&str> = line.split('\t').collect();
                let start = Instant::now();
                // Reaped below with wait4, which also gives its peak RSS.
                #[allow(clippy::zombie_processes)]
                let mut child = Command::new(argv[0])
                    .args(&argv[1..])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                let out = std::io::read_to_string(child.stdout.take().unwrap()).unwrap();
                let (status, rss_kib) = wait_rusage(child.id() as i32);
                let secs = start.elapsed().as_secs_f64();
                let head: Vec<&str> = out.lines().take(4).collect();
                let reply = format!(
                    "{status}\t{rss_kib}\t{secs}\t{}\t{}\n",
                    out.lines().count(),
                    head.join("\t")
                );
                std::io::Write::write_all(&mut replies, reply.as_bytes()).unwrap();
            }
            unsafe { libc::_exit(0) };
        }
        // SAFETY: our pipe ends (the runner's are closed here).
        unsafe {
            libc::close(to_r);
            libc::close(from_w);
            Self {
                to: std::fs::File::from_raw_fd(to_w),
                from: std::io::BufReader::new(std::fs::File::from_raw_fd(from_r)),
            }
        }
    }

    /// (exit status, peak RSS in KiB, seconds, output lines, the first 4 lines).
    fn run(&mut self, argv: &[&str]) -> (i32, i64, f64, usize, Vec<String>) {
        std::io::Write::write_all(&mut self.to, format!("{}\n", argv.join("\t")).as_bytes())
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.from, &mut line).unwrap();
        let mut f = line.trim_end_matches('\n').split('\t');
        let mut next = || f.next().unwrap_or_default().to_string();
        let status = next().parse().unwrap();
        let rss = next().parse().unwrap();
        let secs = next().parse().unwrap();
        let lines = next().parse().unwrap();
        let head = f.map(str::to_string).collect();
        (status, rss, secs, lines, head)
    }
}

/// Forks the holders (each in a namespace of its own with `own_ns`) and the idle processes;
/// returns their pids once every holder has its sockets.
fn populate(holders: usize, pairs: usize, idle: usize, own_ns: bool) -> Vec<i32> {
    let (tx_fd, rx_fd) = pipe();
    let mut children = Vec::new();
    for _ in 0..holders {
        // SAFETY: the child runs plain Rust and exits through _exit.
        match unsafe { libc::fork() } {
            0 => {
                if own_ns {
                    enter_new_namespace();
                }
                hold(pairs, tx_fd);
                unsafe { libc::pause() };
                unsafe { libc::_exit(0) }
            }
            pid => children.push(pid),
        }
    }
    for _ in 0..holders {
        let mut b = [0u8; 1];
        // SAFETY: reading one byte from our pipe.
        unsafe { libc::read(rx_fd, b.as_mut_ptr().cast(), 1) };
    }
    for _ in 0..idle {
        // SAFETY: the child only closes fds and sleeps.
        match unsafe { libc::fork() } {
            0 => unsafe {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                libc::pause();
                libc::_exit(0)
            },
            pid => children.push(pid),
        }
    }
    // SAFETY: our pipe's ends.
    unsafe {
        libc::close(tx_fd);
        libc::close(rx_fd);
    }
    std::thread::sleep(std::time::Duration::from_millis(500)); // delayed ACKs settle
    children
}

fn kill_all(children: Vec<i32>) {
    for pid in children {
        // SAFETY: our children.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
}

/// Times `finwait-trace snapshot` (summary, then JSON) and, with `with_ss`, `ss -tanpoe`.
fn measure(runners: &mut Vec<Runner>, layout: &str, bin: &str, processes: usize, with_ss: bool) {
    let sockets = count_sockets(bin);
    println!("{layout}: {sockets} TCP sockets, {processes} processes");
    let mut runs: Vec<(&str, Vec<&str>)> = vec![
        ("finwait-trace snapshot", vec![bin, "snapshot"]),
        (
            "finwait-trace snapshot --json",
            vec![bin, "snapshot", "--json"],
        ),
    ];
    if with_ss {
        runs.push(("ss -tanpoe", vec!["ss", "-tanpoe"]));
    }
    for (name, argv) in runs {
        let mut runner = runners.pop().expect("a runner per command");
        let (status, rss_kib, secs, lines, head) = runner.run(&argv);
        assert_eq!(status, 0, "{name} failed");
        println!(
            "  {name:<30} {secs:.2} s, peak RSS {:.1} MiB, {lines} output lines",
            rss_kib as f64 / 1024.0,
        );
        if argv.len() == 2 && argv[1] == "snapshot" {
            for line in head {
                println!("      {line}");
            }
        }
    }
}

/// Every TCP socket of every namespace, as finwait's JSON summary counts them.
fn count_sockets(bin: &str) -> String {
    let out = Command::new(bin)
        .args(["snapshot", "--json"])
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap();
    let first = String::from_utf8_lossy(&out.stdout);
    let first = first.lines().next().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(first).unwrap_or_default();
    format!(
        "{} on the close path and {} in TIME_WAIT, in {} namespaces,",
        v["sockets"], v["time_wait"], v["namespaces"]["read"]
    )
}

/// In a forked child: a network namespace of its own, its loopback up.
fn enter_new_namespace() {
    // SAFETY: raw calls on this child's own memory.
    unsafe {
        assert_eq!(libc::unshare(libc::CLONE_NEWNET), 0);
        let ctl = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
        assert_eq!(libc::ioctl(ctl, libc::SIOCSIFFLAGS, &ifr), 0);
        libc::close(ctl);
    }
}

/// In a child: `pairs` connections on a listener of its own, then a mix of close-path states.
fn hold(pairs: usize, tx_fd: i32) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut kept = Vec::new();
    for i in 0..pairs {
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        match i % 4 {
            0 => {
                a.shutdown(Shutdown::Write).unwrap(); // half-closed + CLOSE_WAIT
                kept.push(a.into_raw_fd());
                kept.push(b.into_raw_fd());
            }
            1 => kept.push(b.into_raw_fd()), // client closed: orphan + CLOSE_WAIT
            2 => kept.push(a.into_raw_fd()), // server closed: orphan on the listening port
            _ => {
                kept.push(a.into_raw_fd());
                kept.push(b.into_raw_fd());
            }
        }
    }
    std::mem::forget(listener);
    // SAFETY: writing one byte to our pipe.
    unsafe { libc::write(tx_fd, b"r".as_ptr().cast(), 1) };
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: valid array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[1], fds[0])
}

fn wait_rusage(pid: i32) -> (i32, i64) {
    let mut status = 0;
    // SAFETY: zeroed rusage is valid; our child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    (libc::WEXITSTATUS(status), ru.ru_maxrss)
}
