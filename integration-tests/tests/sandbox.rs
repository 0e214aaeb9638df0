//! finwait's own sandbox (docs/sandbox.md): once the programs are attached, what a compromise
//! would try first (another process's memory opened read-write, a file written, a BPF map
//! made, a process started) is refused;
//! with `--no-sandbox` the same tries succeed, which shows the test can fail.
#![allow(unused_crate_dependencies)]
mod common;

use std::{process::Command, time::Duration};

use common::*;
use serde_json::Value;

/// The tracer run for a second with the hidden self-test against `victim`: its start event,
/// and each try's errno by name.
fn self_test(victim: i32, extra: &[&str]) -> (Value, Vec<(String, i64)>) {
    let pid = victim.to_string();
    // Only the victim is followed: the host's other connections would fill the pipe.
    let mut args = vec![
        "--json",
        "--duration",
        "1",
        "--no-snapshot",
        "--pid",
        &pid,
        "--sandbox-self-test-write-proc-mem",
        &pid,
    ];
    args.extend_from_slice(extra);
    let child = Command::new(finwait_trace())
        .args(mode_args(&args))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn finwait-trace");
    let out = output_within(child, start_limit() + Duration::from_secs(30));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let start: Value = stdout
        .lines()
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no start event: {stdout}\n{stderr}"));
    let tries = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            Some((
                v["sandbox_self_test"].as_str()?.to_string(),
                v["errno"].as_i64()?,
            ))
        })
        .collect::<Vec<_>>();
    assert_eq!(tries.len(), 4, "the self-test did not run: {stderr}");
    (start, tries)
}

/// A process of root's to aim at: it sleeps until killed.
fn victim() -> ChildGuard {
    ChildGuard(fork_child(|| {
        loop {
            sleep_ms(1000);
        }
    }))
}

#[test]
fn the_sandbox_refuses_writing_another_process_memory_and_files() {
    let v = victim();
    let (start, tries) = self_test(v.0, &[]);
    assert_eq!(start["event"], "start", "{start}");
    assert_eq!(start["sandbox"], "seccomp", "{start}");
    for (what, errno) in tries {
        assert!(
            errno == i64::from(libc::EPERM) || errno == i64::from(libc::EACCES),
            "{what}: errno {errno}, expected EPERM or EACCES"
        );
    }
}

#[test]
fn without_the_sandbox_the_same_tries_succeed() {
    let v = victim();
    let (start, tries) = self_test(v.0, &["--no-sandbox"]);
    assert_eq!(start["sandbox"], "off (--no-sandbox)", "{start}");
    for (what, errno) in tries {
        assert_eq!(errno, 0, "{what} failed without the sandbox");
    }
}
