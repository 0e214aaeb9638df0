//! The sockets someone must close, one entry per socket whichever path saw it first: seeded
//! from the start-up inventory, moved by live transitions, checked against the kernel's table.
//!
//! The summary, the metrics' gauges and `top` each keep one, with what they show of a socket
//! as the entry's payload; the rules of identity are here, once. A socket is found by its
//! kernel address once seen live, by its inode while only the inventory has seen it, and by
//! its ends when a transition has no inode (a closed socket's last transitions).
use std::collections::{HashMap, HashSet};

use finwait_common::TcpState;

use super::{EndsKey, TransitionReport};

/// What a socket waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// FIN_WAIT2 after shutdown(), still held: the application must close it.
    HalfClosed,
    /// CLOSE_WAIT: its owner must close it.
    CloseWait,
}

impl Kind {
    /// The state a socket of this kind is in.
    pub(crate) fn state(self) -> TcpState {
        match self {
            Self::HalfClosed => TcpState::FinWait2,
            Self::CloseWait => TcpState::CloseWait,
        }
    }
}

/// One socket someone must close, with what the ledger's user keeps of it (`data`).
#[derive(Clone, Debug)]
pub(crate) struct Entry<T> {
    pub(crate) kind: Kind,
    /// The process that must close it (0: not known); the kernel's table is read in its
    /// network namespace.
    pub(crate) pid: u32,
    /// Its ends: the match of last resort, and its key in the kernel's table.
    pub(crate) key: EndsKey,
    pub(crate) since_ns: u64,
    /// Stuck before the start: `since_ns` is when the inventory saw it (a lower bound).
    pub(crate) at_least: bool,
    pub(crate) data: T,
}

/// For each holder's pid its network namespace, the namespaces read, and their sockets in
/// CLOSE_WAIT or FIN_WAIT2 by (namespace, ends): (state, inode).
pub(crate) struct CloseTable {
    pub(crate) ns_of: HashMap<u32, Option<u64>>,
    pub(crate) read: HashSet<u64>,
    pub(crate) sockets: HashMap<(u64, EndsKey), (TcpState, u64)>,
}

impl CloseTable {
    /// Whether the kernel no longer has this socket in its state (a half-closed one: held by
    /// a process, so with an inode). A holder whose namespace was not read (or a holder gone)
    /// is not judged: false.
    fn lacks<T>(&self, e: &Entry<T>) -> bool {
        let ns = self.ns_of.get(&e.pid).copied().flatten();
        let Some(ns) = ns.filter(|ns| self.read.contains(ns)) else {
            return false;
        };
        match (e.kind, self.sockets.get(&(ns, e.key))) {
            (Kind::CloseWait, Some((state, _))) => *state != TcpState::CloseWait,
            (Kind::HalfClosed, Some((state, inode))) => *state != TcpState::FinWait2 || *inode == 0,
            (_, None) => true,
        }
    }
}

/// What a live transition did to a ledger, before its user holds anything new.
pub(crate) struct Moved<T> {
    /// A seeded entry the live view replaces (see [`Ledger::transition`]): its count is taken
    /// back.
    pub(crate) replaced: Option<Entry<T>>,
    /// The entry the transition closed: the socket left CLOSE_WAIT or FIN_WAIT2, or closed.
    pub(crate) released: Option<Entry<T>>,
}

impl<T> Moved<T> {
    /// Both, for a user that only counts what is held.
    pub(crate) fn entries(self) -> impl Iterator<Item = Entry<T>> {
        self.replaced.into_iter().chain(self.released)
    }
}

/// The sockets someone must close, each once.
pub(crate) struct Ledger<T> {
    /// By kernel address: seen live.
    live: HashMap<u64, Entry<T>>,
    /// By inode: seen by the inventory only (it has no kernel addresses).
    seeded: HashMap<u64, Entry<T>>,
    /// The seeded ones by ends, for a transition without an inode (a half-closed socket's
    /// close orphans it before its last transition). None where two share their ends (in two
    /// namespaces: every pod has its own 127.0.0.1): no guess.
    seeded_ends: HashMap<EndsKey, Option<u64>>,
}

impl<T> Default for Ledger<T> {
    fn default() -> Self {
        Self {
            live: HashMap::new(),
            seeded: HashMap::new(),
            seeded_ends: HashMap::new(),
        }
    }
}

