//! The attribution state machine: kernel records in, reports of what caused each transition out.
//!
//! Rules (see docs/close-path.md):
//! - Only a socket's own close()/shutdown() (or its owner's exit) moves it into FIN_WAIT1 or
//!   LAST_ACK. Those transitions are matched to the call by socket identity: the call records the
//!   socket behind its fd, so a peer's transition that happens inline on loopback (inside another
//!   process's call) is never blamed on that call.
//! - A close's final fput may run after sys_exit (task work on older kernels), but always in the
//!   calling thread before its next syscall: a call stays pending for its thread until then.
//! - Softirq transitions (FIN_WAIT2, CLOSE_WAIT, TIME_WAIT, LAST_ACK -> CLOSE) inherit or are the
//!   peer's doing; the pid of whatever ran in softirq is never used.
//! - finwait's own /proc reads hold a file for a moment (a readlink of /proc/PID/fd/N takes a
//!   reference): a close in that moment leaves the socket's end to finwait's thread (or another
//!   finwait run's). That end belongs to the application's close that left the reference.
use std::{collections::HashMap, num::NonZeroUsize};

use finwait_common::{Call, TcpState};
use foldhash::fast::RandomState as FastHash;
use lru::LruCache;

use crate::{
    model::{
        Cause, CauseKind, CloseNoFinReport, Fw2Exit, Report, Task, TransitionKind as K,
        TransitionReport,
    },
    trace::decode::{CallEnter, Decoded, Record, StateChange},
};

/// `enum sock_flags` bits (stable since long before any kernel we support).
const SOCK_DEAD: u64 = 1 << 0;
const SOCK_DONE: u64 = 1 << 1;

/// An orphan whose FIN_WAIT2 ends within this of its start, in the thread that entered it, was
/// handed to the time-wait timer at entry (default settings), not later by the orphan timer.
const HANDOVER_WINDOW_NS: u64 = 50_000_000;

/// Bounds of the tables (LRU: the least recently seen entry goes first, counted).
const MAX_SOCKETS: usize = 262_144;
const MAX_THREADS: usize = 65_536;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    pub(crate) transitions: u64,
    pub(crate) calls: u64,
    /// Precise mode: tcp_close/tcp_shutdown records.
    pub(crate) kernel_calls: u64,
    pub(crate) sockets_evicted: u64,
    pub(crate) threads_evicted: u64,
}

#[derive(Clone, Debug)]
struct PendingCall {
    call: Call,
    how: Option<i32>,
    task: Task,
    /// None: the call covered a range of fds, or only the kernel hook saw it.
    fd: Option<i32>,
}

impl PendingCall {
    fn cause(&self) -> Cause {
        Cause {
            kind: CauseKind::Call(self.call),
            how: self.how,
            task: Some(self.task.clone()),
            fd: self.fd,
            exact: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct SockState {
    state: Option<TcpState>,
    ends: Option<crate::model::Endpoints>,
    /// When its last transition here happened.
    last_ns: u64,
    /// A call on this socket whose effect may still be on its way (see module docs).
    pending: Option<PendingCall>,
    /// The last close that left other references: if finwait's own thread drops the last one
    /// (a /proc read), this close is what ended the socket.
    released: Option<PendingCall>,
    /// The close()/shutdown()/exit that sent our FIN.
    fin_cause: Option<Cause>,
    fin_sent_ns: Option<u64>,
    fw2_since_ns: Option<u64>,
    fw2_entered_by_tid: u32,
    half_closed_since_ns: Option<u64>,
    close_wait_since_ns: Option<u64>,
    reset_received: bool,
    reset_sent: bool,
    orphan: bool,
    /// Its durations count from the start-up snapshot.
    since_snapshot: bool,
}

impl SockState {
    /// How an orphan left FIN_WAIT2: reset if we sent one, else into the time-wait mini-socket.
    fn orphan_exit(&self) -> Fw2Exit {
        if self.reset_sent {
            Fw2Exit::Reset
        } else {
            Fw2Exit::OrphanTimewait
        }
    }

    fn fin_cause(&self) -> Cause {
        self.fin_cause.clone().unwrap_or_else(Cause::unknown)
    }
}

#[derive(Clone, Debug, Default)]
struct ThreadState {
    /// The call in progress, with the socket it resolved (if any).
    current: Option<(PendingCall, Option<u64>)>,
    /// A call that returned but whose final fput may still run (until the next syscall).
    after: Option<(PendingCall, Option<u64>)>,
    /// Precise mode: the socket tcp_close/tcp_shutdown last ran on in this thread, and the call.
    /// Kept per thread (not per socket) so a close that changes no state leaves nothing behind.
    kernel_call: Option<(u64, PendingCall)>,
    exiting: bool,
}

impl ThreadState {
    /// A call of this thread whose socket is unknown (no fd -> socket resolution).
    fn unresolved(&self) -> impl Iterator<Item = &PendingCall> {
        [&self.current, &self.after]
            .into_iter()
            .flatten()
            .filter(|(_, sock)| sock.is_none())
            .map(|(p, _)| p)
    }
}

/// Which processes are finwait: this one, and other runs of the same executable (an operator's
/// beside the DaemonSet's), whose /proc reads hold files for a moment too.
struct Finwaits {
    own: u32,
    /// This executable's (device, inode).
    exe: Option<(u64, u64)>,
    seen: LruCache<u32, bool, FastHash>,
}

impl Finwaits {
    fn new() -> Self {
        Self {
            own: std::process::id(),
            exe: Self::exe_of("self"),
            seen: LruCache::with_hasher(
                NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN),
                FastHash::default(),
            ),
        }
    }

    fn exe_of(pid: &str) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
        Some((m.dev(), m.ino()))
    }

    /// Asked only of a transition with no call of its own, right after a close that left
    /// references: rare, so one stat of /proc/PID/exe per new pid is cheap.
    fn is(&mut self, pid: u32) -> bool {
        if pid == self.own {
            return true;
        }
        let exe = self.exe;
        *self.seen.get_or_insert(pid, || {
            exe.is_some() && Self::exe_of(&pid.to_string()) == exe
        })
    }
}

/// One state change, as the correlator works on it.
struct Change<'a> {
    ts: u64,
    task: &'a Task,
    c: &'a StateChange,
}

impl Change<'_> {
    /// The kernel's own flag: no process holds the socket any more.
    fn dead(&self) -> Option<bool> {
        self.c.sk_flags.map(|f| f & SOCK_DEAD != 0)
    }

    /// The peer's FIN was received.
    fn peer_fin_seen(&self) -> bool {
        self.c.sk_flags.is_some_and(|f| f & SOCK_DONE != 0)
    }

    /// Nanoseconds since `since`.
    fn since(&self, since: Option<u64>) -> Option<u64> {
        since.map(|t| self.ts.saturating_sub(t))
    }
}

pub(crate) struct Correlator {
    // Keys are kernel addresses and thread ids, which no process chooses: a fast hasher.
    socks: LruCache<u64, SockState, FastHash>,
    threads: LruCache<u32, ThreadState, FastHash>,
    /// Sockets that were already in CLOSE_WAIT or half-closed FIN_WAIT2 when finwait started:
    /// inode -> CLOSE_WAIT or FIN_WAIT2 since (at least) this time.
    seeds: HashMap<u64, u64>,
    /// file_ref_t (6.13+) counts from zero.
    refs_zero_based: bool,
    /// finwait's processes: their threads close no traced socket but their own.
    finwaits: Finwaits,
    stats: Stats,
}

impl Correlator {
    pub(crate) fn new(refs_zero_based: bool) -> Self {
        Self::with_capacity(refs_zero_based, MAX_SOCKETS, MAX_THREADS)
    }

