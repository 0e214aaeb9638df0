//! Runs the real `finwait-trace --json` against scenarios made on loopback by the test itself.
#![allow(dead_code)]
use std::{
    io::{BufRead, BufReader},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::Value;

pub(crate) struct Tracer {
    child: Child,
    lines: mpsc::Receiver<Value>,
    /// The `start` event; `stop_when` returns it first.
    pub start: Value,
}

/// The `finwait-trace` binary under test: `FINWAIT_TRACE` (set by `cargo xtask test`, which
/// builds it first), else `finwait-trace` in the target directory this test binary was built
/// in (`target/PROFILE/deps/TEST` -> `target/PROFILE/finwait-trace`; in the VMs too, where both
/// keep their host paths). This crate cannot name another package's binary through
/// `CARGO_BIN_EXE_*`.
pub(crate) fn finwait_trace() -> PathBuf {
    if let Some(path) = std::env::var_os("FINWAIT_TRACE") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("finwait-trace"))
        .expect("the test binary is in target/PROFILE/deps");
    assert!(
        bin.is_file(),
        "{} not found: build it first (`cargo build -p finwait-userspace`), or run the \
         integration tests with `cargo xtask test`, or name the binary in FINWAIT_TRACE",
        bin.display()
    );
    bin
}

pub(crate) fn gettid() -> u32 {
    // SAFETY: no arguments.
    unsafe { libc::gettid() as u32 }
}

pub(crate) fn fd(s: &impl AsRawFd) -> i64 {
    i64::from(s.as_raw_fd())
}

/// How long a tracer may take to attach: an emulated guest on a machine loaded by other work
/// attaches its 36 fentry/fexit programs slowly (over 60 s seen on 7.2 under TCG).
/// Is the running kernel older than `major.minor`?
pub(crate) fn kernel_before(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-', '+']);
    let mut number = || {
        parts
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0)
    };
    (number(), number()) < (major, minor)
}

pub(crate) fn start_limit() -> Duration {
    if std::env::var_os("FINWAIT_TEST_GUEST").is_some() {
        Duration::from_secs(240)
    } else {
        Duration::from_secs(60)
    }
}

impl Tracer {
    /// Starts the tracer and waits until its programs are attached.
    pub(crate) fn start(args: &[&str]) -> Self {
        Self::start_env(args, &[])
    }

