//! The sockets already on the close path when finwait starts (or when `snapshot` is asked):
//! who holds each one and whose job it is.
use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use anyhow::Result;
use finwait_common::tcp_state as st;
use netlink_packet_sock_diag::inet::StateFlags;

use crate::{
    host::{
        cgroup::Cgroups,
        clock::monotonic_ns,
        inspect::{self, EpollSets},
        namespaces::{self, Coverage},
        owners::{self, Index},
        procs,
        sockdiag::DiagSocket,
    },
    kernel::inventory,
    model::{
        Comm, Container, Endpoints, Holder, Owner, Verdict,
        diagnosis::{OwnerState, Threads, readings_words},
        escape,
        verdict::{Bound, Facts, whose_job},
    },
};

/// A process that probably owned an orphan: the one listening on its local port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Inferred {
    pub(crate) pid: u32,
    pub(crate) comm: Comm,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) sock: DiagSocket,
    pub(crate) owners: Vec<Owner>,
    pub(crate) inferred: Option<Inferred>,
    pub(crate) verdict: Verdict,
    /// A socket its owner must close: what the owner is doing about it.
    pub(crate) owner_state: Option<OwnerState>,
    /// The other end, when it is on this host too.
    pub(crate) peer: Option<Peer>,
}

impl Entry {
    /// The socket as the answers see it: a file refers to it (inode) or it is an orphan.
    fn new(sock: DiagSocket, owners: Vec<Owner>) -> Option<Self> {
        let bound = match sock.timer {
            Some(t) => Bound::Left(t.left()),
            None => Bound::Retries,
        };
        // An orphan has no file, hence no inode (nor has a time-wait mini-socket).
        let facts = Facts {
            state: sock.state,
            held: Some(sock.inode != 0),
            holder: Holder::of(&owners),
            bound,
        };
        let verdict = whose_job(facts)?;
        let must_close = match verdict {
            Verdict::OwnerMustClose(_) => true,
            Verdict::ApplicationMustClose(_) => sock.state == st::FIN_WAIT2,
            _ => false,
        };
        let owner_state = must_close.then(|| OwnerState::new(sock.state, sock.recv_queue));
        Some(Self {
            sock,
            owners,
            inferred: None,
            verdict,
            owner_state,
            peer: None,
        })
    }

    /// The JSON contract's `class`: the state, with FIN_WAIT2 split by its verdict.
    pub(crate) fn class(&self) -> &'static str {
        match (self.sock.state, &self.verdict) {
            (st::FIN_WAIT2, Verdict::ApplicationMustClose(_)) => "fin_wait2_half_closed",
            (st::FIN_WAIT2, _) => "fin_wait2_orphaned",
            (st::CLOSE_WAIT, _) => "close_wait",
            (st::FIN_WAIT1, _) => "fin_wait1",
            (st::LAST_ACK, _) => "last_ack",
            (st::CLOSING, _) => "closing",
            _ => "time_wait",
        }
    }

    pub(crate) fn ends(&self) -> Endpoints {
        let s = &self.sock;
        Endpoints {
            local: s.local,
            lport: s.lport,
            remote: s.remote,
            rport: s.rport,
        }
    }

    pub(crate) fn is_time_wait(&self) -> bool {
        self.sock.state == st::TIME_WAIT
    }

    /// The process the summary files this socket under, and whether it was inferred.
    pub(crate) fn responsible(&self) -> Option<(u32, &str, bool)> {
        if let Some(o) = self.owners.first() {
            return Some((o.pid, &o.comm, false));
        }
        self.inferred.as_ref().map(|i| (i.pid, &*i.comm, true))
    }

    /// The answer in words: what the socket is, then whose job it is.
    pub(crate) fn answer(&self) -> String {
        let inferred = self.inferred.as_ref().map(|i| {
            format!(
                " (closed by {}[{}], inferred: it listens on port {})",
                i.comm, i.pid, self.sock.lport
            )
        });
        let inferred = inferred.unwrap_or_default();
        let what = match (self.sock.state, &self.verdict) {
            (st::FIN_WAIT2, Verdict::ApplicationMustClose(_)) => "half-closed by shutdown()".into(),
            (st::FIN_WAIT2, _) => format!("orphaned after close(){inferred}"),
            (st::CLOSE_WAIT, _) => "the peer closed".into(),
            (st::FIN_WAIT1, Verdict::ApplicationMustClose(_)) => {
                "FIN sent by shutdown(), not yet acknowledged".into()
            }
            (st::FIN_WAIT1, _) => format!("FIN sent by close(), not yet acknowledged{inferred}"),
            (st::LAST_ACK, _) => {
                "closed by its owner after the peer; waiting for the peer's last ACK".into()
            }
            (st::CLOSING, _) => "both sides closed at once; waiting for the peer's ACK".into(),
            _ => "TIME_WAIT, normal after an active close".into(),
        };
        let mut answer = format!("{what}; {}", self.verdict.clause());
        if let (Some(o), Some(h)) = (&self.owner_state, self.owners.first()) {
            answer += &format!(
                "; {}",
                o.sentence(&format!("{}[{}]", h.comm, h.pid), Some(h.fd))
            );
        }
        if let Some(p) = &self.peer {
            answer += &format!("; {}", p.sentence());
        }
        answer
    }
}