    pub(crate) fn with_capacity(refs_zero_based: bool, socks: usize, threads: usize) -> Self {
        let cap = |n: usize| NonZeroUsize::new(n.max(1)).expect("at least 1");
        Self {
            socks: LruCache::with_hasher(cap(socks), FastHash::default()),
            threads: LruCache::with_hasher(cap(threads), FastHash::default()),
            seeds: HashMap::new(),
            refs_zero_based,
            finwaits: Finwaits::new(),
            stats: Stats::default(),
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        self.stats
    }

    /// A socket found by the start-up snapshot in CLOSE_WAIT or half-closed FIN_WAIT2, keyed by
    /// inode (what sock_diag and the kernel hooks have in common).
    pub(crate) fn seed(&mut self, inode: u64, since_ns: u64) {
        if inode != 0 {
            self.seeds.insert(inode, since_ns);
        }
    }

    pub(crate) fn tracked_sockets(&self) -> usize {
        self.socks.len()
    }

    /// Sockets whose last transition here came before `before_ns`: each one's ends and the
    /// state that transition entered.
    pub(crate) fn last_states(
        &self,
        before_ns: u64,
    ) -> impl Iterator<Item = (u64, &crate::model::Endpoints, TcpState)> {
        self.socks.iter().filter_map(move |(sock, s)| {
            let (ends, state) = (s.ends.as_ref()?, s.state?);
            (s.last_ns < before_ns).then_some((*sock, ends, state))
        })
    }

    fn sock(&mut self, sock: u64) -> &mut SockState {
        if !self.socks.contains(&sock) && self.socks.push(sock, SockState::default()).is_some() {
            self.stats.sockets_evicted += 1;
        }
        self.socks.get_mut(&sock).expect("just inserted")
    }

    fn thread(&mut self, tid: u32) -> &mut ThreadState {
        if !self.threads.contains(&tid) && self.threads.push(tid, ThreadState::default()).is_some()
        {
            self.stats.threads_evicted += 1;
        }
        self.threads.get_mut(&tid).expect("just inserted")
    }

    fn exiting(&self, tid: u32) -> bool {
        self.threads.peek(&tid).is_some_and(|t| t.exiting)
    }

    /// Forgets what a thread's previous call may still cause: it is making a new one (or exiting),
    /// so that call has returned and its last fput has run. A call that named its socket and
    /// succeeded sends no exit record: it is still `current` here.
    fn retire_after(&mut self, tid: u32) {
        let Some(t) = self.threads.get_mut(&tid) else {
            return;
        };
        for (_, sock) in [t.after.take(), t.current.take()].into_iter().flatten() {
            if let Some(sock) = sock
                && let Some(s) = self.socks.peek_mut(&sock)
                && s.pending.as_ref().is_some_and(|p| p.task.tid == tid)
            {
                s.pending = None;
            }
        }
    }

    /// Takes one record; what it explains goes to `out`.
    pub(crate) fn handle(&mut self, rec: Record, out: &mut Vec<Report>) {
        let tid = rec.task.tid;
        match rec.what {
            Decoded::CallEnter(e) => {
                self.stats.calls += 1;
                self.call_enter(rec.ts_ns, rec.task, e, out);
            }
            Decoded::CallExit { ret, .. } => self.call_exit(tid, ret),
            Decoded::ProcessExit { .. } => {
                self.retire_after(tid);
                self.thread(tid).exiting = true;
            }
            Decoded::ReceiveReset { sock } => self.sock(sock).reset_received = true,
            Decoded::SendReset { sock } => self.sock(sock).reset_sent = true,
            // Ownership news is the resolver's (the tracer hands it over directly).
            Decoded::Obtained { .. } => {}
            Decoded::KernelCall { call, how, sock } => {
                self.stats.kernel_calls += 1;
                let task = rec.task;
                let call = PendingCall {
                    call,
                    how,
                    task,
                    fd: None,
                };
                self.thread(tid).kernel_call = Some((sock, call));
            }
            Decoded::Transition(c) => {
                self.stats.transitions += 1;
                let change = Change {
                    ts: rec.ts_ns,
                    task: &rec.task,
                    c: &c,
                };
                let mut r = self.transition(&change);
                r.recorded_owner = c.owner;
                out.push(Report::Transition(r));
            }
        }
    }

    fn call_enter(&mut self, ts: u64, task: Task, e: CallEnter, out: &mut Vec<Report>) {
        let tid = task.tid;
        // close_range sends one record for the range, then one per socket it found.
        let range = e.call == Call::CloseRange && e.sock.is_none();
        let per_fd = e.call == Call::CloseRange && e.sock.is_some();
        let pending = PendingCall {
            call: e.call,
            how: (e.call == Call::Shutdown).then_some(e.arg as i32),
            task,
            fd: (!range).then_some(e.fd),
        };
        if !per_fd {
            self.retire_after(tid);
            self.thread(tid).current = Some((pending.clone(), e.sock));
        }
        let Some(sock) = e.sock else { return };
        // close(), dup2() over the fd, close_range(): the socket only ends when this drops the
        // file's last reference.
        let remaining = e.file_refs.map(|r| {
            if self.refs_zero_based {
                r
            } else {
                r.saturating_sub(1)
            }
        });
        if e.call == Call::Shutdown || remaining.is_none_or(|r| r == 0) {
            self.sock(sock).pending = Some(pending);
            return;
        }
        let s = self.sock(sock);
        s.released = Some(pending.clone());
        out.push(Report::CloseNoFin(CloseNoFinReport {
            ts_ns: ts,
            sock,
            call: e.call,
            task: pending.task,
            fd: e.fd,
            remaining_refs: remaining.unwrap_or(0),
            holders: Vec::new(),
            inode: e.inode,
            ends: s.ends.clone().or_else(|| e.ends.clone()),
            state: s.state,
            recorded_owner: e.owner,
            netns: None,
        }));
        if let Some(t) = self.threads.get_mut(&tid).filter(|_| !per_fd) {
            t.current = None;
        }
    }

    fn call_exit(&mut self, tid: u32, ret: i64) {
        let t = self.thread(tid);
        let Some((call, sock)) = t.current.take() else {
            return;
        };
        if ret >= 0 {
            t.after = Some((call, sock));
            return;
        }
        // The call failed: it changed nothing.
        if let Some(sock) = sock
            && let Some(s) = self.socks.peek_mut(&sock)
        {
            s.pending = None;
        }
    }

    /// Precise mode: did tcp_close (or, unless `close_only`, tcp_shutdown) just run on `sock` in
    /// this thread?
    fn kernel_call_by(&self, sock: u64, tid: u32, close_only: bool) -> bool {
        self.threads
            .peek(&tid)
            .and_then(|t| t.kernel_call.as_ref())
            .is_some_and(|(s, k)| *s == sock && (!close_only || k.call == Call::Close))
    }

    /// Is this transition finwait's own thread dropping a reference it held for a moment, after
    /// the application's close (see module docs)? Not when finwait itself called on the socket
    /// (its own endpoint's connections).
    fn released_by_us(&mut self, sock: u64, task: &Task) -> bool {
        self.socks.peek(&sock).is_some_and(|s| {
            s.released.is_some() && s.pending.as_ref().is_none_or(|p| p.task.pid != task.pid)
        }) && self.finwaits.is(task.pid)
    }

    /// The call by this thread that may have caused a local transition of `sock`.
    fn local_cause(&mut self, sock: u64, task: &Task) -> Cause {
        let tid = task.tid;
        if self.released_by_us(sock, task) {
            if let Some(t) = self.threads.peek_mut(&tid) {
                t.kernel_call.take_if(|(s, _)| *s == sock);
            }
            let released = self.socks.peek_mut(&sock).and_then(|s| s.released.take());
            return released.map_or_else(Cause::unknown, |p| p.cause());
        }
        let kernel = self
            .threads
            .peek_mut(&tid)
            .and_then(|t| t.kernel_call.take_if(|(s, _)| *s == sock))
            .map(|(_, k)| k);
        if let Some(k) = kernel {
            return self.kernel_confirmed_cause(sock, task, &k);
        }
        if let Some(p) = self.socks.peek_mut(&sock).and_then(|s| s.pending.take()) {
            // Not this thread's: the file was last released elsewhere (io_uring, another path):
            // not ours to guess.
            return if p.task.tid == tid {
                p.cause()
            } else {
                Cause::unknown()
            };
        }
        let Some(t) = self.threads.peek(&tid) else {
            return Cause::unknown();
        };
        // Without fd -> socket resolution, a call whose socket is unknown is the best lead:
        // FIN_WAIT1 and LAST_ACK are only ever entered by the socket's own close/shutdown.
        if let Some(p) = t.unresolved().next() {
            return p.cause();
        }
        if t.exiting {
            // Exit closes in the exiting task's own context.
            return Cause::exit(task);
        }
        Cause::unknown()
    }

    /// The kernel itself says this task ended this socket. The syscall that led there, if one
    /// was seen, names the fd; otherwise the path had none we follow (io_uring, the last
    /// reference of a file shared with another process, ...).
    fn kernel_confirmed_cause(&mut self, sock: u64, task: &Task, k: &PendingCall) -> Cause {
        let shutdown = k.call == Call::Shutdown;
        let syscall = self
            .socks
            .peek_mut(&sock)
            .and_then(|s| s.pending.take())
            .filter(|p| p.task.tid == task.tid && (p.call == Call::Shutdown) == shutdown);
        let mut cause = match syscall {
            Some(p) => p.cause(),
            None if self.exiting(task.tid) && k.call == Call::Close => Cause::exit(task),
            None => k.cause(),
        };
        cause.exact = true;
        cause
    }

    /// One state change: what caused it, and what it ends.
    fn transition(&mut self, c: &Change<'_>) -> TransitionReport {
        let (sock, old, new) = (c.c.sock, c.c.old, c.c.new);
        let mut r = TransitionReport::new(c.ts, sock, c.c.ends.clone(), old, new, c.c.inode);
        r.earlier_socket_lost = self.forget_earlier_socket(sock, &c.c.ends);
        // Each transition leaves the state the previous one entered; where it does not, one in
        // between never arrived (the kernel ran none of the programs for it, or lost it).
        r.missed_before = self
            .socks
            .peek(&sock)
            .and_then(|s| s.state)
            .is_some_and(|last| last != old);
        self.track(c);
        r.at_least = self.socks.peek(&sock).is_some_and(|s| s.since_snapshot);
        match r.kind {
            // Our FIN: only a local close/shutdown (or exit) does this.
            K::FinSent | K::CloseWaitClosed => self.our_fin(c, &mut r),
            K::FinWait2Entered => self.fin_wait2_entered(c, &mut r),
            K::PeerFin => {
                // The owner comes from the kernel's record, off this path (see `resolve`).
                self.sock(sock).close_wait_since_ns = Some(c.ts);
                r.cause = Some(Cause::bare(CauseKind::PeerFin));
            }
            K::FinWait2Left => self.fin_wait2_left(c, &mut r),
            K::LastAckDone | K::ClosingDone | K::FinsCrossed => self.both_closed(c, &mut r),
            K::Aborted => self.straight_to_close(c, &mut r),
            K::Other => {}
        }
        r.fin_by = self
            .socks
            .peek(&sock)
            .and_then(|s| s.fin_cause.as_ref())
            .and_then(|c| c.task.clone());
        if new == TcpState::Close {
            // The socket is gone; its address may be reused by a new one.
            self.socks.pop(&sock);
        } else if let Some(s) = self.socks.peek_mut(&sock) {
            // A reset ends its socket at once (tcp_done): it is the next transition's or none's.
            // One whose socket's CLOSE never came here (with --pid the kernel forwards every
            // reset, but only followed sockets' transitions; an active reset may follow the
            // CLOSE) must not end the next socket at the address.
            (s.reset_received, s.reset_sent) = (false, false);
        }
        r
    }

    /// A socket's ends are fixed once it is connected: a transition at this address with other
    /// ends is a new socket in the memory of one whose CLOSE never arrived (the kernel skipped
    /// it, or, with `--pid`, did not forward it: a socket of a process not followed). That
    /// socket's state goes; what came after its last transition (a call, a reset) is kept, as
    /// the new socket's more likely. True if there was one.
    fn forget_earlier_socket(&mut self, sock: u64, ends: &crate::model::Endpoints) -> bool {
        let Some(s) = self.socks.peek_mut(&sock) else {
            return false;
        };
        // A connect()'s SYN_SENT is reported before its local port is chosen.
        let earlier = s
            .ends
            .as_ref()
            .is_some_and(|e| e.lport != 0 && e.key() != ends.key());
        if earlier {
            *s = SockState {
                pending: s.pending.take(),
                reset_received: s.reset_received,
                reset_sent: s.reset_sent,
                ..SockState::default()
            };
        }
        earlier
    }

    /// Records the new state. Leaving a state whose start finwait never saw: if the start-up
    /// snapshot found the socket there, it is timed from the snapshot, as a lower bound.
    fn track(&mut self, c: &Change<'_>) {
        let (sock, old) = (c.c.sock, c.c.old);
        let unknown_since = match (old, self.socks.peek(&sock)) {
            (TcpState::CloseWait, s) => s.is_none_or(|s| s.close_wait_since_ns.is_none()),
            (TcpState::FinWait2, s) => {
                s.is_none_or(|s| s.half_closed_since_ns.is_none() && !s.orphan)
            }
            _ => false,
        };
        let seed = unknown_since
            .then(|| self.seeds.remove(&c.c.inode))
            .flatten();
        let s = self.sock(sock);
        s.ends = Some(c.c.ends.clone());
        s.last_ns = c.ts;
        s.state = Some(c.c.new);
        if let Some(since) = seed {
            match old {
                TcpState::CloseWait => s.close_wait_since_ns = Some(since),
                _ => s.half_closed_since_ns = Some(since),
            }
            s.since_snapshot = true;
        }
    }

    /// FIN_WAIT1 or LAST_ACK: our FIN went out, sent by a local call (or exit).
    fn our_fin(&mut self, c: &Change<'_>, r: &mut TransitionReport) {
        let cause = self.local_cause(c.c.sock, c.task);
        let s = self.sock(c.c.sock);
        if c.c.new == TcpState::LastAck {
            r.close_wait_ns = c.since(s.close_wait_since_ns);
        }
        s.fin_cause = Some(cause.clone());
        s.fin_sent_ns = Some(c.ts);
        if cause.kind == CauseKind::Call(Call::Shutdown) {
            s.half_closed_since_ns = Some(c.ts);
        }
        r.cause = Some(cause);
    }

    /// FIN_WAIT1 -> FIN_WAIT2: half-closed (still held) or orphaned, by the call that sent the FIN.
    fn fin_wait2_entered(&mut self, c: &Change<'_>, r: &mut TransitionReport) {
        let s = self.sock(c.c.sock);
        let cause = s.fin_cause();
        // The kernel's own flag says whether a process still holds the socket.
        let orphan = c.dead().unwrap_or_else(|| cause.is_close_like());
        s.orphan = orphan;
        s.fw2_since_ns = Some(c.ts);
        s.fw2_entered_by_tid = c.task.tid;
        r.orphan = Some(orphan);
        r.since_fin_ns = c.since(s.fin_sent_ns);
        r.cause = Some(cause);
    }

    /// FIN_WAIT2 -> CLOSE: the peer's FIN (TIME_WAIT), a reset, the owner closing a half-closed
    /// socket, or an orphan's hand-over to the time-wait timer.
    fn fin_wait2_left(&mut self, c: &Change<'_>, r: &mut TransitionReport) {
        let (sock, tid) = (c.c.sock, c.task.tid);
        let pending_close = self
            .socks
            .peek(&sock)
            .and_then(|s| s.pending.as_ref())
            .is_some_and(|p| p.task.tid == tid && p.call != Call::Shutdown)
            || self.kernel_call_by(sock, tid, true)
            || self.released_by_us(sock, c.task);
        let in_unresolved_close = self
            .threads
            .peek(&tid)
            .is_some_and(|t| t.unresolved().any(|p| p.call != Call::Shutdown));
        let s = self.socks.peek(&sock).cloned().unwrap_or_default();
        r.since_fin_ns = c.since(s.fin_sent_ns);
        let half_closed = c.since(s.half_closed_since_ns);
        let (exit, cause) = if s.reset_received {
            (Fw2Exit::Reset, Cause::bare(CauseKind::PeerRst))
        } else if pending_close || (!s.orphan && (in_unresolved_close || self.exiting(tid))) {
            // The owner closed a half-closed socket: it becomes an orphan and, with the default
            // tcp_fin_timeout, a time-wait mini-socket in substate FIN_WAIT2.
            let cause = if pending_close || in_unresolved_close {
                self.local_cause(sock, c.task)
            } else {
                Cause::exit(c.task)
            };
            r.orphan = Some(true);
            r.half_closed_ns = half_closed;
            (s.orphan_exit(), cause)
        } else if c.peer_fin_seen() {
            r.orphan = Some(s.orphan);
            r.half_closed_ns = if s.orphan { None } else { half_closed };
            (Fw2Exit::TimeWait, Cause::bare(CauseKind::PeerFin))
        } else if s.orphan {
            // Handed to the time-wait timer right at FIN_WAIT2 entry (default settings), or later
            // by the orphan timer (tcp_fin_timeout above 60 s).
            let immediate = s.fw2_entered_by_tid == tid
                && c.since(s.fw2_since_ns)
                    .is_some_and(|d| d < HANDOVER_WINDOW_NS);
            r.orphan = Some(true);
            let cause = if immediate {
                s.fin_cause()
            } else {
                Cause::bare(CauseKind::Timer)
            };
            (s.orphan_exit(), cause)
        } else {
            (Fw2Exit::Other, Cause::unknown())
        };
        r.fw2_exit = Some(exit);
        r.cause = Some(cause);
    }

    /// LAST_ACK or CLOSING -> CLOSE, FIN_WAIT1 -> CLOSING: both FINs are out.
    fn both_closed(&mut self, c: &Change<'_>, r: &mut TransitionReport) {
        let s = self.socks.peek(&c.c.sock).cloned().unwrap_or_default();
        r.since_fin_ns = c.since(s.fin_sent_ns);
        r.cause = Some(if s.reset_received {
            Cause::bare(CauseKind::PeerRst)
        } else {
            s.fin_cause()
        });
        if r.kind == K::ClosingDone {
            r.fw2_exit = Some(Fw2Exit::TimeWait);
        }
    }

    /// Straight to CLOSE: a reset (SO_LINGER 0, unread data at close, the peer's RST) or an
    /// orphan that timed out.
    fn straight_to_close(&mut self, c: &Change<'_>, r: &mut TransitionReport) {
        let (sock, old) = (c.c.sock, c.c.old);
        let has_pending = self.socks.peek(&sock).is_some_and(|s| s.pending.is_some())
            || self.kernel_call_by(sock, c.task.tid, false);
        let s = self.socks.peek(&sock).cloned().unwrap_or_default();
        r.close_wait_ns = c.since(s.close_wait_since_ns);
        r.since_fin_ns = c.since(s.fin_sent_ns);
        r.cause = Some(if has_pending {
            self.local_cause(sock, c.task)
        } else if s.reset_received {
            Cause::bare(CauseKind::PeerRst)
        } else if matches!(
            old,
            TcpState::Established | TcpState::CloseWait | TcpState::FinWait1
        ) {
            let cause = self.local_cause(sock, c.task);
            if cause.kind == CauseKind::Unknown && old == TcpState::FinWait1 && s.orphan {
                Cause::bare(CauseKind::Timer)
            } else {
                cause
            }
        } else {
            Cause::unknown()
        });
    }
}

/// The kernel has a socket in `kernel`, a state after `believed` on the close path (FIN_WAIT1 ->
/// FIN_WAIT2 or CLOSING -> TIME_WAIT, CLOSE_WAIT -> LAST_ACK): the transitions in between never
/// arrived. An orphan handed to the time-wait timer is listed in its substate (FIN_WAIT2 or
/// TIME_WAIT). A state before `believed`, or the same, proves nothing: a transition is reported
/// just before the kernel stores its state, and the same ends may be another socket's.
pub(crate) fn moved_on(believed: TcpState, kernel: TcpState) -> bool {
    match believed {
        TcpState::FinWait1 => matches!(
            kernel,
            TcpState::FinWait2 | TcpState::Closing | TcpState::TimeWait
        ),
        TcpState::FinWait2 | TcpState::Closing => kernel == TcpState::TimeWait,
        TcpState::CloseWait => kernel == TcpState::LastAck,
        _ => false,
    }
}

/// Unit tests drive the state machine with the exact record sequences the kernel produces on
/// loopback, including the traps of docs/close-path.md.
#[cfg(test)]
#[allow(clippy::too_many_lines)] // scenarios read best whole
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{model::Endpoints, trace::dedup::Dedup};

