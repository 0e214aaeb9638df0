//! Decides who holds a socket (CLOSE_WAIT owners, the holders left after a close without FIN),
//! never blocking the event path.
//!
//! The kernel records a socket's holder when a task obtains an fd to it (accept, connect, dup,
//! SCM_RIGHTS, pidfd_getfd) and the record travels with each transition: that answers almost
//! always, with no /proc access. Where the record cannot know (none: a socket obtained another
//! way, or a full map; stale: its holder closed its fd while others kept the file; its holder
//! exited since it was recorded, which the kernel's exit records say, in order), the few processes
//! that can hold it are checked in /proc (the recorded holder, its
//! children, one link each), and only then does the report wait, in order, for a full /proc
//! scan made after its event, off this thread. A CLOSE_WAIT whose FIN came before accept()
//! returned has no record yet: it waits for the kernel's word that the socket was obtained.
use std::{
    collections::{HashMap, VecDeque},
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use finwait_common::OwnerRec;
use lru::LruCache;

use finwait_common::TcpState;

use crate::{
    host::owners::{self, Index, Scanner},
    model::{KernelOwner, Owner, Report, TransitionReport},
};

/// Past this, a report goes out with the owner it has (possibly none) rather than waiting on.
const MAX_WAIT: Duration = Duration::from_secs(2);
/// A socket with no record is usually being accepted right now: give the accept's record this
/// long before asking for a full scan.
const ACCEPT_GRACE: Duration = Duration::from_millis(200);

/// How owners were found, for the stats line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct OwnerStats {
    /// Taken from the kernel's record as it came.
    pub(crate) from_kernel: u64,
    /// Found by checking the few processes that could hold the socket in /proc.
    pub(crate) verified: u64,
    /// Waited for a full scan (or an accept) that did not come in time: the owner stayed
    /// unknown.
    pub(crate) timed_out: u64,
}

struct Pending {
    report: Report,
    since: Instant,
    /// The owner is still unknown: wait for the kernel's record of an accept, or a full scan
    /// made after the event.
    waiting: bool,
}

pub(crate) struct Resolver {
    scanner: Scanner,
    queue: VecDeque<Pending>,
    /// The kernel's ownership map, read directly for a CLOSE_WAIT whose transition raced its
    /// accept (the state hook runs before the new state is stored: the accept can miss it).
    owner_map: Option<BpfHashMap<MapData, u64, OwnerRec>>,
    /// Owners of sockets the start-up snapshot found in CLOSE_WAIT, by inode (for their close).
    snapshot_owner: HashMap<u64, Owner>,
    /// Processes that exited, and when (bounded: the oldest are forgotten).
    exited: LruCache<u32, u64>,
    /// Sockets with a queued CLOSE_WAIT that waits for its owner, and how many: news of any
    /// other socket skips the queue walk (a long queue behind one waiting report made each
    /// walk cost its whole length).
    waiting_socks: HashMap<u64, u32>,
    pub(crate) stats: OwnerStats,
}

/// The task whose call ended this transition's socket, as its owner (it held an fd to it).
fn closer(t: &TransitionReport) -> Option<Owner> {
    let c = t.cause.as_ref()?;
    let task = c.task.as_ref()?;
    Some(Owner {
        pid: task.pid,
        comm: task.comm.clone(),
        fd: c.fd?,
        cgroup_id: (task.cgroup_id != 0).then_some(task.cgroup_id),
        container: task.container.clone(),
    })
}

/// Exited processes remembered (a record made before one of them exited is not trusted).
const MAX_EXITED: usize = 65_536;

impl Resolver {
    pub(crate) fn new(scanner: Scanner) -> Self {
        Self {
            scanner,
            queue: VecDeque::new(),
            owner_map: None,
            snapshot_owner: HashMap::new(),
            exited: LruCache::new(NonZeroUsize::new(MAX_EXITED).unwrap()),
            waiting_socks: HashMap::new(),
            stats: OwnerStats::default(),
        }
    }

    /// The kernel recorded a holder for a socket already in CLOSE_WAIT, at `ts_ns`: it owns the
    /// latest CLOSE_WAIT of that socket still waiting for its owner (reports reach the resolver
    /// in kernel order, so that one came before this accept).
    pub(crate) fn obtained(&mut self, sock: u64, ts_ns: u64, owner: &KernelOwner) {
        self.fill_waiting(sock, None, ts_ns, owner);
    }