impl<T> Ledger<T> {
    /// A socket stuck before the start, by its inode. False (not kept, not to be counted):
    /// no inode, or already in the ledger.
    pub(crate) fn seed(&mut self, inode: u64, e: Entry<T>) -> bool {
        if inode == 0 || self.seeded.contains_key(&inode) {
            return false;
        }
        self.seeded_ends
            .entry(e.key)
            .and_modify(|i| *i = None)
            .or_insert(Some(inode));
        self.seeded.insert(inode, e);
        true
    }

    /// Any live transition, before its user counts it. A seeded socket it names (by inode, or
    /// by ends when it has none) moves under its kernel address, or is replaced by the live
    /// view: when the transition enters the state it was seeded in (it happened while the
    /// inventory was read, and is counted live), or the address is already held. Then the
    /// socket's entry is released if the transition leaves CLOSE_WAIT or FIN_WAIT2, or closes.
    pub(crate) fn transition(&mut self, t: &TransitionReport) -> Moved<T> {
        let replaced = self.adopt(t);
        let leaves = matches!(t.old, TcpState::FinWait2 | TcpState::CloseWait);
        let released = if leaves || t.new == TcpState::Close {
            self.release(t.sock, t.inode)
        } else {
            None
        };
        Moved { replaced, released }
    }

    /// See [`Self::transition`]: the seeded entry replaced, if any.
    fn adopt(&mut self, t: &TransitionReport) -> Option<Entry<T>> {
        if self.seeded.is_empty() {
            return None;
        }
        let inode = match t.inode {
            0 => self.seeded_ends.get(&t.ends.key()).copied().flatten()?,
            inode => inode,
        };
        let e = self.take_seeded(inode)?;
        if t.new == e.kind.state() || self.live.contains_key(&t.sock) {
            return Some(e);
        }
        self.live.insert(t.sock, e);
        None
    }

    /// A socket seen live entering its state, under its address; the entry it replaces.
    pub(crate) fn hold(&mut self, sock: u64, e: Entry<T>) -> Option<Entry<T>> {
        self.live.insert(sock, e)
    }

    /// The socket's closing transition: its entry by address, else by inode (0: none).
    fn release(&mut self, sock: u64, inode: u64) -> Option<Entry<T>> {
        match self.live.remove(&sock) {
            Some(e) => Some(e),
            None if inode != 0 => self.take_seeded(inode),
            None => None,
        }
    }

    /// Every entry `gone` names is released, and returned.
    pub(crate) fn release_where(
        &mut self,
        mut gone: impl FnMut(&Entry<T>) -> bool,
    ) -> Vec<Entry<T>> {
        let mut out: Vec<Entry<T>> = self
            .live
            .extract_if(|_, e| gone(e))
            .map(|(_, e)| e)
            .collect();
        let inodes: Vec<u64> = self
            .seeded
            .iter()
            .filter(|(_, e)| gone(e))
            .map(|(i, _)| *i)
            .collect();
        out.extend(inodes.into_iter().filter_map(|i| self.take_seeded(i)));
        out
    }

    /// The periodic check: every entry `checked` allows that the kernel no longer has (a
    /// transition lost on the way) is released, and returned. Only namespaces `k` read are
    /// judged.
    pub(crate) fn release_gone(
        &mut self,
        k: &CloseTable,
        checked: impl Fn(&Entry<T>) -> bool,
    ) -> Vec<Entry<T>> {
        self.release_where(|e| checked(e) && k.lacks(e))
    }

    /// The processes that must close what is held (whose namespaces the check reads).
    pub(crate) fn holders(&self) -> HashSet<u32> {
        self.values().map(|e| e.pid).collect()
    }

    /// A live entry, by address.
    pub(crate) fn get_mut(&mut self, sock: u64) -> Option<&mut Entry<T>> {
        self.live.get_mut(&sock)
    }