    fn task(pid: u32, tid: u32, comm: &str) -> Task {
        Task {
            pid,
            tid,
            comm: comm.into(),
            thread_comm: None,
            ..Default::default()
        }
    }
    fn ends(lport: u16, rport: u16) -> Endpoints {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        Endpoints {
            local: lo,
            lport,
            remote: lo,
            rport,
        }
    }
    fn rec(ts: u64, t: &Task, what: Decoded) -> Record {
        Record {
            ts_ns: ts,
            task: t.clone(),
            what,
        }
    }
    fn enter(call: Call, fd: i32, arg: i64, sock: u64, refs: u64) -> Decoded {
        Decoded::CallEnter(CallEnter {
            call,
            fd,
            arg,
            sock: Some(sock),
            inode: sock + 1000,
            file_refs: Some(refs),
            owner: None,
            ends: None,
            maybe_duplicate: false,
        })
    }
    fn exit(call: Call) -> Decoded {
        Decoded::CallExit { call, ret: 0 }
    }
    fn tr(sock: u64, old: TcpState, new: TcpState, flags: u64, lport: u16, rport: u16) -> Decoded {
        Decoded::Transition(StateChange {
            sock,
            old,
            new,
            ends: ends(lport, rport),
            sk_flags: Some(flags),
            inode: sock + 1000,
            owner: None,
            maybe_duplicate: false,
        })
    }
    /// A record as a guarded hook's second program sends it: possibly a duplicate.
    fn marked(d: Decoded) -> Decoded {
        match d {
            Decoded::Transition(mut s) => {
                s.maybe_duplicate = true;
                Decoded::Transition(s)
            }
            Decoded::CallEnter(mut e) => {
                e.maybe_duplicate = true;
                Decoded::CallEnter(e)
            }
            d => d,
        }
    }
    /// A record through the two stages the pipeline runs before attribution.
    fn staged(d: &mut Dedup, c: &mut Correlator, r: Record, out: &mut Vec<Report>) {
        if d.keep(&r) {
            c.handle(r, out);
        }
    }
    fn transitions(out: &[Report]) -> Vec<&TransitionReport> {
        out.iter()
            .filter_map(|r| match r {
                Report::Transition(t) => Some(t),
                _ => None,
            })
            .collect()
    }

