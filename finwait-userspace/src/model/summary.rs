//! What a tracing session found, per process: counted as reports pass, answered when tracing
//! ends, and the sockets still open that `--stuck` names.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use finwait_common::TcpState;

use super::{
    Comm, Container, Endpoints, Holder, Report, Stuck, TransitionKind, TransitionReport, Verdict,
    diagnosis::{FinReading, readings_words},
    ledger::{Entry, Kind, Ledger},
    verdict::{Bound, Facts, whose_job},
};

/// Per-process counts. Keyed by the process that made the call (FIN_WAIT2) or holds the socket
/// (CLOSE_WAIT).
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub(crate) struct Counts {
    /// FIN_WAIT2 entries still owned, by the call that half-closed them (e.g. "shutdown(SHUT_WR)").
    pub(crate) half_closed: BTreeMap<String, u64>,
    /// Of those, the ones that left FIN_WAIT2 while traced (closed, or the peer's FIN), by call.
    pub(crate) half_closed_ended: BTreeMap<String, u64>,
    /// FIN_WAIT2 entries orphaned, by call ("close()", "process exit", ...).
    pub(crate) orphaned: BTreeMap<String, u64>,
    pub(crate) close_wait: u64,
    /// CLOSE_WAIT sockets already held when tracing started (the start-up inventory's).
    pub(crate) close_wait_at_start: u64,
    /// CLOSE_WAIT sockets their owner then closed (entered while traced or at start).
    pub(crate) close_wait_closed: u64,
    /// Those still open when tracing ended, by what the owner did with the peer's FIN
    /// (`fin_not_read`, `read_eof_not_closed`).
    pub(crate) close_wait_readings: BTreeMap<&'static str, u64>,
}

/// What the summary keeps of a socket someone must close, still open (its ledger entry's
/// payload).
#[derive(Debug, Clone)]
pub(crate) struct Open {
    /// FIN_WAIT2 after this call (None: CLOSE_WAIT).
    pub(crate) half_closed_by: Option<String>,
    pub(crate) ends: Endpoints,
    pub(crate) fd: Option<i32>,
    pub(crate) container: Option<Arc<Container>>,
    /// Already reported by `--stuck`.
    reported: bool,
}

/// A socket someone must close, in the summary's ledger.
type Held = Entry<Open>;

impl Open {
    /// `CLOSE_WAIT`, or `FIN_WAIT2 after shutdown(SHUT_WR)`.
    pub(crate) fn what(&self) -> String {
        match &self.half_closed_by {
            Some(call) => format!("FIN_WAIT2 after {call}"),
            None => "CLOSE_WAIT".into(),
        }
    }
}

/// One of the sockets open the longest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Longest {
    /// The kernel address (0: seen only by the start-up inventory).
    pub(crate) sock: u64,
    pub(crate) what: String,
    pub(crate) pid: u32,
    pub(crate) comm: Comm,
    pub(crate) fd: Option<i32>,
    pub(crate) ends: Endpoints,
    pub(crate) age_ns: u64,
    /// Stuck before tracing started: at least `age_ns`.
    pub(crate) at_least: bool,
}

/// One process's line in the summary.
pub(crate) struct ProcessSummary<'a> {
    pub(crate) pid: u32,
    pub(crate) comm: &'a Comm,
    pub(crate) cmdline: Option<&'a Comm>,
    /// Its sockets still open that it must close, by peer, most first (at most [`TOP_PEERS`]).
    pub(crate) peers: Vec<PeerCount>,
    pub(crate) container: Option<&'a Container>,
    pub(crate) counts: &'a Counts,
    pub(crate) answer: String,
}

