//! Every command the README shows is run by a test, and where the README shows its output, the
//! command prints that (numbers, pids, fds and command lines aside): the incident the README
//! walks through is rebuilt here with processes of the same names (a back-end that closes idle
//! connections, a client pool that keeps them, a server that half-closes and lingers, a load
//! generator that never reads), and `snapshot`, `--stuck` and the summary are run against it.
//! A command the README gains that no test runs fails here.
#![allow(unused_crate_dependencies, clippy::too_many_lines)]
mod common;

use std::{
    ffi::CStr,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use regex::Regex;

const README: &str = include_str!("../../README.md");

/// A command of the README, and the output it shows (none for a bare command).
#[derive(Debug)]
struct Shown {
    command: String,
    output: Vec<String>,
}

/// The README's commands: each line of a `sh` block, and each `$ ` line of another block with
/// the lines after it (a block with no `$ ` line continues the command before: the summary
/// Ctrl-C prints).
fn shown() -> Vec<Shown> {
    let mut all: Vec<Shown> = Vec::new();
    let mut block: Option<bool> = None; // Some(is_sh) inside a block
    for line in README.lines() {
        match (block, line.strip_prefix("```")) {
            (None, Some(lang)) => block = Some(lang.trim() == "sh"),
            (Some(_), Some(_)) => block = None,
            (None, None) => {}
            (Some(true), None) => {
                let cmd = line.split(" #").next().unwrap_or("").trim();
                if !cmd.is_empty() {
                    all.push(Shown {
                        command: cmd.to_string(),
                        output: Vec::new(),
                    });
                }
            }
            (Some(false), None) => match line.strip_prefix("$ ") {
                Some(cmd) => all.push(Shown {
                    command: cmd.split(" #").next().unwrap_or("").trim().to_string(),
                    output: Vec::new(),
                }),
                None => {
                    if let Some(last) = all.last_mut()
                        && !line.trim().is_empty()
                    {
                        last.output.push(line.trim().to_string());
                    }
                }
            },
        }
    }
    all
}

/// Who runs each command that this file does not: the test command itself, or another test.
const RUN_ELSEWHERE: &[(&str, &str)] = &[
    (
        "cargo xtask run -- --demo",
        "cargo xtask test runs it first (xtask/src/test.rs)",
    ),
    ("cargo xtask test", "the test command itself (.ci/run)"),
    (
        "cargo xtask build --release",
        "cargo xtask test builds it; xtask/tests/old_userland.rs runs it",
    ),
    (
        "cargo xtask build --release --target aarch64-unknown-linux-musl",
        "cargo xtask test builds it",
    ),
];

/// Every command in the README is known: run here, or by the test named for it.
#[test]
fn every_readme_command_is_run_by_a_test() {
    let mut unknown = Vec::new();
    for s in shown() {
        let here = s.command.starts_with("sudo finwait-trace ");
        let elsewhere = RUN_ELSEWHERE.iter().any(|(c, _)| *c == s.command);
        if !here && !elsewhere {
            unknown.push(s.command);
        }
    }
    assert!(
        unknown.is_empty(),
        "README commands no test runs: {unknown:?}"
    );
    // The install table's commands too (they are in a table, not a block).
    for (cmd, _) in RUN_ELSEWHERE {
        assert!(README.contains(cmd), "stale entry: {cmd}");
    }
}

/// A README line as a pattern: numbers, the command line after `name[pid]`, a list of fds and
/// an elision `(...)` match whatever this run has there; the rest must be word for word.
fn pattern(line: &str) -> Regex {
    let marks = [
        // `api-client[18693] (api-client client.py)`: the command line differs.
        (r"\[(\d+)\] \([^():]*\)", "[\u{1}] \u{2}"),
        (r"fds [\d, .-]+ for", "\u{3}"),
        (r"\(\.\.\.\)", "\u{4}"),
        (r"\d+(\.\d+)?", "\u{1}"),
    ];
    let mut s = line.to_string();
    for (from, to) in marks {
        s = Regex::new(from).unwrap().replace_all(&s, to).into_owned();
    }
    let s = regex::escape(&s)
        .replace('\u{1}', r"\d+(\.\d+)?")
        .replace('\u{2}', r"\([^()]*\)")
        .replace('\u{3}', "fds? .+ for")
        .replace('\u{4}', r"\(.+\)");
    Regex::new(&format!("^{s}$")).unwrap()
}

#[test]
fn patterns_keep_the_words_and_free_the_numbers() {
    let p = pattern("api-client[18693] (api-client client.py): 40 CLOSE_WAIT held open (...)");
    assert!(p.is_match("api-client[7] (x --y 3): 2 CLOSE_WAIT held open (anything)"));
    assert!(!p.is_match("api-client[7] (x): 2 CLOSE_WAIT held (anything)"));
    let p = pattern("STUCK 33 sockets held by a[1] fds 3-9, 11, ... for at least 3.0 s: x");
    assert!(p.is_match("STUCK 2 sockets held by a[5] fds 4-5 for at least 3.0 s: x"));
}

/// The processes of the README's incident, each named as there, killed when dropped.
struct Incident {
    _children: Vec<ChildGuard>,
}

/// Sockets of each kind: at least two, so that each group is plural as in the README.
const POOL: usize = 6;
const NEVER_READ: usize = 2;
const LINGERED: usize = 4;

impl Incident {
    fn start() -> Self {
        let backend = TcpListener::bind("127.0.0.1:0").unwrap();
        let lingerd = TcpListener::bind("127.0.0.1:0").unwrap();
        let (bport, lport) = (port_of(&backend), port_of(&lingerd));
        let (bfd, lfd) = (backend.as_raw_fd(), lingerd.as_raw_fd());
        let (r, w) = pipe();
        let mut children = Vec::new();
        // The back-end closes each connection at once: orphans in FIN_WAIT2 on its port.
        children.push(role(c"backend", &[bfd, w], w, move || unsafe {
            for _ in 0..POOL {
                let s = libc::accept4(bfd, std::ptr::null_mut(), std::ptr::null_mut(), 0);
                if s < 0 {
                    return false;
                }
                libc::close(s);
            }
            true
        }));
        // The pool reads the EOF of most connections, never the rest, and closes none.
        children.push(role(c"api-client", &[w], w, move || unsafe {
            // No allocation in a child forked from a multi-threaded process.
            let mut socks = [0; POOL];
            for s in &mut socks {
                match connect_to(bport) {
                    Some(c) => *s = c,
                    None => return false,
                }
            }
            libc::usleep(300_000);
            let mut buf = [0u8; 16];
            socks[NEVER_READ..]
                .iter()
                .all(|&c| libc::read(c, buf.as_mut_ptr().cast(), buf.len()) == 0)
        }));
        // The lingering server half-closes each connection and keeps it, blocked in accept4.
        children.push(role(c"lingerd", &[lfd, w], w, move || unsafe {
            for _ in 0..LINGERED {
                let s = libc::accept4(lfd, std::ptr::null_mut(), std::ptr::null_mut(), 0);
                if s < 0 || libc::shutdown(s, libc::SHUT_WR) != 0 {
                    return false;
                }
            }
            libc::write(w, b"y".as_ptr().cast(), 1);
            libc::accept4(lfd, std::ptr::null_mut(), std::ptr::null_mut(), 0);
            false
        }));
        // The load generator never reads: CLOSE_WAIT, the FIN never read.
        children.push(role(c"loadgen", &[w], w, move || unsafe {
            (0..LINGERED).all(|_| connect_to(lport).is_some())
        }));
        close_fd(w);
        for _ in 0..children.len() {
            let mut b = [0u8; 1];
            // SAFETY: our pipe.
            let n = unsafe { libc::read(r, b.as_mut_ptr().cast(), 1) };
            assert!(n == 1 && b[0] == b'y', "a process of the incident failed");
        }
        close_fd(r);
        // One TIME_WAIT: the connecting end closes first.
        let tw = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(tw.local_addr().unwrap()).unwrap();
        let (s, _) = tw.accept().unwrap();
        drop(c);
        std::thread::sleep(Duration::from_millis(100));
        drop(s);
        std::thread::sleep(Duration::from_millis(200));
        Self {
            _children: children,
        }
    }
}

fn port_of(l: &TcpListener) -> u16 {
    l.local_addr().unwrap().port()
}

fn pipe() -> (i32, i32) {
    let mut p = [0; 2];
    // SAFETY: a plain pipe.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    (p[0], p[1])
}

/// Forks a process named `name` that keeps only `keep` of this process's fds, runs `body`, says
/// on `w` whether it worked ('y' unless the body wrote it already) and then sleeps for good
/// (in clock_nanosleep, as the README's processes wait). Raw calls only in the child.
fn role(name: &CStr, keep: &[i32], w: i32, body: impl FnOnce() -> bool) -> ChildGuard {
    ChildGuard(fork_child(move || unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
        // Only its own sockets: the other tests' (running meanwhile) are not the incident's.
        for fd in 3..4096 {
            if !keep.contains(&fd) {
                libc::close(fd);
            }
        }
        let ok = body();
        libc::write(w, if ok { b"y" } else { b"n" }.as_ptr().cast(), 1);
        loop {
            libc::usleep(1_000_000);
        }
    }))
}

