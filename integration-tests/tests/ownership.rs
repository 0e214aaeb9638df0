//! Owners from the kernel: each CLOSE_WAIT names the process and fd that hold the socket, from
//! the kernel's ownership record, with no full /proc scan (`owner_scans` stays 0). Run one at a
//! time: forked children inherit this process's fds.
// Test and bench crates share the package's dependencies (the library is where unused ones
// show); their drivers are long by nature.
#![allow(
    unused_crate_dependencies,
    clippy::too_many_lines,
    clippy::needless_pass_by_value
)]
mod common;

use std::{
    net::{TcpListener, TcpStream},
    os::{
        fd::{AsRawFd, IntoRawFd},
        unix::net::UnixStream,
    },
    process::Command,
    sync::Mutex,
};

use common::*;
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A pipe for a child to tell the parent a number (an fd it obtained).
fn pipe() -> (i32, i32) {
    let mut p = [0; 2];
    // SAFETY: valid out-array.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    (p[0], p[1])
}

fn send_i32(fd: i32, v: i32) {
    // SAFETY: writing 4 bytes from a local.
    unsafe { libc::write(fd, (&v as *const i32).cast(), 4) };
}

fn recv_i32(fd: i32) -> i32 {
    let mut v = -1i32;
    // SAFETY: reading 4 bytes into a local.
    assert_eq!(unsafe { libc::read(fd, (&mut v as *mut i32).cast(), 4) }, 4);
    v
}

/// The stats line, after checking that owners came from the kernel's record alone.
fn stats(all: &[Value]) -> &Value {
    let s = all.last().unwrap();
    assert_eq!(s["event"], "stats", "{s}");
    assert_eq!(s["owner_map_full"], 0, "{s}");
    s
}

fn assert_no_proc(all: &[Value]) {
    let s = stats(all);
    assert_eq!(s["owner_scans"], 0, "no full /proc scan: {s}");
    assert_eq!(s["owner_lookups_timed_out"], 0, "{s}");
}

/// Not even one process was checked in /proc: every owner came from the kernel's record.
fn assert_kernel_only(all: &[Value]) {
    assert_no_proc(all);
    assert_eq!(stats(all)["owners_verified"], 0, "{}", stats(all));
}

fn close_wait_owner(all: &[Value], lport: u16, rport: u16) -> Value {
    let ts = transitions(all, lport, rport);
    find(&ts, lport, "ESTABLISHED", "CLOSE_WAIT")["owner"].clone()
}

fn assert_owner(owner: &Value, pid: i32, fd: i32) {
    assert_eq!(
        (owner["pid"].as_i64(), owner["fd"].as_i64()),
        (Some(i64::from(pid)), Some(i64::from(fd))),
        "{owner}"
    );
}

/// A server process accepts and never closes; a client process connects and is never closed
/// by its owner: each CLOSE_WAIT names the process that accept()ed or connect()ed, not the one
/// whose FIN ran the transition.
#[test]
fn accepting_server_and_connecting_client() {
    accepting_server_and_connecting_client_with(&[]);
}

/// The same owners, with the kernel's hash maps preallocated as before Linux 6.1 (on later
/// kernels the default allocates their entries as they are written): both storages hold them.
#[test]
fn owners_hold_with_preallocated_maps() {
    accepting_server_and_connecting_client_with(&["--preallocate-maps"]);
    fd_passed_over_a_unix_socket_with(&["--preallocate-maps"]);
    socket_accepted_before_the_start_with(&["--preallocate-maps"]);
}

/// The tracer, started with `args` and `extra`, after checking how it says its maps are held.
fn tracer(args: &[&str], extra: &[&str]) -> Tracer {
    let all: Vec<&str> = args.iter().chain(extra).copied().collect();
    let tracer = Tracer::start(&all);
    let want = if extra.contains(&"--preallocate-maps") || kernel_before(6, 1) {
        "preallocated"
    } else {
        "by_need"
    };
    assert_eq!(tracer.start["maps"]["allocation"], want, "{}", tracer.start);
    tracer
}

fn accepting_server_and_connecting_client_with(extra: &[&str]) {
    let _g = serial();
    let tracer = tracer(&["--no-snapshot"], extra);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let lfd = listener.as_raw_fd();
    let (rd, wr) = pipe();
    // The server: accept4(), report the fd, hold it.
    let server = fork_child(move || {
        // SAFETY: raw syscalls in the child.
        let fd = unsafe { libc::accept4(lfd, std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        send_i32(wr, fd);
        sleep_ms(3000);
        0
    });
    let _s = ChildGuard(server);
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let server_fd = recv_i32(rd);
    let (cp, sp) = (
        client.local_addr().unwrap().port(),
        listener.local_addr().unwrap().port(),
    );
    drop(client);

    // The client: socket() + connect() in another child, to our listener; we close our side.
    let addr = listener.local_addr().unwrap();
    let client = fork_child(move || {
        // SAFETY: raw syscalls in the child.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: addr.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
                },
                sin_zero: [0; 8],
            };
            libc::connect(
                fd,
                (&sin as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            );
            send_i32(wr, fd);
        }
        sleep_ms(3000);
        0
    });
    let _c = ChildGuard(client);
    let client_fd = recv_i32(rd);
    let (accepted, peer) = listener.accept().unwrap();
    let client_port = peer.port();
    drop(accepted);

    let all = tracer.stop_when(&[
        (sp, cp, "ESTABLISHED", "CLOSE_WAIT"),
        (client_port, sp, "ESTABLISHED", "CLOSE_WAIT"),
    ]);
    assert_owner(&close_wait_owner(&all, sp, cp), server, server_fd);
    assert_owner(&close_wait_owner(&all, client_port, sp), client, client_fd);
    assert_kernel_only(&all);
    assert_map_memory(stats(&all), extra);
}