    /// Every entry: the live ones, then the seeded ones.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Entry<T>> {
        self.live.values().chain(self.seeded.values())
    }

    /// Every entry with its kernel address (0: seen by the inventory only).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &Entry<T>)> {
        let seeded = self.seeded.values().map(|e| (0, e));
        self.live.iter().map(|(s, e)| (*s, e)).chain(seeded)
    }

    /// [`Self::iter`], to change the payloads.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut Entry<T>)> {
        let seeded = self.seeded.values_mut().map(|e| (0, e));
        self.live.iter_mut().map(|(s, e)| (*s, e)).chain(seeded)
    }

    /// How many sockets are held.
    pub(crate) fn count(&self) -> usize {
        self.live.len() + self.seeded.len()
    }

    fn take_seeded(&mut self, inode: u64) -> Option<Entry<T>> {
        let e = self.seeded.remove(&inode)?;
        // An ambiguous key goes too: the one left sharing it is not matched by ends.
        let ends = self.seeded_ends.get(&e.key);
        if ends.is_some_and(|i| i.is_none_or(|i| i == inode)) {
            self.seeded_ends.remove(&e.key);
        }
        Some(e)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::model::Endpoints;

    /// 127.0.0.1:80 to 127.0.0.1:`rport` (the tests of the ledger's users share it).
    pub(crate) fn ends(rport: u16) -> Endpoints {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        Endpoints {
            local: lo,
            lport: 80,
            remote: lo,
            rport,
        }
    }

    /// A socket of `pid`'s to port `rport`; its payload names it.
    fn entry(kind: Kind, pid: u32, rport: u16) -> Entry<&'static str> {
        Entry {
            kind,
            pid,
            key: ends(rport).key(),
            since_ns: 1,
            at_least: true,
            data: "seeded",
        }
    }

    fn tr(sock: u64, inode: u64, rport: u16, old: TcpState, new: TcpState) -> TransitionReport {
        TransitionReport::new(2, sock, ends(rport), old, new, inode)
    }

    #[test]
    fn a_seeded_socket_is_adopted_by_inode_or_by_ends() {
        let mut l = Ledger::default();
        assert!(l.seed(10, entry(Kind::CloseWait, 7, 4000)));
        assert!(l.seed(11, entry(Kind::HalfClosed, 7, 4001)));
        // Its close, with the inode: now under its address.
        let t = tr(0x100, 10, 4000, TcpState::CloseWait, TcpState::LastAck);
        assert!(l.adopt(&t).is_none());
        assert_eq!(l.release(0x100, 0).map(|e| e.data), Some("seeded"));
        // Orphaned by its close (no inode any more): matched by its ends.
        let t = tr(0x200, 0, 4001, TcpState::FinWait2, TcpState::Close);
        assert!(l.adopt(&t).is_none());
        assert_eq!(l.iter().map(|(s, _)| s).collect::<Vec<_>>(), [0x200]);
        assert!(l.release(0x200, 0).is_some());
        assert_eq!(l.count(), 0);
    }

    /// What a transition hands back to be un-counted: a seeded entry the live view replaces,
    /// and the entry it closes.
    #[test]
    fn a_transition_replaces_or_releases() {
        let mut l = Ledger::default();
        l.seed(10, entry(Kind::CloseWait, 7, 4000));
        l.seed(11, entry(Kind::HalfClosed, 7, 4001));
        let m = l.transition(&tr(
            0x100,
            10,
            4000,
            TcpState::Established,
            TcpState::CloseWait,
        ));
        assert!(m.replaced.is_some() && m.released.is_none());
        // Orphaned by its close, then closed: found by its ends.
        let m = l.transition(&tr(0x200, 0, 4001, TcpState::FinWait2, TcpState::Close));
        assert!(m.replaced.is_none());
        assert_eq!(m.released.map(|e| e.kind), Some(Kind::HalfClosed));
        assert_eq!(l.count(), 0);
        // Nothing held: nothing handed back.
        let m = l.transition(&tr(0x300, 12, 4002, TcpState::CloseWait, TcpState::LastAck));
        assert_eq!(m.entries().count(), 0);
    }

    /// A transition into the state the inventory saw (it happened while it was read) is the
    /// socket's one entry; so is one already held at its address.
    #[test]
    fn the_live_view_wins_over_the_seeded_one() {
        let mut l = Ledger::default();
        l.seed(10, entry(Kind::CloseWait, 7, 4000));
        let t = tr(0x100, 10, 4000, TcpState::Established, TcpState::CloseWait);
        assert_eq!(l.adopt(&t).map(|e| e.data), Some("seeded"));
        let mut live = entry(Kind::CloseWait, 7, 4000);
        live.data = "live";
        assert!(l.hold(0x100, live.clone()).is_none());
        assert_eq!(l.count(), 1);
        // Seen by both paths under two names: the live entry stays.
        l.seed(11, entry(Kind::HalfClosed, 8, 4001));
        l.hold(
            0x200,
            Entry {
                data: "live",
                ..entry(Kind::HalfClosed, 8, 4001)
            },
        );
        let t = tr(0x200, 11, 4001, TcpState::FinWait2, TcpState::TimeWait);
        assert_eq!(l.adopt(&t).map(|e| e.data), Some("seeded"));
        assert_eq!(l.count(), 2);
        assert!(l.values().all(|e| e.data == "live"));
    }

    #[test]
    fn released_by_address_or_by_inode_once() {
        let mut l = Ledger::default();
        l.seed(10, entry(Kind::CloseWait, 7, 4000));
        l.hold(0x100, entry(Kind::CloseWait, 7, 4001));
        assert!(l.release(0x999, 10).is_some(), "by inode");
        assert!(l.release(0x100, 0).is_some(), "by address");
        assert!(l.release(0x100, 0).is_none());
        assert!(l.release(0x999, 10).is_none());
        // A socket the inventory saw once counts once; one with no inode is not seeded.
        assert!(l.seed(12, entry(Kind::CloseWait, 7, 4002)));
        assert!(!l.seed(12, entry(Kind::CloseWait, 7, 4002)));
        assert!(!l.seed(0, entry(Kind::CloseWait, 7, 4003)));
        assert_eq!(l.count(), 1);
    }

    /// Two namespaces' sockets with the same ends: neither is guessed from a transition that
    /// has no inode.
    #[test]
    fn ends_shared_by_two_seeded_sockets_match_neither() {
        let mut l = Ledger::default();
        l.seed(10, entry(Kind::CloseWait, 7, 4000));
        l.seed(11, entry(Kind::CloseWait, 8, 4000));
        let t = tr(0x100, 0, 4000, TcpState::CloseWait, TcpState::Close);
        assert!(l.adopt(&t).is_none());
        assert_eq!(l.iter().filter(|(s, _)| *s == 0).count(), 2);
    }

    /// The check releases what the kernel no longer has in its state, in the namespaces it
    /// read only; what `checked` exempts stays.
    #[test]
    fn the_check_judges_only_the_namespaces_read() {
        let mut l = Ledger::default();
        l.hold(1, entry(Kind::CloseWait, 7, 4000)); // gone from namespace 70
        l.hold(2, entry(Kind::CloseWait, 7, 4001)); // still there
        l.hold(3, entry(Kind::HalfClosed, 7, 4002)); // orphaned: no inode
        l.seed(10, entry(Kind::CloseWait, 7, 4003)); // LAST_ACK now
        l.hold(4, entry(Kind::CloseWait, 9, 4000)); // namespace 90, not read
        l.hold(5, entry(Kind::CloseWait, 6, 4000)); // holder gone
        let mut exempt = entry(Kind::CloseWait, 7, 4004);
        exempt.data = "exempt";
        l.hold(6, exempt);
        assert_eq!(l.holders(), [6, 7, 9].into());
        let k = CloseTable {
            ns_of: [(7, Some(70)), (9, Some(90)), (6, None)].into(),
            read: [70].into(),
            sockets: [
                ((70, ends(4001).key()), (TcpState::CloseWait, 5)),
                ((70, ends(4002).key()), (TcpState::FinWait2, 0)),
                ((70, ends(4003).key()), (TcpState::LastAck, 6)),
                ((90, ends(4000).key()), (TcpState::LastAck, 7)),
            ]
            .into(),
        };
        let gone = l.release_gone(&k, |e| e.data != "exempt");
        let mut ports: Vec<u16> = gone.iter().map(|e| e.key.3).collect();
        ports.sort_unstable();
        assert_eq!(ports, [4000, 4002, 4003]);
        let mut left: Vec<u64> = l.iter().map(|(s, _)| s).collect();
        left.sort_unstable();
        assert_eq!(left, [2, 4, 5, 6]);
    }
}
