//! `--metrics`: the findings as Prometheus metrics, by workload (process name and container),
//! for the endpoint in [`super::endpoint`] to serve. A sink like the others; it keeps the
//! sockets someone must close, seeded by the start-up snapshot, so that its gauges are exact.
use std::{
    collections::HashMap,
    fmt, io,
    sync::Arc,
    time::{Duration, Instant},
};

use finwait_common::TcpState;
use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use super::{Sink, Start, Stats};
use crate::{
    host::namespaces,
    model::{
        Comm, Container, Endpoints, Owner, Report, Stuck, Task, TransitionKind, TransitionReport,
        Verdict, summary::Summary,
    },
    snapshot::Snapshot,
};

/// Who a series is about: a process name and where it runs. Never a pid, port or address.
#[derive(Clone, Debug)]
pub(crate) struct Workload {
    comm: Comm,
    container_id: Option<Arc<str>>,
    pod_uid: Option<Arc<str>>,
    systemd_unit: Option<Arc<str>>,
    /// The pod's namespace and name, where the node shows them: not a label of the workload's
    /// series (a pod's UID says it already) but of `finwait_pod_info`, to join on.
    pod: Option<(Arc<str>, Arc<str>)>,
}

/// The series' identity: the labels, without the pod's name (known later than its UID at times).
impl PartialEq for Workload {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.comm,
            &self.container_id,
            &self.pod_uid,
            &self.systemd_unit,
        ) == (&o.comm, &o.container_id, &o.pod_uid, &o.systemd_unit)
    }
}

impl Eq for Workload {}

impl std::hash::Hash for Workload {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (
            &self.comm,
            &self.container_id,
            &self.pod_uid,
            &self.systemd_unit,
        )
            .hash(h);
    }
}

impl Workload {
    fn new(comm: &Comm, c: Option<&Container>) -> Self {
        Self {
            comm: comm.clone(),
            container_id: c.and_then(|c| c.id.clone()),
            pod_uid: c.and_then(|c| c.pod_uid.clone()),
            systemd_unit: c.and_then(|c| c.systemd_unit.clone()),
            pod: c.and_then(|c| c.pod.clone()),
        }
    }

    fn of_task(t: Option<&Task>) -> Self {
        t.map_or_else(Self::unknown, |t| {
            Self::new(&t.comm, t.container.as_deref())
        })
    }

    fn of_owner(o: Option<&Owner>) -> Self {
        o.map_or_else(Self::unknown, |o| {
            Self::new(&o.comm, o.container.as_deref())
        })
    }

    fn named(comm: &str) -> Self {
        Self::new(&comm.into(), None)
    }

    /// A socket whose process finwait could not name.
    fn unknown() -> Self {
        Self::named("unknown")
    }
}

impl EncodeLabelSet for Workload {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        let or_empty = |v: &Option<Arc<str>>| v.as_deref().unwrap_or("").to_string();
        ("comm", &*self.comm).encode(e.encode_label())?;
        ("container_id", or_empty(&self.container_id)).encode(e.encode_label())?;
        ("k8s_pod_uid", or_empty(&self.pod_uid)).encode(e.encode_label())?;
        ("systemd_unit", or_empty(&self.systemd_unit)).encode(e.encode_label())
    }
}

/// `finwait_pod_info`'s labels: a pod's UID with its namespace and name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct PodLabels {
    k8s_pod_uid: Arc<str>,
    k8s_namespace: Arc<str>,
    k8s_pod_name: Arc<str>,
}

impl PodLabels {
    fn of(w: &Workload) -> Option<Self> {
        let (uid, (ns, name)) = (w.pod_uid.clone()?, w.pod.clone()?);
        Some(Self {
            k8s_pod_uid: uid,
            k8s_namespace: ns,
            k8s_pod_name: name,
        })
    }
}

/// A FIN_WAIT2 entry's series: the call that sent our FIN, and whose it was.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct CauseLabels {
    cause: &'static str,
    workload: Workload,
}

impl EncodeLabelSet for CauseLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("cause", self.cause).encode(e.encode_label())?;
        self.workload.encode(e)
    }
}

/// Every cause name a FIN_WAIT2 series can carry (an evicted workload's are all removed).
const CAUSES: [&str; 10] = [
    "shutdown",
    "close",
    "close_range",
    "dup2",
    "dup3",
    "exit",
    "peer_fin",
    "peer_rst",
    "timer",
    "unknown",
];