/// A connected TCP socket to 127.0.0.1:`port` (raw calls, for a forked child).
unsafe fn connect_to(port: u16) -> Option<i32> {
    // SAFETY: plain socket calls on memory of this frame.
    unsafe {
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as u16;
        addr.sin_port = port.to_be();
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let c = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let len = size_of::<libc::sockaddr_in>() as u32;
        (libc::connect(c, (&raw const addr).cast(), len) == 0).then_some(c)
    }
}

/// Runs a README command (`sudo` dropped: the tests run as root); a live one is stopped with
/// Ctrl-C (SIGINT) after `live_for`, as the README says to.
fn run(command: &str, live_for: Duration) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(&words[..2], ["sudo", "finwait-trace"], "{command}");
    let args = &words[2..];
    let mut cmd = Command::new(finwait_trace());
    if args.first() != Some(&"snapshot") {
        cmd.args(mode_args(args));
    }
    let child = cmd
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if args.first() != Some(&"snapshot") {
        std::thread::sleep(live_for);
        // SAFETY: our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The README's incident, rebuilt: each command prints every line the README shows for it.
#[test]
fn the_readme_incident_prints_what_the_readme_shows() {
    let _incident = Incident::start();
    let mut checked = 0;
    for s in shown() {
        if !s.command.starts_with("sudo finwait-trace ") {
            continue;
        }
        // Past `--stuck 3`'s threshold, with room for a slow guest's start.
        let out = run(&s.command, Duration::from_secs(8) + start_limit() / 8);
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        for want in &s.output {
            // A heading (`Sockets on the close path now:`) may say more here (`in 2 network
            // namespaces`, where a test made one meanwhile).
            let heading = want.ends_with(':') && !want.contains(|c: char| c.is_ascii_digit());
            let p = if heading {
                let words = regex::escape(want.trim_end_matches(':'));
                Regex::new(&format!("^{words}( .*)?:$")).unwrap()
            } else {
                pattern(want)
            };
            assert!(
                lines.iter().any(|l| p.is_match(l)),
                "`{}` printed no line like the README's\n  {want}\n(pattern {p}); it printed:\n{out}",
                s.command
            );
            checked += 1;
        }
    }
    assert!(checked >= 8, "the README's sample output was not found");
}