/// Each map's memory is reported; allocated by need on a host of few sockets, all of them
/// take under 8 MiB (preallocated, the ownership map alone took 32 MiB before it was sized
/// from the host).
fn assert_map_memory(s: &Value, extra: &[&str]) {
    let maps = s["bpf_map_bytes"].as_object().expect("bpf_map_bytes");
    for name in ["OWNERS", "EVENTS", "IN_CALL", "COUNTERS"] {
        assert!(
            maps.get(name)
                .and_then(Value::as_u64)
                .is_some_and(|b| b > 0),
            "{name}: {s}"
        );
    }
    let total: u64 = maps.values().filter_map(Value::as_u64).sum();
    let sockets = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    if !extra.contains(&"--preallocate-maps") && !kernel_before(6, 1) {
        assert!(total < 8 << 20, "{total} bytes of maps; {sockets}: {s}");
    }
}

/// The client's FIN arrives before the server has accept()ed: the CLOSE_WAIT happens in the
/// accept queue, with no holder yet. It names the process and fd that accept() it later.
#[test]
fn close_wait_before_accept_names_the_acceptor() {
    let _g = serial();
    let tracer = Tracer::start(&["--no-snapshot"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let cp = client.local_addr().unwrap().port();
    let sp = listener.local_addr().unwrap().port();
    drop(client);
    wait_for_kernel_state(sp, cp, "CLOSE_WAIT");
    sleep_ms(300);
    let (server, _) = listener.accept().unwrap();
    let all = tracer.stop_when(&[(sp, cp, "ESTABLISHED", "CLOSE_WAIT")]);
    let cw = find(&transitions(&all, sp, cp), sp, "ESTABLISHED", "CLOSE_WAIT").clone();
    assert!(
        cw["inode"].is_null(),
        "no socket file before accept(): {cw}"
    );
    assert_owner(&cw["owner"], std::process::id() as i32, server.as_raw_fd());
    assert_no_proc(&all);
}

/// inetd-style: the parent accepts, forks a worker for the connection and closes its copy (no
/// FIN: the worker holds it). The kernel's record named the parent, which closed its fd: the
/// worker is found among its children by one link, not by a scan.
#[test]
fn forked_worker_after_the_parent_closes_its_copy() {
    let _g = serial();
    let tracer = Tracer::start(&["--no-snapshot"]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (client, server) = pair(&listener);
    let (cp, sp) = ports(&client, &server);
    let (sfd, cfd) = (server.into_raw_fd(), client.as_raw_fd());
    let (rd, wr) = pipe();
    // The worker keeps only the accepted socket.
    let worker = fork_child(move || {
        close_fd(cfd);
        send_i32(wr, 0);
        sleep_ms(3000);
        0
    });
    let _w = ChildGuard(worker);
    recv_i32(rd);
    close_fd(sfd);
    drop(client);
    let all = tracer.stop_when(&[(sp, cp, "ESTABLISHED", "CLOSE_WAIT")]);
    assert_owner(&close_wait_owner(&all, sp, cp), worker, sfd);
    let no_fin: Vec<&Value> = all
        .iter()
        .filter(|v| v["event"] == "close_no_fin" && v["fd"] == sfd)
        .collect();
    assert_eq!(no_fin.len(), 1, "{all:#?}");
    assert_eq!(no_fin[0]["holders"][0]["pid"], worker, "{}", no_fin[0]);
    assert_no_proc(&all);
}

/// An accepted socket passed to another process over a unix socket (SCM_RIGHTS), then closed by
/// the sender: the receiver, with the fd number it received, from the kernel's record.
#[test]
fn fd_passed_over_a_unix_socket() {
    fd_passed_over_a_unix_socket_with(&[]);
}

fn fd_passed_over_a_unix_socket_with(extra: &[&str]) {
    let _g = serial();
    let tracer = tracer(&["--no-snapshot"], extra);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (ufd, their_fd) = (ours.as_raw_fd(), theirs.into_raw_fd());
    // The receiver is forked before the TCP sockets exist: it holds only what it receives.
    let receiver = fork_child(move || {
        // Only its own end: if this test dies, the receive sees EOF and the child exits.
        close_fd(ufd);
        let fd = recv_fd(their_fd);
        send_i32(their_fd, fd);
        sleep_ms(3000);
        0
    });
    let _r = ChildGuard(receiver);
    close_fd(their_fd);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (client, server) = pair(&listener);
    let (cp, sp) = ports(&client, &server);
    send_fd(ufd, server.as_raw_fd());
    let received = recv_i32(ufd);
    drop(server);
    drop(client);
    let all = tracer.stop_when(&[(sp, cp, "ESTABLISHED", "CLOSE_WAIT")]);
    assert_owner(&close_wait_owner(&all, sp, cp), receiver, received);
    assert_kernel_only(&all);
}

/// A socket accepted before finwait started: its owner comes from the start-up snapshot, seeded
/// into the kernel's record.
#[test]
fn socket_accepted_before_the_start() {
    socket_accepted_before_the_start_with(&[]);
}

fn socket_accepted_before_the_start_with(extra: &[&str]) {
    let _g = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (client, server) = pair(&listener);
    let (cp, sp) = ports(&client, &server);
    let tracer = tracer(&[], extra);
    drop(client);
    let all = tracer.stop_when(&[(sp, cp, "ESTABLISHED", "CLOSE_WAIT")]);
    assert_owner(
        &close_wait_owner(&all, sp, cp),
        std::process::id() as i32,
        server.as_raw_fd(),
    );
    assert_no_proc(&all);
    drop(server);
}

/// A full ownership map is counted, and the owners it could not hold come from /proc: right,
/// never a wrong owner.
#[test]
fn full_ownership_map_is_counted_and_falls_back_to_proc() {
    let _g = serial();
    let tracer = tracer(&["--no-snapshot", "--owner-map-entries", "1"], &[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let pairs: Vec<_> = (0..4).map(|_| pair(&listener)).collect();
    let mut expect = Vec::new();
    let mut servers = Vec::new();
    for (client, server) in pairs {
        let (cp, sp) = ports(&client, &server);
        expect.push((sp, cp, server.as_raw_fd()));
        servers.push(server);
        drop(client);
    }
    let wanted: Vec<_> = expect
        .iter()
        .map(|&(sp, cp, _)| (sp, cp, "ESTABLISHED", "CLOSE_WAIT"))
        .collect();
    let all = tracer.stop_when(&wanted);
    for &(sp, cp, fd) in &expect {
        assert_owner(
            &close_wait_owner(&all, sp, cp),
            std::process::id() as i32,
            fd,
        );
    }
    let s = all.last().unwrap();
    assert!(s["owner_map_full"].as_u64().unwrap() > 0, "{s}");
    assert!(s["owner_scans"].as_u64().unwrap() > 0, "{s}");
    drop(servers);
}

/// `--pid` of a process that makes no connections: other processes' transitions, softirq ones
/// included, stay in the kernel.
#[test]
fn pid_filter_keeps_other_processes_transitions_in_the_kernel() {
    let _g = serial();
    let mut idle = Command::new("sleep").arg("30").spawn().unwrap();
    let idle_pid = idle.id().to_string();
    let tracer = Tracer::start(&["--no-snapshot", "--pid", &idle_pid]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    for _ in 0..50 {
        let (client, server) = pair(&listener);
        client.shutdown(std::net::Shutdown::Write).unwrap();
        drop(client);
        drop(server);
    }
    // Let the last FINs and ACKs run.
    sleep_ms(300);
    let all = tracer.stop_when(&[]);
    let s = all.last().unwrap();
    // 50 connections make about 300 close-path records unfiltered; a few unrelated ones
    // (sockets of processes the kernel has no owner for) may still pass.
    assert!(s["records"].as_u64().unwrap() < 5, "{s}");
    let _ = idle.kill();
    let _ = idle.wait();
}

/// A control-message buffer aligned for `cmsghdr`.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// A one-byte message whose control buffer is `control` (raw parts: used in forked children).
/// SAFETY: the pointers in the result refer to the three arguments, which must outlive it.
unsafe fn one_byte_msg(
    byte: &mut u8,
    iov: &mut libc::iovec,
    control: &mut Control,
) -> libc::msghdr {
    *iov = libc::iovec {
        iov_base: (byte as *mut u8).cast(),
        iov_len: 1,
    };
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len();
    msg
}

fn send_fd(sock: i32, fd: i32) {
    let (mut byte, mut control) = (0u8, Control([0; 64]));
    let mut iov = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    // SAFETY: the buffers live until sendmsg returns; one SCM_RIGHTS control message.
    unsafe {
        let mut msg = one_byte_msg(&mut byte, &mut iov, &mut control);
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
        assert_eq!(libc::sendmsg(sock, &msg, 0), 1);
    }
}

/// Receives one fd (raw calls only: it runs in a forked child).
fn recv_fd(sock: i32) -> i32 {
    let (mut byte, mut control) = (0u8, Control([0; 64]));
    let mut iov = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    // SAFETY: the buffers live until recvmsg returns and the control message is read.
    unsafe {
        let mut msg = one_byte_msg(&mut byte, &mut iov, &mut control);
        if libc::recvmsg(sock, &mut msg, 0) != 1 {
            return -1;
        }
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() {
            return -1;
        }
        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>())
    }
}