/// The metrics, registered once; each is shared with the registry the endpoint encodes.
#[derive(Default)]
struct Families {
    fin_wait2_entries: Family<CauseLabels, Counter>,
    close_wait_entries: Family<Workload, Counter>,
    closes_without_fin: Family<Workload, Counter>,
    half_closed: Family<Workload, Gauge>,
    close_wait: Family<Workload, Gauge>,
    /// 1 per pod with series, naming it (join on `k8s_pod_uid`).
    pod_info: Family<PodLabels, Gauge>,
}

/// The tracer's own health, set from its counters every second.
#[derive(Default)]
struct Health {
    records: Counter,
    lost: Counter,
    skipped: Counter,
    recovered: Counter,
    read_failed: Counter,
    transitions_missed: Counter,
    owner_map_full: Counter,
    sockets_evicted: Counter,
    containers_unresolved: Counter,
    gauge_corrections: Counter,
    attach_failed: Gauge,
    rss_bytes: Gauge,
    workloads: Gauge,
    workloads_evicted: Counter,
    workloads_folded: Counter,
}

impl Health {
    /// Name, help and counter of each.
    fn counters(&self) -> [(&'static str, &'static str, &Counter); 12] {
        [
            ("records", "Ring-buffer records read", &self.records),
            (
                "events_lost",
                "Events lost: the ring buffer was full",
                &self.lost,
            ),
            (
                "kernel_skipped",
                "Events lost: the kernel skipped the program (another BPF program was running on that CPU)",
                &self.skipped,
            ),
            (
                "kernel_recovered",
                "Events the kernel skipped a guarded hook's first program for, which its second caught (not lost)",
                &self.recovered,
            ),
            (
                "kernel_read_failed",
                "Kernel memory reads that failed in the programs",
                &self.read_failed,
            ),
            (
                "transitions_missed",
                "Transitions of reported sockets that never arrived (seen by the next transition or the exit check)",
                &self.transitions_missed,
            ),
            (
                "owner_map_full",
                "Socket owners not recorded: the kernel's ownership map was full",
                &self.owner_map_full,
            ),
            (
                "sockets_evicted",
                "Tracked sockets evicted from userspace's table (their later transitions lose their cause)",
                &self.sockets_evicted,
            ),
            (
                "containers_unresolved",
                "Tasks whose cgroup could not be found",
                &self.containers_unresolved,
            ),
            (
                "gauge_corrections",
                "Sockets the gauges counted that the kernel no longer had in that state (their last transition was lost or evicted)",
                &self.gauge_corrections,
            ),
            (
                "workloads_evicted",
                "Idle workloads whose series were removed to stay under --metrics-max-workloads",
                &self.workloads_evicted,
            ),
            (
                "workloads_folded",
                "Events of new workloads counted under comm=\"other\" (every series held sockets)",
                &self.workloads_folded,
            ),
        ]
    }
}

/// Time half-closed or in CLOSE_WAIT: 1 ms to 70 minutes, by powers of four.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

/// Which of the two gauges a held socket counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    HalfClosed,
    CloseWait,
}

/// One socket someone must close, and the series it counts in.
struct Held {
    kind: Kind,
    workload: Workload,
    /// To find it in the kernel's socket table when the gauges are checked.
    key: Key,
    /// The process it counts under: only sockets of processes in finwait's own network
    /// namespace are checked (sock_diag sees that one).
    pid: u32,
}

type Key = crate::model::EndsKey;

/// The gauges are checked against the kernel's socket table this often: a transition lost on
/// the way (counted) must not leave a socket counted forever.
const CHECK_EVERY: Duration = Duration::from_secs(60);

/// The workloads that have series, at most `max`; beyond it the least recently seen one that
/// holds nothing loses its series, and where every one holds sockets the newcomer is folded into
/// `comm="other"`.
struct Workloads {
    max: usize,
    /// Workload -> (sockets it holds now, last use).
    live: HashMap<Workload, (u64, u64)>,
    clock: u64,
}