#[derive(Default)]
pub(crate) struct Summary {
    /// pid -> its line. The name is the process's (from its CLOSE_WAIT owners) once known,
    /// else the calling thread's.
    by_process: BTreeMap<u32, Process>,
    /// Processes dropped to keep the summary bounded: at [`MAX_PROCESSES`], those with nothing
    /// left open (a long run on a host that forks constantly).
    pub(crate) processes_dropped: u64,
    /// The sockets someone must close, still open: seeded by the start-up inventory, moved by
    /// the live transitions.
    open: Ledger<Open>,
    pub(crate) half_closed_ms: Histogram,
    pub(crate) close_wait_ms: Histogram,
    pub(crate) stuck_reported: u64,
    /// Processes added since [`Summary::take_new`] last ran.
    new: Vec<u32>,
}

/// One process's name, container and counts.
#[derive(Default)]
struct Process {
    comm: Comm,
    container: Option<Arc<Container>>,
    counts: Counts,
    /// Its command line, short (looked for once, by whoever reads [`Summary::take_new`]).
    cmdline: Option<Comm>,
}

/// The call a socket half-closed before tracing started is filed under (it is not known which
/// `how` it was).
const SHUTDOWN_BEFORE_START: &str = "shutdown() before the start";

/// Processes kept in the summary at most.
const MAX_PROCESSES: usize = 10_000;

/// Power-of-two buckets in milliseconds: `counts[i]` holds values in [2^(i-1), 2^i) ms.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub(crate) struct Histogram {
    pub(crate) counts: Vec<u64>,
}

impl Histogram {
    pub(crate) fn add(&mut self, ns: u64) {
        let ms = ns / 1_000_000;
        let bucket = (u64::BITS - ms.leading_zeros()) as usize;
        if self.counts.len() <= bucket {
            self.counts.resize(bucket + 1, 0);
        }
        self.counts[bucket] += 1;
    }

    /// (upper bound in ms, count) of every bucket that has values.
    pub(crate) fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (1u64 << i, *n))
    }
}

impl Summary {
    /// A socket someone must close, already stuck when tracing started: CLOSE_WAIT held by
    /// `holder`, or (`half_closed`) FIN_WAIT2 half-closed by it. Timed from `since_ns`, the
    /// inventory's time, as a lower bound.
    pub(crate) fn seed(
        &mut self,
        inode: u64,
        since_ns: u64,
        holder: &super::Owner,
        half_closed: bool,
        ends: Endpoints,
    ) {
        let e = Entry {
            kind: if half_closed {
                Kind::HalfClosed
            } else {
                Kind::CloseWait
            },
            pid: holder.pid,
            key: ends.key(),
            since_ns,
            at_least: true,
            data: Open {
                half_closed_by: half_closed.then(|| SHUTDOWN_BEFORE_START.to_string()),
                ends,
                fd: Some(holder.fd),
                container: holder.container.clone(),
                reported: false,
            },
        };
        if !self.open.seed(inode, e) {
            return; // no inode, or seeded already
        }
        let entry = self.process(holder.pid);
        entry.comm = holder.comm.clone();
        if holder.container.is_some() {
            entry.container.clone_from(&holder.container);
        }
        if half_closed {
            *entry
                .counts
                .half_closed
                .entry(SHUTDOWN_BEFORE_START.into())
                .or_default() += 1;
        } else {
            entry.counts.close_wait_at_start += 1;
        }
    }

    /// A seeded socket the live trace counts instead (see [`Ledger::transition`]): its seeded
    /// count is taken back.
    fn take_back(&mut self, e: &Held) {
        let c = self.counts(e.pid);
        match &e.data.half_closed_by {
            None => c.close_wait_at_start = c.close_wait_at_start.saturating_sub(1),
            Some(call) => {
                if let Some(n) = c.half_closed.get_mut(call) {
                    *n = n.saturating_sub(1);
                }
            }
        }
    }

