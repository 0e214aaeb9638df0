//! Close paths without fork: half-close then close, resets, TIME_WAIT, threads, dup2/dup3,
//! v4-mapped.
// Test and bench crates share the package's dependencies (the library is where unused ones
// show); their drivers are long by nature.
#![allow(
    unused_crate_dependencies,
    clippy::too_many_lines,
    clippy::needless_pass_by_value
)]
mod common;

use std::{
    io::Write,
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::{AsRawFd, IntoRawFd},
    thread,
    time::Duration,
};

use common::*;

fn me() -> u32 {
    std::process::id()
}

/// Scenario 3: half-closed, then closed: the FIN_WAIT2 socket becomes an orphan; the half-closed time is
/// reported.
#[test]
fn scenario_3_close_after_half_close() {
    let tracer = Tracer::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = pair(&listener);
    let (ap, bp) = ports(&a, &b);
    let tid = gettid();
    let afd = fd(&a);
    a.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(200));
    drop(a);
    let all = tracer.stop_when(&[
        (ap, bp, "ESTABLISHED", "FIN_WAIT1"),
        (ap, bp, "FIN_WAIT1", "FIN_WAIT2"),
        (ap, bp, "FIN_WAIT2", "CLOSE"),
    ]);
    let ts = transitions(&all, ap, bp);
    assert_cause(
        find(&ts, ap, "ESTABLISHED", "FIN_WAIT1"),
        "shutdown",
        me(),
        tid,
        Some(afd),
    );
    assert_eq!(find(&ts, ap, "FIN_WAIT1", "FIN_WAIT2")["orphan"], false);
    let gone = find(&ts, ap, "FIN_WAIT2", "CLOSE");
    assert_cause(gone, "close", me(), tid, Some(afd));
    assert_eq!(gone["orphan"], true, "{gone}");
    assert_eq!(gone["timewait_substate"], "FIN_WAIT2", "{gone}");
    let half = gone["half_closed_ms"].as_f64().unwrap();
    assert!(
        (200.0..2000.0).contains(&half),
        "half-closed {half} ms: {gone}"
    );
    assert_only_callers(&ts, me(), &[tid]);
    drop(b);
}

/// The peer's FIN ends a half-closed FIN_WAIT2: the socket goes to TIME_WAIT, caused by the peer.
#[test]
fn time_wait_exit_after_peer_fin() {
    let tracer = Tracer::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = pair(&listener);
    let (ap, bp) = ports(&a, &b);
    let tid = gettid();
    a.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(50));
    let bfd = fd(&b);
    drop(b);
    let all = tracer.stop_when(&[
        (ap, bp, "FIN_WAIT2", "TIME_WAIT"),
        (bp, ap, "CLOSE_WAIT", "LAST_ACK"),
    ]);
    let ts = transitions(&all, ap, bp);
    let tw = find(&ts, ap, "FIN_WAIT2", "TIME_WAIT");
    assert_eq!(tw["cause"]["call"], "peer_fin", "{tw}");
    assert_eq!(tw["kernel_to"], "CLOSE", "{tw}");
    assert_eq!(tw["orphan"], false, "{tw}");
    assert_cause(
        find(&ts, bp, "CLOSE_WAIT", "LAST_ACK"),
        "close",
        me(),
        tid,
        Some(bfd),
    );
    assert_only_callers(&ts, me(), &[tid]);
    drop(a);
}

/// A thread other than the main one shuts down: that thread's tid is named.
#[test]
fn shutdown_from_a_non_main_thread() {
    let tracer = Tracer::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = pair(&listener);
    let (ap, bp) = ports(&a, &b);
    let afd = fd(&a);
    let (a, tid) = thread::spawn(move || {
        a.shutdown(Shutdown::Both).unwrap();
        (a, gettid())
    })
    .join()
    .unwrap();
    assert_ne!(tid, me());
    let all = tracer.stop_when(&[(ap, bp, "ESTABLISHED", "FIN_WAIT1")]);
    let ts = transitions(&all, ap, bp);
    let fw1 = find(&ts, ap, "ESTABLISHED", "FIN_WAIT1");
    assert_cause(fw1, "shutdown", me(), tid, Some(afd));
    assert_eq!(fw1["cause"]["how"], "SHUT_RDWR");
    assert_only_callers(&ts, me(), &[tid]);
    drop((a, b));
}

