//! From sockets to answers, one socket at a time as the dump streams in: each namespace's
//! listeners first (to infer who accepted an orphan), then each socket on the close path is
//! given its holders and verdict, narrowed to what was asked, its owner inspected, counted, and
//! kept only when the caller wants every socket (JSON, `--detail`, live tracing's seeding).
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use finwait_common::TcpState;

use super::{Entry, Inferred, Peer, Tally};
use crate::{
    host::{
        inspect::{self, EpollSets},
        sockdiag::DiagSocket,
    },
    model::{EndsKey, Owner, diagnosis::Threads},
};

/// Where a listener listens: its namespace, address (None: any) and port.
type ListenAt = (u64, Option<IpAddr>, u16);

/// Every process's epoll fds, from the kernel's inventory.
pub(crate) type EpollFds = HashMap<u32, Vec<i32>>;

/// What `snapshot` narrows its answer to, besides the processes (`--port`, `--state`,
/// `--netns`, `--container`, `--pod`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Narrow {
    pub(crate) ports: Vec<u16>,
    pub(crate) states: Vec<TcpState>,
    /// `--needs-action`: only sockets a process must act on.
    pub(crate) needs_action: bool,
    pub(crate) netns: Vec<u64>,
    /// Container ids (or prefixes), lowercase.
    pub(crate) containers: Vec<String>,
    /// Pods by UID, name or NAMESPACE/NAME.
    pub(crate) pods: Vec<String>,
    /// The network namespaces of the containers' and pods' processes: an orphan (no holder
    /// left) there is theirs.
    pub(crate) container_netns: HashSet<u64>,
}

impl Narrow {
    /// Whether `e` is part of the answer.
    pub(crate) fn passes(&self, e: &Entry) -> bool {
        let s = &e.sock;
        let port =
            self.ports.is_empty() || self.ports.contains(&s.lport) || self.ports.contains(&s.rport);
        let state = (self.states.is_empty() || self.states.contains(&s.state))
            && (!self.needs_action || e.verdict.needs_action());
        let netns = self.netns.is_empty() || self.netns.contains(&s.netns);
        let in_container = |o: &Owner| {
            o.container
                .as_ref()
                .is_some_and(|c| c.is_one_of(&self.containers, &self.pods))
        };
        let container = (self.containers.is_empty() && self.pods.is_empty())
            || e.owners.iter().any(in_container)
            || (e.owners.is_empty() && self.container_netns.contains(&s.netns));
        port && state && netns && container
    }
}

/// Owners inspected at most (each costs a read of its epoll sets and threads in /proc).
const MAX_INSPECTED: usize = 256;

/// What the owner of a socket it must close is doing: is the fd still in one of its epoll sets,
/// and what are its threads waiting in. Each owner is read once; its epoll fds, where the
/// kernel's inventory named them, without reading its every fd link.
#[derive(Default)]
pub(crate) struct Inspector {
    epoll: Option<EpollFds>,
    seen: HashMap<u32, (Option<EpollSets>, Option<Threads>)>,
}

impl Inspector {
    pub(crate) fn new(epoll: Option<EpollFds>) -> Self {
        Self {
            epoll,
            seen: HashMap::new(),
        }
    }

    fn inspect(&mut self, e: &mut Entry) {
        let (Some(state), Some(o)) = (e.owner_state.as_mut(), e.owners.first()) else {
            return;
        };
        if !self.seen.contains_key(&o.pid) && self.seen.len() >= MAX_INSPECTED {
            return;
        }
        let epoll = &self.epoll;
        let (sets, threads) = self.seen.entry(o.pid).or_insert_with(|| {
            let sets = match epoll {
                Some(e) => Some(EpollSets::of_epoll_fds(
                    o.pid,
                    e.get(&o.pid).map_or(&[], Vec::as_slice),
                )),
                None => EpollSets::of(o.pid),
            };
            (sets, inspect::threads(o.pid))
        });
        state.polled = sets.as_ref().map(|s| s.polled(o.fd));
        state.threads.clone_from(threads);
    }
}

pub(crate) struct Builder<F> {
    owners_of: F,
    /// Only sockets held by (or inferred to belong to) these processes; None keeps all.
    keep: Option<HashSet<u32>>,
    narrow: Narrow,
    listeners: HashMap<ListenAt, Inferred>,
    inspector: Option<Inspector>,
    tally: Tally,
    /// Every socket kept, when asked.
    entries: Option<Vec<Entry>>,
    /// Every socket seen, by ends, for the peers of those kept: (state, namespace, inode).
    all_ends: HashMap<EndsKey, Vec<(TcpState, u64, u64)>>,
}

