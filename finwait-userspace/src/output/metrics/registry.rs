//! The metrics' families and labels, registered once, and the registry the endpoint encodes:
//! what each series is called, what it means, and which labels name a workload.
use std::{fmt, sync::Arc};

use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::{MetricsSink, exposition::Exposition};
use crate::model::{Comm, Container, Owner, Task};

/// Who a series is about: a process name and where it runs. Never a pid, port or address.
#[derive(Clone, Debug)]
pub(crate) struct Workload {
    pub(super) comm: Comm,
    pub(super) container_id: Option<Arc<str>>,
    pub(super) pod_uid: Option<Arc<str>>,
    pub(super) systemd_unit: Option<Arc<str>>,
    /// The pod's namespace and name, where the node shows them: not a label of the workload's
    /// series (a pod's UID says it already) but of `finwait_pod_info`, to join on.
    pub(super) pod: Option<(Arc<str>, Arc<str>)>,
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
    pub(super) fn new(comm: &Comm, c: Option<&Container>) -> Self {
        Self {
            comm: comm.clone(),
            container_id: c.and_then(|c| c.id.clone()),
            pod_uid: c.and_then(|c| c.pod_uid.clone()),
            systemd_unit: c.and_then(|c| c.systemd_unit.clone()),
            pod: c.and_then(|c| c.pod.clone()),
        }
    }

    pub(super) fn of_task(t: Option<&Task>) -> Self {
        t.map_or_else(Self::unknown, |t| {
            Self::new(&t.comm, t.container.as_deref())
        })
    }

    pub(super) fn of_owner(o: Option<&Owner>) -> Self {
        o.map_or_else(Self::unknown, |o| {
            Self::new(&o.comm, o.container.as_deref())
        })
    }

    pub(super) fn named(comm: &str) -> Self {
        Self::new(&comm.into(), None)
    }

    /// A socket whose process finwait could not name.
    pub(super) fn unknown() -> Self {
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
    pub(super) k8s_pod_uid: Arc<str>,
    pub(super) k8s_namespace: Arc<str>,
    pub(super) k8s_pod_name: Arc<str>,
}

impl PodLabels {
    pub(super) fn of(w: &Workload) -> Option<Self> {
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
    pub(super) cause: &'static str,
    pub(super) workload: Workload,
}

impl EncodeLabelSet for CauseLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("cause", self.cause).encode(e.encode_label())?;
        self.workload.encode(e)
    }
}

