//! A real container runtime: Debian's podman (with runc) runs a server that leaks CLOSE_WAIT,
//! half-closed and orphaned sockets in the container's own network namespace; finwait, on the
//! host, names each one with its owner and the container, in `snapshot`, in live tracing's
//! `--stuck` and summary, and in the gauges.
// Test and bench crates share the package's dependencies (the library is where unused ones
// show); their drivers are long by nature.
#![allow(
    unused_crate_dependencies,
    clippy::too_many_lines,
    clippy::needless_pass_by_value
)]
mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

const PODMAN: &str = "/usr/bin/podman";

/// The server in the container: on its loopback, 3 connections whose clients close (CLOSE_WAIT,
/// 3 orphaned clients) and 2 it shuts down (half-closed; their clients in CLOSE_WAIT).
const LEAKER: &str = r#"
import socket, time
l = socket.socket(); l.bind(("127.0.0.1", 8080)); l.listen(16)
keep = []
for i in range(3):
    c = socket.create_connection(("127.0.0.1", 8080)); s, _ = l.accept(); keep.append(s); c.close()
for i in range(2):
    c = socket.create_connection(("127.0.0.1", 8080)); s, _ = l.accept()
    s.shutdown(socket.SHUT_WR); keep += [s, c]
time.sleep(600)
"#;

/// A container run by podman from a root file system of the host's /usr (no image is pulled);
/// removed when dropped.
struct Container {
    name: String,
    id: String,
    pid: u32,
    root: PathBuf,
}

impl Container {
    fn start() -> Option<Self> {
        if !Path::new(PODMAN).exists() {
            assert!(
                std::env::var_os("FINWAIT_REQUIRE_PODMAN").is_none(),
                "no {PODMAN}: `cargo xtask test` installs Debian's podman and runc"
            );
            eprintln!("skipped: no {PODMAN} here (the host run of `cargo xtask test` has it)");
            return None;
        }
        let root = std::env::temp_dir().join(format!("finwait-rootfs-{}", std::process::id()));
        for d in ["proc", "sys", "dev", "etc", "tmp", "usr"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for d in ["lib", "lib64", "bin", "sbin"] {
            let _ = std::os::unix::fs::symlink(format!("usr/{d}"), root.join(d));
        }
        std::fs::write(root.join("leak.py"), LEAKER).unwrap();
        let name = format!("finwait-test-{}", std::process::id());
        let _ = Command::new(PODMAN).args(["rm", "-f", &name]).output();
        let out = Command::new(PODMAN)
            .args([
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "run",
                "-d",
            ])
            .args(["--name", &name, "--network", "none"])
            .args([
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=4096:4096",
            ])
            .args(["-v", "/usr:/usr:ro", "--rootfs"])
            .arg(&root)
            .args(["/usr/bin/python3", "/leak.py"])
            .output()
            .expect("run podman");
        assert!(
            out.status.success(),
            "podman run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let inspect = Command::new(PODMAN)
            .args(["inspect", "-f", "{{.State.Pid}} {{.Id}}", &name])
            .output()
            .unwrap();
        let text = String::from_utf8(inspect.stdout).unwrap();
        let (pid, id) = text
            .trim()
            .split_once(' ')
            .expect("podman inspect: pid and id");
        Some(Self {
            name,
            id: id.to_string(),
            pid: pid.parse().unwrap(),
            root,
        })
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new(PODMAN)
            .args(["rm", "-f", "-t", "0", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// (close_wait, half-closed, orphaned) among the snapshot's sockets in `netns`.
fn counts(all: &[Value], netns: u64) -> (usize, usize, usize) {
    let n = |class: &str| {
        all.iter()
            .filter(|v| v["event"] == "snapshot" && v["netns"] == netns && v["class"] == class)
            .count()
    };
    (
        n("close_wait"),
        n("fin_wait2_half_closed"),
        n("fin_wait2_orphaned"),
    )
}

fn netns_of(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino()
}

/// The endpoint's value of `name` for the series whose labels include `container_id="ID"`.
fn gauge(port: u16, name: &str, id: &str) -> Option<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let label = format!("container_id=\"{id}\"");
    reply
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
}

#[test]
fn a_podman_containers_leak_is_named_from_the_host() {
    let Some(c) = Container::start() else {
        return;
    };
    let netns = netns_of(c.pid);
    assert_ne!(
        netns,
        netns_of(std::process::id()),
        "the container has its own namespace"
    );
    // The server sets its sockets up after it starts.
    let deadline = Instant::now() + Duration::from_secs(20);
    let all = loop {
        let all = snapshot(&[]);
        if counts(&all, netns) == (5, 2, 3) || Instant::now() > deadline {
            break all;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(counts(&all, netns), (5, 2, 3), "{all:#?}");
    let pid = c.pid.to_string();
    let only = snapshot(&["--pid", &pid]);
    assert_eq!(counts(&only, netns), (5, 2, 0), "{only:#?}");
    for v in only.iter().filter(|v| v["event"] == "snapshot") {
        let o = &v["owners"][0];
        assert_eq!(o["pid"], c.pid, "{v}");
        assert_eq!(o["container"]["container.id"], c.id.as_str(), "{v}");
        assert_eq!(o["container"]["container.runtime"], "podman", "{v}");
    }

    // --container (a prefix of its id): its sockets, its orphans (in its namespace) too.
    let mine = snapshot(&["--container", &c.id[..12]]);
    assert_eq!(counts(&mine, netns), (5, 2, 3), "{mine:#?}");
    let others = mine
        .iter()
        .filter(|v| v["event"] == "snapshot" && v["netns"] != netns)
        .count();
    assert_eq!(others, 0, "{mine:#?}");

    // Live, from the host: stuck before the start, in --stuck, the summary and the gauges.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    // --container: the processes in it, as --pid follows them.
    let short = &c.id[..12];
    let tracer = Tracer::start(&["--container", short, "--stuck", "1", "--metrics", &addr]);
    let (mut stuck, mut gauges) = (0, None);
    let all = tracer.read_until(Duration::from_secs(30), |v| {
        stuck += usize::from(v["event"] == "stuck");
        if stuck == 7 && gauges.is_none() {
            gauges = Some((
                gauge(port, "finwait_close_wait_sockets", &c.id),
                gauge(port, "finwait_half_closed_sockets", &c.id),
            ));
        }
        stuck == 7
    });
    let reports: Vec<&Value> = all.iter().filter(|v| v["event"] == "stuck").collect();
    assert_eq!(reports.len(), 7, "{all:#?}");
    for v in &reports {
        assert_eq!(v["pid"], c.pid, "{v}");
        assert_eq!(v["at_least"], true, "{v}");
        assert_eq!(v["container"]["container.id"], c.id.as_str(), "{v}");
    }
    assert_eq!(
        gauges,
        Some((Some(5.0), Some(2.0))),
        "the gauges with the container's id"
    );
    let summary = all.iter().find(|v| v["event"] == "summary").unwrap();
    let p = summary["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == c.pid)
        .unwrap_or_else(|| panic!("{summary}"));
    assert_eq!(p["close_wait_at_start"], 5, "{p}");
    assert_eq!(p["container"]["container.id"], c.id.as_str(), "{p}");

    // A container that does not exist is an error, not an empty trace.
    let out = Command::new(finwait_trace())
        .args(["--container", "0000deadbeef", "--duration", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no process runs in container 0000deadbeef"),
        "{err}"
    );
}