impl<F: Fn(u64) -> Vec<Owner>> Builder<F> {
    /// `owners_of`: a socket's holders by inode; `keep`: only sockets of these processes
    /// (empty keeps all); `keep_entries`: keep every socket, not only the counts.
    pub(crate) fn new(owners_of: F, keep: &[u32], narrow: Narrow, keep_entries: bool) -> Self {
        Self {
            owners_of,
            keep: (!keep.is_empty()).then(|| keep.iter().copied().collect()),
            narrow,
            listeners: HashMap::new(),
            inspector: None,
            tally: Tally::default(),
            entries: keep_entries.then(Vec::new),
            all_ends: HashMap::new(),
        }
    }

    /// Also reads what each owner is doing about the sockets it must close.
    pub(crate) fn inspecting(mut self, inspector: Inspector) -> Self {
        self.inspector = Some(inspector);
        self
    }

    /// A listening socket: who accepted the orphans on its port, in its namespace (every pod
    /// can listen on the same port).
    pub(crate) fn listener(&mut self, s: &DiagSocket) {
        if let Some(o) = (self.owners_of)(s.inode).into_iter().next() {
            let addr = (!s.local.is_unspecified()).then_some(s.local);
            let inferred = Inferred {
                pid: o.pid,
                comm: o.comm,
            };
            self.listeners.insert((s.netns, addr, s.lport), inferred);
        }
    }

    /// One socket on the close path.
    pub(crate) fn socket(&mut self, s: DiagSocket) {
        if s.state == TcpState::Listen {
            return self.listener(&s);
        }
        if self.entries.is_some() {
            let at = (s.state, s.netns, s.inode);
            self.all_ends.entry(s.key()).or_default().push(at);
        }
        let mut owners = if s.inode != 0 {
            (self.owners_of)(s.inode)
        } else {
            Vec::new()
        };
        if let Some(keep) = &self.keep {
            // The processes asked about come first: the answers speak of them.
            owners.sort_by_key(|o| !keep.contains(&o.pid));
        }
        let Some(mut e) = Entry::new(s, owners) else {
            return;
        };
        if e.owners.is_empty() && !e.is_time_wait() {
            let s = &e.sock;
            e.inferred = self
                .listeners
                .get(&(s.netns, Some(s.local), s.lport))
                .or_else(|| self.listeners.get(&(s.netns, None, s.lport)))
                .cloned();
        }
        let wanted = |pid: &u32| self.keep.as_ref().is_none_or(|k| k.contains(pid));
        let held = e.owners.iter().any(|o| wanted(&o.pid));
        let inferred = e.inferred.as_ref().is_some_and(|i| wanted(&i.pid));
        if !(self.keep.is_none() || held || inferred) || !self.narrow.passes(&e) {
            return;
        }
        if let Some(i) = &mut self.inspector {
            i.inspect(&mut e);
        }
        self.tally.add(&e);
        if let Some(entries) = &mut self.entries {
            entries.push(e);
        }
    }

    /// The sockets kept (each with its peer where it is on this host), and the counts.
    pub(crate) fn finish(self) -> (Vec<Entry>, Tally) {
        let mut entries = self.entries.unwrap_or_default();
        for e in &mut entries {
            e.peer = peer_of(&self.all_ends, &e.sock).map(|(state, netns, inode)| Peer {
                state,
                netns,
                owners: if inode != 0 {
                    (self.owners_of)(inode)
                } else {
                    Vec::new()
                },
            });
        }
        (entries, self.tally)
    }
}

/// The peer's (state, namespace, inode) where it is on this host: the socket with the same
/// ends the other way round, in the same namespace, else the one such socket of another
/// namespace (a pod's peer on the node). Loopback never leaves a namespace, and several
/// candidates elsewhere (pods that reuse the same addresses) name none.
fn peer_of(
    all: &HashMap<EndsKey, Vec<(TcpState, u64, u64)>>,
    s: &DiagSocket,
) -> Option<(TcpState, u64, u64)> {
    let (l, lp, r, rp) = s.key();
    let found = all.get(&(r, rp, l, lp))?;
    let same_ns = found.iter().find(|p| p.1 == s.netns);
    match (same_ns, found.as_slice()) {
        (Some(p), _) => Some(*p),
        (None, _) if r.is_loopback() => None,
        (None, [p]) => Some(*p),
        (None, _) => None,
    }
}