impl Workloads {
    /// The series `w` counts in; `evict` removes a workload's series.
    fn label(&mut self, w: Workload, h: &Health, evict: impl FnOnce(&Workload)) -> Workload {
        self.clock += 1;
        if let Some(slot) = self.live.get_mut(&w) {
            slot.1 = self.clock;
            return w;
        }
        if self.live.len() >= self.max {
            let idle = self
                .live
                .iter()
                .filter(|(_, (held, _))| *held == 0)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(w, _)| w.clone());
            let Some(idle) = idle else {
                h.workloads_folded.inc();
                return Workload::named("other");
            };
            self.live.remove(&idle);
            evict(&idle);
            h.workloads_evicted.inc();
        }
        self.live.insert(w.clone(), (0, self.clock));
        w
    }

    fn held(&mut self, w: &Workload, delta: i64) {
        if let Some(slot) = self.live.get_mut(w) {
            slot.0 = slot.0.saturating_add_signed(delta);
        }
    }
}

pub(crate) struct MetricsSink {
    families: Families,
    health: Health,
    half_closed_seconds: Histogram,
    close_wait_seconds: Histogram,
    /// One series, 1: the mode, state hook, kernel and version as labels.
    info: Family<Vec<(&'static str, String)>, Gauge>,
    workloads: Workloads,
    /// Sockets someone must close, by kernel address (seen live) ...
    held: HashMap<u64, Held>,
    /// ... or by inode (found by the start-up snapshot, which has no addresses).
    seeded: HashMap<u64, Held>,
    checked_at: Instant,
    /// Set once the gauges are seeded (the endpoint answers from then on).
    ready: super::endpoint::Ready,
}

impl MetricsSink {
    /// The sink, and the registry holding its metrics (for the endpoint).
    pub(crate) fn new(max_workloads: usize) -> (Self, Registry) {
        let sink = Self {
            families: Families::default(),
            health: Health::default(),
            half_closed_seconds: duration_histogram(),
            close_wait_seconds: duration_histogram(),
            info: Family::default(),
            workloads: Workloads {
                max: max_workloads,
                live: HashMap::new(),
                clock: 0,
            },
            held: HashMap::new(),
            seeded: HashMap::new(),
            checked_at: Instant::now(),
            ready: Default::default(),
        };
        let registry = sink.registry();
        (sink, registry)
    }

    /// The flag the endpoint reads: set once the gauges are seeded.
    pub(crate) fn readiness(&self) -> super::endpoint::Ready {
        self.ready.clone()
    }

    fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("finwait");
        let f = &self.families;
        r.register(
            "fin_wait2_entries",
            "Sockets that entered FIN_WAIT2, by the call that sent our FIN and the workload that made it",
            f.fin_wait2_entries.clone(),
        );
        r.register(
            "close_wait_entries",
            "Sockets that entered CLOSE_WAIT (the peer closed), by the workload that holds them",
            f.close_wait_entries.clone(),
        );
        r.register(
            "closes_without_fin",
            "close() calls that sent no FIN because another reference to the socket remained",
            f.closes_without_fin.clone(),
        );
        r.register(
            "half_closed_sockets",
            "Sockets half-closed by shutdown() now: the application must close them (no kernel timeout)",
            f.half_closed.clone(),
        );
        r.register(
            "close_wait_sockets",
            "Sockets in CLOSE_WAIT now: their owner must close them (CLOSE_WAIT never times out)",
            f.close_wait.clone(),
        );
        r.register_with_unit(
            "half_closed_duration",
            "Time from FIN_WAIT2 after shutdown() to its end",
            Unit::Seconds,
            self.half_closed_seconds.clone(),
        );
        r.register_with_unit(
            "close_wait_duration",
            "Time in CLOSE_WAIT before the owner closed",
            Unit::Seconds,
            self.close_wait_seconds.clone(),
        );
        r.register(
            "info",
            "How finwait-trace runs here (labels), always 1",
            self.info.clone(),
        );
        r.register(
            "pod_info",
            "A Kubernetes pod with series here: its namespace and name by UID (from the node's /var/log/pods), always 1",
            f.pod_info.clone(),
        );
        self.register_health(&mut r);
        r
    }

    fn register_health(&self, r: &mut Registry) {
        for (name, help, c) in self.health.counters() {
            r.register(name, help, c.clone());
        }
        let h = &self.health;
        let gauges: [(&str, &str, &Gauge); 3] = [
            (
                "attach_failed",
                "Hooks that failed to attach",
                &h.attach_failed,
            ),
            ("workloads", "Workloads with series now", &h.workloads),
            (
                "resident_memory_bytes",
                "finwait-trace's resident memory",
                &h.rss_bytes,
            ),
        ];
        for (name, help, g) in gauges {
            r.register(name, help, g.clone());
        }
    }