impl Peer {
    /// `its peer on this host, python3[9183] fd 3, is in CLOSE_WAIT: it has not closed its end`.
    pub(crate) fn sentence(&self) -> String {
        let state = crate::model::state_name(self.state);
        let who = match self.owners.first() {
            Some(o) => format!("{}[{}] fd {}", o.comm, o.pid, o.fd),
            None => "held by no process".into(),
        };
        let then = match (self.state, self.owners.is_empty()) {
            (st::CLOSE_WAIT, false) => ": it has not closed its end",
            (st::FIN_WAIT2, false) => ": half-closed, still open",
            _ => "",
        };
        format!("its peer on this host, {who}, is in {state}{then}")
    }
}

/// The states a snapshot reads (LISTEN only to infer owners of orphans).
pub(crate) fn states() -> StateFlags {
    StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK
        | StateFlags::CLOSING
        | StateFlags::TIME_WAIT
        | StateFlags::LISTEN
}

pub(crate) struct Snapshot {
    pub(crate) entries: Vec<Entry>,
    /// CLOCK_MONOTONIC when the dump was taken.
    pub(crate) taken_ns: u64,
    /// Every socket's holders, as the scan found them (live tracing seeds the kernel's
    /// ownership map from it).
    pub(crate) owners: Index,
    /// The network namespaces read, and those that could not be.
    pub(crate) coverage: Coverage,
    /// Where the holders came from: the kernel's socket inventory, or /proc (and why).
    pub(crate) holders: Holders,
}

/// Where a snapshot's holders came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Holders {
    /// The kernel's socket inventory (`iter/task_file`), in one pass.
    Kernel,
    /// Every process's fd links in /proc: the inventory could not run, for this reason.
    Proc(String),
}

impl Holders {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Holders::Kernel => "kernel",
            Holders::Proc(_) => "proc",
        }
    }
}

impl Snapshot {
    /// Says on stderr what the snapshot could not see (never silently empty).
    pub(crate) fn warn_unseen(&self) {
        if let Some(w) = self.coverage.warning() {
            eprintln!("finwait-trace: warning: {w}");
        }
        if let Holders::Proc(why) = &self.holders {
            eprintln!(
                "finwait-trace: note: socket holders read from /proc, not from the kernel's socket inventory ({why})"
            );
        }
    }

    /// Entries alone, as made up by tests.
    #[cfg(test)]
    pub(crate) fn of(entries: Vec<Entry>) -> Self {
        Self {
            entries,
            taken_ns: 0,
            owners: Index::default(),
            coverage: Coverage::default(),
            holders: Holders::Kernel,
        }
    }
}

/// Reads the sockets and their owners. `pids`: keep only sockets held by (or inferred to belong
/// to) these processes and their descendants; empty keeps all. `kernel`: the loaded object
/// whose socket inventory names the holders (else, or if it fails, /proc does).
pub(crate) fn take(pids: &[u32], kernel: Result<&mut aya::Ebpf, String>) -> Result<Snapshot> {
    let taken_ns = monotonic_ns();
    let mut sockets = Vec::new();
    let coverage = namespaces::dump_everywhere(&states(), |s| sockets.push(s))?;
    let from = kernel.and_then(|k| from_kernel(k).map_err(|e| format!("{e:#}")));
    let (owners, epoll, holders) = match from {
        Ok((index, epoll)) => (index, Some(epoll), Holders::Kernel),
        Err(why) => (owners::scan(), None, Holders::Proc(why)),
    };
    let keep: Vec<u32> = if pids.is_empty() {
        Vec::new()
    } else {
        procs::with_descendants(pids)
    };
    let containers = RefCell::new(Containers::default());
    let owners_of = |inode| {
        let mut found = owners.get(inode);
        for o in &mut found {
            o.container = containers.borrow_mut().of(o.pid);
        }
        found
    };
    let mut entries = build(sockets, owners_of, &keep);
    inspect_owners(&mut entries, epoll.as_ref());
    Ok(Snapshot {
        entries,
        taken_ns,
        owners,
        coverage,
        holders,
    })
}