    pub(crate) fn start_env(args: &[&str], envs: &[(&str, &str)]) -> Self {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the integration tests load eBPF programs: run them as root (`cargo xtask test`)"
        );
        let mut child = Command::new(finwait_trace())
            .arg("--json")
            .args(mode_args(args))
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn finwait-trace");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let start = rx
            .recv_timeout(start_limit())
            .expect("tracer did not start");
        assert_eq!(start["event"], "start", "{start}");
        PRECISE.set(start["mode"] == "precise");
        Tracer {
            child,
            lines: rx,
            start,
        }
    }

    /// Waits (up to 10 s) until every `(lport, rport, from, to)` in `expect` is reported, then
    /// stops the tracer with SIGINT and returns everything it printed. Waiting for the events
    /// rather than sleeping matters: a peer in delayed-ACK mode may take 200 ms or more (longer on
    /// a loaded machine) to acknowledge a FIN.
    ///
    /// Each entry is `(lport, rport, from, to)`: the full port pair, because ephemeral ports are
    /// reused across connections to other peers, by other tests running at the same time.
    pub(crate) fn stop_when(self, expect: &[(u16, u16, &str, &str)]) -> Vec<Value> {
        self.stop_when_within(Duration::from_secs(10), expect)
    }

    /// As `stop_when`, waiting up to `limit` (for a kernel timer that takes longer).
    pub(crate) fn stop_when_within(
        self,
        limit: Duration,
        expect: &[(u16, u16, &str, &str)],
    ) -> Vec<Value> {
        let all = self.stop_after(limit, expect);
        assert_losses_owned_up_to(all.last().unwrap());
        all
    }

    /// As `stop_when`, for a tracer run with `--summary-only`: there are no transition lines to
    /// wait for, so it waits for the kernel's view of each socket instead (`ss`), then stops.
    pub(crate) fn stop_when_summary(self, expect: &[(u16, u16, &str, &str)]) -> Vec<Value> {
        for (l, r, _, to) in expect {
            wait_for_kernel_state(*l, *r, to);
        }
        self.stop_when(&[])
    }

    /// Reads the tracer's lines until `done` says the last one completed what the caller waits
    /// for, or until `limit` passes (or the tracer stopped by itself), then stops it (SIGINT)
    /// and returns everything it printed, the `stats` event last. Checks nothing: the caller
    /// weighs the counters.
    pub(crate) fn read_until(
        mut self,
        limit: Duration,
        mut done: impl FnMut(&Value) -> bool,
    ) -> Vec<Value> {
        let mut all = vec![self.start.clone()];
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    let finished = done(&v);
                    all.push(v);
                    if finished {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        // SAFETY: signalling our own child (a no-op if it already exited and was not reaped).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "tracer exited with {status}");
        all.extend(self.lines.iter());
        let stats = all.last().expect("no output");
        assert_eq!(stats["event"], "stats", "{stats}");
        all
    }

    /// As `stop_when`, but leaves the check of `kernel_skipped_nested` to the caller.
    pub(crate) fn stop_when_with_skips(self, expect: &[(u16, u16, &str, &str)]) -> Vec<Value> {
        self.stop_after(Duration::from_secs(10), expect)
    }

    fn stop_after(mut self, limit: Duration, expect: &[(u16, u16, &str, &str)]) -> Vec<Value> {
        let mut all = vec![self.start.clone()];
        let deadline = std::time::Instant::now() + limit;
        let is = |v: &Value, (l, r, from, to): &(u16, u16, &str, &str)| {
            v["lport"] == *l && v["rport"] == *r && v["from"] == *from && v["to"] == *to
        };
        // Each line is checked once as it comes: a busy host (every socket's transitions, with
        // no filter) sends tens of thousands, and rescanning them all per line never ends.
        let mut seen = vec![false; expect.len()];
        while !seen.iter().all(|s| *s) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    for (e, s) in expect.iter().zip(&mut seen) {
                        *s |= is(&v, e);
                    }
                    all.push(v);
                }
                Err(_) => {
                    let missing: Vec<_> = expect
                        .iter()
                        .zip(&seen)
                        .filter(|(_, s)| !**s)
                        .map(|(e, _)| e)
                        .collect();
                    eprintln!("stop_when: still missing after {limit:?}: {missing:?}");
                    for (l, r, _, _) in missing {
                        let ss = Command::new("ss")
                            .args(["-tanoiH", &format!("( sport = :{l} and dport = :{r} )")])
                            .output();
                        eprintln!(
                            "kernel: {:?}",
                            ss.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        );
                    }
                    break;
                }
            }
        }
        // Whatever else the same actions caused (a test may assert that something is absent).
        thread::sleep(Duration::from_millis(300));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "tracer exited with {status}");
        all.extend(self.lines.iter());
        let stats = all.last().expect("no output");
        assert_eq!(stats["event"], "stats", "{stats}");
        assert_eq!(stats["lost_ring_full"], 0, "events were lost: {stats}");
        assert_eq!(stats["in_call_full"], 0, "call exits were lost: {stats}");
        all
    }
}

