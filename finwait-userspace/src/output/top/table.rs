//! `top`'s table, no I/O: the sockets someone must close counted per workload from the
//! start-up snapshot and the live reports, their growth and oldest age, and the sort orders.
use std::{
    cmp::Reverse,
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

use finwait_common::TcpState;

use crate::{
    host::namespaces::CloseTable,
    model::{
        Comm, Container, Report, TransitionKind, TransitionReport, Verdict,
        ledger::{self, Entry, Ledger},
    },
    snapshot::Snapshot,
};

/// Growth is the change over this window (less right after the start).
pub(crate) const GROWTH_WINDOW_NS: u64 = 60 * 1_000_000_000;

/// What a held socket counts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// FIN_WAIT2 after shutdown(), still held: the application must close it.
    HalfClosed,
    /// The owner must close it.
    CloseWait,
    /// FIN_WAIT2 no process holds: the kernel frees it (shown, not counted as stuck). Most
    /// become time-wait mini-sockets at once, whose end is not traced: counted until the
    /// kernel's bound, tcp_fin_timeout.
    Orphan,
}

/// A row: a process, with the container it runs in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Workload {
    pub(crate) pid: u32,
    pub(crate) comm: Comm,
    /// `docker:3f2a9c1b7d4e`, as the human lines name it.
    pub(crate) container: Option<Arc<str>>,
}

impl Workload {
    fn new(pid: u32, comm: &Comm, container: Option<&Container>) -> Self {
        // The pod, if any, stays out of the cell: one word per column.
        let short = container
            .and_then(Container::short)
            .map(|s| Arc::from(s.split(", ").next().unwrap_or_default()));
        Self {
            pid,
            comm: comm.clone(),
            container: short,
        }
    }

    /// A socket whose holder was not found.
    fn unknown() -> Self {
        Self {
            pid: 0,
            comm: "?".into(),
            container: None,
        }
    }

    /// `nginx[12]`.
    pub(crate) fn name(&self) -> String {
        format!("{}[{}]", self.comm, self.pid)
    }
}

/// What the table keeps of a socket in its ledger: the row it counts in.
#[derive(Clone, Debug)]
struct Shown {
    workload: Workload,
    /// Half-closed, then closed by its last holder: the kernel's to free now (an orphan until
    /// its transition, which the check does not judge).
    orphaned: bool,
}

/// One socket counted, and since when.
type Held = Entry<Shown>;

/// What a held socket counts as.
fn kind_of(h: &Held) -> Kind {
    match h.kind {
        _ if h.data.orphaned => Kind::Orphan,
        ledger::Kind::HalfClosed => Kind::HalfClosed,
        ledger::Kind::CloseWait => Kind::CloseWait,
    }
}

/// A workload's counts now, and its totals of sockets someone must close, sampled.
#[derive(Default, Debug)]
struct Counts {
    by_kind: [u64; 3],
    /// (when, half-closed + CLOSE_WAIT), one a refresh, over [`GROWTH_WINDOW_NS`].
    samples: VecDeque<(u64, u64)>,
}

impl Counts {
    fn stuck(&self) -> u64 {
        self.by_kind[Kind::HalfClosed as usize] + self.by_kind[Kind::CloseWait as usize]
    }
}

/// One row as shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Row {
    pub(crate) workload: Workload,
    pub(crate) half_closed: u64,
    pub(crate) close_wait: u64,
    pub(crate) orphans: u64,
    /// The change of half-closed + CLOSE_WAIT over the window.
    pub(crate) growth: i64,
    /// Age of its oldest half-closed or CLOSE_WAIT socket, and whether it is a lower bound.
    pub(crate) oldest: Option<(u64, bool)>,
}

/// The sockets someone must close, by workload.
#[derive(Default)]
pub(crate) struct Table {
    /// The sockets counted, each once.
    held: Ledger<Shown>,
    counts: HashMap<Workload, Counts>,
    /// Orphans, each until the kernel frees it at the latest.
    orphans: Vec<(u64, Workload)>,
}

/// An orphan whose bound is not known is counted this long (Linux's default tcp_fin_timeout).
const ORPHAN_DEFAULT_NS: u64 = 60 * 1_000_000_000;

