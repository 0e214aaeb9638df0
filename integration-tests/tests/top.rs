//! `finwait-trace top` in a real terminal (a tmux pane of a fixed size): a process the test
//! controls leaks CLOSE_WAIT in two steps, 3 before `top` starts (the start-up snapshot's) and
//! 5 more while it runs; its row shows 3, then 8; `q` ends it with status 0 and the terminal
//! back as it was (no alternate screen, cooked mode).
#![allow(unused_crate_dependencies)]
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::*;

/// A tmux server of the test's own (its socket name), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn capture(&self) -> String {
        let out = self.cmd(&["capture-pane", "-p", "-t", "top"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.cmd(&["kill-server"]);
    }
}

/// A process that leaks CLOSE_WAIT sockets when told: for each byte N written to it, it
/// accepts N connections whose clients (its own) close, then answers one byte.
struct Leaker {
    pid: i32,
    ctl: i32,
    ack: i32,
    _guard: ChildGuard,
}

impl Leaker {
    fn start() -> Self {
        let (ctl_r, ctl_w) = pipe();
        let (ack_r, ack_w) = pipe();
        let pid = fork_child(move || leaker_main(ctl_r, ack_w));
        close_fd(ctl_r);
        close_fd(ack_w);
        Leaker {
            pid,
            ctl: ctl_w,
            ack: ack_r,
            _guard: ChildGuard(pid),
        }
    }

    /// `n` more sockets in CLOSE_WAIT, held by the leaker.
    fn leak(&self, n: u8) {
        let mut pfd = libc::pollfd {
            fd: self.ack,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut answer = [9u8];
        // SAFETY: our own pipe fds, a one-byte buffer, one valid pollfd.
        let read = unsafe {
            assert_eq!(libc::write(self.ctl, [n].as_ptr().cast(), 1), 1);
            libc::poll(&mut pfd, 1, 10_000);
            libc::read(self.ack, answer.as_mut_ptr().cast(), 1)
        };
        assert_eq!((read, answer[0]), (1, 0), "the leaker failed");
    }
}

impl Drop for Leaker {
    fn drop(&mut self) {
        close_fd(self.ctl);
        close_fd(self.ack);
    }
}

fn pipe() -> (i32, i32) {
    let mut fds = [0i32; 2];
    // SAFETY: a valid array of two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    (fds[0], fds[1])
}

/// The leaker's body, in the forked child: raw syscalls only.
fn leaker_main(ctl: i32, ack: i32) -> i32 {
    // SAFETY: raw syscalls on this child's own fds and memory.
    unsafe {
        // Nothing of the parent's but the two pipes, at 100 and 101.
        if libc::dup2(ctl, 100) != 100 || libc::dup2(ack, 101) != 101 {
            return 1;
        }
        libc::syscall(libc::SYS_close_range, 0u32, 99u32, 0u32);
        libc::syscall(libc::SYS_close_range, 102u32, u32::MAX, 0u32);
        let (ctl, ack) = (100, 101);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as u16;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = size_of::<libc::sockaddr_in>() as u32;
        let l = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if libc::bind(l, (&raw const addr).cast(), len) != 0 || libc::listen(l, 64) != 0 {
            return 2;
        }
        let mut len_out = len;
        libc::getsockname(l, (&raw mut addr).cast(), &mut len_out);
        let mut n = [0u8];
        while libc::read(ctl, n.as_mut_ptr().cast(), 1) == 1 {
            let mut status = 0u8;
            for _ in 0..n[0] {
                let c = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let connected = libc::connect(c, (&raw const addr).cast(), len) == 0;
                let s = libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut());
                if !connected || s < 0 {
                    status = 1;
                }
                libc::close(c); // the peer's FIN: `s` goes to CLOSE_WAIT, kept open
            }
            libc::write(ack, [status].as_ptr().cast(), 1);
        }
        0
    }
}

/// The number in `column` of the row whose workload is `comm[pid]`, as the pane shows it.
fn cell(screen: &str, pid: i32, column: &str) -> Option<u64> {
    let lines: Vec<&str> = screen.lines().collect();
    let header = lines
        .iter()
        .find(|l| l.contains("WORKLOAD") && l.contains(column))?;
    let at = header.split_whitespace().position(|w| w == column)?;
    let tag = format!("[{pid}]");
    let row = lines.iter().find(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|w| w.ends_with(&tag))
    })?;
    row.split_whitespace().nth(at)?.parse().ok()
}

/// Waits until the leaker's CLOSE_WAIT cell shows `want`; the pane on failure.
fn wait_for_close_wait(t: &Tmux, pid: i32, want: u64, limit: Duration) {
    let start = Instant::now();
    let mut screen = String::new();
    while start.elapsed() < limit {
        screen = t.capture();
        if cell(&screen, pid, "CLOSE_WAIT") == Some(want) {
            return;
        }
        sleep_ms(200);
    }
    panic!(
        "the row of pid {pid} did not show CLOSE_WAIT {want} within {limit:?} (it shows {:?}); the pane:\n{screen}\nsessions: {:?}",
        cell(&screen, pid, "CLOSE_WAIT"),
        t.cmd(&["list-sessions"]),
    );
}

fn wait_for_file(path: &Path, limit: Duration) -> Option<String> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(s) = std::fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return Some(s);
        }
        sleep_ms(100);
    }
    None
}