/// Every process's epoll fds, from the kernel's inventory.
type EpollFds = HashMap<u32, Vec<i32>>;

/// Every socket's holders, and every process's epoll fds, from the kernel's socket inventory.
fn from_kernel(ebpf: &mut aya::Ebpf) -> Result<(Index, EpollFds)> {
    let mut index = Index::default();
    index.built_ns = monotonic_ns();
    let mut epoll = EpollFds::new();
    inventory::read(ebpf, |r| {
        if r.state == finwait_common::FD_EPOLL {
            let fds = epoll.entry(r.tgid).or_default();
            // Threads that share the fd table are visited once each on some kernels.
            if !fds.contains(&(r.fd as i32)) {
                fds.push(r.fd as i32);
            }
            return;
        }
        index.add_with(r.inode, r.tgid, r.fd as i32, || {
            escape::sanitize(&inventory::comm(&r.comm)).into()
        });
    })?;
    Ok((index, epoll))
}

/// Each owner's container, read once per process.
#[derive(Default)]
struct Containers {
    cgroups: Option<Cgroups>,
    by_pid: HashMap<u32, Option<Arc<Container>>>,
}

impl Containers {
    fn of(&mut self, pid: u32) -> Option<Arc<Container>> {
        let cgroups = self.cgroups.get_or_insert_with(Cgroups::new);
        self.by_pid
            .entry(pid)
            .or_insert_with(|| cgroups.of(0, pid))
            .clone()
    }
}

/// Owners inspected at most (each costs a read of its fds and threads in /proc).
const MAX_INSPECTED: usize = 256;

/// For each socket its owner must close: is the fd still in one of the owner's epoll sets, and
/// what are its threads doing. Each owner is read once; its epoll fds, where the kernel's
/// inventory named them, without reading its every fd link.
fn inspect_owners(entries: &mut [Entry], epoll: Option<&EpollFds>) {
    let mut seen: HashMap<u32, (Option<EpollSets>, Option<Threads>)> = HashMap::new();
    for e in entries.iter_mut() {
        let (Some(state), Some(o)) = (e.owner_state.as_mut(), e.owners.first()) else {
            continue;
        };
        if !seen.contains_key(&o.pid) && seen.len() >= MAX_INSPECTED {
            continue;
        }
        let sets = |pid| match epoll {
            Some(e) => Some(EpollSets::of_epoll_fds(
                pid,
                e.get(&pid).map_or(&[], Vec::as_slice),
            )),
            None => EpollSets::of(pid),
        };
        let (sets, threads) = seen
            .entry(o.pid)
            .or_insert_with(|| (sets(o.pid), inspect::threads(o.pid)));
        state.polled = sets.as_ref().map(|s| s.polled(o.fd));
        state.threads.clone_from(threads);
    }
}

/// Where a listener listens: its namespace, address (None: any) and port.
type ListenAt = (u64, Option<IpAddr>, u16);

/// Listening sockets by where they listen, to infer who accepted a now-orphaned connection
/// (only in its own namespace: every pod can listen on the same port).
fn listeners(
    sockets: &[DiagSocket],
    owners_of: &impl Fn(u64) -> Vec<Owner>,
) -> HashMap<ListenAt, Inferred> {
    let mut listeners = HashMap::new();
    for s in sockets.iter().filter(|s| s.state == st::LISTEN) {
        if let Some(o) = owners_of(s.inode).into_iter().next() {
            let any = s.local.is_unspecified();
            let inferred = Inferred {
                pid: o.pid,
                comm: o.comm,
            };
            let addr = if any { None } else { Some(s.local) };
            listeners.insert((s.netns, addr, s.lport), inferred);
        }
    }
    listeners
}