    /// A socket someone must close, counted under `w` (a series label from [`Self::counted`]).
    fn hold(&mut self, sock: u64, kind: Kind, w: Workload, ends: &Endpoints, pid: u32) {
        self.gauge(kind, &w).inc();
        self.workloads.held(&w, 1);
        let held = Held {
            kind,
            workload: w,
            key: ends.key(),
            pid,
        };
        if let Some(old) = self.held.insert(sock, held) {
            self.release_held(&old);
        }
    }

    /// Every socket counted that the kernel no longer has in its state (for a half-closed one:
    /// held by a process, with an inode) is released and counted as a correction.
    fn check_against_kernel(&mut self) {
        use netlink_packet_sock_diag::inet::StateFlags;
        // Each holder's namespace, looked up once; only those namespaces are read.
        let mut ns_of: HashMap<u32, Option<u64>> = HashMap::new();
        for h in self.held.values().chain(self.seeded.values()) {
            ns_of
                .entry(h.pid)
                .or_insert_with(|| namespaces::of_pid(h.pid));
        }
        let needed: std::collections::HashSet<u64> = ns_of.values().flatten().copied().collect();
        // Ends repeat across namespaces (every pod has its own 127.0.0.1): keyed by both.
        let mut now: HashMap<(u64, Key), (TcpState, u64)> = HashMap::new();
        let states = StateFlags::CLOSE_WAIT | StateFlags::FIN_WAIT2;
        let read = namespaces::dump_where(
            &states,
            |ns| needed.contains(&ns),
            |s| {
                now.insert((s.netns, s.key()), (s.state, s.inode));
            },
        );
        let Ok(coverage) = read else {
            return; // checked next time; nothing is released on a failed read
        };
        // A holder's namespace that was not read (or a holder gone) is not checked.
        let read: std::collections::HashSet<u64> = coverage.read.into_iter().collect();
        self.release_gone(|h| {
            let Some(ns) = ns_of
                .get(&h.pid)
                .copied()
                .flatten()
                .filter(|ns| read.contains(ns))
            else {
                return false;
            };
            match (h.kind, now.get(&(ns, h.key))) {
                (Kind::CloseWait, Some((state, _))) => *state != TcpState::CloseWait,
                (Kind::HalfClosed, Some((state, inode))) => {
                    *state != TcpState::FinWait2 || *inode == 0
                }
                (_, None) => true,
            }
        });
    }

    fn release_gone(&mut self, mut gone: impl FnMut(&Held) -> bool) {
        let mut stale = Vec::new();
        for table in [&mut self.held, &mut self.seeded] {
            table.retain(|_, h| {
                let keep = !gone(h);
                if !keep {
                    stale.push((h.kind, h.workload.clone()));
                }
                keep
            });
        }
        for (kind, workload) in stale {
            self.health.gauge_corrections.inc();
            self.gauge(kind, &workload).dec();
            self.workloads.held(&workload, -1);
        }
    }

    fn release(&mut self, sock: u64, inode: u64) {
        let found = self
            .held
            .remove(&sock)
            .or_else(|| (inode != 0).then(|| self.seeded.remove(&inode)).flatten());
        if let Some(h) = found {
            self.release_held(&h);
        }
    }

    fn release_held(&mut self, h: &Held) {
        self.gauge(h.kind, &h.workload).dec();
        self.workloads.held(&h.workload, -1);
    }

    fn gauge(&self, kind: Kind, w: &Workload) -> Gauge {
        match kind {
            Kind::HalfClosed => self.families.half_closed.get_or_create_owned(w),
            Kind::CloseWait => self.families.close_wait.get_or_create_owned(w),
        }
    }

    /// The series `w`'s events count in (its own, or `other`).
    fn counted(&mut self, w: Workload) -> Workload {
        let f = &self.families;
        let w = self
            .workloads
            .label(w, &self.health, |gone| remove_series(f, gone));
        if let Some(pod) = PodLabels::of(&w) {
            f.pod_info.get_or_create(&pod).set(1);
        }
        w
    }