    /// Names the owner of the latest CLOSE_WAIT of `sock` (with `inode`, when known) that came
    /// before `ts_ns` and still waits for one.
    fn fill_waiting(&mut self, sock: u64, inode: Option<u64>, ts_ns: u64, owner: &KernelOwner) {
        if !self.waiting_socks.contains_key(&sock) {
            return;
        }
        let waiting = self.queue.iter_mut().rev().find(|p| {
            p.waiting
                && matches!(&p.report, Report::Transition(t)
                    if t.sock == sock && t.new == TcpState::CloseWait && t.ts_ns <= ts_ns
                        && inode.is_none_or(|i| i == t.inode))
        });
        if let Some(p) = waiting
            && let Report::Transition(t) = &mut p.report
        {
            t.owner = Some(owner.into());
            p.waiting = false;
            self.stats.from_kernel += 1;
            self.stop_waiting(sock);
        }
    }

    /// A queued CLOSE_WAIT of `sock` waits for its owner.
    fn start_waiting(&mut self, r: &Report) {
        if let Report::Transition(t) = r
            && t.new == TcpState::CloseWait
        {
            *self.waiting_socks.entry(t.sock).or_default() += 1;
        }
    }

    /// A queued CLOSE_WAIT of `sock` no longer waits (named, or given up on).
    fn stop_waiting(&mut self, sock: u64) {
        if let Some(n) = self.waiting_socks.get_mut(&sock) {
            *n -= 1;
            if *n == 0 {
                self.waiting_socks.remove(&sock);
            }
        }
    }

    /// Takes the head of the queue; if it was waiting, it no longer is.
    fn pop_head(&mut self) -> Option<Pending> {
        let p = self.queue.pop_front()?;
        if let (true, Report::Transition(t)) = (p.waiting, &p.report)
            && t.new == TcpState::CloseWait
        {
            self.stop_waiting(t.sock);
        }
        Some(p)
    }

    pub(crate) fn set_owner_map(&mut self, map: BpfHashMap<MapData, u64, OwnerRec>) {
        self.owner_map = Some(map);
    }

    /// The kernel's record of socket `sock` (with this inode) as it is now.
    fn recorded_now(&self, sock: u64, inode: u64) -> Option<KernelOwner> {
        let rec = self.owner_map.as_ref()?.get(&sock, 0).ok()?;
        (rec.inode == inode && inode != 0).then(|| crate::trace::decode::kernel_owner(&rec))
    }

    /// A CLOSE_WAIT with no record: has the kernel recorded its socket since? (Its accept may
    /// have raced the transition.)
    fn owner_in_map(&mut self, t: &mut TransitionReport) -> bool {
        let Some(k) = self.recorded_now(t.sock, t.inode).filter(|k| !k.stale) else {
            return false;
        };
        t.owner = Some((&k).into());
        self.stats.from_kernel += 1;
        true
    }

    /// Process `pid` exited (its last thread) at `ts_ns`.
    pub(crate) fn exited(&mut self, pid: u32, ts_ns: u64) {
        self.exited.push(pid, ts_ns);
    }