    /// Counts one report, with its verdict.
    pub(crate) fn add(&mut self, r: &Report, verdict: Option<&Verdict>) {
        let Report::Transition(t) = r else { return };
        let moved = self.open.transition(t);
        if let Some(e) = &moved.replaced {
            self.take_back(e);
        }
        match t.kind {
            TransitionKind::FinWait2Entered => self.fin_wait2(t, verdict),
            TransitionKind::PeerFin => self.close_wait(t),
            TransitionKind::FinSent
            | TransitionKind::CloseWaitClosed
            | TransitionKind::FinWait2Left
            | TransitionKind::LastAckDone
            | TransitionKind::FinsCrossed
            | TransitionKind::ClosingDone
            | TransitionKind::Aborted
            | TransitionKind::Other => self.left(t, moved.released),
        }
    }

    /// A socket left CLOSE_WAIT or half-closed FIN_WAIT2: how long it was there, and its
    /// ledger entry (`released`) counted as closed.
    fn left(&mut self, t: &TransitionReport, released: Option<Held>) {
        match t.old {
            TcpState::CloseWait => {
                if let Some(ns) = t.close_wait_ns {
                    self.close_wait_ms.add(ns);
                }
                if let Some(o) = released {
                    self.counts(o.pid).close_wait_closed += 1;
                }
            }
            TcpState::FinWait2 => {
                if let Some(ns) = t.half_closed_ns {
                    self.half_closed_ms.add(ns);
                }
                if let Some(o) = released
                    && let Some(call) = o.data.half_closed_by
                {
                    *self
                        .counts(o.pid)
                        .half_closed_ended
                        .entry(call)
                        .or_default() += 1;
                }
            }
            _ => {}
        }
    }

    fn counts(&mut self, pid: u32) -> &mut Counts {
        &mut self.process(pid).counts
    }

    /// `pid`'s entry, made room for at [`MAX_PROCESSES`].
    fn process(&mut self, pid: u32) -> &mut Process {
        if self.by_process.len() >= MAX_PROCESSES && !self.by_process.contains_key(&pid) {
            let holding = self.open.holders();
            let before = self.by_process.len();
            self.by_process.retain(|p, _| holding.contains(p));
            self.processes_dropped += (before - self.by_process.len()) as u64;
        }
        if !self.by_process.contains_key(&pid) && self.new.len() < MAX_PROCESSES {
            self.new.push(pid);
        }
        self.by_process.entry(pid).or_default()
    }

