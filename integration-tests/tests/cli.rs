//! The command line as an operator meets it: errors, the summary's numbers, hostile names.
// Test and bench crates share the package's dependencies (the library is where unused ones
// show); their drivers are long by nature.
#![allow(
    unused_crate_dependencies,
    clippy::too_many_lines,
    clippy::needless_pass_by_value
)]
mod common;

use std::{
    net::{Shutdown, TcpListener},
    os::fd::AsRawFd,
    process::Command,
    sync::Mutex,
};

use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn trace(args: &[&str]) -> std::process::Output {
    Command::new(finwait_trace()).args(args).output().unwrap()
}

/// Starts the tracer with piped output and returns once it printed its first line (programs
/// attached): a fixed sleep is too short on a slow machine or an emulated kernel.
fn spawn_attached(args: &[&str]) -> (std::process::Child, String) {
    use std::io::Read;
    let mut child = Command::new(finwait_trace())
        .args(mode_args(args))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = Vec::new();
    let stdout = child.stdout.as_mut().unwrap();
    let mut byte = [0u8];
    while stdout.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        first.push(byte[0]);
    }
    (child, String::from_utf8_lossy(&first).into_owned())
}

#[test]
fn clear_errors_with_the_fix() {
    // Not root: the capabilities are named (setpriv drops to nobody), and the demo, which
    // starts its workload first, ends it and fails as promptly.
    for args in [&["--duration", "1"][..], &["--demo"]] {
        let child = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(finwait_trace())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("setpriv (util-linux)");
        let out = output_within(child, std::time::Duration::from_secs(20));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("CAP_BPF") && err.contains("CAP_PERFMON"),
            "{args:?}: {err}"
        );
    }

    let out = trace(&["--pid", "999999999", "--duration", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pid 999999999: no such process"));

    // A thread id (as `top -H` shows) is not a process: the error names the process.
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        tid_tx.send(gettid()).unwrap();
        let _ = done_rx.recv();
    });
    let tid = tid_rx.recv().unwrap();
    let out = trace(&["--pid", &tid.to_string(), "--duration", "1"]);
    drop(done_tx);
    thread.join().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let pid = std::process::id();
    assert!(
        err.contains(&format!(
            "--pid {tid} is a thread of process {pid}: pass --pid {pid}"
        )),
        "{err}"
    );

    for bad in [
        &["--state", "HALF_OPEN"][..],
        &["-4", "-6"],
        &["--duration", "0"],
        &["--demo", "--pid", "1"],
        &["--comm", "name-longer-than-15"],
        &[
            "--comm", "a", "--comm", "b", "--comm", "c", "--comm", "d", "--comm", "e",
        ],
    ] {
        let out = trace(bad);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{bad:?} should be a usage error"
        );
    }
}