impl Table {
    /// The sockets already stuck when `top` starts count from the start, aged from then.
    pub(crate) fn seed(&mut self, snap: &Snapshot) {
        for e in &snap.entries {
            let kind = match (&e.verdict, e.sock.state) {
                (Verdict::OwnerMustClose(_), TcpState::CloseWait) => ledger::Kind::CloseWait,
                (Verdict::ApplicationMustClose(_), TcpState::FinWait2) => ledger::Kind::HalfClosed,
                (Verdict::KernelFrees(_), TcpState::FinWait2) => {
                    // The kernel's: counted until its timer fires, not held.
                    let left = e
                        .sock
                        .timer
                        .map_or(ORPHAN_DEFAULT_NS, |t| t.left().as_nanos() as u64);
                    self.orphan(snap.taken_ns.saturating_add(left), workload_of(e));
                    continue;
                }
                _ => continue,
            };
            let workload = workload_of(e);
            let held = Held {
                kind,
                pid: workload.pid,
                key: e.sock.key(),
                since_ns: snap.taken_ns,
                at_least: true,
                data: Shown {
                    workload,
                    orphaned: false,
                },
            };
            if self.held.seed(e.sock.inode, held.clone()) {
                self.count(&held, 1);
            }
        }
    }

    /// One live report, with its verdict.
    pub(crate) fn report(&mut self, r: &Report, verdict: Option<&Verdict>) {
        match r {
            Report::Transition(t) => self.transition(t, verdict),
            // The last close of a half-closed socket: the kernel's to free from now on.
            Report::CloseNoFin(n) if n.remaining_refs == 0 => {
                if let Some(h) = self
                    .held
                    .get_mut(n.sock)
                    .filter(|h| kind_of(h) == Kind::HalfClosed)
                {
                    h.data.orphaned = true;
                    let w = h.data.workload.clone();
                    self.count_kind(&w, Kind::HalfClosed, -1);
                    self.count_kind(&w, Kind::Orphan, 1);
                }
            }
            Report::CloseNoFin(_) => {}
        }
    }

    fn transition(&mut self, t: &TransitionReport, verdict: Option<&Verdict>) {
        // Closed, or entered while the inventory was read (which saw it too: counted once,
        // from here).
        for h in self.held.transition(t).entries() {
            self.count(&h, -1);
        }
        let (kind, workload) = match t.kind {
            TransitionKind::FinWait2Entered => {
                let task = t.cause.as_ref().and_then(|c| c.task.as_ref());
                let w = task.map_or_else(Workload::unknown, |k| {
                    Workload::new(k.pid, &k.comm, k.container.as_deref())
                });
                match verdict {
                    Some(Verdict::ApplicationMustClose(_)) => (ledger::Kind::HalfClosed, w),
                    Some(Verdict::KernelFrees(_)) => {
                        let bound = t.fin_timeout_s.saturating_mul(1_000_000_000);
                        return self.orphan(t.ts_ns.saturating_add(bound), w);
                    }
                    _ => return,
                }
            }
            TransitionKind::PeerFin => {
                let w = t.owner.as_ref().map_or_else(Workload::unknown, |o| {
                    Workload::new(o.pid, &o.comm, o.container.as_deref())
                });
                (ledger::Kind::CloseWait, w)
            }
            _ => return,
        };
        let held = Held {
            kind,
            pid: workload.pid,
            key: t.ends.key(),
            since_ns: t.ts_ns,
            at_least: false,
            data: Shown {
                workload,
                orphaned: false,
            },
        };
        self.count(&held, 1);
        if let Some(old) = self.held.hold(t.sock, held) {
            self.count(&old, -1);
        }
    }

    /// The processes holding what is counted (whose namespaces [`Self::check`] needs).
    pub(crate) fn holders(&self) -> HashSet<u32> {
        self.held.holders()
    }

    /// Every socket counted that the kernel's table no longer has in its state (a transition
    /// lost on the way) is released; how many were. A holder whose namespace was not read is
    /// not checked; orphans leave by their bound.
    pub(crate) fn check(&mut self, k: &CloseTable) -> u64 {
        let stale = self.held.release_gone(k, |h| !h.data.orphaned);
        for h in &stale {
            self.count(h, -1);
        }
        stale.len() as u64
    }