/// The other end of a connection, when it is a socket on this host too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Peer {
    pub(crate) state: u8,
    pub(crate) netns: u64,
    /// Empty: no process holds it (an orphan, or a time-wait socket).
    pub(crate) owners: Vec<Owner>,
}

/// For each socket, its peer's (state, namespace, inode) where the peer is on this host: the
/// socket with the same ends the other way round, in the same namespace, else the one such
/// socket of another namespace (a pod's peer on the node). Loopback never leaves a namespace,
/// and several candidates elsewhere (pods that reuse the same addresses) name none.
fn peers(sockets: &[DiagSocket]) -> Vec<Option<(u8, u64, u64)>> {
    type Ends = (IpAddr, u16, IpAddr, u16);
    let ends = |s: &DiagSocket| -> Ends {
        (
            s.local.to_canonical(),
            s.lport,
            s.remote.to_canonical(),
            s.rport,
        )
    };
    let mut by_ends: HashMap<Ends, Vec<usize>> = HashMap::new();
    for (i, s) in sockets.iter().enumerate() {
        if s.state != st::LISTEN {
            by_ends.entry(ends(s)).or_default().push(i);
        }
    }
    sockets
        .iter()
        .map(|s| {
            if s.state == st::LISTEN {
                return None;
            }
            let (l, lp, r, rp) = ends(s);
            let found = by_ends.get(&(r, rp, l, lp))?;
            let same_ns = found.iter().find(|&&j| sockets[j].netns == s.netns);
            let peer = match (same_ns, found.as_slice()) {
                (Some(&j), _) => j,
                (None, _) if r.is_loopback() => return None,
                (None, [j]) => *j,
                (None, _) => return None,
            };
            let p = &sockets[peer];
            Some((p.state, p.netns, p.inode))
        })
        .collect()
}

/// Gives each socket its owners and verdict (pure: unit-tested with made-up sockets). `keep`:
/// only sockets held by (or inferred to belong to) these processes; empty keeps all.
pub(crate) fn build(
    sockets: Vec<DiagSocket>,
    owners_of: impl Fn(u64) -> Vec<Owner>,
    keep: &[u32],
) -> Vec<Entry> {
    let listeners = listeners(&sockets, &owners_of);
    let peers = peers(&sockets);
    let keep: Option<HashSet<u32>> = (!keep.is_empty()).then(|| keep.iter().copied().collect());
    let mut entries = Vec::new();
    for (s, peer) in sockets.into_iter().zip(peers) {
        if s.state == st::LISTEN {
            continue;
        }
        let mut owners = if s.inode != 0 {
            owners_of(s.inode)
        } else {
            Vec::new()
        };
        if let Some(keep) = &keep {
            // The processes asked about come first: the answers speak of them.
            owners.sort_by_key(|o| !keep.contains(&o.pid));
        }
        let Some(mut e) = Entry::new(s, owners) else {
            continue;
        };
        e.peer = peer.map(|(state, netns, inode)| Peer {
            state,
            netns,
            owners: if inode != 0 {
                owners_of(inode)
            } else {
                Vec::new()
            },
        });
        if e.owners.is_empty() && !e.is_time_wait() {
            let s = &e.sock;
            e.inferred = listeners
                .get(&(s.netns, Some(s.local), s.lport))
                .or_else(|| listeners.get(&(s.netns, None, s.lport)))
                .cloned();
        }
        let wanted = |pid: &u32| keep.as_ref().is_none_or(|k| k.contains(pid));
        let held = e.owners.iter().any(|o| wanted(&o.pid));
        let inferred = e.inferred.as_ref().is_some_and(|i| wanted(&i.pid));
        if keep.is_none() || held || inferred {
            entries.push(e);
        }
    }
    entries
}

/// What `snapshot` narrows its answer to, besides the processes (`--port`, `--state`,
/// `--netns`, `--container`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Narrow {
    pub(crate) ports: Vec<u16>,
    pub(crate) states: Vec<u8>,
    pub(crate) netns: Vec<u64>,
    /// Container ids (or prefixes), lowercase.
    pub(crate) containers: Vec<String>,
    /// Pods by UID, name or NAMESPACE/NAME.
    pub(crate) pods: Vec<String>,
}