    const A: u64 = 0xa000;
    const B: u64 = 0xb000;

    fn kernel(call: Call, sock: u64, how: Option<i32>) -> Decoded {
        Decoded::KernelCall { call, how, sock }
    }

    /// httpd's lingering close, with the peer's ACK of our FIN never delivered (seen on the 6.18
    /// host: the kernel ran no program for a softirq landing on one task): the close's
    /// FIN_WAIT2 -> CLOSE says a transition went missing before it, and is still attributed.
    /// An unbroken chain, and a socket's first transition here, say nothing of the kind.
    #[test]
    fn the_second_state_programs_duplicate_is_dropped_and_a_recovery_kept() {
        use TcpState::{CloseWait, Established, FinWait1, FinWait2};
        let (mut d, mut c) = (Dedup::new(), Correlator::new(false));
        let t = task(7, 7, "srv");
        let mut out = Vec::new();
        let mut feed = |r| staged(&mut d, &mut c, r, &mut out);
        // The first program's report, another socket's change, then the second's copy.
        feed(rec(1, &t, tr(1, Established, FinWait1, 0, 80, 5000)));
        feed(rec(2, &t, tr(2, Established, CloseWait, 0, 80, 5001)));
        feed(rec(
            3,
            &t,
            marked(tr(1, Established, FinWait1, 0, 80, 5000)),
        ));
        // A marked change never reported before is the only report of it: kept.
        feed(rec(4, &t, marked(tr(3, FinWait1, FinWait2, 0, 80, 5002))));
        let got: Vec<(u64, TcpState)> = transitions(&out).iter().map(|r| (r.sock, r.new)).collect();
        assert_eq!(got, [(1, FinWait1), (2, CloseWait), (3, FinWait2)]);
        assert_eq!(d.stats().duplicates_dropped, 1);
        assert_eq!(c.stats().transitions, 3);
        assert_eq!(d.stats().state_recovered_here, 1);
    }

    #[test]
    fn a_kernel_call_reported_by_both_programs_counts_once() {
        let (mut d, mut c) = (Dedup::new(), Correlator::new(false));
        let t = task(7, 7, "srv");
        let mut out = Vec::new();
        let mut feed = |r| staged(&mut d, &mut c, r, &mut out);
        feed(rec(1, &t, kernel(Call::Close, 0x10, None)));
        feed(rec(2, &t, kernel(Call::Close, 0x10, None)));
        // Another socket's is another call.
        feed(rec(3, &t, kernel(Call::Close, 0x20, None)));
        assert_eq!(c.stats().kernel_calls, 2);
        assert_eq!(d.stats().duplicates_dropped, 1);
    }