    fn count(&mut self, h: &Held, delta: i64) {
        self.count_kind(&h.data.workload, kind_of(h), delta);
    }

    fn count_kind(&mut self, w: &Workload, kind: Kind, delta: i64) {
        let c = self.counts.entry(w.clone()).or_default();
        let n = &mut c.by_kind[kind as usize];
        *n = n.saturating_add_signed(delta);
    }

    /// An orphan of `w`'s, counted until `until_ns`.
    fn orphan(&mut self, until_ns: u64, w: Workload) {
        self.count_kind(&w, Kind::Orphan, 1);
        self.orphans.push((until_ns, w));
    }

    /// The orphans the kernel has freed by `now_ns` leave the counts.
    fn expire_orphans(&mut self, now_ns: u64) {
        let mut freed = Vec::new();
        self.orphans.retain(|(until, w)| {
            let keep = *until > now_ns;
            if !keep {
                freed.push(w.clone());
            }
            keep
        });
        for w in freed {
            self.count_kind(&w, Kind::Orphan, -1);
        }
    }

    /// The rows at `now_ns` (one sample of each workload's growth taken): every workload that
    /// holds something or held something within the window.
    pub(crate) fn rows(&mut self, now_ns: u64) -> Vec<Row> {
        self.expire_orphans(now_ns);
        let mut oldest: HashMap<&Workload, (u64, bool)> = HashMap::new();
        for h in self.held.values() {
            if h.data.orphaned {
                continue;
            }
            let age = (now_ns.saturating_sub(h.since_ns), h.at_least);
            let o = oldest.entry(&h.data.workload).or_insert(age);
            if age.0 > o.0 {
                *o = age;
            }
        }
        let mut rows = Vec::new();
        self.counts.retain(|w, c| {
            let stuck = c.stuck();
            c.samples.push_back((now_ns, stuck));
            // One sample at or before the window's start stays: the base of the change.
            while c.samples.len() > 1 && c.samples[1].0 <= now_ns.saturating_sub(GROWTH_WINDOW_NS) {
                c.samples.pop_front();
            }
            let growth = growth(&c.samples, stuck);
            let held_lately = c.samples.iter().any(|(_, n)| *n > 0);
            if c.by_kind == [0; 3] && !held_lately {
                return false;
            }
            rows.push(Row {
                workload: w.clone(),
                half_closed: c.by_kind[Kind::HalfClosed as usize],
                close_wait: c.by_kind[Kind::CloseWait as usize],
                orphans: c.by_kind[Kind::Orphan as usize],
                growth,
                oldest: oldest.get(w).copied(),
            });
            true
        });
        rows
    }
}

/// The row a socket of the start-up snapshot counts in: its holder's, else the process
/// inferred to have accepted it.
fn workload_of(e: &crate::snapshot::Entry) -> Workload {
    match (e.owners.first(), &e.inferred) {
        (Some(o), _) => Workload::new(o.pid, &o.comm, o.container.as_deref()),
        (None, Some(i)) => Workload::new(i.pid, &i.comm, None),
        (None, None) => Workload::unknown(),
    }
}

/// The change from the first sample to `now`.
fn growth(samples: &VecDeque<(u64, u64)>, now: u64) -> i64 {
    let base = samples.front().map_or(now, |(_, n)| *n);
    now as i64 - base as i64
}

/// The orders the table can be sorted in (the key that picks each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum SortBy {
    #[default]
    CloseWait,
    HalfClosed,
    Oldest,
    Growth,
    Name,
}

impl SortBy {
    pub(crate) fn from_key(c: char) -> Option<Self> {
        Some(match c {
            'c' => Self::CloseWait,
            'h' => Self::HalfClosed,
            'o' => Self::Oldest,
            'g' => Self::Growth,
            'n' => Self::Name,
            _ => return None,
        })
    }

    pub(crate) fn column(self) -> &'static str {
        match self {
            Self::CloseWait => "CLOSE_WAIT",
            Self::HalfClosed => "HALF-CLOSED",
            Self::Oldest => "OLDEST",
            Self::Growth => "GROWTH/MIN",
            Self::Name => "WORKLOAD",
        }
    }
}