    fn transition(&mut self, t: &TransitionReport, verdict: Option<&Verdict>) {
        if t.old == TcpState::FinWait2 || t.old == TcpState::CloseWait || t.new == TcpState::Close {
            self.release(t.sock, t.inode);
        }
        // Entered while the start-up inventory was read, which saw it there too: one socket,
        // counted once, from the live report.
        if matches!(t.new, TcpState::FinWait2 | TcpState::CloseWait)
            && t.inode != 0
            && let Some(h) = self.seeded.remove(&t.inode)
        {
            self.release_held(&h);
        }
        if let Some(ns) = t.half_closed_ns.filter(|_| t.old == TcpState::FinWait2) {
            self.half_closed_seconds.observe(ns as f64 / 1e9);
        }
        if let Some(ns) = t.close_wait_ns.filter(|_| t.old == TcpState::CloseWait) {
            self.close_wait_seconds.observe(ns as f64 / 1e9);
        }
        match t.kind {
            TransitionKind::FinWait2Entered => {
                let task = t.cause.as_ref().and_then(|c| c.task.as_ref());
                let w = self.counted(Workload::of_task(task));
                let cause = t.cause.as_ref().map_or("unknown", |c| c.kind.name());
                let labels = CauseLabels {
                    cause,
                    workload: w.clone(),
                };
                self.families.fin_wait2_entries.get_or_create(&labels).inc();
                if matches!(verdict, Some(Verdict::ApplicationMustClose(_))) {
                    let pid = task.map_or(0, |t| t.pid);
                    self.hold(t.sock, Kind::HalfClosed, w, &t.ends, pid);
                }
            }
            TransitionKind::PeerFin => {
                let w = self.counted(Workload::of_owner(t.owner.as_ref()));
                self.families.close_wait_entries.get_or_create(&w).inc();
                let pid = t.owner.as_ref().map_or(0, |o| o.pid);
                self.hold(t.sock, Kind::CloseWait, w, &t.ends, pid);
            }
            TransitionKind::FinSent
            | TransitionKind::CloseWaitClosed
            | TransitionKind::FinWait2Left
            | TransitionKind::LastAckDone
            | TransitionKind::FinsCrossed
            | TransitionKind::ClosingDone
            | TransitionKind::Aborted
            | TransitionKind::Other => {}
        }
    }
}

/// Every series of a workload that no longer has its own.
fn remove_series(f: &Families, w: &Workload) {
    for cause in CAUSES {
        f.fin_wait2_entries.remove(&CauseLabels {
            cause,
            workload: w.clone(),
        });
    }
    for family in [&f.close_wait_entries, &f.closes_without_fin] {
        family.remove(w);
    }
    for family in [&f.half_closed, &f.close_wait] {
        family.remove(w);
    }
    if let Some(pod) = PodLabels::of(w) {
        f.pod_info.remove(&pod);
    }
}

/// A counter set to an absolute value read elsewhere (counters only grow).
fn set_counter(c: &Counter, v: u64) {
    let now = c.get();
    if v > now {
        c.inc_by(v - now);
    }
}