impl Narrow {
    /// The entries that pass. A socket with no owner (an orphan) belongs to a container when
    /// it is in the namespace of one of the container's sockets' owners.
    pub(crate) fn keep(&self, entries: Vec<Entry>) -> Vec<Entry> {
        let in_container = |o: &Owner| {
            o.container.as_ref().is_some_and(|c| {
                self.containers.iter().any(|want| {
                    c.id.as_deref()
                        .is_some_and(|id| id.starts_with(want.as_str()))
                        || c.pod_uid.as_deref().is_some_and(|uid| uid == want)
                })
            })
        };
        let container_ns: HashSet<u64> = entries
            .iter()
            .filter(|e| e.owners.iter().any(in_container))
            .map(|e| e.sock.netns)
            .collect();
        entries
            .into_iter()
            .filter(|e| {
                let s = &e.sock;
                let port = self.ports.is_empty()
                    || self.ports.contains(&s.lport)
                    || self.ports.contains(&s.rport);
                let state = self.states.is_empty() || self.states.contains(&s.state);
                let netns = self.netns.is_empty() || self.netns.contains(&s.netns);
                let container = (self.containers.is_empty() && self.pods.is_empty())
                    || e.owners.iter().any(in_container)
                    || (e.owners.is_empty() && container_ns.contains(&s.netns));
                port && state && netns && container
            })
            .collect()
    }
}

/// Per process: counts by class (and how many were inferred).
#[derive(Default, Debug, PartialEq, Eq)]
pub(crate) struct Group {
    pub(crate) counts: BTreeMap<&'static str, usize>,
    pub(crate) inferred: usize,
    /// CLOSE_WAIT by what the owner did with the FIN (`fin_not_read`, `read_eof_not_closed`).
    pub(crate) readings: BTreeMap<&'static str, usize>,
    /// The verdict of each class, for the words.
    verdicts: BTreeMap<&'static str, Verdict>,
    /// The process's container, where it runs in one.
    pub(crate) container: Option<Arc<Container>>,
}

/// Sockets on the close path by responsible process ((0, "(no owner found)") when none),
/// TIME_WAIT aside.
pub(crate) fn summarize(entries: &[Entry]) -> BTreeMap<(u32, String), Group> {
    let mut groups: BTreeMap<(u32, String), Group> = BTreeMap::new();
    for e in entries.iter().filter(|e| !e.is_time_wait()) {
        let (pid, comm, inferred) = e
            .responsible()
            .map(|(p, c, i)| (p, c.to_string(), i))
            .unwrap_or((0, "(no owner found)".into(), false));
        let g = groups.entry((pid, comm)).or_default();
        if g.container.is_none() && !inferred {
            g.container = e.owners.first().and_then(|o| o.container.clone());
        }
        *g.counts.entry(e.class()).or_default() += 1;
        g.verdicts
            .entry(e.class())
            .or_insert_with(|| e.verdict.clone());
        g.inferred += usize::from(inferred);
        if let Some(r) = e.owner_state.as_ref().and_then(|o| o.reading) {
            *g.readings.entry(r.name()).or_default() += 1;
        }
    }
    groups
}

/// One process's sentence: `nginx[12]: 8 FIN_WAIT2: ...; 3 CLOSE_WAIT held open: ...`.
fn group_line(pid: u32, comm: &str, g: &Group) -> String {
    let n = |c: &str| g.counts.get(c).copied().unwrap_or(0);
    let whose = |c: &str| {
        g.verdicts
            .get(c)
            .map(|v| v.plural(comm).to_string())
            .unwrap_or_default()
    };
    let mut parts = Vec::new();
    let (half, orphaned) = (n("fin_wait2_half_closed"), n("fin_wait2_orphaned"));
    if half + orphaned > 0 {
        let mut kinds = Vec::new();
        if orphaned > 0 {
            let inferred = match g.inferred {
                0 => String::new(),
                i => format!("; {i} inferred from the listening port"),
            };
            let whose = whose("fin_wait2_orphaned");
            kinds.push(format!(
                "{orphaned} orphaned after close() ({whose}{inferred})"
            ));
        }
        if half > 0 {
            let whose = whose("fin_wait2_half_closed");
            kinds.push(format!(
                "{half} half-closed by shutdown() and still open ({whose})"
            ));
        }
        parts.push(format!(
            "{} FIN_WAIT2: {}",
            half + orphaned,
            kinds.join(", ")
        ));
    }
    if n("close_wait") > 0 {
        let whose = whose("close_wait");
        parts.push(format!(
            "{} CLOSE_WAIT held open{}: {whose}",
            n("close_wait"),
            readings_words(|k| g.readings.get(k).map_or(0, |n| *n as u64))
        ));
    }
    for (c, label) in [
        ("fin_wait1", "FIN_WAIT1"),
        ("last_ack", "LAST_ACK"),
        ("closing", "CLOSING"),
    ] {
        if n(c) > 0 {
            parts.push(format!("{} {label}", n(c)));
        }
    }
    let mut who = if pid == 0 {
        comm.to_string()
    } else {
        format!("{comm}[{pid}]")
    };
    crate::model::container::write_short(&mut who, g.container.as_deref());
    format!("{who}: {}", parts.join("; "))
}