    /// The processes added since the last call: their command lines are for the caller to
    /// read (this model does no I/O) and hand to [`Summary::set_cmdline`].
    pub(crate) fn take_new(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.new)
    }

    pub(crate) fn set_cmdline(&mut self, pid: u32, cmdline: Option<String>) {
        if let Some(p) = self.by_process.get_mut(&pid) {
            p.cmdline = cmdline.map(Into::into);
        }
    }

    /// FIN_WAIT2 entered: counted by call under the caller, as its verdict says.
    fn fin_wait2(&mut self, t: &TransitionReport, verdict: Option<&Verdict>) {
        let Some(c) = &t.cause else { return };
        let Some(task) = &c.task else { return };
        let call = c.call_name().to_string();
        let entry = self.process(task.pid);
        if entry.comm.is_empty() {
            entry.comm = task.comm.clone();
        }
        if entry.container.is_none() {
            entry.container.clone_from(&task.container);
        }
        match verdict {
            Some(Verdict::ApplicationMustClose(_)) => {
                *entry.counts.half_closed.entry(call.clone()).or_default() += 1;
                let open = Open {
                    half_closed_by: Some(call),
                    ends: t.ends.clone(),
                    fd: c.fd,
                    container: task.container.clone(),
                    reported: false,
                };
                self.open
                    .hold(t.sock, live(t, Kind::HalfClosed, task.pid, open));
            }
            Some(Verdict::KernelFrees(_)) => *entry.counts.orphaned.entry(call).or_default() += 1,
            _ => {}
        }
    }

    /// CLOSE_WAIT entered: counted under its owner, when known.
    fn close_wait(&mut self, t: &TransitionReport) {
        let Some(o) = &t.owner else { return };
        let entry = self.process(o.pid);
        entry.comm = o.comm.clone(); // the process's own name
        if o.container.is_some() {
            entry.container.clone_from(&o.container);
        }
        entry.counts.close_wait += 1;
        let open = Open {
            half_closed_by: None,
            ends: t.ends.clone(),
            fd: Some(o.fd),
            container: o.container.clone(),
            reported: false,
        };
        self.open
            .hold(t.sock, live(t, Kind::CloseWait, o.pid, open));
    }

    fn comm(&self, pid: u32) -> Comm {
        self.by_process
            .get(&pid)
            .map(|p| p.comm.clone())
            .unwrap_or_else(|| "".into())
    }

    /// Whose job an open socket is (the same verdict a live report gives).
    fn verdict_of(&self, o: &Held) -> (Holder, Verdict) {
        let holder = Holder {
            pid: o.pid,
            comm: self.comm(o.pid),
            fd: o.data.fd,
            others: 0,
            container: o.data.container.clone(),
        };
        let facts = Facts {
            state: o.kind.state(),
            held: Some(true),
            holder: Some(holder.clone()),
            bound: Bound::Retries,
        };
        (holder, whose_job(facts).unwrap_or(Verdict::Unknown))
    }

    /// Sockets stuck for at least `threshold_ns` and not reported yet (each is reported once),
    /// oldest first.
    pub(crate) fn take_stuck(&mut self, now_ns: u64, threshold_ns: u64) -> Vec<Stuck> {
        let mut due = Vec::new();
        // A seeded socket has no address yet: 0 (its inode is known to the inventory only).
        for (sock, o) in self.open.iter_mut() {
            let age = now_ns.saturating_sub(o.since_ns);
            if !o.data.reported && age >= threshold_ns {
                o.data.reported = true;
                due.push((sock, o.clone(), age));
            }
        }
        let mut out: Vec<Stuck> = due
            .into_iter()
            .map(|(sock, o, age)| {
                let (holder, verdict) = self.verdict_of(&o);
                Stuck {
                    sock,
                    what: o.data.what(),
                    holder,
                    verdict,
                    owner_state: None,
                    ends: o.data.ends,
                    stuck_ns: age,
                    at_least: o.at_least,
                    netns: None,
                }
            })
            .collect();
        self.stuck_reported += out.len() as u64;
        out.sort_by_key(|s| std::cmp::Reverse(s.stuck_ns));
        out
    }

    /// Every process, with its answer.
    pub(crate) fn processes(&self) -> impl Iterator<Item = ProcessSummary<'_>> {
        let mut peers: HashMap<u32, HashMap<(IpAddr, u16), u64>> = HashMap::new();
        for o in self.open.values() {
            let e = &o.data.ends;
            *peers
                .entry(o.pid)
                .or_default()
                .entry((e.remote, e.rport))
                .or_default() += 1;
        }
        self.by_process.iter().map(move |(pid, p)| {
            let peers = peers.get(pid).map(by_peer).unwrap_or_default();
            let mut answer = answer(*pid, &p.comm, p.container.as_deref(), &p.counts);
            if let Some(c) = &p.cmdline {
                // `python3[1463] (python3 app.py --pool 8) ...`: after the name and pid.
                let at = answer.find(']').map_or(0, |i| i + 1);
                answer.insert_str(at, &format!(" ({c})"));
            }
            if !peers.is_empty() {
                answer += &format!("; still open: {}", peers_words(&peers));
            }
            ProcessSummary {
                pid: *pid,
                comm: &p.comm,
                cmdline: p.cmdline.as_ref(),
                peers,
                container: p.container.as_deref(),
                counts: &p.counts,
                answer,
            }
        })
    }

    /// Reads each CLOSE_WAIT still open: `recv_queue` gives a socket's Recv-Q, if it is still
    /// in CLOSE_WAIT. At most `max` are read.
    pub(crate) fn read_close_waits(
        &mut self,
        max: usize,
        mut recv_queue: impl FnMut(u32, &Endpoints) -> Option<u32>,
    ) {
        let open: Vec<(u32, Endpoints)> = self
            .open
            .values()
            .filter(|o| o.kind == Kind::CloseWait)
            .take(max)
            .map(|o| (o.pid, o.data.ends.clone()))
            .collect();
        for (who, ends) in open {
            if let Some(q) = recv_queue(who, &ends) {
                let r = FinReading::of_close_wait(q).name();
                *self.counts(who).close_wait_readings.entry(r).or_default() += 1;
            }
        }
    }

    /// Sockets still open that someone must close.
    pub(crate) fn still_stuck(&self) -> usize {
        self.open.count()
    }

    /// The `n` open the longest, oldest first.
    pub(crate) fn longest(&self, now_ns: u64, n: usize) -> Vec<Longest> {
        let mut v: Vec<_> = self
            .open
            .iter()
            .map(|(s, o)| (s, o, now_ns.saturating_sub(o.since_ns)))
            .collect();
        // Oldest first; the same age in a stable order (by port, then socket).
        v.sort_by_key(|(s, o, age)| {
            let e = &o.data.ends;
            (std::cmp::Reverse(*age), e.lport, e.rport, *s)
        });
        v.truncate(n);
        v.into_iter()
            .map(|(sock, o, age)| Longest {
                sock,
                what: o.data.what(),
                pid: o.pid,
                comm: self.comm(o.pid),
                fd: o.data.fd,
                ends: o.data.ends.clone(),
                age_ns: age,
                at_least: o.at_least,
            })
            .collect()
    }
}

