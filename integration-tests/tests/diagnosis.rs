//! Why a CLOSE_WAIT is still open, live: `--stuck` reports say what the owner did with the
//! peer's FIN (Recv-Q of that one socket), whether it still polls the fd and what its threads
//! do; the summary splits each process's CLOSE_WAIT the same way.
// Test and bench crates share the package's dependencies (the library is where unused ones
// show); their drivers are long by nature.
#![allow(
    unused_crate_dependencies,
    clippy::too_many_lines,
    clippy::needless_pass_by_value
)]
mod common;

use std::{
    io::Read,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::Mutex,
    time::Duration,
};

use common::*;
use serde_json::Value;

/// Tests here fork: one at a time (a child inherits every fd of this process).
static SERIAL: Mutex<()> = Mutex::new(());

fn stuck_of(all: &[Value], lport: u16, rport: u16) -> Value {
    all.iter()
        .find(|v| v["event"] == "stuck" && v["lport"] == lport && v["rport"] == rport)
        .unwrap_or_else(|| panic!("no stuck report for {lport} > {rport}: {all:?}"))
        .clone()
}

fn process(all: &[Value], pid: u32) -> Value {
    let summary = all.iter().find(|v| v["event"] == "summary").unwrap();
    summary["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("no summary line for {pid}: {summary}"))
        .clone()
}

/// Owners that read the EOF and keep the socket, never read after the FIN, leave 5 bytes
/// unread, keep the fd in epoll, or drop it from epoll: each `--stuck` report and the summary
/// say which.
#[test]
fn stuck_reports_say_whether_the_owner_read_the_fin() {
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let me = std::process::id();
    let tracer = Tracer::start(&["--no-snapshot", "--stuck", "0.5", "--pid", &me.to_string()]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (eof_c, mut eof_s) = pair(&listener);
    let (never_c, never_s) = pair(&listener);
    let (data_c, data_s) = pair(&listener);
    let (polled_c, polled_s) = pair(&listener);
    let (forgot_c, forgot_s) = pair(&listener);
    let ep = Epoll::new();
    ep.add(&polled_s, libc::EPOLLIN);
    ep.add(&forgot_s, libc::EPOLLIN);
    ep.remove(&forgot_s);
    std::io::Write::write_all(&mut &data_c, b"hello").unwrap();
    let keys = [&eof_c, &never_c, &data_c, &polled_c, &forgot_c].map(|c| {
        (
            c.peer_addr().unwrap().port(),
            c.local_addr().unwrap().port(),
        )
    });
    // The EOF is read at once, well before the --stuck threshold; then one close at a time
    // (see the IMAP test below).
    drop(eof_c);
    eof_s
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 8];
    while eof_s.read(&mut buf).unwrap() > 0 {}
    for c in [never_c, data_c, polled_c, forgot_c] {
        drop(c);
        sleep_ms(100);
    }
    // Past the --stuck threshold.
    sleep_ms(1500);
    let expect: Vec<_> = keys
        .iter()
        .map(|(l, r)| (*l, *r, "ESTABLISHED", "CLOSE_WAIT"))
        .collect();
    let all = tracer.stop_when(&expect);
    let eof = stuck_of(&all, keys[0].0, keys[0].1);
    assert_eq!(
        eof["owner_state"]["diagnosis"], "read_eof_not_closed",
        "{eof}"
    );
    assert_eq!(eof["fd"], eof_s.as_raw_fd(), "{eof}");
    let never = stuck_of(&all, keys[1].0, keys[1].1);
    assert_eq!(never["owner_state"]["diagnosis"], "fin_not_read", "{never}");
    assert_eq!(never["fd"], never_s.as_raw_fd(), "{never}");
    let data = stuck_of(&all, keys[2].0, keys[2].1);
    assert_eq!(data["owner_state"]["diagnosis"], "fin_not_read", "{data}");
    assert_eq!(data["owner_state"]["unread_bytes"], 5, "{data}");
    let polled = stuck_of(&all, keys[3].0, keys[3].1);
    assert_eq!(
        polled["owner_state"]["epoll"]["registered"], true,
        "{polled}"
    );
    let forgot = stuck_of(&all, keys[4].0, keys[4].1);
    assert_eq!(
        forgot["owner_state"]["epoll"]["registered"], false,
        "{forgot}"
    );
    let mine = process(&all, me);
    assert_eq!(mine["close_wait_readings"]["fin_not_read"], 4, "{mine}");
    assert_eq!(
        mine["close_wait_readings"]["read_eof_not_closed"], 1,
        "{mine}"
    );
    drop((eof_s, never_s, data_s, polled_s, forgot_s));
    drop(ep);
}

/// The nginx mailing-list case: an IMAP back-end behind a proxy. The back-end greets each
/// connection, then its only thread blocks elsewhere (a futex) and never reads again; the proxy
/// closes its upstream connections. Every back-end socket is in CLOSE_WAIT with Recv-Q 1:
/// finwait names the back-end and says it never read the peer's FIN, and where its thread is.
#[test]
fn imap_backend_behind_a_proxy_never_reads_the_fin() {
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let me = std::process::id();
    let tracer = Tracer::start(&["--no-snapshot", "--stuck", "0.5", "--pid", &me.to_string()]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let lfd = listener.as_raw_fd();
    const CONNECTIONS: usize = 3;
    let backend = fork_child(move || {
        const GREETING: &[u8] = b"* OK IMAP4rev1 ready\r\n";
        for _ in 0..CONNECTIONS {
            // SAFETY: raw calls on the inherited listener; the accepted fds are kept open.
            unsafe {
                let fd = libc::accept(lfd, std::ptr::null_mut(), std::ptr::null_mut());
                libc::write(fd, GREETING.as_ptr().cast(), GREETING.len());
            }
        }
        // Stuck elsewhere: never reads its connections again.
        let word = 0u32;
        loop {
            // SAFETY: waits on a word nobody changes.
            unsafe { libc::syscall(libc::SYS_futex, &word, libc::FUTEX_WAIT, 0, 0usize) };
        }
    });
    let _child = ChildGuard(backend);
    // The proxy: connect upstream, read the greeting, then close (its client went away).
    let mut keys = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut up = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        up.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut greeting = [0u8; 22];
        up.read_exact(&mut greeting).unwrap();
        assert!(greeting.starts_with(b"* OK"));
        keys.push((
            up.peer_addr().unwrap().port(),
            up.local_addr().unwrap().port(),
        ));
        drop(up);
        // One close at a time: back-to-back closes on one CPU can nest the state hook in a
        // softirq, which the kernel skips (counted; this test is about the diagnosis).
        sleep_ms(100);
    }
    sleep_ms(1500);
    let expect: Vec<_> = keys
        .iter()
        .map(|(l, r)| (*l, *r, "ESTABLISHED", "CLOSE_WAIT"))
        .collect();
    let all = tracer.stop_when(&expect);
    for (l, r) in &keys {
        let s = stuck_of(&all, *l, *r);
        assert_eq!(s["pid"], backend, "the back-end holds it: {s}");
        let o = &s["owner_state"];
        assert_eq!(o["diagnosis"], "fin_not_read", "{s}");
        assert_eq!(
            (o["fin_read"].clone(), o["unread_bytes"].clone()),
            (false.into(), 0.into())
        );
        assert_eq!(o["threads"]["waiting"]["futex()"], 1, "{s}");
        assert!(
            o["answer"]
                .as_str()
                .unwrap()
                .starts_with("it never read the peer's FIN: it is not reading this socket"),
            "{s}"
        );
    }
    let b = process(&all, backend as u32);
    assert_eq!(b["close_wait"], CONNECTIONS, "{b}");
    assert_eq!(b["close_wait_readings"]["fin_not_read"], CONNECTIONS, "{b}");
    assert!(
        b["answer"]
            .as_str()
            .unwrap()
            .contains("3 never read the peer's FIN: not reading these sockets"),
        "{b}"
    );
}