/// One sentence per process, most stuck sockets first, then the TIME_WAIT count.
pub(crate) fn summary_lines(entries: &[Entry]) -> Vec<String> {
    let groups = summarize(entries);
    let mut rows: Vec<_> = groups.iter().collect();
    rows.sort_by_key(|(_, g)| std::cmp::Reverse(g.counts.values().sum::<usize>()));
    let mut lines: Vec<String> = rows
        .into_iter()
        .map(|((pid, comm), g)| group_line(*pid, comm, g))
        .collect();
    let tw = entries.iter().filter(|e| e.is_time_wait()).count();
    lines.push(format!(
        "TIME_WAIT: {tw} (normal after an active close; the kernel frees them)"
    ));
    lines
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::host::sockdiag::TimerLeft;

    fn sock(state: u8, lport: u16, inode: u64, timer: Option<TimerLeft>) -> DiagSocket {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        DiagSocket {
            state,
            local: lo,
            lport,
            remote: lo,
            rport: 40000,
            inode,
            uid: 0,
            timer,
            recv_queue: 0,
            send_queue: 0,
            netns: 0,
        }
    }

    /// The other end on this host: in the same namespace, else the one socket of another
    /// namespace with the same ends reversed; loopback never crosses; several name none.
    #[test]
    fn names_the_peer_on_this_host() {
        let at = |state, (l, lp): (&str, u16), (r, rp): (&str, u16), inode, netns| DiagSocket {
            local: l.parse().unwrap(),
            lport: lp,
            remote: r.parse().unwrap(),
            rport: rp,
            netns,
            ..sock(state, lp, inode, None)
        };
        let owners = |inode: u64| match inode {
            1 => vec![owner(10, "proxy", 7)],
            2 => vec![owner(20, "backend", 3)],
            _ => vec![],
        };
        let sockets = vec![
            // loopback, same namespace: a half-closed proxy socket, the back-end's CLOSE_WAIT
            at(st::FIN_WAIT2, ("127.0.0.1", 5000), ("127.0.0.1", 80), 1, 7),
            at(st::CLOSE_WAIT, ("127.0.0.1", 80), ("127.0.0.1", 5000), 2, 7),
            // loopback in another namespace, the same ends: not this one's peer
            at(st::CLOSE_WAIT, ("127.0.0.1", 80), ("127.0.0.1", 6000), 3, 8),
            at(st::FIN_WAIT2, ("127.0.0.1", 6000), ("127.0.0.1", 80), 0, 9),
            // pod to pod: one candidate in another namespace
            at(st::CLOSE_WAIT, ("10.0.0.1", 80), ("10.0.0.2", 7000), 4, 8),
            at(st::FIN_WAIT2, ("10.0.0.2", 7000), ("10.0.0.1", 80), 0, 9),
            // two pods reuse the same addresses: no answer
            at(st::CLOSE_WAIT, ("10.0.0.1", 80), ("10.0.0.3", 7100), 5, 8),
            at(st::FIN_WAIT2, ("10.0.0.3", 7100), ("10.0.0.1", 80), 0, 9),
            at(st::FIN_WAIT2, ("10.0.0.3", 7100), ("10.0.0.1", 80), 0, 10),
        ];
        let e = build(sockets, owners, &[]);
        let peer = |i: usize| e[i].peer.as_ref().map(|p| (p.state, p.netns));
        assert_eq!(peer(0), Some((st::CLOSE_WAIT, 7)));
        assert_eq!(peer(1), Some((st::FIN_WAIT2, 7)));
        assert_eq!(
            (peer(2), peer(3)),
            (None, None),
            "loopback stays in its namespace"
        );
        assert_eq!(peer(4), Some((st::FIN_WAIT2, 9)));
        assert_eq!(peer(5), Some((st::CLOSE_WAIT, 8)));
        assert_eq!(peer(6), None, "two candidates elsewhere: no guess");
        assert!(
            e[0].answer()
                .ends_with("its peer on this host, backend[20] fd 3, is in CLOSE_WAIT: it has not closed its end"),
            "{}",
            e[0].answer()
        );
    }

    #[test]
    fn narrows_by_port_state_namespace_and_container() {
        const ID: &str = "3f2a9c1b7d4e5f60718293a4b5c6d7e8f0112233445566778899aabbccddeeff";
        let in_container = |pid, fd| Owner {
            container: Some(Arc::new(Container::from_path(&format!(
                "/libpod_parent/libpod-{ID}"
            )))),
            ..owner(pid, "python3", fd)
        };
        let owners = |inode: u64| match inode {
            1 => vec![in_container(20, 4)],
            2 => vec![owner(30, "nginx", 5)],
            _ => vec![],
        };
        let tw = Some(TimerLeft::TimeWait(Duration::from_secs(42)));
        let at = |mut s: DiagSocket, netns| {
            s.netns = netns;
            s
        };
        let sockets = vec![
            at(sock(st::CLOSE_WAIT, 8080, 1, None), 7), // the container's
            at(sock(st::FIN_WAIT2, 40001, 0, tw), 7),   // an orphan in its namespace
            at(sock(st::CLOSE_WAIT, 80, 2, None), 9),   // the host's
            at(sock(st::FIN_WAIT2, 40002, 0, tw), 9),   // an orphan of the host's
        ];
        let all = build(sockets, owners, &[]);
        let ports =
            |n: &Narrow| -> Vec<u16> { n.keep(all.clone()).iter().map(|e| e.sock.lport).collect() };
        let container = Narrow {
            containers: vec![ID[..12].to_string()],
            ..Narrow::default()
        };
        assert_eq!(ports(&container), [8080, 40001]);
        let netns = Narrow {
            netns: vec![9],
            ..Narrow::default()
        };
        assert_eq!(ports(&netns), [80, 40002]);
        let state = Narrow {
            states: vec![st::CLOSE_WAIT],
            ports: vec![80, 8080],
            ..Narrow::default()
        };
        assert_eq!(ports(&state), [8080, 80]);
        assert_eq!(ports(&Narrow::default()).len(), 4);
    }
    fn owner(pid: u32, comm: &str, fd: i32) -> Owner {
        Owner {
            pid,
            comm: comm.into(),
            fd,
            cgroup_id: None,
            container: None,
        }
    }

    #[test]
    fn classifies_and_infers_the_listener() {
        let owners = |inode: u64| match inode {
            1 => vec![owner(10, "nginx", 6)],   // listener on :80
            2 => vec![owner(11, "nginx", 9)],   // half-closed, held
            3 => vec![owner(99, "python3", 4)], // CLOSE_WAIT
            _ => vec![],
        };
        let tw = Some(TimerLeft::TimeWait(Duration::from_secs(42)));
        let sockets = vec![
            sock(st::LISTEN, 80, 1, None),
            sock(st::FIN_WAIT2, 80, 2, None),
            sock(st::FIN_WAIT2, 80, 0, tw),
            sock(st::CLOSE_WAIT, 5432, 3, None),
            sock(st::TIME_WAIT, 80, 0, tw),
            sock(st::FIN_WAIT2, 5555, 0, tw),
        ];
        let e = build(sockets, owners, &[]);
        let classes: Vec<&str> = e.iter().map(Entry::class).collect();
        assert_eq!(
            classes,
            [
                "fin_wait2_half_closed",
                "fin_wait2_orphaned",
                "close_wait",
                "time_wait",
                "fin_wait2_orphaned"
            ]
        );
        assert_eq!(
            e[1].inferred,
            Some(Inferred {
                pid: 10,
                comm: "nginx".into()
            })
        );
        assert_eq!(
            e[4].inferred, None,
            "no listener on a client port: no guess"
        );
        let lines = summary_lines(&e);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("nginx[10]: 1 FIN_WAIT2: 1 orphaned after close()")),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("python3[99]: 1 CLOSE_WAIT held open")),
            "{lines:?}"
        );
        assert_eq!(
            lines.last().unwrap(),
            "TIME_WAIT: 1 (normal after an active close; the kernel frees them)"
        );
        assert!(
            e[1].answer().contains("about 42 s left"),
            "{}",
            e[1].answer()
        );
    }
}