/// A test that ends early (or panics) must not leave its tracer running, holding the test
/// harness's output pipe open.
impl Drop for Tracer {
    fn drop(&mut self) {
        // Both are no-ops for a tracer `stop_when` already reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the product promises when the kernel skips a program run (a BPF program of the same
/// kind already held the CPU: on 7.x, another task preempted inside it, more often under
/// emulation and load): the loss is counted per program in `stats`, never silent. Whether it
/// cost the scenario an answer is for the test's own assertions, which name every transition
/// and cause they need: a skip elsewhere on the host (any process's close() runs the hook) is
/// not a failure. The hooks guarded by a second program make a counted loss rare; it is shown.
pub(crate) fn assert_losses_owned_up_to(stats: &Value) {
    assert_eq!(stats["event"], "stats", "{stats}");
    let skipped = stats["kernel_skipped_nested"].as_u64().unwrap_or(0);
    if skipped == 0 {
        return;
    }
    let by_program = stats["kernel_skipped_by_program"]
        .as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum::<u64>());
    assert_eq!(by_program, skipped, "a skip not named per program: {stats}");
    eprintln!(
        "note: the kernel skipped {skipped} program runs (counted: {}); the test's assertions \
         say whether the scenario lost anything",
        stats["kernel_skipped_by_program"]
    );
}

/// Waits (up to 10 s) until the kernel shows the socket `lport` -> `rport` in `state` (or past
/// it: closed sockets vanish or sit in TIME-WAIT/LAST-ACK), as `ss` sees it.
pub(crate) fn wait_for_kernel_state(lport: u16, rport: u16, state: &str) {
    // `ss` spells FIN_WAIT2 as FIN-WAIT-2: compare without separators.
    let state = state.replace(['_', '-'], "");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let ss = Command::new("ss")
            .args([
                "-tanH",
                &format!("( sport = :{lport} and dport = :{rport} )"),
            ])
            .output()
            .unwrap();
        let now = String::from_utf8_lossy(&ss.stdout).replace('-', "");
        if now.is_empty()
            || now.contains(&state)
            || now.contains("TIMEWAIT")
            || now.contains("LASTACK")
        {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the orphan `lport` -> `rport` sits in FIN_WAIT2 as a full socket on the keepalive
/// timer (the peer's ACK reached it while close() still owned it) rather than as a time-wait
/// mini-socket. Waits for FIN_WAIT2 first.
pub(crate) fn orphan_kept_full(lport: u16, rport: u16) -> bool {
    wait_for_kernel_state(lport, rport, "FIN_WAIT2");
    let ss = Command::new("ss")
        .args([
            "-tanoH",
            &format!("( sport = :{lport} and dport = :{rport} )"),
        ])
        .output()
        .unwrap();
    let now = String::from_utf8_lossy(&ss.stdout);
    now.contains("FIN-WAIT-2") && now.contains("timer:(keepalive")
}

/// Transitions of the connection between these two ports, in order.
pub(crate) fn transitions(all: &[Value], port_a: u16, port_b: u16) -> Vec<Value> {
    all.iter()
        .filter(|v| v["event"] == "transition")
        .filter(|v| {
            let (l, r) = (
                v["lport"].as_u64().unwrap() as u16,
                v["rport"].as_u64().unwrap() as u16,
            );
            (l, r) == (port_a, port_b) || (l, r) == (port_b, port_a)
        })
        .cloned()
        .collect()
}

/// The one transition of socket `lport` from `from` to `to`.
pub(crate) fn find<'a>(ts: &'a [Value], lport: u16, from: &str, to: &str) -> &'a Value {
    let hits: Vec<&Value> = ts
        .iter()
        .filter(|v| v["lport"] == lport && v["from"] == from && v["to"] == to)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "expected one {from} -> {to} on port {lport} in {ts:#?}"
    );
    hits[0]
}

/// No transition names a task other than the ones the test made its calls from.
pub(crate) fn assert_only_callers(ts: &[Value], pid: u32, tids: &[u32]) {
    for v in ts {
        let cause = &v["cause"];
        if cause.is_null() || cause["pid"].is_null() {
            continue;
        }
        assert_eq!(cause["pid"], pid, "foreign pid in {v}");
        let tid = cause["tid"].as_u64().unwrap() as u32;
        assert!(
            tids.contains(&tid),
            "cause names tid {tid}, not one of the callers {tids:?}: {v}"
        );
    }
}

pub(crate) fn pair(listener: &std::net::TcpListener) -> (std::net::TcpStream, std::net::TcpStream) {
    let a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (b, _) = listener.accept().unwrap();
    (a, b)
}

pub(crate) fn ports(a: &std::net::TcpStream, b: &std::net::TcpStream) -> (u16, u16) {
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// Forks; the child runs `f` (raw libc calls only: the parent is multi-threaded) and exits with
/// its return value. Returns the child's pid.
pub(crate) fn fork_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only makes async-signal-safe calls before _exit.
    match unsafe { libc::fork() } {
        -1 => panic!("fork failed"),
        0 => {
            let code = f();
            unsafe { libc::_exit(code) }
        }
        pid => pid,
    }
}