/// A socket seen live entering its state, timed from the transition.
fn live(t: &TransitionReport, kind: Kind, pid: u32, open: Open) -> Held {
    Entry {
        kind,
        pid,
        key: t.ends.key(),
        since_ns: t.ts_ns,
        at_least: false,
        data: open,
    }
}

/// Peers listed per process at most.
pub(crate) const TOP_PEERS: usize = 3;

/// Sockets to one peer: an address and port, or (when no two sockets share one: a server's
/// clients) an address alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PeerCount {
    pub(crate) addr: IpAddr,
    pub(crate) port: Option<u16>,
    pub(crate) count: u64,
    /// Further peers not listed (on the last entry only).
    pub(crate) more: usize,
}

/// Sockets counted by peer (address and port), most first; by address alone where no two
/// sockets share a port (a server's clients).
pub(crate) fn by_peer(counts: &HashMap<(IpAddr, u16), u64>) -> Vec<PeerCount> {
    let mut by: HashMap<(IpAddr, Option<u16>), u64> = HashMap::new();
    let singletons = counts.len() > 1 && counts.values().all(|n| *n == 1);
    for ((addr, port), n) in counts {
        let port = (!singletons).then_some(*port);
        *by.entry((addr.to_canonical(), port)).or_default() += n;
    }
    let mut v: Vec<((IpAddr, Option<u16>), u64)> = by.into_iter().collect();
    v.sort_by_key(|((addr, port), n)| (std::cmp::Reverse(*n), *addr, *port));
    let more = v.len().saturating_sub(TOP_PEERS);
    v.truncate(TOP_PEERS);
    let last = v.len().saturating_sub(1);
    v.into_iter()
        .enumerate()
        .map(|(i, ((addr, port), count))| PeerCount {
            addr,
            port,
            count,
            more: if i == last { more } else { 0 },
        })
        .collect()
}

/// `2190 to 127.0.0.1:8080, 10 to 10.0.0.7, 4 more peers`.
pub(crate) fn peers_words(peers: &[PeerCount]) -> String {
    let mut words: Vec<String> = peers
        .iter()
        .map(|p| match p.port {
            Some(port) => format!("{} to {}:{port}", p.count, p.addr),
            None => format!("{} to {}", p.count, p.addr),
        })
        .collect();
    let more = peers.last().map_or(0, |p| p.more);
    if more > 0 {
        words.push(format!("{more} more peers"));
    }
    words.join(", ")
}