/// How the test ends `top`.
#[derive(Clone, Copy, Debug)]
enum End {
    /// These keys, as tmux names them.
    Keys(&'static str),
    /// The traced process exits: `top` stops by itself and says why once the terminal is back.
    TracedExit,
}

/// Tests here fork and load the CPU: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Starts `top --pid` on a leaker in a 160x40 tmux pane; its CLOSE_WAIT cell goes 3 -> 8
/// (3 from the start-up snapshot, 5 live); `end` ends it, with status 0 and the terminal back
/// as it was. The pane after the end, for more checks; None where there is no tmux.
fn top_run(name: &str, end: End) -> Option<String> {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !Path::new("/usr/bin/tmux").exists() {
        // The qemu guests carry the test binaries only; the host runs this test for real.
        assert!(
            std::env::var_os("FINWAIT_TEST_GUEST").is_some(),
            "no /usr/bin/tmux: `cargo xtask test` installs Debian's `tmux` package"
        );
        eprintln!("skipped: no tmux in this guest");
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root (`cargo xtask test`)"
    );
    let leaker = Leaker::start();
    leaker.leak(3); // before the start: the start-up snapshot's
    let dir = PathBuf::from(format!(
        "/tmp/finwait-top-test-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tmux = start_top(name, leaker.pid, &dir);
    wait_for_close_wait(&tmux, leaker.pid, 3, Duration::from_secs(40));
    leaker.leak(5);
    wait_for_close_wait(&tmux, leaker.pid, 8, Duration::from_secs(30));
    // Counted once each: a few refreshes later, still 8; the leaker's own clients, closed,
    // are its orphans (the 5 seen live at least).
    sleep_ms(2500);
    let screen = tmux.capture();
    eprintln!("the pane:\n{screen}");
    assert_eq!(cell(&screen, leaker.pid, "CLOSE_WAIT"), Some(8), "{screen}");
    let orphans = cell(&screen, leaker.pid, "ORPHANS").unwrap_or_default();
    assert!((5..=8).contains(&orphans), "{screen}");
    assert!(screen.contains("lost (ring full) 0"), "{screen}");
    // A key sorts (and redraws at once).
    tmux.cmd(&["send-keys", "-t", "top", "n"]);
    let start = Instant::now();
    while !tmux.capture().contains("sort: WORKLOAD") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{}",
            tmux.capture()
        );
        sleep_ms(100);
    }
    match end {
        End::Keys(keys) => {
            tmux.cmd(&["send-keys", "-t", "top", keys]);
        }
        End::TracedExit => drop(leaker),
    }
    let screen = assert_restored(&tmux, &dir, end);
    let _ = std::fs::remove_dir_all(&dir);
    Some(screen)
}

/// `top --pid PID` in a tmux pane of 160x40; after it, its exit status and the terminal's
/// modes go to files in `dir`, and the pane stays for the checks.
fn start_top(name: &str, pid: i32, dir: &Path) -> Tmux {
    let mode = mode_args(&[]).join(" ");
    let cmd = format!(
        "{} top --pid {pid} {mode}; echo $? > {d}/status; stty -a > {d}/stty; sleep 600",
        finwait_trace().display(),
        d = dir.display()
    );
    let tmux = Tmux {
        // A server of its own per test: one just killed may still hold its socket's name.
        socket: format!("finwait-top-{}-{name}", std::process::id()),
    };
    let size = ["-x", "160", "-y", "40"];
    let started = tmux.cmd(&[&["new-session", "-d", "-s", "top"], &size[..], &[&cmd]].concat());
    assert!(started.status.success(), "{started:?}");
    eprintln!("in tmux: {cmd}");
    tmux
}

/// `top` exited 0 and left the terminal as it found it: no alternate screen, no table, cooked
/// mode with echo. The pane.
fn assert_restored(tmux: &Tmux, dir: &Path, end: End) -> String {
    let status = wait_for_file(&dir.join("status"), Duration::from_secs(30));
    let screen = tmux.capture();
    assert_eq!(
        status.as_deref(),
        Some("0\n"),
        "top did not exit 0 ({end:?}):\n{screen}"
    );
    let alt = tmux.cmd(&["display-message", "-p", "-t", "top", "#{alternate_on}"]);
    assert_eq!(String::from_utf8_lossy(&alt.stdout).trim(), "0", "{screen}");
    assert!(!screen.contains("WORKLOAD"), "{screen}");
    let stty = wait_for_file(&dir.join("stty"), Duration::from_secs(5)).unwrap_or_default();
    let flags: Vec<&str> = stty.split_whitespace().collect();
    for flag in ["icanon", "echo", "isig"] {
        assert!(flags.contains(&flag), "{flag} not restored: {stty}");
    }
    screen
}

#[test]
fn q_quits() {
    top_run("q", End::Keys("q"));
}

/// Raw mode turns Ctrl-C into a key: it quits as q does.
#[test]
fn ctrl_c_quits() {
    top_run("ctrl-c", End::Keys("C-c"));
}

/// What the tracer wrote to stderr while the table was up reaches the terminal after it.
#[test]
fn the_end_of_the_traced_process_ends_it_and_says_so() {
    let Some(screen) = top_run("traced-exit", End::TracedExit) else {
        return;
    };
    assert!(
        screen.contains("every traced process has exited"),
        "{screen}"
    );
}
