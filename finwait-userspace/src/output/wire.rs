//! The JSON lines contract (`--json`), as types: every event finwait prints is one of these,
//! serialized as one object per line (the sink that writes them is [`super::json`]; the
//! tracer's own start and counters are [`super::health`]). README.md's field list is checked
//! against them by a test.
use std::{collections::BTreeMap, net::IpAddr};

use finwait_common::TcpState;
use serde::{Serialize, Serializer};

use super::{Start, Stats};
use crate::{
    host::{
        clock::{Clock, monotonic_ns},
        namespaces::Coverage,
    },
    model::{
        Cause, CloseNoFinReport, Container, Endpoints, Fw2Exit, Owner, Stuck, TransitionReport,
        Verdict,
        diagnosis::{FinReading, OwnerState, Polled, epoll_events},
        escape, how_name,
        summary::Summary,
    },
    snapshot::{Entry, Snapshot},
};

/// One line of output.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum Event<'a> {
    Start(&'a Start),
    Transition(Transition<'a>),
    CloseNoFin(CloseNoFin<'a>),
    Stuck(StuckEvent<'a>),
    Summary(SummaryEvent<'a>),
    Stats(&'a Stats),
    Snapshot(SnapshotEvent<'a>),
    SnapshotSummary(SnapshotSummary),
}

/// A time as RFC 3339 with microseconds, written without an intermediate String.
struct Time(std::time::SystemTime);

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(self.0))
    }
}

/// A kernel address, as `0xffff...`.
struct Hex(u64);

impl Serialize for Hex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#x}", self.0))
    }
}

/// Milliseconds, from nanoseconds.
fn ms(ns: Option<u64>) -> Option<f64> {
    ns.map(|n| n as f64 / 1e6)
}

/// A connection's fields, the same in every event that names one.
#[derive(Serialize)]
pub(crate) struct Conn {
    family: &'static str,
    laddr: IpAddr,
    lport: u16,
    raddr: IpAddr,
    rport: u16,
}

impl From<&Endpoints> for Conn {
    fn from(e: &Endpoints) -> Self {
        Self {
            family: if e.is_ipv6() { "ipv6" } else { "ipv4" },
            laddr: e.local,
            lport: e.lport,
            raddr: e.remote,
            rport: e.rport,
        }
    }
}

/// Where a task runs: OpenTelemetry's resource attribute names where they exist. One pointer
/// in the events that carry it; the fields are laid out as it is written.
pub(crate) struct ContainerJson<'a>(&'a Container);

impl<'a> ContainerJson<'a> {
    fn of(c: Option<&'a Container>) -> Option<Self> {
        c.map(Self)
    }
}

/// A container shared with the model, serialized as [`ContainerJson`].
pub(crate) struct SharedContainerJson(std::sync::Arc<Container>);

impl Serialize for SharedContainerJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ContainerJson(&self.0).serialize(s)
    }
}

impl Serialize for ContainerJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Fields<'a> {
            #[serde(serialize_with = "name")]
            cgroup: &'a str,
            #[serde(
                rename = "container.id",
                skip_serializing_if = "Option::is_none",
                serialize_with = "opt_name"
            )]
            id: Option<&'a str>,
            #[serde(rename = "container.runtime", skip_serializing_if = "Option::is_none")]
            runtime: Option<&'static str>,
            #[serde(
                rename = "k8s.pod.uid",
                skip_serializing_if = "Option::is_none",
                serialize_with = "opt_name"
            )]
            pod_uid: Option<&'a str>,
            #[serde(
                rename = "k8s.namespace.name",
                skip_serializing_if = "Option::is_none",
                serialize_with = "opt_name"
            )]
            namespace: Option<&'a str>,
            #[serde(
                rename = "k8s.pod.name",
                skip_serializing_if = "Option::is_none",
                serialize_with = "opt_name"
            )]
            pod_name: Option<&'a str>,
            #[serde(rename = "k8s.pod.qos_class", skip_serializing_if = "Option::is_none")]
            qos: Option<&'static str>,
            #[serde(
                rename = "systemd.unit",
                skip_serializing_if = "Option::is_none",
                serialize_with = "opt_name"
            )]
            systemd_unit: Option<&'a str>,
        }
        let c = self.0;
        Fields {
            cgroup: &c.cgroup,
            id: c.id.as_deref(),
            runtime: c.runtime,
            pod_uid: c.pod_uid.as_deref(),
            namespace: c.pod.as_ref().map(|(ns, _)| &**ns),
            pod_name: c.pod.as_ref().map(|(_, name)| &**name),
            qos: c.qos,
            systemd_unit: c.systemd_unit.as_deref(),
        }
        .serialize(s)
    }
}