/// Largest first (names: A to Z); ties by what must be closed, then by name and pid, so that
/// rows do not swap places between refreshes.
pub(crate) fn sort(rows: &mut [Row], by: SortBy) {
    let name = |r: &Row| (r.workload.comm.clone(), r.workload.pid);
    let stuck = |r: &Row| Reverse(r.half_closed + r.close_wait);
    match by {
        SortBy::CloseWait => rows.sort_by_key(|r| (Reverse(r.close_wait), stuck(r), name(r))),
        SortBy::HalfClosed => rows.sort_by_key(|r| (Reverse(r.half_closed), stuck(r), name(r))),
        SortBy::Oldest => {
            rows.sort_by_key(|r| (Reverse(r.oldest.map(|o| o.0)), stuck(r), name(r)));
        }
        SortBy::Growth => rows.sort_by_key(|r| (Reverse(r.growth), stuck(r), name(r))),
        SortBy::Name => rows.sort_by_key(|r| (name(r), stuck(r))),
    }
}

/// `45s`, `3m04s`, `2h05m`, `3d04h`; a lower bound gets `>=`.
pub(crate) fn age(ns: u64, at_least: bool) -> String {
    let s = ns / 1_000_000_000;
    let text = match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    };
    if at_least { format!(">={text}") } else { text }
}

/// `+5`, `-3`, `0`.
pub(crate) fn signed(n: i64) -> String {
    if n > 0 {
        format!("+{n}")
    } else {
        n.to_string()
    }
}

/// Per kind, the sum over `rows`: (half-closed, CLOSE_WAIT, orphans).
pub(crate) fn totals(rows: &[Row]) -> (u64, u64, u64) {
    rows.iter().fold((0, 0, 0), |(h, c, o), r| {
        (h + r.half_closed, c + r.close_wait, o + r.orphans)
    })
}

#[cfg(test)]
mod tests {

    use finwait_common::Call;

    use super::*;
    use crate::{
        host::sockdiag::DiagSocket,
        model::{Cause, CauseKind, CloseNoFinReport, Owner, Task},
    };

    const S: u64 = 1_000_000_000;

    use crate::model::ledger::tests::ends;

    fn owner(pid: u32, comm: &str) -> Owner {
        Owner {
            pid,
            comm: comm.into(),
            fd: 9,
            ..Owner::default()
        }
    }

    fn send(t: &mut Table, r: &Report) {
        let v = match r {
            Report::Transition(t) => t.verdict(),
            Report::CloseNoFin(_) => None,
        };
        t.report(r, v.as_ref());
    }

    fn close_wait(ts: u64, sock: u64, inode: u64, o: Owner) -> Report {
        let mut t = TransitionReport::new(
            ts,
            sock,
            ends(4000 + sock as u16),
            TcpState::Established,
            TcpState::CloseWait,
            inode,
        );
        t.owner = Some(o);
        Report::Transition(t)
    }

    fn closed(ts: u64, sock: u64, inode: u64) -> Report {
        Report::Transition(TransitionReport::new(
            ts,
            sock,
            ends(4000 + sock as u16),
            TcpState::CloseWait,
            TcpState::LastAck,
            inode,
        ))
    }

    /// FIN_WAIT2 after `pid`'s shutdown() (still held) or close() (an orphan).
    fn fin_wait2(ts: u64, sock: u64, pid: u32, held: bool) -> Report {
        let mut t = TransitionReport::new(
            ts,
            sock,
            ends(5000),
            TcpState::FinWait1,
            TcpState::FinWait2,
            sock,
        );
        let call = if held { Call::Shutdown } else { Call::Close };
        t.cause = Some(Cause {
            kind: CauseKind::Call(call),
            how: held.then_some(1),
            task: Some(Task {
                pid,
                tid: pid,
                comm: "nginx".into(),
                thread_comm: None,
                ..Task::default()
            }),
            fd: Some(4),
            exact: false,
        });
        t.orphan = Some(!held);
        Report::Transition(t)
    }

    fn row(rows: &[Row], pid: u32) -> &Row {
        rows.iter().find(|r| r.workload.pid == pid).unwrap()
    }