/// One sentence per process: shutdown() or close(), and whose job the clean-up is.
fn answer(pid: u32, comm: &str, container: Option<&Container>, c: &Counts) -> String {
    let mut parts = Vec::new();
    for (call, n) in &c.half_closed {
        let ended = c.half_closed_ended.get(call).copied().unwrap_or(0).min(*n);
        let open = n - ended;
        let mut part =
            format!("{n} FIN_WAIT2 after {call}, {ended} ended later, {open} still half-closed");
        if open > 0 {
            part += &format!(": {}", Verdict::ApplicationMustClose(None).plural(comm));
        }
        parts.push(part);
    }
    let orphans = Verdict::KernelFrees(Bound::Retries);
    for (call, n) in &c.orphaned {
        parts.push(format!(
            "{n} FIN_WAIT2 after {call}: orphans, {}",
            orphans.plural(comm)
        ));
    }
    let close_wait = c.close_wait + c.close_wait_at_start;
    if close_wait > 0 {
        let open = close_wait - c.close_wait_closed.min(close_wait);
        let at_start = match c.close_wait_at_start {
            0 => String::new(),
            n => format!(" ({n} already at start)"),
        };
        let mut part = format!(
            "{close_wait} CLOSE_WAIT{at_start}, {} closed later, {open} never closed while traced",
            c.close_wait_closed
        );
        part += &readings_words(|k| c.close_wait_readings.get(k).copied().unwrap_or(0));
        if open > 0 {
            part += &format!(": {}", Verdict::OwnerMustClose(None).plural(comm));
        }
        parts.push(part);
    }
    let mut who = format!("{comm}[{pid}]");
    super::container::write_short(&mut who, container);
    format!("{who}: {}", parts.join("; "))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use finwait_common::Call;

    use super::*;
    use crate::model::{Cause, CauseKind, Owner, Task};

    fn tr(sock: u64, old: TcpState, new: TcpState) -> TransitionReport {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        TransitionReport::new(
            sock * 10,
            sock,
            Endpoints {
                local: lo,
                lport: 1,
                remote: lo,
                rport: 2,
            },
            old,
            new,
            0,
        )
    }
    fn cause(kind: CauseKind, how: Option<i32>) -> Option<Cause> {
        Some(Cause {
            kind,
            how,
            task: Some(Task {
                pid: 7,
                tid: 7,
                comm: "nginx".into(),
                thread_comm: None,
                ..Default::default()
            }),
            fd: Some(3),
            exact: false,
        })
    }

    #[test]
    fn a_long_run_keeps_the_processes_that_still_hold_sockets() {
        let mut s = Summary::default();
        let close_wait = |pid: u32, sock: u64| {
            let mut t = tr(sock, TcpState::Established, TcpState::CloseWait);
            t.owner = Some(Owner {
                pid,
                comm: "w".into(),
                fd: 4,
                ..Owner::default()
            });
            Report::Transition(t)
        };
        s.add(&close_wait(1, 1), None); // still open: kept
        for pid in 2..=MAX_PROCESSES as u32 + 5 {
            s.add(&close_wait(pid, 2), None); // each replaces the last on socket 2
        }
        assert!(s.by_process.len() <= MAX_PROCESSES);
        assert!(s.by_process.contains_key(&1));
        assert_eq!(s.processes_dropped, MAX_PROCESSES as u64 - 2);
    }

    /// Stuck before the start: in --stuck and the summary as "at least"; one entry per socket
    /// whichever path saw it first; closed later, counted as closed.
    #[test]
    fn sockets_stuck_before_the_start_are_one_ledger_with_the_live_ones() {
        let mut s = Summary::default();
        let owner = Owner {
            pid: 9,
            comm: "python3".into(),
            fd: 4,
            ..Owner::default()
        };
        let ends = |lport| Endpoints {
            local: "127.0.0.1".parse().unwrap(),
            lport,
            remote: "::ffff:127.0.0.1".parse().unwrap(),
            rport: 2,
        };
        s.seed(100, 1_000, &owner, false, ends(10)); // CLOSE_WAIT, closed later
        s.seed(101, 1_000, &owner, false, ends(11)); // CLOSE_WAIT, still open
        s.seed(102, 1_000, &owner, true, ends(12)); // half-closed, closed (its inode gone)
        s.seed(103, 1_000, &owner, false, ends(13)); // also seen entering CLOSE_WAIT live
        s.seed(103, 1_000, &owner, false, ends(13)); // the same socket twice: one entry
        assert_eq!(s.still_stuck(), 4);
        let stuck = s.take_stuck(3_000, 1_000);
        assert_eq!(stuck.len(), 4);
        assert!(stuck.iter().all(|x| x.at_least && x.stuck_ns == 2_000));

        let mut t = tr(1, TcpState::Established, TcpState::CloseWait);
        t.inode = 103;
        t.ts_ns = 2_000;
        t.ends = ends(13);
        t.owner = Some(owner.clone());
        s.add(&Report::Transition(t), None);
        let mut t = tr(2, TcpState::CloseWait, TcpState::LastAck);
        t.inode = 100;
        s.add(&Report::Transition(t), None);
        // Matched by ends (mapped or not) once the inode is gone.
        let mut t = tr(3, TcpState::FinWait2, TcpState::Close);
        t.ends = ends(12);
        s.add(&Report::Transition(t), None);

        let c = &s.by_process[&9].counts;
        assert_eq!((c.close_wait, c.close_wait_at_start), (1, 2));
        assert_eq!(c.close_wait_closed, 1);
        assert_eq!(c.half_closed[SHUTDOWN_BEFORE_START], 1);
        assert_eq!(c.half_closed_ended[SHUTDOWN_BEFORE_START], 1);
        assert_eq!(s.still_stuck(), 2, "101 seeded, 103 live");
        let longest = s.longest(5_000, 5);
        assert_eq!(longest.len(), 2);
        assert!(longest[0].at_least && longest[0].age_ns == 4_000);
        assert_eq!((longest[0].ends.lport, longest[0].fd), (11, Some(4)));
        let answer = s.processes().next().unwrap().answer;
        assert_eq!(
            answer,
            "python3[9]: 1 FIN_WAIT2 after shutdown() before the start, 1 ended later, 0 still half-closed; 3 CLOSE_WAIT (2 already at start), 1 closed later, 2 never closed while traced: python3 must close them (a leak if they stay); still open: 2 to 127.0.0.1:2"
        );
    }

    #[test]
    fn counts_answers_and_histograms() {
        let mut s = Summary::default();
        for sock in 1..=3 {
            let mut t = tr(sock, TcpState::FinWait1, TcpState::FinWait2);
            t.cause = cause(CauseKind::Call(Call::Shutdown), Some(1));
            t.orphan = Some(false);
            let v = t.verdict();
            s.add(&Report::Transition(t), v.as_ref());
        }
        let mut t = tr(4, TcpState::FinWait1, TcpState::FinWait2);
        t.cause = cause(CauseKind::Call(Call::Close), None);
        t.orphan = Some(true);
        let v = t.verdict();
        s.add(&Report::Transition(t), v.as_ref());
        for sock in 5..=6 {
            let mut t = tr(sock, TcpState::Established, TcpState::CloseWait);
            t.owner = Some(Owner {
                pid: 9,
                comm: "python3".into(),
                fd: 4,
                ..Owner::default()
            });
            let v = t.verdict();
            s.add(&Report::Transition(t), v.as_ref());
        }
        let mut t = tr(5, TcpState::CloseWait, TcpState::LastAck);
        t.close_wait_ns = Some(300_000_000);
        let v = t.verdict();
        s.add(&Report::Transition(t), v.as_ref());
        // The first half-closed socket is closed: an orphan now, no longer the process's job.
        let mut t = tr(1, TcpState::FinWait2, TcpState::Close);
        t.cause = cause(CauseKind::Call(Call::Close), None);
        t.half_closed_ns = Some(3_000_000_000);
        let v = t.verdict();
        s.add(&Report::Transition(t), v.as_ref());

        let c = &s.by_process[&7].counts;
        assert_eq!(c.half_closed["shutdown(SHUT_WR)"], 3);
        assert_eq!(c.half_closed_ended["shutdown(SHUT_WR)"], 1);
        assert_eq!(c.orphaned["close()"], 1);
        let p = &s.by_process[&9].counts;
        assert_eq!((p.close_wait, p.close_wait_closed), (2, 1));
        let answers: Vec<String> = s.processes().map(|p| p.answer).collect();
        assert_eq!(
            answers[0],
            "nginx[7]: 3 FIN_WAIT2 after shutdown(SHUT_WR), 1 ended later, 2 still half-closed: nginx must close them; 1 FIN_WAIT2 after close(): orphans, the kernel frees them; still open: 2 to 127.0.0.1:2"
        );
        assert_eq!(
            answers[1],
            "python3[9]: 2 CLOSE_WAIT, 1 closed later, 1 never closed while traced: python3 must close them (a leak if they stay); still open: 1 to 127.0.0.1:2"
        );
        // 300 ms falls in [256, 512).
        assert_eq!(s.close_wait_ms.buckets().collect::<Vec<_>>(), [(512, 1)]);
        assert_eq!(s.still_stuck(), 3, "2 half-closed + 1 CLOSE_WAIT");
        // --stuck: each once, oldest first; the CLOSE_WAIT names its owner's fd.
        let stuck = s.take_stuck(2_000_000_000, 1_000_000_000);
        assert_eq!(stuck.len(), 3);
        assert!(s.take_stuck(3_000_000_000, 1_000_000_000).is_empty());
        let cw = stuck.iter().find(|x| x.what == "CLOSE_WAIT").unwrap();
        assert_eq!((cw.holder.pid, cw.holder.fd), (9, Some(4)));
        assert_eq!(
            cw.verdict.clause().to_string(),
            "python3[9] fd 4 must close it (CLOSE_WAIT never times out)"
        );
        assert_eq!(s.stuck_reported, 3);
    }

    /// A pool's leak reads by its back-end; a server's sockets from many clients by address.
    #[test]
    fn still_open_sockets_by_peer() {
        let count = |peers: &[(&str, u16)]| {
            let mut m: HashMap<(IpAddr, u16), u64> = HashMap::new();
            for (a, p) in peers {
                *m.entry((a.parse().unwrap(), *p)).or_default() += 1;
            }
            peers_words(&by_peer(&m))
        };
        let pool: Vec<(&str, u16)> = [("127.0.0.1", 8080); 5]
            .into_iter()
            .chain([("10.0.0.7", 5432)])
            .collect();
        assert_eq!(count(&pool), "5 to 127.0.0.1:8080, 1 to 10.0.0.7:5432");
        let clients: Vec<(&str, u16)> = (0..6)
            .map(|i| (if i < 4 { "10.0.0.9" } else { "10.0.0.8" }, 50000 + i))
            .collect();
        assert_eq!(count(&clients), "4 to 10.0.0.9, 2 to 10.0.0.8");
        let addrs = ["10.0.1.0", "10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4"];
        let many: Vec<(&str, u16)> = addrs.iter().map(|a| (*a, 1)).collect();
        assert_eq!(
            count(&many),
            "1 to 10.0.1.0, 1 to 10.0.1.1, 1 to 10.0.1.2, 2 more peers"
        );
    }
}