impl Sink for MetricsSink {
    fn start(&mut self, s: &Start) -> io::Result<()> {
        let labels = vec![
            ("mode", s.mode.to_string()),
            ("state_hook", s.state_hook.to_string()),
            ("kernel", s.kernel.clone()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
        ];
        self.info.get_or_create(&labels).set(1);
        Ok(())
    }

    /// The sockets already waiting for someone to close them count from the start.
    fn snapshot(&mut self, snap: &Snapshot, _detail: bool) -> io::Result<()> {
        let entries = &snap.entries;
        for e in entries {
            let kind = match (&e.verdict, e.sock.state) {
                (Verdict::OwnerMustClose(_), TcpState::CloseWait) => Kind::CloseWait,
                (Verdict::ApplicationMustClose(_), TcpState::FinWait2) => Kind::HalfClosed,
                _ => continue,
            };
            if e.sock.inode == 0 {
                continue;
            }
            let w = self.counted(Workload::of_owner(e.owners.first()));
            self.gauge(kind, &w).inc();
            self.workloads.held(&w, 1);
            let s = &e.sock;
            let held = Held {
                kind,
                workload: w,
                key: s.key(),
                pid: e.owners.first().map_or(0, |o| o.pid),
            };
            self.seeded.insert(e.sock.inode, held);
        }
        Ok(())
    }

    fn report(&mut self, r: &Report, verdict: Option<&Verdict>) -> io::Result<()> {
        match r {
            Report::Transition(t) => self.transition(t, verdict),
            Report::CloseNoFin(n) => {
                let w = self.counted(Workload::of_task(Some(&n.task)));
                self.families.closes_without_fin.get_or_create(&w).inc();
            }
        }
        Ok(())
    }

    fn stuck(&mut self, _s: &Stuck) -> io::Result<()> {
        Ok(())
    }

    fn summary(&mut self, _s: &Summary, _now_ns: u64) -> io::Result<()> {
        Ok(())
    }

    fn stats(&mut self, s: &Stats) -> io::Result<()> {
        self.health(s)
    }

    fn health(&mut self, s: &Stats) -> io::Result<()> {
        if self.checked_at.elapsed() >= CHECK_EVERY {
            self.checked_at = Instant::now();
            self.check_against_kernel();
        }
        let h = &self.health;
        set_counter(&h.records, s.records);
        set_counter(&h.lost, s.lost_ring_full);
        set_counter(&h.skipped, s.kernel_skipped_nested);
        set_counter(&h.recovered, s.kernel_recovered_nested);
        set_counter(&h.read_failed, s.kernel_read_failed);
        set_counter(&h.transitions_missed, s.transitions_missed);
        set_counter(&h.owner_map_full, s.owner_map_full);
        set_counter(&h.sockets_evicted, s.sockets_evicted);
        set_counter(&h.containers_unresolved, s.containers_unresolved);
        h.attach_failed.set(s.attach_failed as i64);
        h.rss_bytes.set((s.rss_kib * 1024) as i64);
        h.workloads.set(self.workloads.live.len() as i64);
        Ok(())
    }

    fn ready(&mut self) {
        self.ready.store(true, std::sync::atomic::Ordering::Release);
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use finwait_common::Call;

    use super::*;
    use crate::{
        host::sockdiag::DiagSocket,
        model::{Cause, CauseKind, Endpoints},
    };

    fn ends() -> Endpoints {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        Endpoints {
            local: lo,
            lport: 80,
            remote: lo,
            rport: 4000,
        }
    }

    fn owner(comm: &str, path: &str) -> Owner {
        Owner {
            pid: 7,
            comm: comm.into(),
            fd: 9,
            container: Some(Container::from_path(path).into()),
            ..Owner::default()
        }
    }

    /// A CLOSE_WAIT socket the start-up inventory found, with `ends()`.
    fn close_wait_at_start(inode: u64) -> DiagSocket {
        DiagSocket {
            state: TcpState::CloseWait,
            local: ends().local,
            lport: ends().lport,
            remote: ends().remote,
            rport: ends().rport,
            inode,
            uid: 0,
            timer: None,
            recv_queue: 1,
            send_queue: 0,
            netns: 0,
        }
    }

    fn close_wait(sock: u64, inode: u64, o: Owner) -> Report {
        let mut t = TransitionReport::new(
            1,
            sock,
            ends(),
            TcpState::Established,
            TcpState::CloseWait,
            inode,
        );
        t.owner = Some(o);
        Report::Transition(t)
    }

    fn closed(sock: u64, inode: u64) -> Report {
        let mut t = TransitionReport::new(
            2,
            sock,
            ends(),
            TcpState::CloseWait,
            TcpState::LastAck,
            inode,
        );
        t.close_wait_ns = Some(2_000_000_000);
        Report::Transition(t)
    }

    fn send(m: &mut MetricsSink, r: &Report) {
        let v = match r {
            Report::Transition(t) => t.verdict(),
            Report::CloseNoFin(_) => None,
        };
        m.report(r, v.as_ref()).unwrap();
    }

    fn text(r: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, r).unwrap();
        s
    }

    const DOCKER: &str = "/system.slice/docker-3f2a9c1b7d4e5f60718293a4b5c6d7e8f0112233445566778899aabbccddeeff.scope";

    #[test]
    fn close_wait_gauge_counts_seeded_and_live_sockets_by_container() {
        let (mut m, reg) = MetricsSink::new(10);
        let seeded = DiagSocket {
            lport: 80,
            rport: 5000,
            ..close_wait_at_start(77)
        };
        let entries = crate::snapshot::build(vec![seeded], |_| vec![owner("imapd", DOCKER)], &[]);
        m.snapshot(&Snapshot::of(entries), false).unwrap();
        send(&mut m, &close_wait(0x100, 55, owner("imapd", DOCKER)));
        let series = r#"finwait_close_wait_sockets{comm="imapd",container_id="3f2a9c1b7d4e5f60718293a4b5c6d7e8f0112233445566778899aabbccddeeff",k8s_pod_uid="",systemd_unit="docker-3f2a9c1b7d4e5f60718293a4b5c6d7e8f0112233445566778899aabbccddeeff.scope"}"#;
        assert!(
            text(&reg).contains(&format!("{series} 2\n")),
            "{}",
            text(&reg)
        );
        // The seeded one leaves by its inode (its address was never seen), the live one by
        // address.
        send(&mut m, &closed(0x999, 77));
        send(&mut m, &closed(0x100, 0));
        let t = text(&reg);
        assert!(t.contains(&format!("{series} 0\n")), "{t}");
        assert!(
            t.contains("finwait_close_wait_duration_seconds_count 2\n"),
            "{t}"
        );
        assert!(
            t.contains("finwait_close_wait_entries_total{comm=\"imapd\""),
            "{t}"
        );
        // A socket already released is not released twice.
        send(&mut m, &closed(0x100, 0));
        assert!(text(&reg).contains(&format!("{series} 0\n")));
    }

    /// A pod's name is not a label of its series (its UID is) but of `finwait_pod_info`, once
    /// per pod, to join on; a name found later does not split the pod's series in two.
    #[test]
    fn pods_are_named_once_in_pod_info() {
        let (mut m, reg) = MetricsSink::new(10);
        let path = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0d3c1a52_7e7f_4c5e_9a1b_2f6e8d9c0b1a.slice/cri-containerd-3f2a9c1b7d4e5f60718293a4b5c6d7e8f0112233445566778899aabbccddeeff.scope";
        let unnamed = owner("imapd", path);
        let mut named = owner("imapd", path);
        let mut c = Container::from_path(path);
        c.pod = Some(("shop".into(), "checkout".into()));
        named.container = Some(c.into());
        send(&mut m, &close_wait(0x100, 1, unnamed));
        send(&mut m, &close_wait(0x200, 2, named));
        let t = text(&reg);
        assert!(
            t.contains(r#"finwait_pod_info{k8s_pod_uid="0d3c1a52-7e7f-4c5e-9a1b-2f6e8d9c0b1a",k8s_namespace="shop",k8s_pod_name="checkout"} 1"#),
            "{t}"
        );
        let series: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("finwait_close_wait_sockets{"))
            .collect();
        assert_eq!(series.len(), 1, "{t}");
        assert!(series[0].ends_with(" 2"), "{t}");
    }

    /// A socket that enters CLOSE_WAIT while the start-up inventory is read is seen by both:
    /// counted once, and released once it closes.
    #[test]
    fn a_socket_seen_by_the_inventory_and_live_counts_once() {
        let (mut m, reg) = MetricsSink::new(10);
        let seeded = close_wait_at_start(77);
        let entries = crate::snapshot::build(vec![seeded], |_| vec![owner("imapd", DOCKER)], &[]);
        m.snapshot(&Snapshot::of(entries), false).unwrap();
        send(&mut m, &close_wait(0x100, 77, owner("imapd", DOCKER)));
        let gauge = |t: &str| {
            t.lines()
                .find(|l| l.starts_with("finwait_close_wait_sockets{"))
                .map(|l| l.rsplit_once(' ').unwrap().1.to_string())
        };
        assert_eq!(gauge(&text(&reg)).as_deref(), Some("1"), "{}", text(&reg));
        send(&mut m, &closed(0x100, 77));
        assert_eq!(gauge(&text(&reg)).as_deref(), Some("0"), "{}", text(&reg));
        assert!(text(&reg).contains("finwait_gauge_corrections_total 0\n"));
    }

    #[test]
    fn half_closed_gauge_follows_the_verdict() {
        let (mut m, reg) = MetricsSink::new(10);
        let mut t =
            TransitionReport::new(1, 0x200, ends(), TcpState::FinWait1, TcpState::FinWait2, 3);
        t.cause = Some(Cause {
            kind: CauseKind::Call(Call::Shutdown),
            how: Some(1),
            task: Some(Task {
                pid: 5,
                tid: 5,
                comm: "nginx".into(),
                ..Task::default()
            }),
            fd: Some(4),
            exact: false,
        });
        t.orphan = Some(false);
        send(&mut m, &Report::Transition(t));
        let t = text(&reg);
        assert!(t.contains("finwait_half_closed_sockets{comm=\"nginx\",container_id=\"\",k8s_pod_uid=\"\",systemd_unit=\"\"} 1\n"), "{t}");
        assert!(
            t.contains("finwait_fin_wait2_entries_total{cause=\"shutdown\",comm=\"nginx\""),
            "{t}"
        );
        let mut end =
            TransitionReport::new(2, 0x200, ends(), TcpState::FinWait2, TcpState::TimeWait, 3);
        end.half_closed_ns = Some(1_000_000);
        send(&mut m, &Report::Transition(end));
        let t = text(&reg);
        assert!(t.contains("finwait_half_closed_sockets{comm=\"nginx\",container_id=\"\",k8s_pod_uid=\"\",systemd_unit=\"\"} 0\n"), "{t}");
        assert!(
            t.contains("finwait_half_closed_duration_seconds_count 1\n"),
            "{t}"
        );
    }

    #[test]
    fn workloads_beyond_the_cap_evict_idle_ones_then_fold_into_other() {
        let (mut m, reg) = MetricsSink::new(3);
        // Three holders: nobody idle.
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            send(&mut m, &close_wait(i as u64 + 1, 0, owner(name, "/")));
        }
        send(&mut m, &close_wait(4, 0, owner("d", "/")));
        let t = text(&reg);
        assert!(
            t.contains("finwait_close_wait_sockets{comm=\"other\""),
            "{t}"
        );
        assert!(!t.contains("comm=\"d\""), "{t}");
        assert!(t.contains("finwait_workloads_folded_total 1\n"), "{t}");
        // `a` closes its socket: idle, so the next newcomer takes its place.
        send(&mut m, &closed(1, 0));
        send(&mut m, &close_wait(5, 0, owner("e", "/")));
        let t = text(&reg);
        assert!(!t.contains("comm=\"a\""), "{t}");
        assert!(t.contains("finwait_close_wait_sockets{comm=\"e\""), "{t}");
        assert!(t.contains("finwait_workloads_evicted_total 1\n"), "{t}");
        // The folded socket leaves the `other` series it was counted in.
        send(&mut m, &closed(4, 0));
        assert!(text(&reg).contains("finwait_close_wait_sockets{comm=\"other\",container_id=\"\",k8s_pod_uid=\"\",systemd_unit=\"\"} 0\n"));
    }