/// Every numeric flag, fed extremes: a usage error (exit 2) that names the flag's bounds, never a
/// panic (exit 101) or a run that burns a core.
#[test]
fn extreme_flag_values_are_usage_errors() {
    let extremes = [
        "1e300",
        "-1",
        "1e-9",
        "0",
        "NaN",
        "inf",
        "-inf",
        "18446744073709551616",
        "",
        " ",
    ];
    let flags = ["--duration", "--stuck", "--stats-every"];
    for flag in flags {
        for v in extremes {
            let out = trace(&[flag, v]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{flag} {v:?}: {err}");
            assert!(
                err.contains("is not a number of seconds between"),
                "{flag} {v:?}: {err}"
            );
            assert!(!err.contains("panicked"), "{flag} {v:?}: {err}");
        }
    }
    let integers = [
        (
            "--ring-buffer-kib",
            &["0", "3", "5", "4294967296", "-4", "1e3"][..],
        ),
        (
            "--owner-map-entries",
            &["0", "16777217", "4294967295", "-1"],
        ),
        ("--port", &["0x50", "65536", "-1", "1e300"]),
        ("--pid", &["4294967296", "-1", "1e300"]),
        ("--netns", &["18446744073709551616", "-1"]),
    ];
    for (flag, values) in integers {
        for v in values {
            let out = trace(&[flag, v]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{flag} {v:?}: {err}");
            assert!(!err.contains("panicked"), "{flag} {v:?}: {err}");
        }
    }
    let out = trace(&[
        "--metrics",
        "127.0.0.1:9977",
        "--metrics-max-workloads",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// Three half-closes (one closed later) and two closes by this process, five CLOSE_WAITs on its
/// server side of which one is closed: the summary says exactly that.
#[test]
fn summary_counts_after_a_scripted_scenario() {
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let lp = listener.local_addr().unwrap().port();
    let tracer = Tracer::start(&["--port", &lp.to_string(), "--summary-only"]);
    let mut keep = Vec::new();
    let mut expect = Vec::new();
    for i in 0..5 {
        let (a, b) = pair(&listener);
        let (ap, bp) = ports(&a, &b);
        expect.push((bp, ap, "ESTABLISHED", "CLOSE_WAIT"));
        if i < 3 {
            a.shutdown(Shutdown::Write).unwrap();
            keep.push(a);
        }
        keep.push(b);
    }
    let closed = keep.pop().unwrap(); // the last server socket
    let (cp, cr) = (
        closed.local_addr().unwrap().port(),
        closed.peer_addr().unwrap().port(),
    );
    expect.push((cp, cr, "CLOSE_WAIT", "LAST_ACK"));
    drop(closed);
    // The first half-closed socket is closed once in FIN_WAIT2: it ended, the other two did not.
    let first = keep.remove(0);
    let (fp, fr) = (
        first.local_addr().unwrap().port(),
        first.peer_addr().unwrap().port(),
    );
    wait_for_kernel_state(fp, fr, "FIN_WAIT2");
    drop(first);
    let all = tracer.stop_when_summary(&expect);
    assert!(
        all.iter().all(|v| v["event"] != "transition"),
        "--summary-only prints no transitions"
    );
    let summary = all
        .iter()
        .find(|v| v["event"] == "summary")
        .expect("a summary");
    let me = summary["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == std::process::id())
        .expect("this process");
    assert_eq!(me["fin_wait2_half_closed"]["shutdown(SHUT_WR)"], 3, "{me}");
    assert_eq!(
        me["fin_wait2_half_closed_ended"]["shutdown(SHUT_WR)"], 1,
        "{me}"
    );
    assert_eq!(me["fin_wait2_orphaned"]["close()"], 2, "{me}");
    assert_eq!(
        (me["close_wait"].as_u64(), me["close_wait_closed"].as_u64()),
        (Some(5), Some(1)),
        "{me}"
    );
    let answer = me["answer"].as_str().unwrap();
    assert!(
        answer
            .contains("3 FIN_WAIT2 after shutdown(SHUT_WR), 1 ended later, 2 still half-closed: ")
            && answer.contains("4 never closed while traced"),
        "{answer}"
    );
    drop(keep);
}

/// The tracer's output (with `args`) while a process named `name` (its main thread's name, set
/// after fork) shuts a connection down, then exits holding it.
fn shutdown_by_a_process_named(name: &'static std::ffi::CStr, args: &[&str]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let lp = listener.local_addr().unwrap().port();
    let port = lp.to_string();
    let mut all = vec!["--port", &port, "--no-snapshot"];
    all.extend_from_slice(args);
    let (child, _) = spawn_attached(&all);
    let (a, b) = pair(&listener);
    let sock = a.as_raw_fd();
    let hostile = fork_child(move || {
        // SAFETY: raw calls in the child: renames its only (main) thread, so the process.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, name.as_ptr());
            libc::shutdown(sock, libc::SHUT_WR);
        }
        sleep_ms(500);
        0
    });
    drop(a);
    wait_child(hostile);
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(b);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process that names itself with a terminal escape and a newline cannot forge output.
#[test]
fn hostile_process_names_are_escaped() {
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let text = shutdown_by_a_process_named(c"\x1b[2Jevil\nFAKE", &[]);
    assert!(
        !text.contains('\x1b'),
        "a raw escape reached the terminal: {text:?}"
    );
    assert!(text.contains("\\u{1b}[2Jevil\\nFAKE"), "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("FAKE")),
        "a forged line: {text}"
    );
}

/// A name with a bidirectional override, an invisible character, a line separator and a
/// backslash: each JSON line stays one valid line (a splitter at U+2028 cannot cut it), the
/// characters are JSON `\u` escapes in the bytes, never raw, and a JSON reader gets the name.
#[test]
fn names_cannot_reorder_hide_or_split_a_line() {
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let text = shutdown_by_a_process_named(c"a\u{202e}b\u{200b}\u{2028}\\e", &["--json"]);
    for raw in ['\u{202e}', '\u{200b}', '\u{2028}'] {
        assert!(
            !text.contains(raw),
            "{raw:?} reached the output raw: {text:?}"
        );
    }
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not one JSON line ({e}): {line:?}"));
    }
    // JSON's own escapes in the bytes; the name itself to a JSON reader.
    assert!(text.contains(r#""a\u202eb\u200b\u2028\\e""#), "{text}");
    let name = "a\u{202e}b\u{200b}\u{2028}\\e";
    let named = text.lines().any(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .is_ok_and(|v| v["event"] == "transition" && v["cause"]["comm"].as_str() == Some(name))
    });
    assert!(named, "the name is missing: {text}");
}

/// A thread that names itself after another program does not rename its process: the call,
/// the STUCK report and the summary name the process by its main thread (`/proc/PID/comm`), and
/// the thread's name is said as the thread's.
#[test]
fn a_thread_cannot_relabel_its_process() {
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let process = std::fs::read_to_string("/proc/self/comm").unwrap();
    let process = process.trim_end();
    assert_ne!(process, "nginx");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let lp = listener.local_addr().unwrap().port();
    let tracer = Tracer::start(&["--port", &lp.to_string(), "--stuck", "1", "--no-snapshot"]);
    let (a, b) = std::thread::spawn(move || {
        // SAFETY: renames this thread only.
        unsafe { libc::prctl(libc::PR_SET_NAME, c"nginx".as_ptr()) };
        let (a, b) = pair(&listener);
        a.shutdown(Shutdown::Write).unwrap();
        (a, b)
    })
    .join()
    .unwrap();
    let all = tracer.read_until(std::time::Duration::from_secs(30), |v| {
        v["event"] == "stuck"
    });
    assert_losses_owned_up_to(all.last().unwrap());
    drop((a, b));
    let shutdown = all
        .iter()
        .find(|v| v["event"] == "transition" && v["cause"]["call"] == "shutdown")
        .unwrap_or_else(|| panic!("no shutdown: {all:#?}"));
    assert_eq!(shutdown["cause"]["comm"], process, "{shutdown}");
    assert_eq!(shutdown["cause"]["thread_comm"], "nginx", "{shutdown}");
    let stuck = all
        .iter()
        .find(|v| v["event"] == "stuck")
        .unwrap_or_else(|| panic!("no stuck report: {all:#?}"));
    assert_eq!(stuck["comm"], process, "{stuck}");
    let text: String = all.iter().map(|v| format!("{v}\n")).collect();
    assert!(
        !text.contains(r#""comm":"nginx""#),
        "the thread's name named the process: {text}"
    );
}

/// `--stuck 1`: a half-closed socket and two CLOSE_WAIT sockets still open after a second are
/// each reported once, with the process and fd that must close them.
#[test]
fn stuck_sockets_are_reported_once() {
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let lp = listener.local_addr().unwrap().port();
    let tracer = Tracer::start(&["--port", &lp.to_string(), "--stuck", "1"]);
    let (a1, b1) = pair(&listener);
    a1.shutdown(Shutdown::Write).unwrap();
    let (a2, b2) = pair(&listener);
    let (p1, p2) = (
        a1.local_addr().unwrap().port(),
        a2.local_addr().unwrap().port(),
    );
    drop(a2);
    // Until the three reports (a loaded machine may take a while), then 1.5 s more: once each.
    let mut seen = 0;
    let all = tracer.read_until(std::time::Duration::from_secs(30), |v| {
        seen += usize::from(v["event"] == "stuck");
        if seen == 3 {
            std::thread::sleep(std::time::Duration::from_millis(1500));
        }
        seen == 3
    });
    assert_losses_owned_up_to(all.last().unwrap());
    let stuck: Vec<_> = all.iter().filter(|v| v["event"] == "stuck").collect();
    assert_eq!(stuck.len(), 3, "{stuck:#?}");
    let me = std::process::id();
    let find = |lport: u16, state: &str| {
        stuck
            .iter()
            .find(|v| v["lport"] == lport && v["state"] == state)
            .unwrap_or_else(|| panic!("no {state} on {lport}: {stuck:#?}"))
    };
    let half = find(p1, "FIN_WAIT2 after shutdown(SHUT_WR)");
    assert_eq!(
        (half["pid"].as_u64(), half["fd"].as_i64()),
        (Some(u64::from(me)), Some(fd(&a1))),
        "{half}"
    );
    for (b, peer) in [(&b1, p1), (&b2, p2)] {
        let cw = stuck
            .iter()
            .find(|v| v["rport"] == peer && v["state"] == "CLOSE_WAIT")
            .expect("CLOSE_WAIT stuck");
        assert_eq!(
            (cw["pid"].as_u64(), cw["fd"].as_i64()),
            (Some(u64::from(me)), Some(fd(b))),
            "{cw}"
        );
        assert!(cw["stuck_s"].as_f64().unwrap() >= 1.0, "{cw}");
    }
    let summary = all.iter().find(|v| v["event"] == "summary").unwrap();
    assert_eq!(summary["stuck_reported"], 3, "{summary}");
    drop((a1, b1, b2));
}

/// A client pool's leak of 600 CLOSE_WAIT sockets to one server reads as one STUCK line (its
/// count, fds and peer, one explanation), timestamped; another process's socket is its own.
#[test]
fn stuck_sockets_of_one_leak_are_one_line() {
    const N: usize = 600;
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut go = [0i32; 2];
    // SAFETY: a valid array of two fds.
    assert_eq!(unsafe { libc::pipe(go.as_mut_ptr()) }, 0);
    let (go_r, go_w) = (go[0], go[1]);
    let pool = fork_child(move || {
        close_inherited_fds(&[go_r]);
        // SAFETY: raw calls in the child: wait for the word, then open N connections and
        // never read them.
        unsafe {
            let mut b = [0u8; 1];
            libc::read(go_r, b.as_mut_ptr().cast(), 1);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as u16;
            addr.sin_port = port.to_be();
            addr.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
            let len = size_of::<libc::sockaddr_in>() as u32;
            for _ in 0..N {
                let c = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if c < 0 || libc::connect(c, (&raw const addr).cast(), len) != 0 {
                    return 1;
                }
            }
            libc::sleep(120);
        }
        0
    });
    let _reap = ChildGuard(pool);
    close_fd(go_r);
    // SAFETY: one byte to our own pipe.
    unsafe { libc::write(go_w, [1u8].as_ptr().cast(), 1) };
    let accepted: Vec<_> = (0..N).map(|_| listener.accept().unwrap().0).collect();
    let peers: Vec<u16> = accepted
        .iter()
        .map(|s| s.peer_addr().unwrap().port())
        .collect();
    drop(accepted);
    // The last one closed is the last to get there.
    wait_for_kernel_state(peers[N - 1], port, "CLOSE_WAIT");
    // An operator arriving mid-incident: the leak is there before the tracer starts, and one
    // check after the threshold finds all of it (sockets that went stuck over a spread of time
    // would be found over several checks, a line each).
    let (child, _) = spawn_attached(&["--pid", &pool.to_string(), "--stuck", "1"]);
    std::thread::sleep(std::time::Duration::from_millis(3000));
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let stuck: Vec<&str> = text.lines().filter(|l| l.contains(" STUCK ")).collect();
    assert_eq!(stuck.len(), 1, "one line for the one leak: {text}");
    let line = stuck[0];
    assert!(
        line.contains(&format!(
            "STUCK {N} sockets to 127.0.0.1:{port} CLOSE_WAIT held by "
        )) && line.contains(&format!("[{pool}] fds "))
            && line.contains("must close them"),
        "{line}"
    );
    assert_eq!(line.matches("must close").count(), 1, "said once: {line}");
    // Timestamped like the other lines: seconds since start.
    let time = line.split_whitespace().next().unwrap();
    assert!(time.parse::<f64>().is_ok(), "{line}");
    close_fd(go_w);
}

/// `--needs-action` hides exactly what the kernel frees by itself: live, the orphan's
/// transitions go and the half-closed and CLOSE_WAIT sockets' stay; in a snapshot, the orphan
/// goes and the three sockets a process must close stay.
#[test]
fn needs_action_hides_exactly_what_the_kernel_frees() {
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let lp = listener.local_addr().unwrap().port();
    let tracer = Tracer::start(&["--port", &lp.to_string(), "--needs-action", "--no-snapshot"]);
    let (half, b1) = pair(&listener);
    half.shutdown(Shutdown::Write).unwrap();
    let (orphan, b2) = pair(&listener);
    let (hp, op) = (
        half.local_addr().unwrap().port(),
        orphan.local_addr().unwrap().port(),
    );
    drop(orphan);
    for p in [hp, op] {
        wait_for_kernel_state(p, lp, "FIN_WAIT2");
    }
    let all = tracer.stop_when(&[
        (hp, lp, "FIN_WAIT1", "FIN_WAIT2"),
        (lp, hp, "ESTABLISHED", "CLOSE_WAIT"),
        (lp, op, "ESTABLISHED", "CLOSE_WAIT"),
    ]);
    let shown: Vec<&serde_json::Value> =
        all.iter().filter(|v| v["event"] == "transition").collect();
    assert!(
        shown.iter().all(|v| v["lport"] != op),
        "an orphan's transition shown: {shown:#?}"
    );
    assert!(
        shown.iter().all(|v| v["verdict"] == "application_must_close"
            || v["verdict"] == "owner_must_close"),
        "{shown:#?}"
    );
    assert!(shown.iter().any(|v| v["lport"] == hp), "{shown:#?}");

    let classes = |args: &[&str]| {
        let mut c: Vec<(u64, String)> = snapshot(args)
            .iter()
            .filter(|v| v["event"] == "snapshot")
            .map(|v| {
                (
                    v["lport"].as_u64().unwrap(),
                    v["class"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        c.sort();
        c
    };
    let port = lp.to_string();
    let all = classes(&["--port", &port]);
    let acted = classes(&["--port", &port, "--needs-action"]);
    let mut want = vec![
        (u64::from(hp), "fin_wait2_half_closed".to_string()),
        (u64::from(lp), "close_wait".to_string()),
        (u64::from(lp), "close_wait".to_string()),
    ];
    want.sort();
    assert_eq!(acted, want, "all: {all:?}");
    assert!(
        all.contains(&(u64::from(op), "fin_wait2_orphaned".to_string())),
        "{all:?}"
    );
    drop((half, b1, b2));
}

/// A process is named by its command line too, and its leak by where it goes: the live summary
/// and the snapshot give both (three CLOSE_WAIT to one server: `3 to 127.0.0.1:PORT`).
#[test]
fn processes_are_named_by_command_line_and_leaks_by_peer() {
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut go = [0i32; 2];
    // SAFETY: a valid array of two fds.
    assert_eq!(unsafe { libc::pipe(go.as_mut_ptr()) }, 0);
    let (go_r, go_w) = (go[0], go[1]);
    let leaker = fork_child(move || {
        close_inherited_fds(&[go_r]);
        // SAFETY: raw calls in the child: three connections, never read.
        unsafe {
            let mut b = [0u8; 1];
            libc::read(go_r, b.as_mut_ptr().cast(), 1);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as u16;
            addr.sin_port = port.to_be();
            addr.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
            for _ in 0..3 {
                let c = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                libc::connect(
                    c,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                );
            }
            libc::sleep(30);
        }
        0
    });
    let _reap = ChildGuard(leaker);
    close_fd(go_r);
    let program = std::env::current_exe().unwrap();
    let program = program.file_name().unwrap().to_string_lossy().into_owned();
    let tracer = Tracer::start(&[
        "--pid",
        &leaker.to_string(),
        "--summary-only",
        "--no-snapshot",
    ]);
    // SAFETY: one byte to our own pipe.
    unsafe { libc::write(go_w, [1u8].as_ptr().cast(), 1) };
    let accepted: Vec<_> = (0..3).map(|_| listener.accept().unwrap().0).collect();
    let peers: Vec<u16> = accepted
        .iter()
        .map(|s| s.peer_addr().unwrap().port())
        .collect();
    drop(accepted);
    for p in &peers {
        wait_for_kernel_state(*p, port, "CLOSE_WAIT");
    }
    let all = tracer.stop_when(&[]);
    let want = serde_json::json!([{"raddr": "127.0.0.1", "rport": port, "sockets": 3}]);
    let summary = all.iter().find(|v| v["event"] == "summary").unwrap();
    let p = summary["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == leaker)
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(p["cmdline"].as_str().unwrap().starts_with(&program), "{p}");
    assert_eq!(p["peers"], want, "{p}");
    assert!(
        p["answer"]
            .as_str()
            .unwrap()
            .contains(&format!("still open: 3 to 127.0.0.1:{port}")),
        "{p}"
    );
    let snap = snapshot(&["--pid", &leaker.to_string()]);
    let g = &snap[0]["processes"][0];
    assert_eq!(g["pid"], leaker, "{g}");
    assert!(g["cmdline"].as_str().unwrap().starts_with(&program), "{g}");
    assert_eq!(g["peers"], want, "{g}");
    close_fd(go_w);
}

/// The reference travels in the binary: `finwait-trace man` prints every flag and every JSON
/// event and field (roff when stdout is not a terminal), and `--help` points there.
#[test]
fn the_manual_is_in_the_binary() {
    let out = Command::new(finwait_trace()).arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    for want in [
        ".TH finwait-trace",
        "\\-\\-needs\\-action",
        ".SH \"JSON LINES",
        "close_no_fin",
        "remaining_refs",
    ] {
        assert!(page.contains(want), "{want} missing from the man page");
    }
    let help = Command::new(finwait_trace())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("finwait-trace man") && !help.contains("README"),
        "{help}"
    );
}

/// `--pid` of a process that exits: the tracer says so and stops by itself, exit status 0.
#[test]
fn stops_when_the_traced_process_exits() {
    let mut target = Command::new("sleep").arg("120").spawn().unwrap();
    let (child, _) = spawn_attached(&[
        "--pid",
        &target.id().to_string(),
        "--duration",
        "60",
        "--no-snapshot",
    ]);
    let _ = target.kill();
    let _ = target.wait();
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("every traced process has exited"));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "it should not wait for --duration"
    );
}

/// `--pid` of a process that exits at any moment of the tracer's start-up (before its programs
/// are attached, while they are, just after): it still stops by itself with the usual message.
#[test]
fn stops_when_the_traced_process_exits_during_start_up() {
    for after in ["0.1", "0.5", "1", "2"] {
        let mut target = Command::new("sleep").arg(after).spawn().unwrap();
        let pid = target.id().to_string();
        let child = Command::new(finwait_trace())
            .args(mode_args(&[]))
            .args(["--pid", &pid, "--no-snapshot", "--duration", "600"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Reaped as soon as it exits: a zombie would not say it is gone.
        let reaper = std::thread::spawn(move || target.wait());
        let out = output_within(child, start_limit() + std::time::Duration::from_secs(30));
        let _ = reaper.join();
        let err = String::from_utf8_lossy(&out.stderr);
        // Gone before the tracer looked: the usual error; else the usual stop.
        let stopped = out.status.success() && err.contains("every traced process has exited");
        let missing = out.status.code() == Some(1) && err.contains("no such process");
        assert!(stopped || missing, "sleep {after}: {:?} {err}", out.status);
    }
}

/// A ring buffer too small for the burst: the loss is warned about live and counted, never silent.
#[test]
fn ring_overruns_are_reported() {
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let lp = listener.local_addr().unwrap().port();
    let (child, _) = spawn_attached(&[
        "--json",
        "--no-snapshot",
        "--ring-buffer-kib",
        "4",
        "--port",
        &lp.to_string(),
    ]);
    for _ in 0..2000 {
        let (a, b) = pair(&listener);
        drop((a, b));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stats: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let lost = stats["lost_ring_full"].as_u64().unwrap();
    assert!(
        lost > 0,
        "a 4 KiB ring cannot hold 2000 connections' events: {stats}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("events lost (ring buffer full; raise --ring-buffer-kib)"),
        "{err}"
    );
}

/// `-v` shows the programs' own diagnostics. Five fds passed in one SCM_RIGHTS message are more
/// than the kernel side reads (4): the receiving thread is named by the program that could not
/// record them all. Without `-v` the loss is only counted: no kernel line.
#[test]
fn verbose_shows_the_kernel_diagnostic_of_fds_not_all_recorded() {
    for verbose in [true, false] {
        let mut args = vec!["--json", "--no-snapshot"];
        if verbose {
            args.push("-v");
        }
        let (child, _) = spawn_attached(&args);
        pass_fds(5);
        // Until the tracer's signal handlers are set up, SIGINT would kill it.
        std::thread::sleep(std::time::Duration::from_millis(300));
        // SAFETY: our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stats: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert!(stats["scm_rights_unread"].as_u64() >= Some(1), "{stats}");
        // The program is the guarded pair's first where syscalls are hooked at their wrappers
        // (`mixed`: where this one's was refused, the tracepoint's).
        let start: serde_json::Value =
            serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
        let programs: &[&str] = match start["syscall_hook"].as_str() {
            Some("tracepoint") => &["sys_exit_recvmsg"],
            Some("fentry") => &["sys_exit_recvmsg_btf"],
            _ => &["sys_exit_recvmsg", "sys_exit_recvmsg_btf"],
        };
        let lines: Vec<String> = programs
            .iter()
            .map(|p| {
                format!(
                    "finwait-trace: kernel: warn {p}: fds received by thread {} not all recorded",
                    gettid()
                )
            })
            .collect();
        if verbose {
            assert!(
                err.lines().any(|l| lines.iter().any(|w| w == l)),
                "none of {lines:?} in:\n{err}"
            );
        } else {
            assert!(!err.contains("kernel:"), "{err}");
        }
    }
}

/// Sends `n` fds (of one pipe end) in one SCM_RIGHTS message to this thread, receives them,
/// closes them.
fn pass_fds(n: usize) {
    let (tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
    let fds = vec![tx.as_raw_fd(); n];
    let len = 4 * n as u32;
    // u64s: aligned for cmsghdr.
    // SAFETY: CMSG_SPACE is arithmetic.
    let mut control = vec![0u64; unsafe { libc::CMSG_SPACE(len) } as usize / 8 + 1];
    let (mut byte, mut received) = (0u8, control.clone());
    // SAFETY: every pointer refers to a live local buffer of the length given.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: (&raw mut byte).cast(),
            iov_len: 1,
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(len) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(len) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), n);
        assert_eq!(libc::sendmsg(tx.as_raw_fd(), &msg, 0), 1);
        msg.msg_control = received.as_mut_ptr().cast();
        msg.msg_controllen = received.len() * 8;
        assert_eq!(libc::recvmsg(rx.as_raw_fd(), &mut msg, 0), 1);
        let c = libc::CMSG_FIRSTHDR(&msg);
        let got = libc::CMSG_DATA(c).cast::<i32>();
        for i in 0..n {
            close_fd(std::ptr::read_unaligned(got.add(i)));
        }
    }
}

/// `--port` is applied in the kernel: another port's transitions never reach userspace (the
/// tracer's own count of transition records equals the lines it printed).
#[test]
fn port_filter_drops_other_sockets_in_the_kernel() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let lp = listener.local_addr().unwrap().port();
    let tracer = Tracer::start(&["--port", &lp.to_string(), "--no-snapshot"]);
    for _ in 0..20 {
        drop(pair(&other));
    }
    let (a, b) = pair(&listener);
    let (ap, bp) = ports(&a, &b);
    drop(a);
    let all = tracer.stop_when(&[
        (ap, bp, "ESTABLISHED", "FIN_WAIT1"),
        (ap, bp, "FIN_WAIT1", "FIN_WAIT2"),
    ]);
    let printed = all.iter().filter(|v| v["event"] == "transition").count() as u64;
    assert!(printed >= 2);
    let stats = all.last().unwrap();
    assert_eq!(stats["transitions"].as_u64(), Some(printed), "{stats}");
    drop(b);
}

/// Runs the tracer in a mount namespace of its own, after `setup` (run in the child, between
/// fork and exec: libc calls only) changed what it sees of /sys. The host is untouched.
fn trace_in_mount_ns(args: &[&str], setup: fn() -> i32) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(finwait_trace());
    cmd.args(mode_args(args)).args(args);
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || setup() != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.output().unwrap()
}

fn tmpfs_over(path: &std::ffi::CStr) -> i32 {
    // SAFETY: valid NUL-terminated strings.
    unsafe {
        libc::mount(
            c"none".as_ptr(),
            path.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    }
}

/// tracefs not mounted: finwait mounts it, says so, and traces.
#[test]
fn tracefs_is_mounted_when_missing() {
    let out = trace_in_mount_ns(&["--json", "--duration", "1", "--no-snapshot"], || {
        // SAFETY: valid paths; either may not be a mount point (then nothing happens).
        unsafe {
            libc::umount2(c"/sys/kernel/tracing".as_ptr(), libc::MNT_DETACH);
            libc::umount2(c"/sys/kernel/debug".as_ptr(), libc::MNT_DETACH);
        }
        0
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("tracefs was not mounted; mounted it at /sys/kernel/tracing"),
        "{err}"
    );
    let start = String::from_utf8_lossy(&out.stdout);
    assert!(
        start.starts_with("{\"") && start.contains("\"event\":\"start\""),
        "{start}"
    );
}

/// The state tracepoint missing (a tracefs without it): a clear error naming the kernel needed.
#[test]
fn missing_tracepoint_names_the_kernel_needed() {
    let out = trace_in_mount_ns(&["--duration", "1", "--no-snapshot"], || {
        // SAFETY: valid paths.
        unsafe {
            if tmpfs_over(c"/sys/kernel/tracing") != 0 {
                return -1;
            }
            libc::mkdir(c"/sys/kernel/tracing/events".as_ptr(), 0o755)
        }
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("sock:inet_sock_set_state tracepoint (Linux 4.16 or newer)"),
        "{err}"
    );
}

/// No kernel BTF: tracing still works; what is off (and why) is said, and precise mode, which
/// needs BTF for fentry, is refused with the reason when asked for explicitly.
#[test]
fn missing_btf_says_which_features_are_off() {
    let hide_btf = || tmpfs_over(c"/sys/kernel/btf");
    let args = [
        "--json",
        "--duration",
        "1",
        "--no-snapshot",
        "--mode",
        "auto",
    ];
    let out = trace_in_mount_ns(&args, hide_btf);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("fd -> socket resolution is off"), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let start: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(start["fd_resolution"], false, "{start}");
    assert_eq!(start["state_hook"], "tracepoint", "{start}");
    if start["mode"] == "correlated" {
        assert!(
            start["precise_unavailable"]
                .as_str()
                .is_some_and(|w| w.contains("fentry: no kernel BTF")),
            "{start}"
        );
    }
}

/// `--demo` (the README's first command): the client and the server are two processes, and
/// each answer names the right one.
#[test]
fn demo_names_the_client_and_the_server() {
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut cmd = Command::new(finwait_trace());
    let out = cmd
        .args(mode_args(&[]))
        .args(["--demo", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let all: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ts: Vec<&serde_json::Value> = all.iter().filter(|v| v["event"] == "transition").collect();
    let with = |from: &str, to: &str| -> Vec<&serde_json::Value> {
        ts.iter()
            .copied()
            .filter(|v| v["from"] == from && v["to"] == to)
            .collect()
    };
    let half = with("FIN_WAIT1", "FIN_WAIT2");
    assert_eq!(half.len(), 3, "{ts:#?}");
    let client = &half[0]["cause"]["pid"];
    assert_eq!(half[0]["cause"]["comm"], "demo-client", "{ts:#?}");
    let (shut, closed): (Vec<&serde_json::Value>, Vec<_>) =
        half.iter().copied().partition(|v| v["orphan"] == false);
    assert_eq!((shut.len(), closed.len()), (1, 2), "{ts:#?}");
    assert_eq!(shut[0]["cause"]["call"], "shutdown");
    assert_eq!(shut[0]["cause"]["how"], "SHUT_WR");
    for v in &half {
        assert_eq!(&v["cause"]["pid"], client, "{v}");
    }
    for v in closed {
        assert_eq!(v["cause"]["call"], "close", "{v}");
    }
    let close_wait = with("ESTABLISHED", "CLOSE_WAIT");
    assert_eq!(close_wait.len(), 3, "{ts:#?}");
    let server = &close_wait[0]["owner"]["pid"];
    assert_ne!(server, client);
    assert_ne!(server, &serde_json::json!(std::process::id()));
    for v in &close_wait {
        assert_eq!(v["cause"]["call"], "peer_fin", "{v}");
        assert_eq!(v["owner"]["comm"], "demo-server", "{v}");
        assert_eq!(&v["owner"]["pid"], server, "{v}");
    }
    let last_ack = with("CLOSE_WAIT", "LAST_ACK");
    assert_eq!(last_ack.len(), 1, "{ts:#?}");
    assert_eq!(last_ack[0]["cause"]["call"], "close");
    assert_eq!(&last_ack[0]["cause"]["pid"], server);
    assert!(last_ack[0]["close_wait_ms"].as_f64().unwrap() >= 300.0);
    let summary = all.iter().find(|v| v["event"] == "summary").unwrap();
    let comms: Vec<&serde_json::Value> = summary["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["comm"])
        .collect();
    assert!(
        comms.contains(&&serde_json::json!("demo-client"))
            && comms.contains(&&serde_json::json!("demo-server")),
        "{summary}"
    );
}

/// `--stats-every`: the counters as `stats` events on stderr while tracing, and once more at
/// the end (the benches read them).
#[test]
fn stats_every_writes_stats_events_to_stderr() {
    let _g = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let child = Command::new(finwait_trace())
        .args(["--no-snapshot", "--stats-every", "0.3", "--duration", "1.2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The load first: a slow emulated guest took over 60 s to attach (5.10 under TCG, the
    // machine running two more guests).
    let out = output_within(child, start_limit() + std::time::Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    let stats: Vec<serde_json::Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "stats")
        .collect();
    assert!(stats.len() >= 3, "{err}");
    assert!(
        stats
            .iter()
            // Counted (a whole-host trace on a busy machine may lose some: it says so).
            .all(|s| s["records"].is_u64() && s["lost_ring_full"].is_u64()),
        "{err}"
    );
}

/// A clone in a private (0700) directory, run by a user without root: the demo's workload
/// processes still start (the binary is re-run through /proc/self/exe), so the user is told
/// what is really missing, the capabilities.
#[test]
fn demo_from_a_private_directory_names_the_missing_capabilities() {
    let dir = std::env::temp_dir().join(format!("finwait-private-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let bin = dir.join("finwait-trace");
    std::fs::copy(finwait_trace(), &bin).unwrap();
    let child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("--demo")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux)");
    let out = output_within(child, std::time::Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("CAP_BPF") && err.contains("CAP_PERFMON"),
        "{err}"
    );
}