    /// The kernel's record, when it still named the holder at `at_ns`: not stale, and its
    /// process had not exited since it was recorded.
    fn trusted<'a>(&self, k: Option<&'a KernelOwner>, at_ns: u64) -> Option<&'a KernelOwner> {
        k.filter(|k| {
            !k.stale
                && self
                    .exited
                    .peek(&k.pid)
                    .is_none_or(|&e| e < k.since_ns || e > at_ns)
        })
    }

    /// The owner of a socket found in CLOSE_WAIT by the start-up snapshot.
    pub(crate) fn remember(&mut self, inode: u64, owner: Owner) {
        self.snapshot_owner.insert(inode, owner);
    }

    pub(crate) fn scans(&self) -> u64 {
        self.scanner.scans()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Resolves what can be resolved now; a report that must wait (and every report after it,
    /// to keep the order) waits in the queue.
    pub(crate) fn push(&mut self, mut report: Report, out: &mut Vec<Report>) {
        // A socket's later transition carries the record its CLOSE_WAIT could not (the record
        // was made by an accept that raced the FIN, and may be gone by now).
        if let Report::Transition(t) = &report
            && t.old == TcpState::CloseWait
            && t.inode != 0
            && let Some(k) = t.recorded_owner.as_ref().filter(|k| !k.stale)
            && !self.queue.is_empty()
        {
            let k = k.clone();
            self.fill_waiting(t.sock, Some(t.inode), t.ts_ns, &k);
        }
        let waiting = !self.resolve_now(&mut report);
        if self.queue.is_empty() && !waiting {
            out.push(report);
            return;
        }
        if waiting {
            self.start_waiting(&report);
        }
        self.queue.push_back(Pending {
            report,
            since: Instant::now(),
            waiting,
        });
    }

    /// Moves every queued report that can go out now, in order, to `out`.
    pub(crate) fn ready(&mut self, out: &mut Vec<Report>) {
        let mut latest: Option<Arc<Index>> = None;
        while let Some(head) = self.queue.front() {
            if head.waiting {
                latest = latest.or_else(|| self.scanner.latest());
                let event_ns = head.report.ts_ns();
                let fresh = latest.as_ref().is_some_and(|i| i.built_ns > event_ns);
                let waited = head.since.elapsed();
                if !fresh && waited < MAX_WAIT {
                    if waited >= ACCEPT_GRACE && head.report.inode() != 0 {
                        let mut p = self.queue.pop_front().unwrap();
                        if let Report::Transition(t) = &mut p.report
                            && self.owner_in_map(t)
                        {
                            self.stop_waiting(t.sock);
                            out.push(p.report);
                            continue;
                        }
                        self.queue.push_front(p);
                        self.scanner.request();
                    }
                    return;
                }
                let mut p = self.pop_head().expect("a head");
                if fresh {
                    self.fill_from_scan(&mut p.report, latest.as_deref().unwrap());
                } else {
                    self.stats.timed_out += 1;
                }
                out.push(p.report);
            } else {
                out.push(self.pop_head().expect("a head").report);
            }
        }
    }

    /// True when the report is complete without a full scan.
    fn resolve_now(&mut self, r: &mut Report) -> bool {
        match r {
            Report::Transition(t) if t.new == TcpState::CloseWait => {
                if let Some(k) = self
                    .trusted(t.recorded_owner.as_ref(), t.ts_ns)
                    .filter(|_| t.inode != 0)
                {
                    t.owner = Some(k.into());
                    self.stats.from_kernel += 1;
                    return true;
                }
                // Inode 0: still in the accept queue; no record can be this socket's yet (one
                // would be of an earlier socket at this address): the accept will say.
                if t.inode == 0 {
                    t.recorded_owner = None;
                    return false;
                }
                if t.recorded_owner.is_none() && self.owner_in_map(t) {
                    return true;
                }
                t.owner = owners::verify(t.inode, t.recorded_owner.as_ref()).map(|mut o| {
                    o.cgroup_id = t.recorded_owner.as_ref().map(|k| k.cgroup_id);
                    o
                });
                self.stats.verified += u64::from(t.owner.is_some());
                t.owner.is_some()
            }
            Report::Transition(t) if t.old == TcpState::CloseWait => {
                // Who held it while in CLOSE_WAIT (its exit may be what closed it).
                t.owner = t
                    .recorded_owner
                    .as_ref()
                    .filter(|k| !k.stale)
                    .map(Owner::from)
                    .or_else(|| self.snapshot_owner.remove(&t.inode))
                    .or_else(|| closer(t));
                true
            }
            Report::CloseNoFin(n) => {
                let other = n
                    .recorded_owner
                    .as_ref()
                    .filter(|k| (k.pid, k.fd) != (n.task.pid, n.fd));
                if let Some(k) = self.trusted(other, n.ts_ns) {
                    n.holders = vec![k.into()];
                    self.stats.from_kernel += 1;
                    return true;
                }
                if n.inode == 0 {
                    return true;
                }
                n.holders = owners::verify_others(n.inode, n.task.pid, n.fd);
                self.stats.verified += u64::from(!n.holders.is_empty());
                !n.holders.is_empty()
            }
            _ => true,
        }
    }

    /// The task that closed `sock` out of CLOSE_WAIT, if that close is already queued: it held
    /// the socket, so it is the owner even when it closed before /proc could be read.
    fn closer_of(&self, sock: u64) -> Option<Owner> {
        self.queue.iter().find_map(|p| match &p.report {
            Report::Transition(t) if t.sock == sock && t.old == TcpState::CloseWait => closer(t),
            _ => None,
        })
    }

    fn fill_from_scan(&self, r: &mut Report, index: &Index) {
        match r {
            Report::Transition(t) => {
                t.owner = index.first(t.inode).or_else(|| self.closer_of(t.sock));
            }
            Report::CloseNoFin(n) => {
                let (pid, fd) = (n.task.pid, n.fd);
                n.holders = index
                    .get(n.inode)
                    .into_iter()
                    .filter(|h| h.pid != pid || h.fd != fd)
                    .collect();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{host::clock::monotonic_ns, model::Endpoints};

    fn transition(ts_ns: u64, old: TcpState, new: TcpState, inode: u64) -> TransitionReport {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let ends = Endpoints {
            local: lo,
            lport: 1,
            remote: lo,
            rport: 2,
        };
        TransitionReport::new(ts_ns, 1, ends, old, new, inode)
    }

    fn owner_of(r: &Report) -> Option<Owner> {
        match r {
            Report::Transition(t) => t.owner.clone(),
            _ => None,
        }
    }

    fn recorded(pid: u32, fd: i32, stale: bool) -> Option<KernelOwner> {
        Some(KernelOwner {
            pid,
            fd,
            comm: "srv".into(),
            cgroup_id: 7,
            stale,
            since_ns: 0,
            followed: false,
            main_thread: true,
        })
    }

    /// A fresh kernel record of a live process is the owner at once: no scan, nothing queued.
    #[test]
    fn a_kernel_record_answers_without_proc() {
        let mut r = Resolver::new(Scanner::start(|| panic!("no scan expected")));
        let mut t = transition(1, TcpState::Established, TcpState::CloseWait, 7);
        t.recorded_owner = recorded(std::process::id(), 9, false);
        let mut out = Vec::new();
        r.push(Report::Transition(t), &mut out);
        let o = owner_of(&out[0]).unwrap();
        assert_eq!((o.pid, o.fd, o.cgroup_id), (std::process::id(), 9, Some(7)));
        assert_eq!(r.stats.from_kernel, 1);
        assert!(r.is_empty());
    }

    /// A FIN before accept(): the CLOSE_WAIT (inode 0) waits for the accept's record, which
    /// names it; an accept that came before a CLOSE_WAIT (an earlier socket at the same address)
    /// does not.
    #[test]
    fn a_close_wait_in_the_accept_queue_waits_for_its_accept() {
        let mut r = Resolver::new(Scanner::start(|| panic!("no scan expected")));
        let me = std::process::id();
        let mut out = Vec::new();
        let mut cw = transition(10, TcpState::Established, TcpState::CloseWait, 0);
        // A record left by an earlier socket at this address is not this socket's.
        cw.recorded_owner = recorded(me, 4, false);
        r.push(Report::Transition(cw), &mut out);
        assert_eq!(r.waiting_socks.get(&1), Some(&1));
        r.push(
            Report::Transition(transition(11, TcpState::Established, TcpState::FinWait1, 8)),
            &mut out,
        );
        // News of a socket nothing waits for does not walk the queue.
        r.obtained(2, 12, &recorded(me, 9, false).unwrap());
        r.obtained(1, 5, &recorded(me, 6, false).unwrap()); // before the FIN: another socket
        r.ready(&mut out);
        assert!(out.is_empty(), "{out:?}");
        r.obtained(1, 12, &recorded(me, 7, false).unwrap());
        r.ready(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(owner_of(&out[0]).unwrap().fd, 7);
        assert_eq!(r.stats.from_kernel, 1);
        assert!(r.waiting_socks.is_empty(), "{:?}", r.waiting_socks);
    }

    /// A record made before its process exited does not name the holder of a CLOSE_WAIT after
    /// that exit (a child kept the socket); one whose process exited after the transition does.
    #[test]
    fn a_holder_that_exited_since_the_record_is_not_trusted() {
        let mut r = Resolver::new(Scanner::start(Index::default));
        let me = std::process::id();
        let mut k = recorded(me, 9, false).unwrap();
        k.since_ns = 100;
        r.exited(me, 150);
        assert!(
            r.trusted(Some(&k), 200).is_none(),
            "exited between record and transition"
        );
        assert!(
            r.trusted(Some(&k), 120).is_some(),
            "exited after the transition"
        );
        k.since_ns = 160; // recorded after the exit: a new process with the same pid
        assert!(r.trusted(Some(&k), 200).is_some());
        k.stale = true;
        assert!(r.trusted(Some(&k), 200).is_none());
    }

    /// A stale record (or none) waits for a fresh scan, keeps later reports behind it, and its
    /// close takes the owner from the record again.
    #[test]
    fn without_a_record_waits_for_a_fresh_scan_and_keeps_order() {
        let scanner = Scanner::start(|| {
            let mut index = Index::default();
            index.built_ns = monotonic_ns();
            index.add(u64::MAX - 7, 20, &"srv".into(), 9);
            index
        });
        let mut r = Resolver::new(scanner);
        let now = monotonic_ns();
        let mut cw = transition(
            now,
            TcpState::Established,
            TcpState::CloseWait,
            u64::MAX - 7,
        );
        cw.recorded_owner = recorded(u32::MAX - 1, 3, true);
        let mut out = Vec::new();
        r.push(Report::Transition(cw), &mut out);
        let fw1 = transition(now + 1, TcpState::Established, TcpState::FinWait1, 8);
        r.push(Report::Transition(fw1), &mut out);
        assert!(out.is_empty(), "the FIN_WAIT1 waits behind the CLOSE_WAIT");
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.len() < 2 && Instant::now() < deadline {
            r.ready(&mut out);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(out.len(), 2);
        assert_eq!(owner_of(&out[0]).unwrap().pid, 20);
        let mut last_ack = transition(
            now + 2,
            TcpState::CloseWait,
            TcpState::LastAck,
            u64::MAX - 7,
        );
        last_ack.recorded_owner = recorded(std::process::id(), 9, false);
        r.push(Report::Transition(last_ack), &mut out);
        assert_eq!(owner_of(&out[2]).unwrap().fd, 9);
        assert_eq!(r.stats.timed_out, 0);
    }
}