    #[test]
    fn counts_by_workload_follow_the_transitions() {
        let mut t = Table::default();
        for sock in 1..=3 {
            send(&mut t, &close_wait(sock * S, sock, 0, owner(7, "imapd")));
        }
        send(&mut t, &fin_wait2(S, 10, 8, true));
        send(&mut t, &fin_wait2(S, 11, 8, false));
        let rows = t.rows(10 * S);
        let imapd = row(&rows, 7);
        assert_eq!((imapd.close_wait, imapd.half_closed), (3, 0));
        assert_eq!(imapd.oldest, Some((9 * S, false)));
        assert_eq!(imapd.workload.name(), "imapd[7]");
        let nginx = row(&rows, 8);
        assert_eq!((nginx.half_closed, nginx.orphans), (1, 1));
        // The orphan is the kernel's: it has no age in OLDEST, the half-closed one has.
        assert_eq!(nginx.oldest, Some((9 * S, false)));
        send(&mut t, &closed(11 * S, 1, 0));
        assert_eq!(row(&t.rows(12 * S), 7).close_wait, 2);
        // A socket already released is not released twice.
        send(&mut t, &closed(11 * S, 1, 0));
        assert_eq!(row(&t.rows(12 * S), 7).close_wait, 2);
        assert_eq!(totals(&t.rows(12 * S)), (1, 2, 1));
        // Its hand-off to a time-wait mini-socket does not free it: the kernel's bound does.
        let mut tw = TransitionReport::new(
            2 * S,
            11,
            ends(5000),
            TcpState::FinWait2,
            TcpState::Close,
            0,
        );
        tw.orphan = Some(true);
        send(&mut t, &Report::Transition(tw));
        assert_eq!(row(&t.rows(60 * S), 8).orphans, 1);
        assert_eq!(row(&t.rows(61 * S), 8).orphans, 0);
    }

    #[test]
    fn the_last_close_of_a_half_closed_socket_makes_it_an_orphan() {
        let mut t = Table::default();
        send(&mut t, &fin_wait2(S, 10, 8, true));
        let close = CloseNoFinReport {
            ts_ns: 2 * S,
            sock: 10,
            call: Call::Close,
            task: Task::default(),
            fd: 4,
            remaining_refs: 0,
            holders: vec![],
            inode: 10,
            ends: None,
            state: Some(TcpState::FinWait2),
            recorded_owner: None,
            netns: None,
        };
        send(&mut t, &Report::CloseNoFin(close));
        let rows = t.rows(3 * S);
        assert_eq!((rows[0].half_closed, rows[0].orphans), (0, 1));
        assert_eq!(rows[0].oldest, None);
    }

    fn at_start(inode: u64, rport: u16) -> DiagSocket {
        DiagSocket {
            state: TcpState::CloseWait,
            local: ends(rport).local,
            lport: 80,
            remote: ends(rport).remote,
            rport,
            inode,
            uid: 0,
            timer: None,
            recv_queue: 1,
            send_queue: 0,
            netns: 0,
        }
    }

    /// Seeded sockets count, aged as lower bounds; one the live trace also sees counts once.
    #[test]
    fn the_start_up_snapshot_seeds_the_table() {
        let mut t = Table::default();
        let socks = vec![at_start(77, 4001), at_start(78, 4002)];
        let entries = crate::snapshot::build(socks, |_| vec![owner(7, "imapd")], &[]);
        let mut snap = Snapshot::of(entries);
        snap.taken_ns = S;
        t.seed(&snap);
        let rows = t.rows(5 * S);
        assert_eq!(rows[0].close_wait, 2);
        assert_eq!(rows[0].oldest, Some((4 * S, true)));
        // Seen live too (entered while the inventory was read): still two.
        send(&mut t, &close_wait(2 * S, 1, 77, owner(7, "imapd")));
        assert_eq!(t.rows(6 * S)[0].close_wait, 2);
        // The other leaves by its inode (its address was never seen).
        send(&mut t, &closed(7 * S, 99, 78));
        let rows = t.rows(8 * S);
        assert_eq!(rows[0].close_wait, 1);
        assert_eq!(rows[0].oldest, Some((6 * S, false)));
    }