/// In a forked child: closes every fd from 3 on but those in `keep`, so that the child holds
/// only the sockets it makes (the parent's other tests, running meanwhile, have theirs open).
/// Raw calls.
pub(crate) fn close_inherited_fds(keep: &[i32]) {
    for fd in 3..4096 {
        if !keep.contains(&fd) {
            // SAFETY: closing fds in a forked child; EBADF for those not open.
            unsafe { libc::close(fd) };
        }
    }
}

/// Kills and reaps a child when dropped, so a failing test never leaves one behind (it would
/// hold the test harness's output pipe open, and cargo would wait forever).
pub(crate) struct ChildGuard(pub i32);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
        wait_child(self.0);
    }
}

pub(crate) fn wait_child(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    status
}

pub(crate) fn sleep_ms(ms: u32) {
    // SAFETY: async-signal-safe.
    unsafe { libc::usleep(ms * 1000) };
}

pub(crate) fn close_fd(fd: i32) {
    // SAFETY: the caller owns fd.
    unsafe { libc::close(fd) };
}

/// The first event with this `event` name whose `sock` matches.
pub(crate) fn by_sock<'a>(all: &'a [Value], event: &str, sock: &Value) -> Vec<&'a Value> {
    all.iter()
        .filter(|v| v["event"] == event && &v["sock"] == sock)
        .collect()
}

/// `FINWAIT_TEST_MODE` (set by `cargo xtask vm-test`): the tracer mode the suite runs in,
/// unless the test's own `args` choose one (tests of mode selection itself).
pub(crate) fn mode_args(args: &[&str]) -> Vec<String> {
    match std::env::var("FINWAIT_TEST_MODE") {
        Ok(m) if !m.is_empty() && !args.contains(&"--mode") => vec!["--mode".into(), m],
        _ => Vec::new(),
    }
}