/// Every cause name a FIN_WAIT2 series can carry (an evicted workload's are all removed).
pub(super) const CAUSES: [&str; 10] = [
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
pub(super) struct Families {
    pub(super) fin_wait2_entries: Family<CauseLabels, Counter>,
    pub(super) close_wait_entries: Family<Workload, Counter>,
    pub(super) closes_without_fin: Family<Workload, Counter>,
    pub(super) half_closed: Family<Workload, Gauge>,
    pub(super) close_wait: Family<Workload, Gauge>,
    /// 1 per pod with series, naming it (join on `k8s_pod_uid`).
    pub(super) pod_info: Family<PodLabels, Gauge>,
}

/// The tracer's own health, set from its counters every second.
#[derive(Default)]
pub(super) struct Health {
    pub(super) records: Counter,
    pub(super) lost: Counter,
    pub(super) skipped: Counter,
    pub(super) recovered: Counter,
    pub(super) read_failed: Counter,
    pub(super) transitions_missed: Counter,
    pub(super) owner_map_full: Counter,
    pub(super) sockets_evicted: Counter,
    pub(super) containers_unresolved: Counter,
    pub(super) gauge_corrections: Counter,
    pub(super) attach_failed: Gauge,
    pub(super) workloads: Gauge,
    /// Each BPF map's memory, by map name (finwait's own maps: a handful of series).
    pub(super) bpf_map_bytes: Family<Vec<(&'static str, String)>, Gauge>,
    pub(super) workloads_evicted: Counter,
    pub(super) workloads_folded: Counter,
}

impl Health {
    /// Name, help and counter of each.
    pub(super) fn counters(&self) -> [(&'static str, &'static str, &Counter); 12] {
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

/// Time half-closed or in CLOSE_WAIT, in round bounds from 10 ms to an hour.
pub(super) fn duration_histogram() -> Histogram {
    Histogram::new([
        0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
    ])
}

/// The standard process metrics (`process_*`, as every Prometheus client library exports
/// them), set from /proc/self every second.
#[derive(Default)]
pub(super) struct ProcessMetrics {
    pub(super) cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    pub(super) resident_memory_bytes: Gauge,
    pub(super) virtual_memory_bytes: Gauge,
    pub(super) open_fds: Gauge,
    pub(super) max_fds: Gauge,
    pub(super) start_time_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl ProcessMetrics {
    pub(super) fn set(&self, u: &crate::host::procs::Usage) {
        let now = self.cpu_seconds.get();
        if u.cpu_seconds > now {
            self.cpu_seconds.inc_by(u.cpu_seconds - now);
        }
        self.resident_memory_bytes
            .set(i64::try_from(u.rss_bytes).unwrap_or(i64::MAX));
        self.virtual_memory_bytes
            .set(i64::try_from(u.vsize_bytes).unwrap_or(i64::MAX));
        self.open_fds
            .set(i64::try_from(u.open_fds).unwrap_or(i64::MAX));
        self.max_fds
            .set(i64::try_from(u.max_fds).unwrap_or(i64::MAX));
        self.start_time_seconds.set(u.start_time_seconds);
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            self.cpu_seconds.clone(),
        );
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                &self.resident_memory_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                &self.virtual_memory_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                &self.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                &self.max_fds,
            ),
        ];
        for (name, help, g) in gauges {
            r.register(name, help, g.clone());
        }
        r.register(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            self.start_time_seconds.clone(),
        );
    }
}

/// Every series of a workload that no longer has its own.
pub(super) fn remove_series(f: &Families, w: &Workload) {
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
pub(super) fn set_counter(c: &Counter, v: u64) {
    let now = c.get();
    if v > now {
        c.inc_by(v - now);
    }
}

impl MetricsSink {
    pub(super) fn registry(&self) -> Exposition {
        let mut root = Registry::default();
        self.process.register(&mut root);
        let mut r = Exposition::new(root, "finwait");
        let f = &self.families;
        r.register_family(
            "fin_wait2_entries",
            "Sockets that entered FIN_WAIT2, by the call that sent our FIN and the workload that made it",
            "counter",
            f.fin_wait2_entries.clone(),
        );
        r.register_family(
            "close_wait_entries",
            "Sockets that entered CLOSE_WAIT (the peer closed), by the workload that holds them",
            "counter",
            f.close_wait_entries.clone(),
        );
        r.register_family(
            "closes_without_fin",
            "close() calls that sent no FIN because another reference to the socket remained",
            "counter",
            f.closes_without_fin.clone(),
        );
        r.register_family(
            "half_closed_sockets",
            "Sockets half-closed by shutdown() now: the application must close them (no kernel timeout)",
            "gauge",
            f.half_closed.clone(),
        );
        r.register_family(
            "close_wait_sockets",
            "Sockets in CLOSE_WAIT now: their owner must close them (CLOSE_WAIT never times out)",
            "gauge",
            f.close_wait.clone(),
        );
        r.registry_mut().register_with_unit(
            "half_closed_duration",
            "Time from FIN_WAIT2 after shutdown() to its end",
            Unit::Seconds,
            self.half_closed_seconds.clone(),
        );
        r.registry_mut().register_with_unit(
            "close_wait_duration",
            "Time in CLOSE_WAIT before the owner closed",
            Unit::Seconds,
            self.close_wait_seconds.clone(),
        );
        r.register_family(
            "info",
            "How finwait-trace runs here (labels), always 1",
            "gauge",
            self.info.clone(),
        );
        r.register_family(
            "pod_info",
            "A Kubernetes pod with series here: its namespace and name by UID (from the node's /var/log/pods), always 1",
            "gauge",
            f.pod_info.clone(),
        );
        self.register_health(&mut r);
        r
    }

    fn register_health(&self, r: &mut Exposition) {
        for (name, help, c) in self.health.counters() {
            r.register(name, help, c.clone());
        }
        let h = &self.health;
        let gauges: [(&str, &str, &Gauge); 2] = [
            (
                "attach_failed",
                "Hooks that failed to attach",
                &h.attach_failed,
            ),
            ("workloads", "Workloads with series now", &h.workloads),
        ];
        for (name, help, g) in gauges {
            r.register(name, help, g.clone());
        }
        r.register(
            "bpf_map_bytes",
            "Memory of each of finwait's BPF maps, as the kernel accounts it (memlock)",
            h.bpf_map_bytes.clone(),
        );
    }
}