    /// A close whose transition was lost: the kernel's table no longer has the socket, and the
    /// check releases it; one it still has, or in a namespace not read, stays.
    #[test]
    fn the_check_releases_what_the_kernel_no_longer_has() {
        let mut t = Table::default();
        for sock in 1..=2 {
            send(&mut t, &close_wait(S, sock, 0, owner(7, "imapd")));
        }
        send(&mut t, &close_wait(S, 3, 0, owner(9, "other")));
        assert_eq!(t.holders(), [7, 9].into());
        let k = CloseTable {
            ns_of: [(7, Some(70)), (9, Some(90))].into(),
            read: [70].into(),
            sockets: [((70, ends(4002).key()), (TcpState::CloseWait, 5))].into(),
        };
        assert_eq!(t.check(&k), 1);
        let rows = t.rows(2 * S);
        assert_eq!((row(&rows, 7).close_wait, row(&rows, 9).close_wait), (1, 1));
        // Its late transition, if it comes, releases nothing more.
        send(&mut t, &closed(3 * S, 1, 0));
        assert_eq!(row(&t.rows(4 * S), 7).close_wait, 1);
    }

    #[test]
    fn growth_is_the_change_over_the_last_minute() {
        let mut t = Table::default();
        assert!(t.rows(0).is_empty());
        send(&mut t, &close_wait(S, 1, 0, owner(7, "imapd")));
        assert_eq!(t.rows(S)[0].growth, 0); // the first sample is the base
        for sock in 2..=4 {
            send(&mut t, &close_wait(2 * S, sock, 0, owner(7, "imapd")));
        }
        assert_eq!(t.rows(2 * S)[0].growth, 3);
        // A minute later the base is the sample of 60 s ago.
        assert_eq!(t.rows(62 * S)[0].growth, 0);
        for sock in 1..=4 {
            send(&mut t, &closed(63 * S, sock, 0));
        }
        assert_eq!(t.rows(63 * S)[0].growth, -4);
        // Kept while its window still holds a sample with sockets; idle for a whole window, gone.
        assert_eq!(t.rows(122 * S).len(), 1);
        assert!(t.rows(124 * S).is_empty());
    }

    fn plain(pid: u32, comm: &str, cw: u64, hc: u64, growth: i64, oldest: u64) -> Row {
        Row {
            workload: Workload {
                pid,
                comm: comm.into(),
                container: None,
            },
            half_closed: hc,
            close_wait: cw,
            orphans: 0,
            growth,
            oldest: (oldest > 0).then_some((oldest, false)),
        }
    }

    #[test]
    fn sorts_by_each_key() {
        let mut rows = vec![
            plain(1, "b", 5, 0, 1, 10),
            plain(2, "a", 1, 9, 4, 0),
            plain(3, "c", 5, 2, -2, 30),
        ];
        let order = |rows: &[Row]| rows.iter().map(|r| r.workload.pid).collect::<Vec<_>>();
        let by = |k| SortBy::from_key(k).unwrap();
        sort(&mut rows, by('c'));
        assert_eq!(order(&rows), [3, 1, 2]); // a tie on CLOSE_WAIT: the one holding more first
        sort(&mut rows, by('h'));
        assert_eq!(order(&rows), [2, 3, 1]);
        sort(&mut rows, by('o'));
        assert_eq!(order(&rows), [3, 1, 2]);
        sort(&mut rows, by('g'));
        assert_eq!(order(&rows), [2, 1, 3]);
        sort(&mut rows, by('n'));
        assert_eq!(order(&rows), [2, 1, 3]);
        assert_eq!(SortBy::from_key('x'), None);
    }

    #[test]
    fn words() {
        assert_eq!(age(45 * S, false), "45s");
        assert_eq!(age(184 * S, true), ">=3m04s");
        assert_eq!(age(7500 * S, false), "2h05m");
        assert_eq!(age(3 * 86_400 * S + 4 * 3600 * S, false), "3d04h");
        assert_eq!(signed(5), "+5");
        assert_eq!(signed(-3), "-3");
        assert_eq!(signed(0), "0");
    }
}