thread_local! {
    /// The last tracer this test (thread) started ran in precise mode (tcp_close/tcp_shutdown
    /// hooked). Per thread: tests of one binary run in parallel, in different modes.
    pub static PRECISE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub(crate) fn assert_cause(v: &Value, call: &str, pid: u32, tid: u32, fd: Option<i64>) {
    let c = &v["cause"];
    // In precise mode the kernel's own hook confirms every call and exit; never otherwise.
    let by_process = ["close", "shutdown", "close_range", "dup2", "dup3", "exit"].contains(&call);
    assert_eq!(c["exact"], by_process && PRECISE.get(), "{v}");
    assert_eq!(c["call"], call, "{v}");
    assert_eq!(c["pid"], pid, "{v}");
    assert_eq!(c["tid"], tid, "{v}");
    match fd {
        Some(fd) => assert_eq!(c["fd"], fd, "{v}"),
        None => assert!(c["fd"].is_null(), "{v}"),
    }
}

/// An epoll set of this process, for owners that poll their sockets; closed when dropped.
pub(crate) struct Epoll(i32);

impl Epoll {
    pub(crate) fn new() -> Self {
        // SAFETY: no arguments to get wrong.
        Self(unsafe { libc::epoll_create1(0) })
    }

    /// Registers `fd` for `events`.
    pub(crate) fn add(&self, fd: &impl AsRawFd, events: i32) {
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: 0,
        };
        // SAFETY: our epoll fd, a valid event.
        unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut ev) };
    }

    /// Forgets `fd` (the "removed from epoll and forgotten" owner).
    pub(crate) fn remove(&self, fd: &impl AsRawFd) {
        // SAFETY: our epoll fd.
        unsafe {
            libc::epoll_ctl(
                self.0,
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: our own fd.
        unsafe { libc::close(self.0) };
    }
}

/// The child's output once it exits; killed (and the test failed) if it runs past `limit`.
pub(crate) fn output_within(mut child: Child, limit: Duration) -> std::process::Output {
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "still running after {limit:?}: {:?}",
                child.wait_with_output()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// A process in a network namespace of its own, as a pod's or container's, holding sockets on
/// its own loopback: `close_wait` accepted sockets whose client closed (CLOSE_WAIT, and as many
/// orphaned clients in FIN_WAIT2), and `half_closed` accepted sockets it shut down (FIN_WAIT2
/// half-closed, their clients, also its own, in CLOSE_WAIT). Killed when dropped.
pub(crate) struct Pod {
    pub pid: i32,
    /// The listening port, in the pod's namespace.
    pub port: u16,
    /// The namespace's inode (`net:[INODE]`).
    pub netns: u64,
    _guard: ChildGuard,
}

impl Pod {
    pub(crate) fn start(close_wait: u32, half_closed: u32) -> Self {
        use std::os::unix::fs::MetadataExt;
        let mut fds = [0i32; 2];
        // SAFETY: a valid array of two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (r, w) = (fds[0], fds[1]);
        let pid = fork_child(move || pod_main(w, close_wait, half_closed));
        let guard = ChildGuard(pid);
        close_fd(w);
        let mut buf = [0u8; 3];
        let mut pfd = libc::pollfd {
            fd: r,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; then a read into a 3-byte buffer.
        let n = unsafe {
            libc::poll(&mut pfd, 1, 10_000);
            libc::read(r, buf.as_mut_ptr().cast(), 3)
        };
        close_fd(r);
        assert_eq!(n, 3, "the pod did not set up its sockets");
        assert_eq!(buf[2], 0, "the pod failed at step {}", buf[2]);
        let netns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .unwrap()
            .ino();
        Pod {
            pid,
            port: u16::from_ne_bytes([buf[0], buf[1]]),
            netns,
            _guard: guard,
        }
    }
}

/// The pod's body, in the forked child: raw syscalls only. Writes (port, 0) to `w` once its
/// sockets are set up, or (0, step) at the step that failed.
fn pod_main(w: i32, close_wait: u32, half_closed: u32) -> i32 {
    // SAFETY: raw syscalls on this child's own fds and memory.
    unsafe {
        // Nothing of the parent's: only the pipe.
        libc::syscall(libc::SYS_close_range, 0u32, (w - 1) as u32, 0u32);
        libc::syscall(libc::SYS_close_range, (w + 1) as u32, u32::MAX, 0u32);
        let fail = |step: u8| {
            libc::write(w, [0u8, 0, step].as_ptr().cast(), 3);
            1
        };
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return fail(1);
        }
        // The new namespace's loopback starts down.
        let ctl = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
        if libc::ioctl(ctl, libc::SIOCSIFFLAGS, &ifr) != 0 {
            return fail(2);
        }
        libc::close(ctl);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as u16;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = size_of::<libc::sockaddr_in>() as u32;
        let l = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let sa = (&raw const addr).cast::<libc::sockaddr>();
        if libc::bind(l, sa, len) != 0 || libc::listen(l, 64) != 0 {
            return fail(3);
        }
        let mut len_out = len;
        libc::getsockname(l, (&raw mut addr).cast(), &mut len_out);
        let connect = || {
            let c = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let ok = libc::connect(c, (&raw const addr).cast(), len) == 0;
            let s = libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut());
            (ok && s >= 0).then_some((c, s))
        };
        for _ in 0..close_wait {
            let Some((c, _s)) = connect() else {
                return fail(4);
            };
            libc::close(c);
        }
        for _ in 0..half_closed {
            let Some((_c, s)) = connect() else {
                return fail(5);
            };
            libc::shutdown(s, libc::SHUT_WR);
        }
        let port = u16::from_be(addr.sin_port).to_ne_bytes();
        libc::write(w, [port[0], port[1], 0].as_ptr().cast(), 3);
        libc::close(w);
        loop {
            libc::pause();
        }
    }
}

/// `finwait-trace snapshot --json ARGS`: its lines (it must succeed).
pub(crate) fn snapshot(args: &[&str]) -> Vec<Value> {
    let out = Command::new(finwait_trace())
        .args(["snapshot", "--json"])
        .args(args)
        .output()
        .expect("run finwait-trace snapshot");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