    #[test]
    fn a_call_reported_by_both_syscall_programs_counts_once() {
        let (mut d, mut c) = (Dedup::new(), Correlator::new(false));
        let t = task(7, 7, "srv");
        let mut out = Vec::new();
        let mut feed = |r| staged(&mut d, &mut c, r, &mut out);
        feed(rec(1, &t, enter(Call::Close, 5, 5, A, 1)));
        feed(rec(2, &t, marked(enter(Call::Close, 5, 5, A, 1))));
        feed(rec(3, &t, exit(Call::Close)));
        // After the return, a marked call is a new one (the first program was skipped for it).
        feed(rec(4, &t, marked(enter(Call::Close, 6, 6, B, 1))));
        let tr = tr(B, TcpState::Established, TcpState::FinWait1, 0, 80, 5000);
        feed(rec(5, &t, tr));
        assert_eq!(c.stats().calls, 2);
        assert_eq!(d.stats().duplicates_dropped, 1);
        let cause = transitions(&out)[0].cause.clone().unwrap();
        assert_eq!(
            (cause.kind, cause.fd),
            (CauseKind::Call(Call::Close), Some(6))
        );
    }

    #[test]
    fn a_transition_that_never_arrived_shows_in_the_next_one() {
        let mut c = Correlator::new(false);
        let child = task(20, 20, "httpd");
        let mut out = Vec::new();
        c.handle(rec(1, &child, enter(Call::Shutdown, 5, 1, A, 1)), &mut out);
        c.handle(
            rec(
                2,
                &child,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 80, 40000),
            ),
            &mut out,
        );
        // FIN_WAIT1 -> FIN_WAIT2 lost.
        c.handle(rec(3, &child, enter(Call::Close, 5, 0, A, 1)), &mut out);
        let dead = SOCK_DEAD;
        c.handle(
            rec(
                4,
                &child,
                tr(A, TcpState::FinWait2, TcpState::Close, dead, 80, 40000),
            ),
            &mut out,
        );
        // Another socket, complete.
        c.handle(
            rec(
                5,
                &child,
                tr(B, TcpState::Established, TcpState::CloseWait, 0, 80, 40001),
            ),
            &mut out,
        );
        c.handle(rec(6, &child, enter(Call::Close, 6, 0, B, 1)), &mut out);
        c.handle(
            rec(
                7,
                &child,
                tr(B, TcpState::CloseWait, TcpState::LastAck, 0, 80, 40001),
            ),
            &mut out,
        );
        let ts = transitions(&out);
        let missed: Vec<bool> = ts.iter().map(|t| t.missed_before).collect();
        assert_eq!(missed, [false, true, false, false]);
        let close = ts[1].cause.clone().unwrap();
        assert_eq!(
            (close.kind, close.task.map(|t| t.pid)),
            (CauseKind::Call(Call::Close), Some(20))
        );
    }

    /// A half-closed socket's CLOSE never arrived and its memory went to a new socket (other
    /// ends) whose FIN_WAIT1 never arrived either: the new one owes the earlier one neither a gap
    /// nor its shutdown as the cause of its FIN_WAIT2.
    #[test]
    fn a_new_socket_at_an_address_inherits_nothing_of_the_earlier_one() {
        let mut c = Correlator::new(false);
        let child = task(20, 20, "httpd");
        let softirq = task(0, 0, "swapper/0");
        let mut out = Vec::new();
        c.handle(rec(1, &child, enter(Call::Shutdown, 5, 1, A, 1)), &mut out);
        let fw1 = tr(A, TcpState::Established, TcpState::FinWait1, 0, 80, 40000);
        c.handle(rec(2, &child, fw1), &mut out);
        let fw2 = tr(A, TcpState::FinWait1, TcpState::FinWait2, 0, 80, 40000);
        c.handle(rec(3, &softirq, fw2), &mut out);
        // Another connection's socket at the same address.
        let fw2 = tr(A, TcpState::FinWait1, TcpState::FinWait2, 0, 80, 40002);
        c.handle(rec(4, &softirq, fw2), &mut out);
        let t = transitions(&out);
        let flags: Vec<_> = t
            .iter()
            .map(|t| (t.missed_before, t.earlier_socket_lost))
            .collect();
        assert_eq!(flags, [(false, false), (false, false), (false, true)]);
        assert_eq!(t[2].cause.as_ref().unwrap().kind, CauseKind::Unknown);
        assert_eq!(t[2].since_fin_ns, None);
        // The same socket again: its own gap.
        let close = tr(A, TcpState::TimeWait, TcpState::Close, 0, 80, 40002);
        c.handle(rec(5, &softirq, close), &mut out);
        let t = transitions(&out);
        assert!(t[3].missed_before && !t[3].earlier_socket_lost);
    }

    /// With `--pid` the kernel forwards every reset but only followed sockets' transitions: a
    /// socket of another process was reset and its CLOSE never came. The followed socket that
    /// gets its address later closes its half-closed FIN_WAIT2 itself; a reset of its own is
    /// still one.
    #[test]
    fn a_reset_belongs_to_the_transition_after_it_only() {
        let mut c = Correlator::new(false);
        let child = task(20, 20, "httpd");
        let softirq = task(0, 0, "swapper/0");
        let mut out = Vec::new();
        c.handle(
            rec(1, &softirq, Decoded::ReceiveReset { sock: A }),
            &mut out,
        );
        c.handle(rec(2, &child, enter(Call::Shutdown, 5, 1, A, 1)), &mut out);
        let fw1 = tr(A, TcpState::Established, TcpState::FinWait1, 0, 80, 40000);
        c.handle(rec(3, &child, fw1), &mut out);
        let fw2 = tr(A, TcpState::FinWait1, TcpState::FinWait2, 0, 80, 40000);
        c.handle(rec(4, &softirq, fw2), &mut out);
        c.handle(rec(5, &child, exit(Call::Shutdown)), &mut out);
        c.handle(rec(6, &child, enter(Call::Close, 5, 0, A, 1)), &mut out);
        let close = tr(A, TcpState::FinWait2, TcpState::Close, SOCK_DEAD, 80, 40000);
        c.handle(rec(7, &child, close), &mut out);
        // The same again, reset by the peer in FIN_WAIT2.
        c.handle(rec(8, &child, enter(Call::Shutdown, 6, 1, B, 1)), &mut out);
        let fw1 = tr(B, TcpState::Established, TcpState::FinWait1, 0, 80, 40002);
        c.handle(rec(9, &child, fw1), &mut out);
        let fw2 = tr(B, TcpState::FinWait1, TcpState::FinWait2, 0, 80, 40002);
        c.handle(rec(10, &softirq, fw2), &mut out);
        c.handle(
            rec(11, &softirq, Decoded::ReceiveReset { sock: B }),
            &mut out,
        );
        let reset = tr(B, TcpState::FinWait2, TcpState::Close, 0, 80, 40002);
        c.handle(rec(12, &softirq, reset), &mut out);
        let exits: Vec<_> = transitions(&out)
            .iter()
            .filter_map(|t| Some((t.fw2_exit?, t.cause.as_ref()?.kind)))
            .collect();
        assert_eq!(
            exits,
            [
                (Fw2Exit::OrphanTimewait, CauseKind::Call(Call::Close)),
                (Fw2Exit::Reset, CauseKind::PeerRst)
            ]
        );
    }

    /// A prefork child closed in FIN_WAIT1 and the peer's ACK moved the orphan to FIN_WAIT2 and
    /// on to the time-wait timer in one softirq, neither transition delivered: the kernel's
    /// table still lists it (substate FIN_WAIT2), past what was last reported.
    #[test]
    fn a_socket_the_kernel_shows_past_its_last_transition_lost_the_ones_between() {
        let mut c = Correlator::new(false);
        let child = task(20, 20, "httpd");
        let mut out = Vec::new();
        c.handle(rec(1, &child, enter(Call::Shutdown, 5, 1, A, 1)), &mut out);
        c.handle(
            rec(
                2,
                &child,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 80, 40000),
            ),
            &mut out,
        );
        let last: Vec<_> = c
            .last_states(3)
            .map(|(s, e, st)| (s, e.lport, st))
            .collect();
        assert_eq!(last, [(A, 80, TcpState::FinWait1)]);
        assert_eq!(c.last_states(2).count(), 0, "not before its transition");
        assert!(moved_on(TcpState::FinWait1, TcpState::FinWait2));
        assert!(moved_on(TcpState::CloseWait, TcpState::LastAck));
        assert!(!moved_on(TcpState::FinWait2, TcpState::FinWait1));
        assert!(!moved_on(TcpState::FinWait2, TcpState::FinWait2));
        assert!(!moved_on(TcpState::LastAck, TcpState::CloseWait));
    }

    /// Precise mode, close(): the syscall names the fd, the kernel hook confirms the task.
    #[test]
    fn precise_close_confirms_the_syscall() {
        let mut c = Correlator::new(false);
        let a = task(10, 11, "client");
        let mut out = Vec::new();
        c.handle(rec(1, &a, enter(Call::Close, 5, 0, A, 1)), &mut out);
        c.handle(rec(2, &a, exit(Call::Close)), &mut out);
        // Deferred fput: tcp_close runs after sys_exit, in the same thread.
        c.handle(rec(3, &a, kernel(Call::Close, A, None)), &mut out);
        c.handle(
            rec(
                4,
                &a,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 40000, 80),
            ),
            &mut out,
        );
        let cause = transitions(&out)[0].cause.clone().unwrap();
        assert_eq!(
            (cause.kind, cause.fd, cause.exact),
            (CauseKind::Call(Call::Close), Some(5), true)
        );
        assert_eq!(cause.task.unwrap().tid, 11);
    }

    /// A forking server's child closes its half-closed socket while finwait's own /proc read
    /// holds a reference for a moment (seen under load on 7.2): the socket ends in finwait's
    /// thread, and belongs to the child's close, in both modes. finwait's own endpoint
    /// connections, which finwait itself closes, stay finwait's.
    #[test]
    fn a_close_finished_by_our_own_proc_read_is_the_applications() {
        for precise in [false, true] {
            let mut c = Correlator::new(false);
            let child = task(20, 20, "server");
            let us = task(std::process::id(), 7, "finwait-trace");
            let mut out = Vec::new();
            c.handle(rec(1, &child, enter(Call::Shutdown, 4, 1, A, 1)), &mut out);
            let to_fw1 = tr(A, TcpState::Established, TcpState::FinWait1, 0, 80, 40000);
            c.handle(rec(2, &child, to_fw1), &mut out);
            let to_fw2 = tr(A, TcpState::FinWait1, TcpState::FinWait2, 0, 80, 40000);
            c.handle(rec(3, &child, to_fw2), &mut out);
            // The child's close leaves the reference our readlink holds.
            c.handle(rec(4, &child, enter(Call::Close, 4, 0, A, 2)), &mut out);
            c.handle(
                rec(5, &child, Decoded::ProcessExit { group_dead: true }),
                &mut out,
            );
            if precise {
                c.handle(rec(6, &us, kernel(Call::Close, A, None)), &mut out);
            }
            let to_close = tr(A, TcpState::FinWait2, TcpState::Close, SOCK_DEAD, 80, 40000);
            c.handle(rec(7, &us, to_close), &mut out);
            let cause = transitions(&out)[2].cause.clone().unwrap();
            assert_eq!(
                (cause.kind, cause.fd, cause.task.map(|t| t.pid)),
                (CauseKind::Call(Call::Close), Some(4), Some(20)),
                "precise: {precise}"
            );

            // Our own connection, closed by us: ours.
            c.handle(rec(8, &us, enter(Call::Close, 9, 0, B, 1)), &mut out);
            c.handle(rec(9, &us, exit(Call::Close)), &mut out);
            let to_fw1 = tr(B, TcpState::Established, TcpState::FinWait1, 0, 9977, 50000);
            c.handle(rec(10, &us, to_fw1), &mut out);
            let cause = transitions(&out)[3].cause.clone().unwrap();
            assert_eq!(
                (cause.kind, cause.task.map(|t| t.pid)),
                (CauseKind::Call(Call::Close), Some(std::process::id()))
            );
        }
    }

    /// Another run of the same executable is finwait too; a pid that is not a live run of it is
    /// not. (A `sleep` spawned beside it read as this executable in the 5.10 guest, every time in
    /// a full run and never alone: that comparison is left to the stress test's two tracers.)
    #[test]
    fn finwaits_are_this_process_and_runs_of_its_executable() {
        let mut f = Finwaits::new();
        assert!(f.is(std::process::id()));
        // A fork of a busy test process can fail for a moment: try again rather than fail, and
        // never signal a pid that is not our child.
        let twin = (0..50)
            .map(|_| {
                // SAFETY: the child only waits in pause() until it is killed.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    loop {
                        // SAFETY: async-signal-safe.
                        unsafe { libc::pause() };
                    }
                }
                if pid < 0 {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                pid
            })
            .find(|&pid| pid > 0)
            .expect("fork failed 50 times");
        let seen = (f.exe, Finwaits::exe_of(&twin.to_string()));
        let is_twin = f.is(twin as u32);
        // SAFETY: our own child.
        unsafe {
            libc::kill(twin, libc::SIGKILL);
            libc::waitpid(twin, std::ptr::null_mut(), 0);
        }
        assert!(is_twin, "(ours, twin's): {seen:?}");
        // Gone and reaped: nothing to read, not finwait.
        assert!(!Finwaits::new().is(twin as u32));
    }

    /// Precise mode, io_uring: no syscall we follow, yet the kernel names the process.
    /// Correlated mode (no kernel record) must say unknown, even with an earlier close in `after`.
    #[test]
    fn io_uring_close_precise_and_correlated() {
        for precise in [true, false] {
            let mut c = Correlator::new(false);
            let a = task(10, 11, "client");
            let mut out = Vec::new();
            // An earlier close() of another socket, still "after" for this thread.
            c.handle(rec(1, &a, enter(Call::Close, 6, 0, B, 1)), &mut out);
            c.handle(rec(2, &a, exit(Call::Close)), &mut out);
            if precise {
                c.handle(rec(3, &a, kernel(Call::Close, A, None)), &mut out);
            }
            c.handle(
                rec(
                    4,
                    &a,
                    tr(A, TcpState::Established, TcpState::FinWait1, 0, 40000, 80),
                ),
                &mut out,
            );
            let cause = transitions(&out)[0].cause.clone().unwrap();
            if precise {
                assert_eq!(
                    (cause.kind, cause.fd, cause.exact, cause.task.map(|t| t.pid)),
                    (CauseKind::Call(Call::Close), None, true, Some(10))
                );
            } else {
                assert_eq!(cause.kind, CauseKind::Unknown);
            }
        }
    }

    /// Precise mode: a shutdown's kernel record does not stand for a later close's transition,
    /// and a tcp_close during exit is the exit.
    #[test]
    fn precise_shutdown_then_exit() {
        let mut c = Correlator::new(false);
        let a = task(10, 11, "client");
        let mut out = Vec::new();
        c.handle(rec(1, &a, enter(Call::Shutdown, 5, 1, A, 1)), &mut out);
        c.handle(rec(2, &a, kernel(Call::Shutdown, A, Some(1))), &mut out);
        c.handle(
            rec(
                3,
                &a,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 40000, 80),
            ),
            &mut out,
        );
        c.handle(rec(4, &a, exit(Call::Shutdown)), &mut out);
        c.handle(
            rec(
                5,
                &a,
                tr(A, TcpState::FinWait1, TcpState::FinWait2, 0, 40000, 80),
            ),
            &mut out,
        );
        c.handle(
            rec(6, &a, Decoded::ProcessExit { group_dead: true }),
            &mut out,
        );
        c.handle(rec(7, &a, kernel(Call::Close, A, None)), &mut out);
        c.handle(
            rec(
                8,
                &a,
                tr(A, TcpState::FinWait2, TcpState::Close, SOCK_DEAD, 40000, 80),
            ),
            &mut out,
        );
        let t = transitions(&out);
        let fin = t[0].cause.clone().unwrap();
        assert_eq!(
            (fin.kind, fin.how, fin.fd, fin.exact),
            (CauseKind::Call(Call::Shutdown), Some(1), Some(5), true)
        );
        let gone = t[2].cause.clone().unwrap();
        assert_eq!((gone.kind, gone.exact), (CauseKind::Exit, true));
    }

    /// A call that named its socket and succeeded sends no exit record: it stays the thread's
    /// current call until the thread's next call or exit retires it. Here shutdown(SHUT_RD)
    /// changes no state; the FIN the exit sends later is the exit's, not the shutdown's.
    #[test]
    fn a_successful_resolved_call_without_exit_is_retired_by_the_next() {
        let mut c = Correlator::new(false);
        let a = task(10, 11, "client");
        let mut out = Vec::new();
        c.handle(rec(1, &a, enter(Call::Shutdown, 5, 0, A, 1)), &mut out);
        c.handle(
            rec(2, &a, Decoded::ProcessExit { group_dead: true }),
            &mut out,
        );
        c.handle(
            rec(
                3,
                &a,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 40000, 80),
            ),
            &mut out,
        );
        let cause = transitions(&out)[0].cause.clone().unwrap();
        assert_eq!(cause.kind, CauseKind::Exit);
        // The next call retires it too: a later close's FIN is that close's.
        let mut c = Correlator::new(false);
        c.handle(rec(1, &a, enter(Call::Shutdown, 5, 0, A, 1)), &mut out);
        c.handle(rec(2, &a, enter(Call::Close, 6, 0, B, 1)), &mut out);
        out.clear();
        c.handle(
            rec(
                3,
                &a,
                tr(B, TcpState::Established, TcpState::FinWait1, 0, 40001, 80),
            ),
            &mut out,
        );
        let cause = transitions(&out)[0].cause.clone().unwrap();
        assert_eq!(
            (cause.kind, cause.fd),
            (CauseKind::Call(Call::Close), Some(6))
        );
    }

    /// Scenario 1 on loopback: A shuts down; the kernel runs B's CLOSE_WAIT and A's FIN_WAIT2
    /// inline, in A's thread. B is owned by pid 20.
    #[test]
    fn shutdown_half_close_and_peer_close_wait() {
        let mut c = Correlator::new(false);
        let a = task(10, 11, "client");
        let mut out = Vec::new();
        c.handle(rec(1, &a, enter(Call::Shutdown, 5, 1, A, 1)), &mut out);
        c.handle(
            rec(
                2,
                &a,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 40000, 80),
            ),
            &mut out,
        );
        c.handle(
            rec(
                3,
                &a,
                tr(B, TcpState::Established, TcpState::CloseWait, 0, 80, 40000),
            ),
            &mut out,
        );
        c.handle(
            rec(
                4,
                &a,
                tr(A, TcpState::FinWait1, TcpState::FinWait2, 0, 40000, 80),
            ),
            &mut out,
        );
        c.handle(rec(5, &a, exit(Call::Shutdown)), &mut out);
        let t = transitions(&out);
        let fw1 = t[0].cause.as_ref().unwrap();
        assert_eq!(
            (fw1.kind, fw1.how, fw1.fd),
            (CauseKind::Call(Call::Shutdown), Some(1), Some(5))
        );
        assert_eq!(fw1.task.as_ref().unwrap().tid, 11);
        // B's CLOSE_WAIT ran in A's thread but is the peer's FIN.
        assert_eq!(t[1].cause.as_ref().unwrap().kind, CauseKind::PeerFin);
        assert!(t[1].cause.as_ref().unwrap().task.is_none());
        assert_eq!(t[2].orphan, Some(false));
        assert_eq!(
            t[2].cause.as_ref().unwrap().kind,
            CauseKind::Call(Call::Shutdown)
        );
    }

    /// Scenario 2: close() makes an orphan; with default settings the kernel hands it to the
    /// time-wait timer right at FIN_WAIT2 entry, in softirq (here: some other task).
    #[test]
    fn close_orphan_hand_over() {
        let mut c = Correlator::new(false);
        let a = task(10, 11, "client");
        let softirq = task(0, 0, "swapper/1");
        let mut out = Vec::new();
        c.handle(rec(1, &a, enter(Call::Close, 5, 0, A, 1)), &mut out);
        c.handle(
            rec(
                2,
                &a,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 40000, 80),
            ),
            &mut out,
        );
        c.handle(rec(3, &a, exit(Call::Close)), &mut out);
        c.handle(
            rec(
                4,
                &softirq,
                tr(
                    A,
                    TcpState::FinWait1,
                    TcpState::FinWait2,
                    SOCK_DEAD,
                    40000,
                    80,
                ),
            ),
            &mut out,
        );
        c.handle(
            rec(
                5,
                &softirq,
                tr(A, TcpState::FinWait2, TcpState::Close, SOCK_DEAD, 40000, 80),
            ),
            &mut out,
        );
        let t = transitions(&out);
        assert_eq!(t[1].orphan, Some(true));
        let fw2 = t[1].cause.as_ref().unwrap();
        assert_eq!(
            (fw2.kind, fw2.task.as_ref().unwrap().pid),
            (CauseKind::Call(Call::Close), 10)
        );
        assert_eq!(t[2].fw2_exit, Some(Fw2Exit::OrphanTimewait));
        assert_eq!(
            t[2].cause.as_ref().unwrap().kind,
            CauseKind::Call(Call::Close)
        );
        assert_eq!(c.tracked_sockets(), 0, "a closed socket is forgotten");
    }

    /// Older kernels run close()'s final fput after sys_exit_close, in the same thread.
    #[test]
    fn deferred_fput_after_sys_exit() {
        let mut c = Correlator::new(false);
        let a = task(10, 11, "client");
        let mut out = Vec::new();
        c.handle(rec(1, &a, enter(Call::Close, 5, 0, A, 1)), &mut out);
        c.handle(rec(2, &a, exit(Call::Close)), &mut out);
        c.handle(
            rec(
                3,
                &a,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 40000, 80),
            ),
            &mut out,
        );
        let t = transitions(&out);
        assert_eq!(
            t[0].cause.as_ref().unwrap().kind,
            CauseKind::Call(Call::Close)
        );
    }

    /// A call that may still have an effect stops being a candidate at the thread's next call.
    #[test]
    fn stale_call_is_not_reused_for_a_reused_address() {
        let mut c = Correlator::new(false);
        let a = task(10, 11, "client");
        let mut out = Vec::new();
        // close() of a socket that was already reset: no transition follows.
        c.handle(rec(1, &a, enter(Call::Close, 5, 0, A, 1)), &mut out);
        c.handle(rec(2, &a, exit(Call::Close)), &mut out);
        c.handle(rec(3, &a, enter(Call::Close, 9, 0, 0xdead, 1)), &mut out);
        c.handle(rec(4, &a, exit(Call::Close)), &mut out);
        // A new socket at the same address later sends FIN from a context we know nothing of.
        let other = task(30, 31, "io_uring-sq");
        c.handle(
            rec(
                5,
                &other,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 40001, 80),
            ),
            &mut out,
        );
        assert_eq!(
            transitions(&out)[0].cause.as_ref().unwrap().kind,
            CauseKind::Unknown
        );
    }

    /// Scenario 4: B sits in CLOSE_WAIT and closes 300 ms later.
    #[test]
    fn close_wait_duration_and_last_ack() {
        let mut c = Correlator::new(false);
        let a = task(10, 11, "client");
        let b = task(20, 21, "srv");
        let mut out = Vec::new();
        c.handle(
            rec(
                1_000_000,
                &a,
                tr(B, TcpState::Established, TcpState::CloseWait, 0, 80, 40000),
            ),
            &mut out,
        );
        c.handle(
            rec(301_000_000, &b, enter(Call::Close, 7, 0, B, 1)),
            &mut out,
        );
        c.handle(
            rec(
                301_000_001,
                &b,
                tr(
                    B,
                    TcpState::CloseWait,
                    TcpState::LastAck,
                    SOCK_DEAD,
                    80,
                    40000,
                ),
            ),
            &mut out,
        );
        // The peer's ACK is processed inline, still in B's thread: not B's doing.
        c.handle(
            rec(
                301_000_002,
                &b,
                tr(
                    A,
                    TcpState::FinWait2,
                    TcpState::Close,
                    SOCK_DEAD | SOCK_DONE,
                    40000,
                    80,
                ),
            ),
            &mut out,
        );
        c.handle(
            rec(
                301_000_003,
                &b,
                tr(B, TcpState::LastAck, TcpState::Close, SOCK_DEAD, 80, 40000),
            ),
            &mut out,
        );
        let t = transitions(&out);
        assert_eq!(t[1].close_wait_ns, Some(300_000_001));
        let la = t[1].cause.as_ref().unwrap();
        assert_eq!(
            (la.kind, la.fd, la.task.as_ref().unwrap().tid),
            (CauseKind::Call(Call::Close), Some(7), 21)
        );
        // A's exit from FIN_WAIT2 is the peer's FIN, not B's close.
        assert_eq!(t[2].fw2_exit, Some(Fw2Exit::TimeWait));
        assert_eq!(t[2].effective_new(), TcpState::TimeWait);
        assert_eq!(t[2].cause.as_ref().unwrap().kind, CauseKind::PeerFin);
    }

    /// A socket already in CLOSE_WAIT when finwait started: its close is timed from the snapshot.
    #[test]
    fn snapshot_seed_gives_a_lower_bound() {
        let mut c = Correlator::new(false);
        c.seed(B + 1000, 1_000);
        let b = task(20, 21, "srv");
        let mut out = Vec::new();
        c.handle(
            rec(5_000_000_000, &b, enter(Call::Close, 7, 0, B, 1)),
            &mut out,
        );
        c.handle(
            rec(
                5_000_000_001,
                &b,
                tr(B, TcpState::CloseWait, TcpState::LastAck, 0, 80, 1),
            ),
            &mut out,
        );
        let t = transitions(&out);
        assert_eq!(t[0].close_wait_ns, Some(4_999_999_001));
        assert!(t[0].at_least);
        assert_eq!(t[0].cause.as_ref().unwrap().fd, Some(7));
    }

    /// Scenario 3: closing a half-closed FIN_WAIT2 socket.
    #[test]
    fn close_of_half_closed_socket_reports_half_closed_time() {
        let mut c = Correlator::new(false);
        let a = task(10, 11, "client");
        let mut out = Vec::new();
        c.handle(rec(10, &a, enter(Call::Shutdown, 5, 1, A, 1)), &mut out);
        c.handle(
            rec(
                20,
                &a,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 40000, 80),
            ),
            &mut out,
        );
        c.handle(
            rec(
                30,
                &a,
                tr(A, TcpState::FinWait1, TcpState::FinWait2, 0, 40000, 80),
            ),
            &mut out,
        );
        c.handle(rec(40, &a, exit(Call::Shutdown)), &mut out);
        c.handle(rec(1_000_020, &a, enter(Call::Close, 5, 0, A, 1)), &mut out);
        // __tcp_close sets both shutdown bits and SOCK_DEAD: flags alone would say "peer FIN".
        c.handle(
            rec(
                1_000_030,
                &a,
                tr(
                    A,
                    TcpState::FinWait2,
                    TcpState::Close,
                    SOCK_DEAD | SOCK_DONE,
                    40000,
                    80,
                ),
            ),
            &mut out,
        );
        let t = transitions(&out);
        let last = t.last().unwrap();
        assert_eq!(last.fw2_exit, Some(Fw2Exit::OrphanTimewait));
        assert_eq!(
            last.cause.as_ref().unwrap().kind,
            CauseKind::Call(Call::Close)
        );
        assert_eq!(last.half_closed_ns, Some(1_000_010));
    }

    /// Scenario 5: a close() that leaves other references sends no FIN and is reported as such.
    #[test]
    fn close_with_other_references_sends_no_fin() {
        let mut c = Correlator::new(false);
        let parent = task(10, 10, "parent");
        let child = task(12, 12, "child");
        let mut out = Vec::new();
        c.handle(rec(1, &parent, enter(Call::Close, 5, 0, A, 2)), &mut out);
        c.handle(rec(2, &parent, exit(Call::Close)), &mut out);
        c.handle(rec(3, &child, enter(Call::Close, 5, 0, A, 1)), &mut out);
        c.handle(
            rec(
                4,
                &child,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 40000, 80),
            ),
            &mut out,
        );
        let Report::CloseNoFin(n) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!((n.task.pid, n.remaining_refs), (10, 1));
        let Report::Transition(t) = &out[1] else {
            panic!()
        };
        assert_eq!(t.cause.as_ref().unwrap().task.as_ref().unwrap().pid, 12);
    }

    /// A close that leaves other references names the socket by the ends the kernel read at
    /// the call: no transition came before it to name them.
    #[test]
    fn a_close_that_ends_nothing_names_the_ends_the_kernel_read() {
        let mut c = Correlator::new(false);
        let a = task(10, 10, "parent");
        let ends = Endpoints {
            local: "127.0.0.1".parse().unwrap(),
            lport: 8080,
            remote: "127.0.0.1".parse().unwrap(),
            rport: 40000,
        };
        let Decoded::CallEnter(mut e) = enter(Call::Close, 5, 0, A, 2) else {
            unreachable!()
        };
        e.ends = Some(ends.clone());
        let mut out = Vec::new();
        c.handle(rec(1, &a, Decoded::CallEnter(e)), &mut out);
        let Report::CloseNoFin(n) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(n.ends, Some(ends));
    }

    /// 6.13+ file_ref_t: 0 means one reference.
    #[test]
    fn zero_based_reference_counts() {
        let mut c = Correlator::new(true);
        let a = task(10, 11, "client");
        let mut out = Vec::new();
        c.handle(rec(1, &a, enter(Call::Close, 5, 0, A, 0)), &mut out);
        assert!(out.is_empty());
        c.handle(rec(2, &a, enter(Call::Close, 6, 0, B, 1)), &mut out);
        assert!(matches!(out[0], Report::CloseNoFin(_)));
    }

    /// Scenario 6: process exit closes without a syscall.
    #[test]
    fn exit_is_the_cause_when_a_process_dies_holding_sockets() {
        let mut c = Correlator::new(false);
        let a = task(10, 10, "victim");
        let mut out = Vec::new();
        c.handle(
            rec(1, &a, Decoded::ProcessExit { group_dead: true }),
            &mut out,
        );
        c.handle(
            rec(
                2,
                &a,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 40000, 80),
            ),
            &mut out,
        );
        let cause = transitions(&out)[0].cause.clone().unwrap();
        assert_eq!(cause.kind, CauseKind::Exit);
        assert_eq!(cause.task, Some(a));
    }

    /// A failed close (EBADF) is no cause; and nothing is blamed on the softirq task.
    #[test]
    fn unknown_rather_than_the_softirq_pid() {
        let mut c = Correlator::new(false);
        let softirq = task(0, 0, "ksoftirqd/0");
        let mut out = Vec::new();
        c.handle(
            rec(
                1,
                &softirq,
                tr(A, TcpState::Established, TcpState::FinWait1, 0, 1, 2),
            ),
            &mut out,
        );
        c.handle(
            rec(
                2,
                &softirq,
                tr(A, TcpState::FinWait1, TcpState::FinWait2, 0, 1, 2),
            ),
            &mut out,
        );
        for t in transitions(&out) {
            let cause = t.cause.as_ref().unwrap();
            assert_eq!(cause.kind, CauseKind::Unknown);
            assert!(cause.task.is_none());
        }
    }

    /// A socket first seen in FIN_WAIT2 (the tracer started late, or a record was lost), and a
    /// call's exit that reaches userspace after the softirq transitions it caused on another CPU.
    #[test]
    fn late_start_and_records_from_other_cpus() {
        let mut c = Correlator::new(false);
        let a = task(10, 11, "client");
        let softirq = task(0, 0, "ksoftirqd/1");
        let mut out = Vec::new();
        c.handle(
            rec(
                1,
                &softirq,
                tr(A, TcpState::FinWait1, TcpState::FinWait2, SOCK_DEAD, 1, 2),
            ),
            &mut out,
        );
        c.handle(rec(2, &a, enter(Call::Close, 5, 0, B, 1)), &mut out);
        c.handle(
            rec(
                3,
                &a,
                tr(B, TcpState::Established, TcpState::FinWait1, 0, 3, 4),
            ),
            &mut out,
        );
        c.handle(
            rec(
                4,
                &softirq,
                tr(B, TcpState::FinWait1, TcpState::FinWait2, SOCK_DEAD, 3, 4),
            ),
            &mut out,
        );
        c.handle(rec(5, &a, exit(Call::Close)), &mut out);
        let t = transitions(&out);
        assert_eq!(t[0].orphan, Some(true), "the kernel's flag, not a guess");
        assert_eq!(t[0].cause.as_ref().unwrap().kind, CauseKind::Unknown);
        let fw2 = t[2].cause.as_ref().unwrap();
        assert_eq!(
            (fw2.kind, fw2.task.as_ref().unwrap().tid),
            (CauseKind::Call(Call::Close), 11)
        );
    }

    #[test]
    fn bounded_tables_count_evictions() {
        let mut c = Correlator::with_capacity(false, 2, 2);
        let a = task(10, 11, "x");
        let mut out = Vec::new();
        for sock in 1..=5u64 {
            c.handle(
                rec(
                    sock,
                    &a,
                    tr(sock, TcpState::Established, TcpState::CloseWait, 0, 1, 2),
                ),
                &mut out,
            );
        }
        assert_eq!(c.tracked_sockets(), 2);
        assert_eq!(c.stats().sockets_evicted, 3);
    }
}