/// Gives each socket its owners, verdict and peer, as `take` does (for tests, with made-up
/// sockets).
#[cfg(test)]
/// `keep`: only sockets held by (or inferred to belong to) these processes; empty keeps all.
pub(crate) fn build(
    sockets: Vec<DiagSocket>,
    owners_of: impl Fn(u64) -> Vec<Owner>,
    keep: &[u32],
) -> Vec<Entry> {
    let mut b = Builder::new(owners_of, keep, Narrow::default(), true);
    let (listening, rest): (Vec<_>, Vec<_>) = sockets
        .into_iter()
        .partition(|s| s.state == TcpState::Listen);
    listening.iter().for_each(|s| b.listener(s));
    rest.into_iter().for_each(|s| b.socket(s));
    b.finish().0
}

#[cfg(test)]
#[allow(clippy::too_many_lines)] // scenarios read best whole
mod tests {
    use std::time::Duration;

    use std::{net::IpAddr, sync::Arc};

    use super::*;
    use crate::{host::sockdiag::TimerLeft, model::Container};

    fn sock(state: TcpState, lport: u16, inode: u64, timer: Option<TimerLeft>) -> DiagSocket {
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
            at(
                TcpState::FinWait2,
                ("127.0.0.1", 5000),
                ("127.0.0.1", 80),
                1,
                7,
            ),
            at(
                TcpState::CloseWait,
                ("127.0.0.1", 80),
                ("127.0.0.1", 5000),
                2,
                7,
            ),
            // loopback in another namespace, the same ends: not this one's peer
            at(
                TcpState::CloseWait,
                ("127.0.0.1", 80),
                ("127.0.0.1", 6000),
                3,
                8,
            ),
            at(
                TcpState::FinWait2,
                ("127.0.0.1", 6000),
                ("127.0.0.1", 80),
                0,
                9,
            ),
            // pod to pod: one candidate in another namespace
            at(
                TcpState::CloseWait,
                ("10.0.0.1", 80),
                ("10.0.0.2", 7000),
                4,
                8,
            ),
            at(
                TcpState::FinWait2,
                ("10.0.0.2", 7000),
                ("10.0.0.1", 80),
                0,
                9,
            ),
            // two pods reuse the same addresses: no answer
            at(
                TcpState::CloseWait,
                ("10.0.0.1", 80),
                ("10.0.0.3", 7100),
                5,
                8,
            ),
            at(
                TcpState::FinWait2,
                ("10.0.0.3", 7100),
                ("10.0.0.1", 80),
                0,
                9,
            ),
            at(
                TcpState::FinWait2,
                ("10.0.0.3", 7100),
                ("10.0.0.1", 80),
                0,
                10,
            ),
        ];
        let e = build(sockets, owners, &[]);
        let peer = |i: usize| e[i].peer.as_ref().map(|p| (p.state, p.netns));
        assert_eq!(peer(0), Some((TcpState::CloseWait, 7)));
        assert_eq!(peer(1), Some((TcpState::FinWait2, 7)));
        assert_eq!(
            (peer(2), peer(3)),
            (None, None),
            "loopback stays in its namespace"
        );
        assert_eq!(peer(4), Some((TcpState::FinWait2, 9)));
        assert_eq!(peer(5), Some((TcpState::CloseWait, 8)));
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
            at(sock(TcpState::CloseWait, 8080, 1, None), 7), // the container's
            at(sock(TcpState::FinWait2, 40001, 0, tw), 7),   // an orphan in its namespace
            at(sock(TcpState::CloseWait, 80, 2, None), 9),   // the host's
            at(sock(TcpState::FinWait2, 40002, 0, tw), 9),   // an orphan of the host's
        ];
        let all = build(sockets, owners, &[]);
        let ports = |n: &Narrow| -> Vec<u16> {
            all.iter()
                .filter(|e| n.passes(e))
                .map(|e| e.sock.lport)
                .collect()
        };
        let container = Narrow {
            containers: vec![ID[..12].to_string()],
            // The container's processes are in namespace 7 (found in /proc by the caller).
            container_netns: [7].into(),
            ..Narrow::default()
        };
        assert_eq!(ports(&container), [8080, 40001]);
        let netns = Narrow {
            netns: vec![9],
            ..Narrow::default()
        };
        assert_eq!(ports(&netns), [80, 40002]);
        let state = Narrow {
            states: vec![TcpState::CloseWait],
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
            sock(TcpState::Listen, 80, 1, None),
            sock(TcpState::FinWait2, 80, 2, None),
            sock(TcpState::FinWait2, 80, 0, tw),
            sock(TcpState::CloseWait, 5432, 3, None),
            sock(TcpState::TimeWait, 80, 0, tw),
            sock(TcpState::FinWait2, 5555, 0, tw),
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
        let lines = Tally::of(&e).lines();
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