#[derive(Serialize)]
pub(crate) struct CauseJson<'a> {
    call: &'static str,
    how: Option<&'static str>,
    pid: Option<u32>,
    tid: Option<u32>,
    #[serde(serialize_with = "opt_name")]
    comm: Option<&'a str>,
    /// The calling thread's own name, where it is not its process's.
    #[serde(serialize_with = "opt_name")]
    thread_comm: Option<&'a str>,
    fd: Option<i32>,
    exact: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<ContainerJson<'a>>,
}

impl<'a> From<&'a Cause> for CauseJson<'a> {
    fn from(c: &'a Cause) -> Self {
        Self {
            call: c.kind.name(),
            how: c.how.map(how_name),
            pid: c.task.as_ref().map(|t| t.pid),
            tid: c.task.as_ref().map(|t| t.tid),
            comm: c.task.as_ref().map(|t| &*t.comm),
            thread_comm: c.task.as_ref().and_then(|t| t.thread_comm.as_deref()),
            fd: c.fd,
            exact: c.exact,
            container: ContainerJson::of(c.task.as_ref().and_then(|t| t.container.as_deref())),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct OwnerJson<'a> {
    pid: u32,
    #[serde(serialize_with = "name")]
    comm: &'a str,
    fd: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<ContainerJson<'a>>,
}

impl<'a> From<&'a Owner> for OwnerJson<'a> {
    fn from(o: &'a Owner) -> Self {
        Self {
            pid: o.pid,
            comm: &o.comm,
            fd: o.fd,
            cgroup_id: o.cgroup_id,
            container: ContainerJson::of(o.container.as_deref()),
        }
    }
}

/// A name or path as the process or the host chose it (the model keeps it escaped for
/// terminals): JSON's writer escapes what could lie ([`super::SafeJson`]), and a reader gets
/// the name itself.
fn name<S: Serializer>(n: &impl AsRef<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&escape::unescape(n.as_ref()))
}

#[allow(clippy::ref_option)] // serde's serialize_with passes a reference to the field
fn opt_name<S: Serializer>(n: &Option<impl AsRef<str>>, s: S) -> Result<S::Ok, S::Error> {
    match n {
        Some(n) => s.serialize_some(&*escape::unescape(n.as_ref())),
        None => s.serialize_none(),
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize)]
pub(crate) struct Transition<'a> {
    time: Time,
    sock: Hex,
    from: &'static str,
    to: &'static str,
    kernel_to: &'static str,
    cause: Option<CauseJson<'a>>,
    inode: Option<u64>,
    /// The socket's network namespace (`net:[INODE]`), from its holder or caller.
    netns: Option<u64>,
    #[serde(flatten)]
    conn: Conn,
    /// FIN_WAIT2 entries and exits only (then possibly null).
    #[serde(skip_serializing_if = "Option::is_none")]
    orphan: Option<Option<bool>>,
    /// CLOSE_WAIT entries and exits only (then possibly null).
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<Option<OwnerJson<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verdict: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timewait_substate: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel_frees_within_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp_fin_timeout_s: Option<u64>,
    #[serde(skip_serializing_if = "is_false")]
    at_least: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    since_fin_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    half_closed_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    close_wait_ms: Option<f64>,
}

