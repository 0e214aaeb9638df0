//! `--metrics`: the endpoint scraped directly and by a real Prometheus server, while a process
//! in a docker-like cgroup leaks CLOSE_WAIT; its gauges exact from the start-up snapshot on; and
//! its series bounded however many process names come and go.
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
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// Tests here fork or load the CPU: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A free loopback port (taken, then released for the server that will bind it).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One plain HTTP/1.0 GET; the status and body.
fn http_status(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let status = head
        .strip_prefix("HTTP/1.")?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, body.to_string()))
}

/// The body of a GET that succeeded (200).
fn http_get(port: u16, path: &str) -> Option<String> {
    http_status(port, path).and_then(|(status, body)| (status == 200).then_some(body))
}

/// The endpoint's samples: (series with labels, value); empty if it did not answer in 5 s.
fn scrape(port: u16) -> Vec<(String, f64)> {
    let body = http_get(port, "/metrics").unwrap_or_default();
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// The value of the one series named `name` whose labels include every `labels` pair.
fn value(samples: &[(String, f64)], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(s, _)| {
            let base = s.split('{').next().unwrap();
            base == name
                && labels
                    .iter()
                    .all(|(k, v)| s.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
}

/// Polls the endpoint until `name{labels}` reads `want` (10 s at most); the last samples.
fn wait_for(port: u16, name: &str, labels: &[(&str, &str)], want: f64) -> Vec<(String, f64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape(port);
        let got = value(&samples, name, labels);
        if got == Some(want) {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?}: {got:?}, not {want}; scraped:\n{}",
            samples
                .iter()
                .map(|(s, v)| format!("{s} {v}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Where cgroup v2 is mounted here (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).
fn cgroup2_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let (fields, fs) = l.split_once(" - ")?;
            fs.starts_with("cgroup2 ")
                .then(|| PathBuf::from(fields.split(' ').nth(4).unwrap()))
        })
        .min_by_key(|p| p.as_os_str().len())
        .expect("cgroup v2 is mounted")
}

/// A cgroup of this test (a container's as docker's systemd driver names it, or a service's),
/// removed when dropped.
struct TestCgroup {
    dir: PathBuf,
    id: String,
}

impl TestCgroup {
    fn new(tag: &str) -> Self {
        let id: String = format!("{:08x}{tag}", std::process::id())
            .bytes()
            .map(|b| format!("{:x}", b % 16))
            .chain(std::iter::repeat_n("f".to_string(), 64))
            .take(64)
            .collect();
        Self::named(&format!("docker-{id}.scope"), id)
    }

    /// A cgroup as systemd names a service's (`NAME.service`).
    fn service(name: &str) -> Self {
        Self::named(&format!("{name}.service"), String::new())
    }

    fn named(leaf: &str, id: String) -> Self {
        let dir = cgroup2_root()
            .join(format!("finwait-test-{}.slice", std::process::id()))
            .join(leaf);
        std::fs::create_dir_all(&dir).expect("create a cgroup (as root)");
        Self { dir, id }
    }

    fn add(&self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::remove_dir(self.dir.parent().unwrap());
    }
}

/// A forked back-end that accepts connections and keeps them until told to close them: the
/// CLOSE_WAIT leak. Commands over a pipe: `a` accept one, `c` close every one, each answered.
struct Leaker {
    pid: i32,
    _guard: ChildGuard,
    cmd: i32,
    ack: i32,
}

const LEAKER_NAME: &str = "leaky-backend";

impl Leaker {
    fn start(listener: &TcpListener) -> Self {
        let (mut to, mut from) = ([0; 2], [0; 2]);
        // SAFETY: plain pipes.
        unsafe {
            assert_eq!(libc::pipe(to.as_mut_ptr()), 0);
            assert_eq!(libc::pipe(from.as_mut_ptr()), 0);
        }
        let lfd = fd(listener) as i32;
        let pid = fork_child(move || {
            // SAFETY: raw calls only, in the child of a multi-threaded parent.
            unsafe {
                // Its gauge counts every socket it holds: only its own (a socket of a test
                // running meanwhile, inherited, counted 111 more on a slow 5.10 guest).
                close_inherited_fds(&[to[0], from[1], lfd]);
                libc::prctl(libc::PR_SET_NAME, c"leaky-backend".as_ptr());
                let mut held = [0i32; 256];
                let mut n = 0;
                let mut c = 0u8;
                while libc::read(to[0], (&raw mut c).cast(), 1) == 1 {
                    match c {
                        b'a' => {
                            held[n] = libc::accept(lfd, std::ptr::null_mut(), std::ptr::null_mut());
                            n += 1;
                        }
                        b'c' => {
                            for fd in &held[..n] {
                                libc::close(*fd);
                            }
                            n = 0;
                        }
                        _ => return 0,
                    }
                    libc::write(from[1], (&raw const c).cast(), 1);
                }
                0
            }
        });
        Self {
            pid,
            _guard: ChildGuard(pid),
            cmd: to[1],
            ack: from[0],
        }
    }

    fn send(&self, c: u8) {
        let mut back = 0u8;
        // SAFETY: our pipes.
        unsafe {
            assert_eq!(libc::write(self.cmd, (&raw const c).cast(), 1), 1);
            assert_eq!(libc::read(self.ack, (&raw mut back).cast(), 1), 1);
        }
    }

    /// `n` connections, accepted and kept by the leaker, then closed by their clients: `n`
    /// sockets in CLOSE_WAIT that the leaker holds.
    fn leak(&self, port: u16, n: usize) {
        for _ in 0..n {
            let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
            self.send(b'a');
            drop(client);
        }
    }
}

/// Two processes of one name in two systemd services: each line names its service beside
/// `comm[pid]` (snapshot, human and JSON), and the gauges keep one series per service.
#[test]
fn same_named_processes_are_told_apart_by_their_service() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let me = std::process::id();
    let units = [format!("shop-a-{me}"), format!("shop-b-{me}")];
    let (cg_a, cg_b) = (
        TestCgroup::service(&units[0]),
        TestCgroup::service(&units[1]),
    );
    let (la, lb) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let (a, b) = (Leaker::start(&la), Leaker::start(&lb));
    cg_a.add(a.pid);
    cg_b.add(b.pid);
    a.leak(la.local_addr().unwrap().port(), 2);
    b.leak(lb.local_addr().unwrap().port(), 3);
    let out = Command::new(finwait_trace())
        .args([
            "snapshot",
            "--pid",
            &a.pid.to_string(),
            "--pid",
            &b.pid.to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for (pid, unit) in [(a.pid, &units[0]), (b.pid, &units[1])] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("{LEAKER_NAME}[{pid}]")))
            .unwrap_or_else(|| panic!("no line for {pid}: {text}"));
        assert!(line.contains(&format!("({unit}.service)")), "{line}");
    }
    let json = snapshot(&["--pid", &a.pid.to_string()]);
    let unit_a = format!("{}.service", units[0]);
    assert!(
        json.iter().any(|v| v
            .to_string()
            .contains(&format!(r#""systemd.unit":"{unit_a}""#))),
        "{json:#?}"
    );
    let metrics = free_port();
    let (pa, pb) = (a.pid.to_string(), b.pid.to_string());
    let addr = format!("127.0.0.1:{metrics}");
    let tracer = Tracer::start(&["--metrics", &addr, "--pid", &pa, "--pid", &pb]);
    for (unit, n) in [(&units[0], 2.0), (&units[1], 3.0)] {
        let unit = format!("{unit}.service");
        let who = [("comm", LEAKER_NAME), ("systemd_unit", unit.as_str())];
        wait_for(metrics, "finwait_close_wait_sockets", &who, n);
    }
    drop(tracer);
}

#[test]
fn close_wait_gauge_by_container_is_exact_from_the_snapshot_on() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cg = TestCgroup::new("gauge");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let leaker = Leaker::start(&listener);
    cg.add(leaker.pid);
    // Two leaked before finwait starts: the start-up snapshot must count them.
    leaker.leak(port, 2);
    let metrics = free_port();
    let addr = format!("127.0.0.1:{metrics}");
    // This process and its back-end only: the unlabelled histogram counts exactly theirs.
    let me = std::process::id().to_string();
    let tracer = Tracer::start(&["--metrics", &addr, "--pid", &me]);
    let who = [("comm", LEAKER_NAME), ("container_id", cg.id.as_str())];
    let s = wait_for(metrics, "finwait_close_wait_sockets", &who, 2.0);
    assert_eq!(
        value(&s, "finwait_close_wait_entries_total", &who),
        None,
        "seeded sockets are not entries seen"
    );
    leaker.leak(port, 3);
    let s = wait_for(metrics, "finwait_close_wait_sockets", &who, 5.0);
    assert_eq!(
        value(&s, "finwait_close_wait_entries_total", &who),
        Some(3.0)
    );
    let unit = format!("docker-{}.scope", cg.id);
    let full = [
        &who[..],
        &[("systemd_unit", unit.as_str()), ("k8s_pod_uid", "")],
    ]
    .concat();
    assert_eq!(value(&s, "finwait_close_wait_sockets", &full), Some(5.0));
    leaker.send(b'c');
    wait_for(metrics, "finwait_close_wait_sockets", &who, 0.0);
    // All five closed by their owner, the two seeded ones timed from the snapshot.
    let s = wait_for(
        metrics,
        "finwait_close_wait_duration_seconds_count",
        &[],
        5.0,
    );
    assert_eq!(value(&s, "finwait_events_lost_total", &[]), Some(0.0));
    assert_eq!(
        value(&s, "finwait_workloads", &[]).map(|w| w >= 1.0),
        Some(true)
    );
    let all = tracer.stop_when(&[]);
    // The JSON lines name the same container.
    let entered: Vec<&Value> = all
        .iter()
        .filter(|v| v["to"] == "CLOSE_WAIT" && v["owner"]["comm"] == LEAKER_NAME)
        .collect();
    assert_eq!(entered.len(), 3, "{all:?}");
    for v in entered {
        let c = &v["owner"]["container"];
        assert_eq!(c["container.id"], cg.id.as_str(), "{v}");
        assert_eq!(c["container.runtime"], "docker", "{v}");
        assert_eq!(c["systemd.unit"], unit.as_str(), "{v}");
    }
}

/// A leak that starts as finwait reads its start-up inventory: each socket is counted once,
/// at every scrape once `/ready` answers, and released as soon as it closes (not a minute later
/// by the reconciliation).
#[test]
fn gauges_are_exact_at_every_scrape_after_ready_with_a_leak_during_start_up() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cg = TestCgroup::new("race");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let leaker = Leaker::start(&listener);
    cg.add(leaker.pid);
    let metrics = free_port();
    let addr = format!("127.0.0.1:{metrics}");
    let me = std::process::id().to_string();
    let tracer = Tracer::start(&["--metrics", &addr, "--pid", &me]);
    // The start line comes before the inventory: leak across it, one every 20 ms.
    let mut before_ready = 0;
    for _ in 0..4 {
        leaker.leak(port, 1);
        before_ready += usize::from(http_status(metrics, "/ready").is_some_and(|(s, _)| s == 503));
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_status(metrics, "/ready").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let who = [("comm", LEAKER_NAME), ("container_id", cg.id.as_str())];
    let s = wait_for(metrics, "finwait_close_wait_sockets", &who, 4.0);
    for _ in 0..10 {
        let s = scrape(metrics);
        assert_eq!(
            value(&s, "finwait_close_wait_sockets", &who),
            Some(4.0),
            "{s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    leaker.send(b'c');
    // Released by the closes themselves: well before the minute's reconciliation.
    let closed = Instant::now();
    wait_for(metrics, "finwait_close_wait_sockets", &who, 0.0);
    assert!(closed.elapsed() < Duration::from_secs(10));
    let after = scrape(metrics);
    assert_eq!(
        value(&after, "finwait_gauge_corrections_total", &[]),
        Some(0.0),
        "{s:?}"
    );
    drop(tracer.stop_when(&[]));
    eprintln!("leaks before /ready answered 200: {before_ready} of 4");
}

/// A real Prometheus server, on loopback, scraping every second; removed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: TempDir,
}

struct TempDir(PathBuf);

/// A new directory of this test process's, `tag` in its name.
fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("finwait-{tag}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Prometheus {
    fn start(target: u16) -> Option<Self> {
        Self::with_jobs(&format!(
            "  - job_name: finwait\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
        ))
    }

    /// Scraping as `jobs` (scrape_configs' entries, YAML indented by two) say, every second.
    fn with_jobs(jobs: &str) -> Option<Self> {
        let bin = Path::new("/usr/bin/prometheus");
        if !bin.exists() {
            // The qemu guests carry the test binaries only; the host runs this test for real.
            assert!(
                std::env::var_os("FINWAIT_TEST_NO_PROMETHEUS").is_some(),
                "no /usr/bin/prometheus: `cargo xtask test` installs Debian's `prometheus` package"
            );
            eprintln!("no Prometheus in this guest: scraped directly only");
            return None;
        }
        let dir = temp_dir("prom");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n{jobs}"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        Some(Self {
            child,
            port,
            _dir: TempDir(dir),
        })
    }

    /// An instant query's result vector, through Prometheus's HTTP API.
    fn query(&self, promql: &str) -> Option<Vec<Value>> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body = http_get(self.port, &format!("/api/v1/query?query={q}"))?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (v["status"] == "success").then(|| v["data"]["result"].as_array().cloned())?
    }

    /// The value of `promql`'s one sample, if it has exactly one.
    fn value(&self, promql: &str) -> Option<f64> {
        match &self.query(promql)?[..] {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Polls `promql` until its one sample reads `want` (60 s at most: Prometheus starts, then
    /// scrapes every second); that sample.
    fn wait_for(&self, promql: &str, want: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = self.query(promql).unwrap_or_default();
            if let [one] = &result[..]
                && one["value"][1] == want
            {
                return one.clone();
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus: {promql} = {result:?}, not {want}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_the_close_wait_leak_of_a_container() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cg = TestCgroup::new("prom");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let leaker = Leaker::start(&listener);
    cg.add(leaker.pid);
    let metrics = free_port();
    let tracer = Tracer::start(&["--metrics", &format!("127.0.0.1:{metrics}")]);
    let Some(prom) = Prometheus::start(metrics) else {
        return;
    };
    leaker.leak(port, 4);
    let promql = format!("finwait_close_wait_sockets{{container_id=\"{}\"}}", cg.id);
    let sample = prom.wait_for(&promql, "4");
    eprintln!("Prometheus: {promql} -> {sample}");
    assert_eq!(sample["metric"]["comm"], LEAKER_NAME);
    assert_eq!(sample["metric"]["job"], "finwait");
    let unit = format!("docker-{}.scope", cg.id);
    assert_eq!(sample["metric"]["systemd_unit"], unit.as_str());
    let entered = format!(
        "finwait_close_wait_entries_total{{container_id=\"{}\"}}",
        cg.id
    );
    prom.wait_for(&entered, "4");
    leaker.send(b'c');
    let sample = prom.wait_for(&promql, "0");
    eprintln!("Prometheus after close: {promql} -> {sample}");
    tracer.stop_when(&[]);
}

/// One GET of `/metrics` with this `Accept`: the response's head and body.
fn metrics_as(port: u16, accept: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    (head.to_ascii_lowercase(), body.to_string())
}

/// Every panel of deploy/grafana/finwait.json, run against the real Prometheus that scrapes a
/// leak, half-closed sockets and their closes, returns series; the standard process metrics are
/// among them. The endpoint speaks the format the scraper asks for, and describes every family
/// from the start.
#[test]
fn the_dashboard_s_queries_answer_and_the_format_is_the_one_asked_for() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let metrics = free_port();
    let tracer = Tracer::start(&["--metrics", &format!("127.0.0.1:{metrics}")]);
    // Before anything happened: every family has its HELP and TYPE.
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(metrics, "/ready").is_none() {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (head, om) = metrics_as(metrics, "*/*");
    assert!(
        head.contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(
        om.contains("# TYPE finwait_closes_without_fin counter"),
        "{om}"
    );
    assert!(om.ends_with("# EOF\n"));
    let (head, text) = metrics_as(metrics, "text/plain;version=0.0.4;q=0.9");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        text.contains("# TYPE finwait_close_wait_entries_total counter"),
        "{text}"
    );
    assert!(
        !text.contains("# EOF") && !text.contains("# UNIT"),
        "{text}"
    );
    let Some(prom) = Prometheus::start(metrics) else {
        tracer.stop_when_with_skips(&[]);
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let leaker = Leaker::start(&listener);
    leaker.leak(port, 3);
    let (half, _peer) = {
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s, _) = listener.accept().unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        (c, s)
    };
    let leaked = format!("sum(finwait_close_wait_sockets{{comm=\"{LEAKER_NAME}\"}})");
    prom.wait_for(&leaked, "3");
    std::thread::sleep(Duration::from_secs(3));
    leaker.send(b'c');
    prom.wait_for(&leaked, "0");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/finwait.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8, "{panels:?}");
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let promql = target["expr"]
                .as_str()
                .unwrap()
                .replace("$job", "finwait")
                .replace("$__rate_interval", "1m");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let series = prom.query(&promql).unwrap_or_default();
                if !series.is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "panel {:?}: {promql} returned no series",
                    panel["title"]
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    drop(half);
    tracer.stop_when_with_skips(&[]);
}

#[test]
fn ten_thousand_process_names_do_not_make_ten_thousand_series() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // The cap is userspace's, the same on every kernel: the guests of the kernel matrix (slow
    // under emulation) prove it with fewer names.
    let names: usize = if std::env::var_os("FINWAIT_TEST_GUEST").is_some() {
        1_000
    } else {
        10_000
    };
    const CAP: usize = 50;
    let metrics = free_port();
    let tracer = Tracer::start(&[
        "--metrics",
        &format!("127.0.0.1:{metrics}"),
        "--metrics-max-workloads",
        &CAP.to_string(),
        "--no-snapshot",
        // A cardinality test, not a throughput one: room for a debug build under qemu.
        "--ring-buffer-kib",
        "65536",
    ]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // One process, renamed (its main thread) before each connection: every close() comes from
    // a process of a new name, as from short-lived processes.
    // One connection at a time, as before the names were a process's: the child closes its end
    // once the parent has accepted and closed its own (a byte on `ack`).
    let mut ack = [0i32; 2];
    // SAFETY: a valid array of two fds.
    assert_eq!(unsafe { libc::pipe(ack.as_mut_ptr()) }, 0);
    let (ack_r, ack_w) = (ack[0], ack[1]);
    let client = fork_child(move || {
        // SAFETY: raw calls in the child; the name is built on the stack.
        unsafe {
            let mut byte = [0u8; 1];
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as u16;
            addr.sin_port = port.to_be();
            addr.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
            for i in 0..names {
                let mut name = [0u8; 16];
                name[0] = b'w';
                let mut digits = [0u8; 10];
                let (mut n, mut len) = (i, 0);
                loop {
                    digits[len] = b'0' + (n % 10) as u8;
                    len += 1;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                for k in 0..len {
                    name[1 + k] = digits[len - 1 - k];
                }
                libc::prctl(libc::PR_SET_NAME, name.as_ptr());
                let c = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if libc::connect(
                    c,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                ) != 0
                {
                    return 1;
                }
                if libc::read(ack_r, byte.as_mut_ptr().cast(), 1) != 1 {
                    return 1;
                }
                libc::close(c);
                if i % 100 == 99 {
                    libc::usleep(20_000);
                }
            }
        }
        0
    });
    let reap = ChildGuard(client);
    for _ in 0..names {
        let (server, _) = listener.accept().unwrap();
        drop(server);
        // SAFETY: one byte to our own pipe.
        unsafe { libc::write(ack_w, [1u8].as_ptr().cast(), 1) };
    }
    close_fd(ack_w);
    close_fd(ack_r);
    let status = wait_child(client);
    std::mem::forget(reap); // reaped: its pid may be another process's now
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the client failed to connect: {status:#x}"
    );
    // A debug build under qemu's emulation (on a loaded machine, slower still) takes a while
    // to work through the connections.
    let deadline = Instant::now() + start_limit() * 4;
    // A name whose close the kernel did not run a program for (counted: a skip, or a
    // transition found missing) has no workload: what is promised is that it is counted.
    let lost = |s: &[(String, f64)]| {
        value(s, "finwait_kernel_skipped_total", &[]).unwrap_or(0.0)
            + value(s, "finwait_transitions_missed_total", &[]).unwrap_or(0.0)
    };
    let s = loop {
        let s = scrape(metrics);
        let seen = value(&s, "finwait_workloads_evicted_total", &[]).unwrap_or(0.0)
            + value(&s, "finwait_workloads", &[]).unwrap_or(0.0)
            + lost(&s);
        if seen >= names as f64 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let series = |name: &str| {
        s.iter()
            .filter(|(l, _)| l.starts_with(&format!("{name}{{")))
            .count()
    };
    let fw2 = series("finwait_fin_wait2_entries_total");
    eprintln!(
        "{names} names: {fw2} fin_wait2 series, {} workloads, {} evicted, {} folded, {} lost \
         (counted)",
        value(&s, "finwait_workloads", &[]).unwrap_or(-1.0),
        value(&s, "finwait_workloads_evicted_total", &[]).unwrap_or(-1.0),
        value(&s, "finwait_workloads_folded_total", &[]).unwrap_or(-1.0),
        lost(&s),
    );
    // Each workload has at most one series per cause; the names here all close().
    assert!(fw2 <= CAP + 1, "{fw2} series for a cap of {CAP}");
    assert!(series("finwait_close_wait_entries_total") <= CAP + 1);
    assert!(value(&s, "finwait_workloads", &[]).unwrap() <= CAP as f64);
    let evicted = value(&s, "finwait_workloads_evicted_total", &[]).unwrap();
    assert!(
        evicted + lost(&s) >= (names - CAP) as f64,
        "every name beyond the cap evicted an idle one or was counted lost: {evicted} evicted, \
         {} lost",
        lost(&s)
    );
    assert_eq!(value(&s, "finwait_events_lost_total", &[]), Some(0.0));
    tracer.stop_when_with_skips(&[]);
}

#[test]
fn quiet_endpoint_stops_cleanly_on_sigterm_and_a_taken_port_is_a_clear_error() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(finwait_trace())
        .args(["--metrics", &addr, "--duration", "5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("--metrics {addr}: cannot listen there")) && err.contains("in use"),
        "{err}"
    );
    drop(taken);

    let port = free_port();
    let child = Command::new(finwait_trace())
        .args(mode_args(&[]))
        .args(["--metrics", &format!("127.0.0.1:{port}"), "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let up = loop {
        if let Some(body) = http_get(port, "/metrics")
            && body.contains("finwait_info{")
        {
            break body;
        }
        assert!(Instant::now() < deadline, "the endpoint never answered");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(up.contains("# TYPE finwait_records counter"), "{up}");
    assert!(up.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    assert_eq!(
        http_status(port, "/"),
        Some((
            404,
            "finwait-trace serves GET /metrics, /ready and /healthz\n".into()
        ))
    );
    // Seeded, since /metrics answered: ready; and alive.
    assert_eq!(http_status(port, "/ready"), Some((200, "ready\n".into())));
    assert_eq!(http_status(port, "/healthz"), Some((200, "ok\n".into())));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = output_within(child, Duration::from_secs(20));
    assert!(out.status.success(), "{:?}", out.status);
    assert!(
        out.stdout.is_empty(),
        "--quiet printed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        http_get(port, "/metrics").is_none(),
        "the endpoint outlived the tracer"
    );
}

/// The endpoint leaves out its own connections and nothing else: an application on the same
/// port number, on another loopback address, is traced (its CLOSE_WAIT reported), while the
/// scrapes on the endpoint's address leave no report.
#[test]
fn an_application_on_the_metrics_port_is_traced_and_the_scrapes_are_not() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let port = free_port();
    let endpoint = format!("127.0.0.2:{port}");
    let child = Command::new(finwait_trace())
        .args(mode_args(&[]))
        .args(["--metrics", &endpoint, "--json", "--no-snapshot"])
        .args(["--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let get = |path: &str| -> Option<String> {
        let mut s = TcpStream::connect(&endpoint).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).ok()?;
        Some(reply)
    };
    // Scraped only once it serves (before its start line): a scraper that gives up on a
    // tracer still loading closes its connection before the endpoint ever saw it, and that
    // close is the scraper's own, traced like any.
    let mut child = child;
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = lines
        .recv_timeout(start_limit())
        .expect("tracer did not start");
    assert!(start.contains(r#""event":"start""#), "{start}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !get("/ready").is_some_and(|r| r.starts_with("HTTP/1.0 200")) {
        assert!(Instant::now() < deadline, "the endpoint never became ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The application: same port, another address; its client closes, its socket waits.
    let app = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (held, _) = app.accept().unwrap();
    drop(client);
    for _ in 0..5 {
        assert!(get("/metrics").is_some());
    }
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = output_within(child, Duration::from_secs(30));
    drop(held);
    assert!(out.status.success(), "{out:?}");
    reader.join().unwrap();
    let stdout: String = lines.iter().map(|l| l + "\n").collect();
    let transitions: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "transition")
        .collect();
    let close_wait = transitions
        .iter()
        .any(|v| v["to"] == "CLOSE_WAIT" && v["lport"] == port && v["laddr"] == "127.0.0.1");
    assert!(
        close_wait,
        "the application's CLOSE_WAIT is missing:\n{stdout}"
    );
    let scrapes: Vec<_> = transitions
        .iter()
        .filter(|v| v["laddr"] == "127.0.0.2" || v["raddr"] == "127.0.0.2")
        .collect();
    assert!(
        scrapes.is_empty(),
        "the endpoint's own connections: {scrapes:#?}"
    );
}

/// `--metrics HOST:0`: the kernel picks the port, and the tracer says which, so it can be
/// scraped.
#[test]
fn metrics_on_port_zero_says_the_port_it_bound() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut child = Command::new(finwait_trace())
        .args(mode_args(&[]))
        .args(["--metrics", "127.0.0.1:0", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let port = loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(n > 0, "the tracer ended without saying its port");
        if let Some(rest) = line.trim_end().split("serving on 127.0.0.1:").nth(1) {
            break rest.parse::<u16>().unwrap();
        }
    };
    assert_ne!(port, 0);
    // Drain the rest of stderr so the tracer never blocks on it.
    let drain = std::thread::spawn(move || stderr.read_to_end(&mut Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_status(port, "/healthz").is_none() {
        assert!(
            Instant::now() < deadline,
            "nothing answers on the port it named"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let _ = drain.join();
}

/// Whether the endpoint has dropped `s` (closed or reset), without reading what it sent.
fn dropped(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

fn connect_nonblocking(port: u16) -> Option<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_nonblocking(true).ok()?;
    Some(s)
}

/// A client that asks for `/metrics` many times at once and reads none of the answers: a small
/// receive buffer, so the endpoint's writes soon wait on it.
fn connect_unread(port: u16) -> Option<TcpStream> {
    let mut s = connect_nonblocking(port)?;
    let small: libc::c_int = 4096;
    // SAFETY: an int option on our own socket.
    unsafe {
        libc::setsockopt(
            fd(&s) as i32,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const small).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    pipeline(&mut s);
    Some(s)
}

/// A hundred more requests, as many as go in without waiting.
fn pipeline(s: &mut TcpStream) {
    let requests = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".repeat(100);
    let _ = s.write(requests.as_bytes());
}

/// For `how_long`, at once: 100 clients sending a request head a byte at a time, 100 that
/// send nothing, 64 that keep pipelining requests and never read; each dropped one comes back within
/// half a second. How many connections were made.
fn hostile_clients(port: u16, how_long: Duration) -> usize {
    const HEAD: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
    let mut slow: Vec<(Option<TcpStream>, usize)> = (0..100).map(|_| (None, 0)).collect();
    let mut idle: Vec<Option<TcpStream>> = (0..100).map(|_| None).collect();
    let mut unread: Vec<Option<TcpStream>> = (0..64).map(|_| None).collect();
    let mut made = 0;
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        for (s, sent) in &mut slow {
            if s.as_ref().is_none_or(dropped) {
                *s = connect_nonblocking(port);
                made += 1;
                *sent = 0;
            }
            if let Some(c) = s {
                let byte = HEAD.get(*sent).copied().unwrap_or(b'x');
                if c.write(&[byte]).is_ok() {
                    *sent += 1;
                }
            }
        }
        for s in &mut idle {
            if s.as_ref().is_none_or(dropped) {
                *s = connect_nonblocking(port);
                made += 1;
            }
        }
        for s in &mut unread {
            match s {
                Some(c) if !dropped(c) => pipeline(c),
                _ => {
                    *s = connect_unread(port);
                    made += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    made
}

/// issue 28: slowloris clients, idle ones and ones that pipeline requests without reading the
/// answers, all at once, do not keep out a real Prometheus that starts scraping (every second)
/// while they go on, nor make it miss a scrape after: each has a deadline, and at the cap a
/// newcomer sheds the least active connection.
#[test]
fn hostile_clients_do_not_make_prometheus_miss_a_scrape() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let metrics = free_port();
    // The tracer follows a sleeper alone: the attack's connections are not its findings.
    let mut sleeper = Command::new("sleep").arg("600").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let tracer = Tracer::start(&[
        "--metrics",
        &format!("127.0.0.1:{metrics}"),
        "--no-snapshot",
        "--pid",
        &pid,
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_status(metrics, "/ready").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The attack first: Prometheus must get in while it goes on, then stay in.
    const ATTACK: u64 = 25;
    let attack =
        std::thread::spawn(move || hostile_clients(metrics, Duration::from_secs(ATTACK + 10)));
    std::thread::sleep(Duration::from_secs(3));
    let Some(prom) = Prometheus::start(metrics) else {
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        return;
    };
    let made = attack.join().unwrap();
    let window = format!("up{{job=\"finwait\"}}[{ATTACK}s]");
    let scrapes = prom.value(&format!("count_over_time({window})"));
    let worst = prom.value(&format!("min_over_time({window})"));
    let good = prom.value(&format!("sum_over_time({window})"));
    let s = scrape(metrics);
    let dropped = |reason| {
        value(
            &s,
            "finwait_metrics_connections_dropped_total",
            &[("reason", reason)],
        )
    };
    eprintln!(
        "{made} hostile connections; Prometheus in the last {ATTACK} s: {scrapes:?} scrapes, {good:?} \
         up, worst up {worst:?}; dropped: shed {:?}, header timeout {:?}, write timeout {:?}",
        dropped("shed"),
        dropped("header_timeout"),
        dropped("write_timeout"),
    );
    assert_eq!(worst, Some(1.0), "a scrape failed during the attack");
    assert!(
        scrapes.is_some_and(|n| n >= (ATTACK - 5) as f64),
        "scrapes in {ATTACK} s: {scrapes:?}"
    );
    assert!(dropped("shed").is_some_and(|n| n > 0.0), "{s:?}");
    assert!(dropped("write_timeout").is_some_and(|n| n > 0.0), "{s:?}");
    drop(tracer);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// Whether `openssl` is here to make certificates: the qemu guests carry the test binaries
/// only (the endpoint is userspace, the same on every kernel: the host tests TLS for real).
fn openssl_here() -> bool {
    let here = Command::new("openssl").arg("version").output().is_ok();
    if !here {
        assert!(
            std::env::var_os("FINWAIT_TEST_GUEST").is_some(),
            "no openssl: Debian's openssl package makes the TLS tests' certificates"
        );
        eprintln!("no openssl in this guest: TLS is tested on the host");
    }
    here
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with `openssl` in
/// `dir`: `ca.crt`, `server.{crt,key}`, `client.{crt,key}`.
fn certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    openssl(
        &[
            &["req", "-x509", "-nodes", "-days", "2"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-subj",
                "/CN=finwait test CA",
            ],
        ]
        .concat(),
    );
    for (who, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{who}.ext")), ext).unwrap();
        let (key, csr, crt) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.crt"),
        );
        let subject = format!("/CN={who}");
        openssl(
            &[
                &["req", "-nodes"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", &subject],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            &format!("{who}.ext"),
        ]);
    }
}

/// `curl` over TLS to the endpoint: the HTTP status, or curl's exit code as an error.
fn curl(dir: &Path, port: u16, path: &str, extra: &[&str]) -> Result<(u16, String), i32> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D", "-", "--cacert"])
        .arg(dir.join("ca.crt"))
        .args(extra)
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    if !out.status.success() {
        return Err(out.status.code().unwrap_or(-1));
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

/// `--web-config-file` as node_exporter's: TLS with verified client certificates and basic
/// auth. A real Prometheus with the CA, its client certificate and the password scrapes it;
/// without the certificate, with a wrong password, or over plain HTTP, nothing is served.
#[test]
fn prometheus_scrapes_over_tls_with_a_client_certificate_and_basic_auth() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !openssl_here() {
        return;
    }
    let dir = TempDir(temp_dir("tls"));
    let d = dir.0.as_path();
    certificates(d);
    let hash = bcrypt::hash("s3cret", 10).unwrap();
    // Relative paths: relative to the file's directory, whatever the tracer's is.
    let web = d.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
             client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n  \
             min_version: TLS12\n\
             basic_auth_users:\n  prometheus: {hash}\n\
             http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n"
        ),
    )
    .unwrap();
    let metrics = free_port();
    let tracer = Tracer::start(&[
        "--metrics",
        &format!("127.0.0.1:{metrics}"),
        "--web-config-file",
        web.to_str().unwrap(),
        "--no-snapshot",
    ]);
    let cert = [
        "--cert",
        &d.join("client.crt").display().to_string(),
        "--key",
        &d.join("client.key").display().to_string(),
    ]
    .map(String::from);
    let cert: Vec<&str> = cert.iter().map(String::as_str).collect();
    let with = |user: &'static str| [&cert[..], &["-u", user]].concat();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (status, head) = loop {
        if let Ok(r @ (200, _)) = curl(d, metrics, "/ready", &with("prometheus:s3cret")) {
            break r;
        }
        assert!(Instant::now() < deadline, "never ready over TLS");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(status, 200);
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    // Every path is authenticated, as exporter-toolkit does.
    let (status, head) = curl(d, metrics, "/healthz", &with("prometheus:wrong")).unwrap();
    assert_eq!(status, 401, "{head}");
    assert!(head.contains("www-authenticate: Basic"), "{head}");
    assert_eq!(curl(d, metrics, "/metrics", &cert).unwrap().0, 401);
    assert!(
        curl(d, metrics, "/metrics", &["-u", "prometheus:s3cret"]).is_err(),
        "served a client without a certificate"
    );
    assert_eq!(http_status(metrics, "/metrics"), None, "served plain HTTP");

    let ca = d.join("ca.crt").display().to_string();
    let (crt, key) = (cert[1], cert[3]);
    let job = |name: &str, tls: &str, password: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config: {{ca_file: '{ca}'{tls}}}\n    \
             basic_auth: {{username: prometheus, password: '{password}'}}\n    \
             static_configs:\n      - targets: ['127.0.0.1:{metrics}']\n"
        )
    };
    let with_cert = format!(", cert_file: '{crt}', key_file: '{key}'");
    let jobs = [
        job("finwait", &with_cert, "s3cret"),
        job("nocert", "", "s3cret"),
        job("wrongpw", &with_cert, "guess"),
    ]
    .concat();
    let Some(prom) = Prometheus::with_jobs(&jobs) else {
        return;
    };
    prom.wait_for("up{job=\"finwait\"}", "1");
    prom.wait_for("count(finwait_info{job=\"finwait\"})", "1");
    prom.wait_for("up{job=\"nocert\"}", "0");
    prom.wait_for("up{job=\"wrongpw\"}", "0");
    // The wrong password's scrapes are counted (in the scrapes the right one makes).
    let refused = prom.wait_for(
        "finwait_metrics_unauthorized_total{job=\"finwait\"} > bool 0",
        "1",
    );
    eprintln!("Prometheus over TLS: refused {refused}");
    drop(prom);
    drop(tracer);
}

/// A bad `--web-config-file` is a usage error, naming the file and the key, before anything
/// loads.
#[test]
fn a_bad_web_config_file_is_refused_at_start_naming_it() {
    let dir = TempDir(temp_dir("webcfg"));
    let web = dir.0.join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: a.crt\n  keyfile: a.key\n",
    )
    .unwrap();
    let out = Command::new(finwait_trace())
        .args(["--metrics", "127.0.0.1:0", "--web-config-file"])
        .arg(&web)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("--web-config-file {}", web.display())) && err.contains("keyfile"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// At its open-files limit the endpoint backs off, says so once, counts each failed accept,
/// and still lets a scraper in (a connection that never asked makes room for it).
#[test]
fn at_the_open_files_limit_the_endpoint_says_so_once_and_still_serves() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let port = free_port();
    let mut sleeper = Command::new("sleep").arg("600").spawn().unwrap();
    let mut child = Command::new(finwait_trace())
        .args(mode_args(&[]))
        .args(["--metrics", &format!("127.0.0.1:{port}"), "--quiet"])
        .args(["--no-snapshot", "--pid", &sleeper.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        all
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_status(port, "/ready").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Room for eight more open files, then a hundred connections that send nothing.
    let pid = child.id() as i32;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let limit = libc::rlimit {
        rlim_cur: open + 8,
        rlim_max: open + 8,
    };
    // SAFETY: sets a limit of our own child.
    assert_eq!(
        unsafe {
            libc::prlimit(
                pid,
                libc::RLIMIT_NOFILE,
                &raw const limit,
                std::ptr::null_mut(),
            )
        },
        0
    );
    let held: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let scraped = (0..10).find_map(|_| {
        let body = http_get(port, "/metrics");
        if body.is_none() {
            std::thread::sleep(Duration::from_millis(300));
        }
        body
    });
    drop(held);
    let body = scraped.expect("no scrape got in at the open-files limit");
    // The hundred gone, it serves as before (the limit still lowered).
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..5 {
        assert_eq!(http_status(port, "/healthz"), Some((200, "ok\n".into())));
    }
    let s: Vec<(String, f64)> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            Some((series.to_string(), v.parse().ok()?))
        })
        .collect();
    let errors = value(&s, "finwait_metrics_accept_errors_total", &[]);
    let made_room = value(
        &s,
        "finwait_metrics_connections_dropped_total",
        &[("reason", "fd_limit")],
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let err = drain.join().unwrap();
    let said = err.matches("accept failed").count();
    eprintln!("accept errors {errors:?}, made room {made_room:?}, said {said} times:\n{err}");
    assert!(errors.is_some_and(|n| n >= 1.0), "{body}");
    assert!(made_room.is_some_and(|n| n >= 1.0), "{body}");
    assert!((1..=2).contains(&said), "{err}");
    assert!(status.success(), "{status:?}: {err}");
}

/// The other client-certificate policies, by curl: `VerifyClientCertIfGiven` serves a client
/// without a certificate and refuses one the CA did not sign; `RequireAnyClientCert` refuses a
/// client without one and serves one the CA did not sign (not checked, as in Go).
#[test]
fn client_certificates_optional_or_unchecked_as_exporter_toolkit_says() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !openssl_here() {
        return;
    }
    let dir = TempDir(temp_dir("tls-policies"));
    let d = dir.0.as_path();
    certificates(d);
    // A client certificate of its own CA: not one the server's CA signed.
    let stranger = d.join("stranger");
    std::fs::create_dir_all(&stranger).unwrap();
    certificates(&stranger);
    let cert_of = |dir: &Path| {
        [
            "--cert".to_string(),
            dir.join("client.crt").display().to_string(),
            "--key".to_string(),
            dir.join("client.key").display().to_string(),
        ]
    };
    let (own, strange) = (cert_of(d), cert_of(&stranger));
    let own: Vec<&str> = own.iter().map(String::as_str).collect();
    let strange: Vec<&str> = strange.iter().map(String::as_str).collect();
    for (policy, served) in [
        ("VerifyClientCertIfGiven", [true, true, false]),
        ("RequireAnyClientCert", [false, true, true]),
    ] {
        let web = d.join(format!("{policy}.yml"));
        std::fs::write(
            &web,
            format!(
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
                 client_auth_type: {policy}\n  client_ca_file: ca.crt\n"
            ),
        )
        .unwrap();
        let metrics = free_port();
        let tracer = Tracer::start(&[
            "--metrics",
            &format!("127.0.0.1:{metrics}"),
            "--web-config-file",
            web.to_str().unwrap(),
            "--no-snapshot",
        ]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while curl(d, metrics, "/ready", &own).map(|r| r.0) != Ok(200) {
            assert!(Instant::now() < deadline, "{policy}: never ready over TLS");
            std::thread::sleep(Duration::from_millis(300));
        }
        for (client, want) in [("none", &[][..]), ("own", &own), ("stranger", &strange)]
            .iter()
            .zip(served)
        {
            let got = curl(d, metrics, "/healthz", client.1);
            assert_eq!(
                got.as_ref().is_ok_and(|r| r.0 == 200),
                want,
                "{policy}, {} certificate: {got:?}",
                client.0
            );
        }
        drop(tracer);
    }
}

/// A connection that sends nothing, and one that sends its head a byte a second, are closed
/// at the header deadline (5 s), and counted.
#[test]
fn idle_and_slow_connections_are_closed_at_the_header_deadline() {
    let _one = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let metrics = free_port();
    let mut sleeper = Command::new("sleep").arg("600").spawn().unwrap();
    let tracer = Tracer::start(&[
        "--metrics",
        &format!("127.0.0.1:{metrics}"),
        "--no-snapshot",
        "--pid",
        &sleeper.id().to_string(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_status(metrics, "/ready").map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    let opened = Instant::now();
    let mut idle = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    let mut slow = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    slow.set_nonblocking(true).unwrap();
    let mut closed = None;
    for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa" {
        if dropped(&slow) {
            closed = Some(opened.elapsed());
            break;
        }
        let _ = slow.write(&[*b]);
        std::thread::sleep(Duration::from_millis(500));
    }
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let n = idle.read(&mut [0u8; 64]).unwrap_or(usize::MAX);
    let idle_closed = opened.elapsed();
    let slow_closed = closed.expect("the slow head was never cut off");
    eprintln!("idle closed after {idle_closed:?} (read {n}), slow after {slow_closed:?}");
    assert_eq!(n, 0, "the idle connection was not closed");
    for t in [idle_closed, slow_closed] {
        assert!(
            t >= Duration::from_secs(4) && t < Duration::from_secs(9),
            "{t:?}"
        );
    }
    let s = scrape(metrics);
    let timed_out = value(
        &s,
        "finwait_metrics_connections_dropped_total",
        &[("reason", "header_timeout")],
    );
    assert!(timed_out.is_some_and(|n| n >= 2.0), "{timed_out:?}");
    drop(tracer);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