/// Scenario 8: SO_LINGER {on, 0}: close() resets the connection; no FIN_WAIT2 anywhere.
#[test]
fn scenario_8_linger_zero_sends_rst() {
    let tracer = Tracer::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = pair(&listener);
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket and option buffer.
    let rc = unsafe {
        libc::setsockopt(
            a.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(rc, 0);
    close_resets(tracer, a, b);
}

/// close() with data still unread resets the connection too (RFC 2525), without SO_LINGER.
#[test]
fn unread_data_at_close_sends_rst() {
    let tracer = Tracer::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, mut b) = pair(&listener);
    b.write_all(b"unread").unwrap();
    // Wait until the data sits in a's receive queue, without reading it.
    a.peek(&mut [0u8; 1]).unwrap();
    close_resets(tracer, a, b);
}

/// Closes `a`, which must reset the connection: `a` goes to CLOSE by this close(), `b` by the
/// peer's RST, and neither passes through FIN_WAIT1/2.
fn close_resets(tracer: Tracer, a: TcpStream, b: TcpStream) {
    let (ap, bp) = ports(&a, &b);
    let (afd, tid) = (fd(&a), gettid());
    drop(a);
    let all = tracer.stop_when(&[
        (ap, bp, "ESTABLISHED", "CLOSE"),
        (bp, ap, "ESTABLISHED", "CLOSE"),
    ]);
    let ts = transitions(&all, ap, bp);
    assert!(
        ts.iter()
            .all(|v| v["to"] != "FIN_WAIT2" && v["to"] != "FIN_WAIT1"),
        "{ts:#?}"
    );
    assert_cause(
        find(&ts, ap, "ESTABLISHED", "CLOSE"),
        "close",
        me(),
        tid,
        Some(afd),
    );
    let reset = find(&ts, bp, "ESTABLISHED", "CLOSE");
    assert_eq!(reset["cause"]["call"], "peer_rst", "{reset}");
    assert_only_callers(&ts, me(), &[tid]);
    drop(b);
}

/// Scenario 7: dup2() over a socket fd closes it: the cause is dup2, with the replaced fd.
#[test]
fn scenario_7_dup2_over_a_socket() {
    // SAFETY: plain fd arguments.
    dup_over_a_socket("dup2", |old, new| unsafe { libc::dup2(old, new) });
}

/// dup3() likewise (the flags do not change what happens to the replaced socket).
#[test]
fn dup3_over_a_socket() {
    // SAFETY: plain fd arguments.
    dup_over_a_socket("dup3", |old, new| unsafe {
        libc::dup3(old, new, libc::O_CLOEXEC)
    });
}

fn dup_over_a_socket(call: &str, dup: fn(i32, i32) -> i32) {
    let tracer = Tracer::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = pair(&listener);
    let (ap, bp) = ports(&a, &b);
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let afd = a.into_raw_fd();
    let tid = gettid();
    // afd now refers to /dev/null and is closed below.
    assert_eq!(dup(devnull.as_raw_fd(), afd), afd);
    close_fd(afd);
    let all = tracer.stop_when(&[
        (ap, bp, "ESTABLISHED", "FIN_WAIT1"),
        (ap, bp, "FIN_WAIT1", "FIN_WAIT2"),
    ]);
    let ts = transitions(&all, ap, bp);
    for (from, to) in [("ESTABLISHED", "FIN_WAIT1"), ("FIN_WAIT1", "FIN_WAIT2")] {
        assert_cause(
            find(&ts, ap, from, to),
            call,
            me(),
            tid,
            Some(i64::from(afd)),
        );
    }
    assert_only_callers(&ts, me(), &[tid]);
    drop(b);
}

/// Scenario 9: IPv4 peers of a dual-stack listener show as IPv4, with the same attributions.
#[test]
fn scenario_9_v4_mapped_prints_as_ipv4() {
    let tracer = Tracer::start(&[]);
    let listener = TcpListener::bind("[::]:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let a = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (b, _) = listener.accept().unwrap();
    assert!(
        b.local_addr().unwrap().is_ipv6(),
        "the accepted socket is AF_INET6"
    );
    let (ap, bp) = ports(&a, &b);
    let (bfd, tid) = (fd(&b), gettid());
    a.shutdown(Shutdown::Write).unwrap();
    drop(b);
    let all = tracer.stop_when(&[
        (bp, ap, "ESTABLISHED", "CLOSE_WAIT"),
        (bp, ap, "CLOSE_WAIT", "LAST_ACK"),
    ]);
    let ts = transitions(&all, ap, bp);
    let cw = find(&ts, bp, "ESTABLISHED", "CLOSE_WAIT");
    assert_eq!(cw["laddr"], "127.0.0.1", "{cw}");
    assert_eq!(cw["raddr"], "127.0.0.1", "{cw}");
    assert_eq!(cw["family"], "ipv4", "{cw}");
    assert_cause(
        find(&ts, bp, "CLOSE_WAIT", "LAST_ACK"),
        "close",
        me(),
        tid,
        Some(bfd),
    );
    drop(a);
}

/// io_uring's IORING_OP_CLOSE ends a socket without a close() syscall. Precise mode sees the
/// kernel's tcp_close and names the process (no fd: no syscall carried one); correlated mode
/// cannot see who did it and must say `unknown`, never guess.
#[test]
fn io_uring_close_is_attributed_or_unknown() {
    use io_uring::{IoUring, opcode, types};
    let tracer = Tracer::start(&[]);
    let precise = tracer.start["mode"] == "precise";
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = pair(&listener);
    let (ap, bp) = ports(&a, &b);
    let mut ring = IoUring::new(4).expect("io_uring_setup (is kernel.io_uring_disabled set?)");
    let close = opcode::Close::new(types::Fd(a.into_raw_fd())).build();
    // SAFETY: the entry refers to no buffer; the fd is given up to the ring.
    unsafe { ring.submission().push(&close).unwrap() };
    ring.submit_and_wait(1).unwrap();
    let res = ring.completion().next().unwrap().result();
    assert_eq!(res, 0, "IORING_OP_CLOSE failed: {res}");
    let all = tracer.stop_when(&[
        (ap, bp, "ESTABLISHED", "FIN_WAIT1"),
        (ap, bp, "FIN_WAIT1", "FIN_WAIT2"),
    ]);
    let ts = transitions(&all, ap, bp);
    let fin = find(&ts, ap, "ESTABLISHED", "FIN_WAIT1");
    let fw2 = find(&ts, ap, "FIN_WAIT1", "FIN_WAIT2");
    if precise {
        for v in [fin, fw2] {
            let c = &v["cause"];
            assert_eq!(
                (c["call"].as_str(), c["pid"].as_u64(), c["exact"].as_bool()),
                (Some("close"), Some(u64::from(me())), Some(true)),
                "{v}"
            );
            assert!(c["fd"].is_null(), "{v}");
        }
        assert_eq!(fw2["orphan"], true, "{fw2}");
    } else {
        for v in [fin, fw2] {
            assert_eq!(v["cause"]["call"], "unknown", "{v}");
            assert!(v["cause"]["pid"].is_null(), "{v}");
        }
    }
    drop(b);
}

/// Precise mode with kprobes instead of fentry (FINWAIT_FORCE_KPROBE=1): the same exact answers
/// for a shutdown, a close of the half-closed socket, and an io_uring close. Where the kernel has
/// no kprobes the tracer must say so and fall back, not pretend.
#[test]
fn precise_mode_with_kprobes() {
    use io_uring::{IoUring, opcode, types};
    let tracer = Tracer::start_env(&["--mode", "auto"], &[("FINWAIT_FORCE_KPROBE", "1")]);
    if tracer.start["mode"] != "precise" {
        assert!(tracer.start["call_hook"].is_null(), "{}", tracer.start);
        assert!(
            tracer.start["precise_unavailable"]
                .as_str()
                .is_some_and(|w| w.contains("kprobe")),
            "{}",
            tracer.start
        );
        return;
    }
    assert_eq!(tracer.start["call_hook"], "kprobe", "{}", tracer.start);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = pair(&listener);
    let (c, d) = pair(&listener);
    let (ap, bp) = ports(&a, &b);
    let (cp, dp) = ports(&c, &d);
    let tid = gettid();
    let afd = fd(&a);
    a.shutdown(Shutdown::Write).unwrap();
    thread::sleep(Duration::from_millis(100));
    drop(a);
    let mut ring = IoUring::new(4).unwrap();
    let close = opcode::Close::new(types::Fd(c.into_raw_fd())).build();
    // SAFETY: the entry refers to no buffer; the fd is given up to the ring.
    unsafe { ring.submission().push(&close).unwrap() };
    ring.submit_and_wait(1).unwrap();
    let all = tracer.stop_when(&[
        (ap, bp, "FIN_WAIT2", "CLOSE"),
        (cp, dp, "ESTABLISHED", "FIN_WAIT1"),
    ]);
    let ts = transitions(&all, ap, bp);
    assert_cause(
        find(&ts, ap, "ESTABLISHED", "FIN_WAIT1"),
        "shutdown",
        me(),
        tid,
        Some(afd),
    );
    assert_cause(
        find(&ts, ap, "FIN_WAIT2", "CLOSE"),
        "close",
        me(),
        tid,
        Some(afd),
    );
    let ts = transitions(&all, cp, dp);
    let fin = find(&ts, cp, "ESTABLISHED", "FIN_WAIT1");
    assert_eq!(
        (
            fin["cause"]["call"].as_str(),
            fin["cause"]["pid"].as_u64(),
            fin["cause"]["exact"].as_bool()
        ),
        (Some("close"), Some(u64::from(me())), Some(true)),
        "{fin}"
    );
    drop((b, d));
}
