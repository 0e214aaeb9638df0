//! Scenarios 1, 2 and 4 of docs/close-path.md on the real kernel, with exact attributions.
// Test and bench crates share the package's dependencies (the library is where unused ones
// show); their drivers are long by nature.
#![allow(
    unused_crate_dependencies,
    clippy::too_many_lines,
    clippy::needless_pass_by_value
)]
mod common;

use std::{
    net::{Shutdown, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use common::*;

fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (b, _) = listener.accept().unwrap();
    (a, b)
}

/// Scenario 1: A shuts down its write side and keeps the fd; B never closes.
fn half_close(bind: &str) {
    let tracer = Tracer::start(&[]);
    let listener = TcpListener::bind(bind).unwrap();
    let (a, b) = pair(&listener);
    let (ap, bp) = (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    );
    let tid = gettid();
    a.shutdown(Shutdown::Write).unwrap();
    let all = tracer.stop_when(&[
        (ap, bp, "ESTABLISHED", "FIN_WAIT1"),
        (ap, bp, "FIN_WAIT1", "FIN_WAIT2"),
        (bp, ap, "ESTABLISHED", "CLOSE_WAIT"),
    ]);
    let ts = transitions(&all, ap, bp);

    for (from, to) in [("ESTABLISHED", "FIN_WAIT1"), ("FIN_WAIT1", "FIN_WAIT2")] {
        let v = find(&ts, ap, from, to);
        let c = &v["cause"];
        assert_eq!(c["call"], "shutdown", "{v}");
        assert_eq!(c["how"], "SHUT_WR", "{v}");
        assert_eq!(c["pid"], std::process::id(), "{v}");
        assert_eq!(c["tid"], tid, "{v}");
        assert_eq!(c["fd"], fd(&a), "{v}");
    }
    assert_eq!(find(&ts, ap, "FIN_WAIT1", "FIN_WAIT2")["orphan"], false);

    let cw = find(&ts, bp, "ESTABLISHED", "CLOSE_WAIT");
    assert_eq!(cw["cause"]["call"], "peer_fin", "{cw}");
    assert!(cw["cause"]["pid"].is_null(), "{cw}");
    assert_eq!(cw["owner"]["pid"], std::process::id(), "{cw}");
    assert_eq!(cw["owner"]["fd"], fd(&b), "{cw}");
    assert_only_callers(&ts, std::process::id(), &[tid]);
    drop((a, b));
}

#[test]
fn scenario_1_shutdown_half_close_ipv4() {
    half_close("127.0.0.1:0");
}

#[test]
fn scenario_1_shutdown_half_close_ipv6() {
    half_close("[::1]:0");
}

/// Scenario 2: A calls close(); B never closes.
#[test]
fn scenario_2_close_orphan() {
    let tracer = Tracer::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = pair(&listener);
    let (ap, bp) = (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    );
    let (afd, tid) = (fd(&a), gettid());
    drop(a);
    // Rarely (seen on an emulated guest) the peer's ACK reaches A while close() still owns it:
    // A then stays a full socket until the keepalive timer resets it, tcp_fin_timeout (60 s)
    // later, instead of becoming a time-wait mini-socket at once.
    let kept_full = orphan_kept_full(ap, bp);
    let all = tracer.stop_when_within(
        Duration::from_secs(if kept_full { 75 } else { 10 }),
        &[
            (ap, bp, "ESTABLISHED", "FIN_WAIT1"),
            (ap, bp, "FIN_WAIT1", "FIN_WAIT2"),
            (ap, bp, "FIN_WAIT2", "CLOSE"),
            (bp, ap, "ESTABLISHED", "CLOSE_WAIT"),
        ],
    );
    let ts = transitions(&all, ap, bp);

    let closed_by = if kept_full {
        vec![("ESTABLISHED", "FIN_WAIT1"), ("FIN_WAIT1", "FIN_WAIT2")]
    } else {
        vec![
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
            ("FIN_WAIT2", "CLOSE"),
        ]
    };
    for (from, to) in closed_by {
        let v = find(&ts, ap, from, to);
        let c = &v["cause"];
        assert_eq!(c["call"], "close", "{v}");
        assert!(c["how"].is_null(), "{v}");
        assert_eq!(c["pid"], std::process::id(), "{v}");
        assert_eq!(c["tid"], tid, "{v}");
        assert_eq!(c["fd"], afd, "{v}");
    }
    assert_eq!(find(&ts, ap, "FIN_WAIT1", "FIN_WAIT2")["orphan"], true);
    let gone = find(&ts, ap, "FIN_WAIT2", "CLOSE");
    if kept_full {
        assert_eq!(gone["cause"]["call"], "timer", "{gone}");
        assert!(gone.get("timewait_substate").is_none(), "{gone}");
    } else {
        // Default tcp_fin_timeout: handed at once to a time-wait mini-socket, substate FIN_WAIT2.
        assert_eq!(gone["timewait_substate"], "FIN_WAIT2", "{gone}");
    }
    let cw = find(&ts, bp, "ESTABLISHED", "CLOSE_WAIT");
    assert_eq!(cw["owner"]["fd"], fd(&b), "{cw}");
    assert_only_callers(&ts, std::process::id(), &[tid]);
}

/// Scenario 4: B closes 300 ms after entering CLOSE_WAIT, from another thread.
#[test]
fn scenario_4_close_wait_then_late_close() {
    let tracer = Tracer::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = pair(&listener);
    let (ap, bp) = (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    );
    let (bfd, a_tid) = (fd(&b), gettid());
    drop(a);
    let b_tid = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        let tid = gettid();
        drop(b);
        tid
    })
    .join()
    .unwrap();
    let all = tracer.stop_when(&[
        (bp, ap, "CLOSE_WAIT", "LAST_ACK"),
        (bp, ap, "LAST_ACK", "CLOSE"),
    ]);
    let ts = transitions(&all, ap, bp);

    let la = find(&ts, bp, "CLOSE_WAIT", "LAST_ACK");
    let c = &la["cause"];
    assert_eq!(c["call"], "close", "{la}");
    assert_eq!(c["pid"], std::process::id(), "{la}");
    assert_eq!(c["tid"], b_tid, "{la}");
    assert_eq!(c["fd"], bfd, "{la}");
    let waited = la["close_wait_ms"].as_f64().unwrap();
    assert!(
        (300.0..2000.0).contains(&waited),
        "CLOSE_WAIT lasted {waited} ms: {la}"
    );
    assert_eq!(la["owner"]["fd"], bfd, "{la}");
    // B's close delivered the FIN that A (an orphan in FIN_WAIT2) was waiting for. A's exit here
    // is the time-wait hand-over made at FIN_WAIT2 entry, caused by A's own close().
    let fin = find(&ts, bp, "LAST_ACK", "CLOSE");
    assert_eq!(fin["cause"]["tid"], b_tid, "{fin}");
    assert_only_callers(&ts, std::process::id(), &[a_tid, b_tid]);
}