impl<'a> Transition<'a> {
    pub(crate) fn new(t: &'a TransitionReport, verdict: Option<&Verdict>, clock: &Clock) -> Self {
        let handed_over = t.fw2_exit == Some(Fw2Exit::OrphanTimewait);
        Self {
            time: Time(clock.wall(t.ts_ns)),
            sock: Hex(t.sock),
            from: t.old.name(),
            to: t.effective_new().name(),
            kernel_to: t.new.name(),
            cause: t.cause.as_ref().map(CauseJson::from),
            inode: (t.inode != 0).then_some(t.inode),
            netns: t.netns,
            conn: Conn::from(&t.ends),
            orphan: t.touches_fin_wait2().then_some(t.orphan),
            owner: t
                .touches_close_wait()
                .then(|| t.owner.as_ref().map(OwnerJson::from)),
            verdict: verdict.map(Verdict::name),
            // `ss` keeps listing it as FIN-WAIT-2 (ino 0) until the kernel frees it.
            timewait_substate: handed_over.then_some("FIN_WAIT2"),
            kernel_frees_within_s: handed_over.then(|| t.frees_within_s()),
            tcp_fin_timeout_s: (handed_over || t.orphan_timed_out()).then_some(t.fin_timeout_s),
            at_least: t.at_least,
            since_fin_ms: ms(t.since_fin_ns),
            half_closed_ms: ms(t.half_closed_ns),
            close_wait_ms: ms(t.close_wait_ns),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct CloseNoFin<'a> {
    time: Time,
    sock: Hex,
    call: &'static str,
    pid: u32,
    tid: u32,
    #[serde(serialize_with = "name")]
    comm: &'a str,
    #[serde(serialize_with = "opt_name")]
    thread_comm: Option<&'a str>,
    fd: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<ContainerJson<'a>>,
    remaining_refs: u64,
    holders: Vec<OwnerJson<'a>>,
    netns: Option<u64>,
    state: Option<&'static str>,
    laddr: Option<IpAddr>,
    lport: Option<u16>,
    raddr: Option<IpAddr>,
    rport: Option<u16>,
}

impl<'a> CloseNoFin<'a> {
    pub(crate) fn new(n: &'a CloseNoFinReport, clock: &Clock) -> Self {
        let e = n.ends.as_ref();
        Self {
            time: Time(clock.wall(n.ts_ns)),
            sock: Hex(n.sock),
            call: crate::model::CauseKind::Call(n.call).name(),
            pid: n.task.pid,
            tid: n.task.tid,
            comm: &n.task.comm,
            thread_comm: n.task.thread_comm.as_deref(),
            fd: n.fd,
            container: ContainerJson::of(n.task.container.as_deref()),
            remaining_refs: n.remaining_refs,
            holders: n.holders.iter().map(OwnerJson::from).collect(),
            netns: n.netns,
            state: n.state.map(TcpState::name),
            laddr: e.map(|e| e.local),
            lport: e.map(|e| e.lport),
            raddr: e.map(|e| e.remote),
            rport: e.map(|e| e.rport),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct StuckEvent<'a> {
    time: Time,
    sock: Hex,
    state: &'a str,
    pid: u32,
    #[serde(serialize_with = "name")]
    comm: &'a str,
    fd: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<ContainerJson<'a>>,
    stuck_s: f64,
    /// Stuck before tracing started: `stuck_s` counts from the start-up inventory.
    at_least: bool,
    netns: Option<u64>,
    verdict: &'static str,
    owner_state: Option<OwnerStateJson>,
    #[serde(flatten)]
    conn: Conn,
}

impl<'a> StuckEvent<'a> {
    pub(crate) fn new(s: &'a Stuck, clock: &Clock) -> Self {
        Self {
            time: Time(clock.wall(monotonic_ns())),
            sock: Hex(s.sock),
            state: &s.what,
            pid: s.holder.pid,
            comm: &s.holder.comm,
            fd: s.holder.fd,
            container: ContainerJson::of(s.holder.container.as_deref()),
            stuck_s: s.stuck_ns as f64 / 1e9,
            at_least: s.at_least,
            netns: s.netns,
            verdict: s.verdict.name(),
            owner_state: s.owner_state.as_ref().map(|o| {
                let who = format!("{}[{}]", s.holder.comm, s.holder.pid);
                OwnerStateJson::new(o, &who, s.holder.fd)
            }),
            conn: Conn::from(&s.ends),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct ProcessJson<'a> {
    pid: u32,
    #[serde(serialize_with = "name")]
    comm: &'a str,
    #[serde(serialize_with = "opt_name")]
    cmdline: Option<&'a str>,
    /// The peers of its sockets still open that it must close, most first.
    peers: Vec<PeerCountJson>,
    peers_more: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<ContainerJson<'a>>,
    fin_wait2_half_closed: &'a BTreeMap<String, u64>,
    fin_wait2_half_closed_ended: &'a BTreeMap<String, u64>,
    fin_wait2_orphaned: &'a BTreeMap<String, u64>,
    close_wait: u64,
    close_wait_at_start: u64,
    close_wait_closed: u64,
    close_wait_readings: &'a BTreeMap<&'static str, u64>,
    answer: String,
}

#[derive(Serialize)]
pub(crate) struct PeerCountJson {
    raddr: IpAddr,
    /// None: grouped by address (no two sockets shared a port: a server's clients).
    rport: Option<u16>,
    sockets: u64,
}

impl From<&crate::model::summary::PeerCount> for PeerCountJson {
    fn from(p: &crate::model::summary::PeerCount) -> Self {
        Self {
            raddr: p.addr,
            rport: p.port,
            sockets: p.count,
        }
    }
}

#[derive(Serialize)]
pub(crate) struct Bucket {
    below_ms: u64,
    count: u64,
}

#[derive(Serialize)]
pub(crate) struct LongestJson {
    sock: Hex,
    state: String,
    pid: u32,
    #[serde(serialize_with = "name")]
    comm: String,
    fd: Option<i32>,
    #[serde(flatten)]
    conn: Conn,
    stuck_ms: f64,
    /// Stuck before tracing started: `stuck_ms` counts from the start-up inventory.
    at_least: bool,
}

#[derive(Serialize)]
pub(crate) struct SummaryEvent<'a> {
    processes: Vec<ProcessJson<'a>>,
    half_closed_ms: Vec<Bucket>,
    close_wait_ms: Vec<Bucket>,
    still_stuck: usize,
    longest_stuck: Vec<LongestJson>,
    stuck_reported: u64,
    /// Processes left out to keep a long run's summary bounded (nothing of theirs still open).
    processes_dropped: u64,
}

impl<'a> SummaryEvent<'a> {
    pub(crate) fn new(s: &'a Summary, now_ns: u64) -> Self {
        let buckets = |h: &crate::model::summary::Histogram| {
            h.buckets()
                .map(|(below_ms, count)| Bucket { below_ms, count })
                .collect()
        };
        Self {
            processes: s
                .processes()
                .map(|p| ProcessJson {
                    pid: p.pid,
                    comm: p.comm,
                    cmdline: p.cmdline.map(|c| &**c),
                    peers_more: p.peers.last().map_or(0, |l| l.more),
                    peers: p.peers.iter().map(PeerCountJson::from).collect(),
                    container: ContainerJson::of(p.container),
                    fin_wait2_half_closed: &p.counts.half_closed,
                    fin_wait2_half_closed_ended: &p.counts.half_closed_ended,
                    fin_wait2_orphaned: &p.counts.orphaned,
                    close_wait: p.counts.close_wait,
                    close_wait_at_start: p.counts.close_wait_at_start,
                    close_wait_closed: p.counts.close_wait_closed,
                    close_wait_readings: &p.counts.close_wait_readings,
                    answer: p.answer,
                })
                .collect(),
            half_closed_ms: buckets(&s.half_closed_ms),
            close_wait_ms: buckets(&s.close_wait_ms),
            still_stuck: s.still_stuck(),
            longest_stuck: s
                .longest(now_ns, 10)
                .into_iter()
                .map(|l| LongestJson {
                    sock: Hex(l.sock),
                    state: l.what,
                    pid: l.pid,
                    comm: l.comm.to_string(),
                    fd: l.fd,
                    conn: Conn::from(&l.ends),
                    stuck_ms: l.age_ns as f64 / 1e6,
                    at_least: l.at_least,
                })
                .collect(),
            stuck_reported: s.stuck_reported,
            processes_dropped: s.processes_dropped,
        }
    }
}

/// What the owner of a socket it must close is doing (see `model::diagnosis`).
#[derive(Serialize)]
pub(crate) struct OwnerStateJson {
    /// CLOSE_WAIT: `fin_not_read` or `read_eof_not_closed`.
    diagnosis: Option<&'static str>,
    fin_read: Option<bool>,
    unread_bytes: u32,
    /// FIN_WAIT2 half-closed: the application still reads it (lingering).
    still_reading: Option<bool>,
    /// null: the owner has no epoll set (or its fds could not be read).
    epoll: Option<EpollJson>,
    threads: Option<ThreadsJson>,
    answer: String,
}

#[derive(Serialize)]
pub(crate) struct EpollJson {
    registered: bool,
    sets: Vec<EpollSetJson>,
}

#[derive(Serialize)]
pub(crate) struct EpollSetJson {
    epfd: i32,
    events: String,
}

#[derive(Serialize)]
pub(crate) struct ThreadsJson {
    total: usize,
    waiting: BTreeMap<String, usize>,
}

impl OwnerStateJson {
    pub(crate) fn new(o: &OwnerState, who: &str, fd: Option<i32>) -> Self {
        let epoll = o.polled.as_ref().and_then(|p| {
            let registered = p.registered()?;
            let sets = match p {
                Polled::Registered(sets) => sets
                    .iter()
                    .map(|(epfd, ev)| EpollSetJson {
                        epfd: *epfd,
                        events: epoll_events(*ev),
                    })
                    .collect(),
                _ => Vec::new(),
            };
            Some(EpollJson { registered, sets })
        });
        Self {
            diagnosis: o.reading.map(FinReading::name),
            fin_read: o.reading.map(|r| r == FinReading::ReadEof),
            unread_bytes: o.unread_bytes,
            still_reading: o.still_reading(),
            epoll,
            threads: o.threads.as_ref().map(|t| ThreadsJson {
                total: t.total,
                waiting: t.by_wait.clone(),
            }),
            answer: o.sentence(who, fd),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct TimerJson {
    kind: &'static str,
    left_ms: u64,
}

#[derive(Serialize)]
pub(crate) struct InferredJson<'a> {
    pid: u32,
    #[serde(serialize_with = "name")]
    comm: &'a str,
}

#[derive(Serialize)]
pub(crate) struct SnapshotEvent<'a> {
    #[serde(flatten)]
    conn: Conn,
    state: &'static str,
    class: &'static str,
    verdict: &'static str,
    inode: Option<u64>,
    uid: u32,
    timer: Option<TimerJson>,
    recv_queue: u32,
    send_queue: u32,
    /// The network namespace's inode (`net:[INODE]`, as `ls -l /proc/PID/ns/net` shows).
    netns: Option<u64>,
    owners: Vec<OwnerJson<'a>>,
    inferred_owner: Option<InferredJson<'a>>,
    owner_state: Option<OwnerStateJson>,
    /// The other end, when it is a socket on this host too.
    peer: Option<PeerJson<'a>>,
    answer: String,
}

#[derive(Serialize)]
pub(crate) struct PeerJson<'a> {
    state: &'static str,
    netns: Option<u64>,
    owners: Vec<OwnerJson<'a>>,
}

impl<'a> From<&'a Entry> for SnapshotEvent<'a> {
    fn from(e: &'a Entry) -> Self {
        let s = &e.sock;
        let ends = Endpoints {
            local: s.local,
            lport: s.lport,
            remote: s.remote,
            rport: s.rport,
        };
        Self {
            conn: Conn::from(&ends),
            state: s.state.name(),
            class: e.class(),
            verdict: e.verdict.name(),
            inode: (s.inode != 0).then_some(s.inode),
            uid: s.uid,
            timer: s.timer.map(|t| TimerJson {
                kind: t.name(),
                left_ms: t.left().as_millis() as u64,
            }),
            recv_queue: s.recv_queue,
            send_queue: s.send_queue,
            netns: (s.netns != 0).then_some(s.netns),
            // The snapshot's owners come from /proc: no cgroup id.
            owners: e.owners.iter().map(OwnerJson::from).collect(),
            inferred_owner: e.inferred.as_ref().map(|i| InferredJson {
                pid: i.pid,
                comm: &i.comm,
            }),
            owner_state: e.owner_state.as_ref().zip(e.owners.first()).map(|(o, h)| {
                OwnerStateJson::new(o, &format!("{}[{}]", h.comm, h.pid), Some(h.fd))
            }),
            peer: e.peer.as_ref().map(|p| PeerJson {
                state: p.state.name(),
                netns: (p.netns != 0).then_some(p.netns),
                owners: p.owners.iter().map(OwnerJson::from).collect(),
            }),
            answer: e.answer(),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct GroupJson {
    pid: Option<u32>,
    #[serde(serialize_with = "name")]
    comm: String,
    #[serde(serialize_with = "opt_name")]
    cmdline: Option<String>,
    peers: Vec<PeerCountJson>,
    peers_more: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<SharedContainerJson>,
    counts: BTreeMap<&'static str, usize>,
    inferred: usize,
    close_wait_readings: BTreeMap<&'static str, usize>,
}

/// Which network namespaces a snapshot read, and which it could not.
#[derive(Serialize)]
pub(crate) struct NamespacesJson {
    read: usize,
    without_timers: usize,
    unseen: Vec<UnseenJson>,
    hidden_processes: usize,
}

#[derive(Serialize)]
pub(crate) struct UnseenJson {
    netns: u64,
    reason: String,
}

impl From<&Coverage> for NamespacesJson {
    fn from(c: &Coverage) -> Self {
        Self {
            read: c.read.len(),
            without_timers: c.proc_net,
            unseen: c
                .unseen
                .iter()
                .map(|(netns, reason)| UnseenJson {
                    netns: *netns,
                    reason: reason.clone(),
                })
                .collect(),
            hidden_processes: c.hidden.len(),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct SnapshotSummary {
    sockets: usize,
    time_wait: usize,
    /// Where the holders came from: `kernel` (the socket inventory) or `proc`.
    holders: &'static str,
    namespaces: NamespacesJson,
    processes: Vec<GroupJson>,
}

impl SnapshotSummary {
    pub(crate) fn new(snap: &Snapshot) -> Self {
        let t = &snap.tally;
        let processes = t
            .groups
            .iter()
            .map(|((pid, comm), g)| {
                let peers = g.peers();
                GroupJson {
                    pid: (*pid != 0).then_some(*pid),
                    comm: comm.clone(),
                    cmdline: g.cmdline.clone(),
                    peers_more: peers.last().map_or(0, |l| l.more),
                    peers: peers.iter().map(PeerCountJson::from).collect(),
                    container: g.container.clone().map(SharedContainerJson),
                    counts: g.counts.clone(),
                    inferred: g.inferred,
                    close_wait_readings: g.readings.clone(),
                }
            })
            .collect();
        Self {
            sockets: t.sockets,
            time_wait: t.time_wait,
            holders: snap.holders.name(),
            namespaces: NamespacesJson::from(&snap.coverage),
            processes,
        }
    }
}

/// The README's field lists are the documentation of this contract: each must name exactly the
/// fields these types write (a list ending in `...` names some of them).
#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use finwait_common::{Call, TcpState};

    use super::*;
    use crate::{
        host::sockdiag::{DiagSocket, TimerLeft},
        model::{CauseKind, Holder, Task, Verdict},
    };

    /// Where the contract is written down: docs/json.md, and docs/usage.md for the events of
    /// each mode.
    const DOCS: &str = concat!(
        include_str!("../../../docs/usage.md"),
        include_str!("../../../docs/json.md")
    );

    /// Every `{"event": "NAME", ...}` in the README: (name, top-level fields, complete?).
    fn documented() -> Vec<(String, BTreeSet<String>, bool)> {
        let mut out = Vec::new();
        let mut rest = DOCS;
        while let Some(at) = rest.find("{\"event\": \"") {
            let body = &rest[at + 1..];
            let (mut depth, mut end) = (1, body.len());
            for (i, ch) in body.char_indices() {
                depth += match ch {
                    '{' | '[' => 1,
                    '}' | ']' => -1,
                    _ => 0,
                };
                if depth == 0 {
                    end = i;
                    break;
                }
            }
            let inner = &body[..end];
            let (mut names, mut depth, mut complete) = (Vec::new(), 0, true);
            let mut chars = inner.char_indices().peekable();
            while let Some((i, ch)) = chars.next() {
                match ch {
                    '{' | '[' => depth += 1,
                    '}' | ']' => depth -= 1,
                    '.' if depth == 0 && inner[i..].starts_with("...") => complete = false,
                    '"' => {
                        let close = inner[i + 1..].find('"').unwrap() + i + 1;
                        if depth == 0 {
                            names.push(inner[i + 1..close].to_string());
                        }
                        while chars.peek().is_some_and(|(j, _)| *j <= close) {
                            chars.next();
                        }
                    }
                    _ => {}
                }
            }
            // "event": "NAME" come first.
            let name = names[1].clone();
            let fields = names[2..].iter().cloned().chain(["event".into()]).collect();
            out.push((name, fields, complete));
            rest = &body[end..];
        }
        out
    }

    fn keys(e: &Event<'_>) -> BTreeSet<String> {
        let serde_json::Value::Object(m) = serde_json::to_value(e).unwrap() else {
            panic!("an event is an object")
        };
        m.into_iter().map(|(k, _)| k).collect()
    }

    fn ends() -> Endpoints {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        Endpoints {
            local: lo,
            lport: 1,
            remote: lo,
            rport: 2,
        }
    }

    fn task() -> Task {
        Task {
            pid: 1,
            tid: 1,
            comm: "x".into(),
            thread_comm: None,
            ..Default::default()
        }
    }

    /// Transitions that between them write every field a transition can have.
    fn transitions() -> Vec<TransitionReport> {
        let mut handed_over =
            TransitionReport::new(1, 1, ends(), TcpState::FinWait2, TcpState::Close, 0);
        handed_over.fw2_exit = Some(Fw2Exit::OrphanTimewait);
        handed_over.orphan = Some(true);
        handed_over.cause = Some(Cause::bare(CauseKind::Call(Call::Close)));
        handed_over.since_fin_ns = Some(1);
        handed_over.half_closed_ns = Some(1);
        handed_over.at_least = true;
        let mut closed =
            TransitionReport::new(1, 1, ends(), TcpState::CloseWait, TcpState::LastAck, 9);
        closed.owner = Some(Owner {
            pid: 1,
            comm: "x".into(),
            fd: 3,
            cgroup_id: Some(1),
            container: None,
        });
        closed.close_wait_ns = Some(1);
        vec![handed_over, closed]
    }

    /// A close without FIN with every field filled.
    fn close_no_fin() -> CloseNoFinReport {
        CloseNoFinReport {
            ts_ns: 1,
            sock: 1,
            call: Call::Close,
            task: Task {
                container: Some(Container::from_path("/system.slice/nginx.service").into()),
                ..task()
            },
            fd: 3,
            remaining_refs: 1,
            holders: Vec::new(),
            inode: 1,
            ends: Some(ends()),
            state: Some(TcpState::Established),
            recorded_owner: None,
            netns: None,
        }
    }

    /// The fields each kind of event writes, from samples that fill every optional one.
    fn written() -> BTreeMap<&'static str, BTreeSet<String>> {
        let clock = Clock::new();
        let ts = transitions();
        let mut m = BTreeMap::new();
        let t = ts.iter().flat_map(|t| {
            let v = t.verdict();
            keys(&Event::Transition(Transition::new(t, v.as_ref(), &clock)))
        });
        m.insert("transition", t.collect());
        let n = close_no_fin();
        m.insert(
            "close_no_fin",
            keys(&Event::CloseNoFin(CloseNoFin::new(&n, &clock))),
        );
        let mut holder = Holder::from(ts[1].owner.as_ref().unwrap());
        holder.container = Some(Container::from_path("/system.slice/nginx.service").into());
        let s = Stuck {
            sock: 1,
            what: "CLOSE_WAIT".into(),
            holder: holder.clone(),
            verdict: Verdict::OwnerMustClose(Some(holder)),
            owner_state: None,
            ends: ends(),
            stuck_ns: 1,
            at_least: false,
            netns: None,
        };
        m.insert("stuck", keys(&Event::Stuck(StuckEvent::new(&s, &clock))));
        let summary = Summary::default();
        m.insert(
            "summary",
            keys(&Event::Summary(SummaryEvent::new(&summary, 0))),
        );
        m.insert("start", keys(&Event::Start(&Start::default())));
        m.insert("stats", keys(&Event::Stats(&Stats::default())));
        let sock = DiagSocket {
            state: TcpState::FinWait2,
            local: ends().local,
            lport: 1,
            remote: ends().remote,
            rport: 2,
            inode: 0,
            uid: 0,
            timer: Some(TimerLeft::TimeWait(std::time::Duration::from_secs(1))),
            recv_queue: 0,
            send_queue: 0,
            netns: 0,
        };
        let entries = crate::snapshot::build(vec![sock], |_| Vec::new(), &[]);
        let snap = keys(&Event::Snapshot(SnapshotEvent::from(&entries[0])));
        m.insert("snapshot", snap);
        let whole = Snapshot::of(entries);
        let ss = keys(&Event::SnapshotSummary(SnapshotSummary::new(&whole)));
        m.insert("snapshot_summary", ss);
        m
    }

    #[test]
    fn the_readme_documents_every_field() {
        let written = written();
        let documented = documented();
        for (name, fields, complete) in &documented {
            let Some(have) = written.get(name.as_str()) else {
                panic!("the docs document an event `{name}` that finwait never writes")
            };
            let unknown: Vec<_> = fields.difference(have).collect();
            assert!(
                unknown.is_empty(),
                "the docs' `{name}` names {unknown:?}, not written"
            );
            if *complete {
                let missing: Vec<_> = have.difference(fields).collect();
                assert!(missing.is_empty(), "the docs' `{name}` omits {missing:?}");
            }
        }
        for name in written.keys() {
            assert!(
                documented
                    .iter()
                    .any(|(n, _, complete)| n == name && *complete),
                "the docs have no complete field list for `{name}`"
            );
        }
    }
}
