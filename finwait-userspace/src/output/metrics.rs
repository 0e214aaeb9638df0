//! `--metrics`: the findings as Prometheus metrics, by workload (process name and container),
//! for the endpoint in [`super::endpoint`] to serve. A sink like the others; it keeps the
//! sockets someone must close, seeded by the start-up snapshot, so that its gauges are exact.
use std::{collections::HashMap, fmt, io, sync::Arc};

use finwait_common::tcp_state as st;
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
    model::{Comm, Container, Owner, Report, Stuck, Task, TransitionReport, Verdict, summary::Summary},
    snapshot::Entry,
};

/// Who a series is about: a process name and where it runs. Never a pid, port or address.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Workload {
    comm: Comm,
    container_id: Option<Arc<str>>,
    pod_uid: Option<Arc<str>>,
    systemd_unit: Option<Arc<str>>,
}

impl Workload {
    fn new(comm: &Comm, c: Option<&Container>) -> Self {
        Self {
            comm: comm.clone(),
            container_id: c.and_then(|c| c.id.clone()),
            pod_uid: c.and_then(|c| c.pod_uid.clone()),
            systemd_unit: c.and_then(|c| c.systemd_unit.clone()),
        }
    }

    fn of_task(t: Option<&Task>) -> Self {
        t.map_or_else(Self::unknown, |t| Self::new(&t.comm, t.container.as_deref()))
    }

    fn of_owner(o: Option<&Owner>) -> Self {
        o.map_or_else(Self::unknown, |o| Self::new(&o.comm, o.container.as_deref()))
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
}

/// The tracer's own health, set from its counters every second.
#[derive(Default)]
struct Health {
    records: Counter,
    lost: Counter,
    skipped: Counter,
    read_failed: Counter,
    owner_map_full: Counter,
    sockets_evicted: Counter,
    containers_unresolved: Counter,
    attach_failed: Gauge,
    rss_bytes: Gauge,
    workloads: Gauge,
    workloads_evicted: Counter,
    workloads_folded: Counter,
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
}

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
        };
        let registry = sink.registry();
        (sink, registry)
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
        self.register_health(&mut r);
        r
    }

    fn register_health(&self, r: &mut Registry) {
        let h = &self.health;
        let counters: [(&str, &str, &Counter); 9] = [
            ("records", "Ring-buffer records read", &h.records),
            ("events_lost", "Events lost: the ring buffer was full", &h.lost),
            ("kernel_skipped", "Program runs the kernel skipped (another BPF program was running on that CPU)", &h.skipped),
            ("kernel_read_failed", "Kernel memory reads that failed in the programs", &h.read_failed),
            ("owner_map_full", "Socket owners not recorded: the kernel's ownership map was full", &h.owner_map_full),
            ("sockets_evicted", "Tracked sockets evicted from userspace's table (their later transitions lose their cause)", &h.sockets_evicted),
            ("containers_unresolved", "Tasks whose cgroup could not be found", &h.containers_unresolved),
            ("workloads_evicted", "Idle workloads whose series were removed to stay under --metrics-max-workloads", &h.workloads_evicted),
            ("workloads_folded", "Events of new workloads counted under comm=\"other\" (every series held sockets)", &h.workloads_folded),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        let gauges: [(&str, &str, &Gauge); 3] = [
            ("attach_failed", "Hooks that failed to attach", &h.attach_failed),
            ("workloads", "Workloads with series now", &h.workloads),
            ("resident_memory_bytes", "finwait-trace's resident memory", &h.rss_bytes),
        ];
        for (name, help, g) in gauges {
            r.register(name, help, g.clone());
        }
    }

    /// A socket someone must close, counted under `w`.
    fn hold(&mut self, sock: u64, kind: Kind, w: Workload) {
        let f = &self.families;
        let w = self.workloads.label(w, &self.health, |gone| remove_series(f, gone));
        self.gauge(kind, &w).inc();
        self.workloads.held(&w, 1);
        if let Some(old) = self.held.insert(sock, Held { kind, workload: w }) {
            self.release_held(&old);
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

    fn counted(&mut self, w: Workload) -> Workload {
        let f = &self.families;
        self.workloads
            .label(w, &self.health, |gone| remove_series(f, gone))
    }

    fn transition(&mut self, t: &TransitionReport, verdict: Option<&Verdict>) {
        if t.old == st::FIN_WAIT2 || t.old == st::CLOSE_WAIT || t.new == st::CLOSE {
            self.release(t.sock, t.inode);
        }
        if let Some(ns) = t.half_closed_ns.filter(|_| t.old == st::FIN_WAIT2) {
            self.half_closed_seconds.observe(ns as f64 / 1e9);
        }
        if let Some(ns) = t.close_wait_ns.filter(|_| t.old == st::CLOSE_WAIT) {
            self.close_wait_seconds.observe(ns as f64 / 1e9);
        }
        match (t.old, t.new) {
            (st::FIN_WAIT1, st::FIN_WAIT2) => {
                let task = t.cause.as_ref().and_then(|c| c.task.as_ref());
                let w = self.counted(Workload::of_task(task));
                let cause = t.cause.as_ref().map_or("unknown", |c| c.kind.name());
                let labels = CauseLabels { cause, workload: w.clone() };
                self.families.fin_wait2_entries.get_or_create(&labels).inc();
                if matches!(verdict, Some(Verdict::ApplicationMustClose(_))) {
                    self.hold(t.sock, Kind::HalfClosed, w);
                }
            }
            (st::ESTABLISHED, st::CLOSE_WAIT) => {
                let w = self.counted(Workload::of_owner(t.owner.as_ref()));
                self.families.close_wait_entries.get_or_create(&w).inc();
                self.hold(t.sock, Kind::CloseWait, w);
            }
            _ => {}
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
    fn snapshot(&mut self, entries: &[Entry], _detail: bool) -> io::Result<()> {
        for e in entries {
            let kind = match (&e.verdict, e.sock.state) {
                (Verdict::OwnerMustClose(_), st::CLOSE_WAIT) => Kind::CloseWait,
                (Verdict::ApplicationMustClose(_), st::FIN_WAIT2) => Kind::HalfClosed,
                _ => continue,
            };
            if e.sock.inode == 0 {
                continue;
            }
            let w = self.counted(Workload::of_owner(e.owners.first()));
            self.gauge(kind, &w).inc();
            self.workloads.held(&w, 1);
            self.seeded.insert(e.sock.inode, Held { kind, workload: w });
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
        let h = &self.health;
        set_counter(&h.records, s.records);
        set_counter(&h.lost, s.lost_ring_full);
        set_counter(&h.skipped, s.kernel_skipped_nested);
        set_counter(&h.read_failed, s.kernel_read_failed);
        set_counter(&h.owner_map_full, s.owner_map_full);
        set_counter(&h.sockets_evicted, s.sockets_evicted);
        set_counter(&h.containers_unresolved, s.containers_unresolved);
        h.attach_failed.set(s.attach_failed as i64);
        h.rss_bytes.set((s.rss_kib * 1024) as i64);
        h.workloads.set(self.workloads.live.len() as i64);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