    #[test]
    fn sockets_the_kernel_no_longer_has_are_released_and_counted() {
        let (mut m, reg) = MetricsSink::new(10);
        send(&mut m, &close_wait(1, 0, owner("imapd", "/")));
        let mut other = ends();
        other.rport = 4001;
        let mut t =
            TransitionReport::new(1, 2, other, TcpState::Established, TcpState::CloseWait, 0);
        t.owner = Some(owner("imapd", "/"));
        send(&mut m, &Report::Transition(t));
        // The close of the first was lost: the kernel's table no longer has it.
        m.release_gone(|h| h.key.3 == 4000);
        let t = text(&reg);
        assert!(t.contains("finwait_close_wait_sockets{comm=\"imapd\",container_id=\"\",k8s_pod_uid=\"\",systemd_unit=\"\"} 1\n"), "{t}");
        assert!(t.contains("finwait_gauge_corrections_total 1\n"), "{t}");
        // Its late transition, if it comes, releases nothing more.
        send(&mut m, &closed(1, 0));
        assert!(text(&reg).contains("finwait_close_wait_sockets{comm=\"imapd\",container_id=\"\",k8s_pod_uid=\"\",systemd_unit=\"\"} 1\n"));
    }

    #[test]
    fn an_evicted_workload_loses_the_series_of_every_cause() {
        use finwait_common::Call::{Close, CloseRange, Dup2, Dup3, Shutdown};
        let kinds = [Shutdown, Close, CloseRange, Dup2, Dup3]
            .map(CauseKind::Call)
            .into_iter()
            .chain([
                CauseKind::Exit,
                CauseKind::PeerFin,
                CauseKind::PeerRst,
                CauseKind::Timer,
                CauseKind::Unknown,
            ]);
        for k in kinds {
            assert!(CAUSES.contains(&k.name()), "{}", k.name());
        }
    }

    #[test]
    fn counters_follow_absolute_values() {
        let c = Counter::default();
        set_counter(&c, 5);
        set_counter(&c, 3);
        set_counter(&c, 9);
        assert_eq!(c.get(), 9);
    }
}
