//! The attribution state machine: kernel records in, answers out.
//!
//! Rules (see shared/TCP-CLOSE.md):
//! - Only a socket's own close()/shutdown() (or its owner's exit) moves it into FIN_WAIT1 or
//!   LAST_ACK. Those transitions are matched to the call by socket identity: the call records the
//!   socket behind its fd, so a peer's transition that happens inline on loopback (inside another
//!   process's call) is never blamed on that call.
//! - A close's final fput may run after sys_exit (task work on older kernels), but always in the
//!   calling thread before its next syscall: a call stays pending for its thread until then.
//! - Softirq transitions (FIN_WAIT2, CLOSE_WAIT, TIME_WAIT, LAST_ACK -> CLOSE) inherit or are the
//!   peer's doing; the pid of whatever ran in softirq is never used.
use std::num::NonZeroUsize;

use finwait_common::{Call, tcp_state as st};
use foldhash::fast::RandomState as FastHash;
use lru::LruCache;

use crate::event::{Decoded, Endpoints, KernelOwner, Record, Task};

/// `enum sock_flags` bits (stable since long before any kernel we support).
const SOCK_DEAD: u64 = 1 << 0;
const SOCK_DONE: u64 = 1 << 1;

/// What made a transition happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CauseKind {
    Call(Call),
    /// The owning process exited (or was killed) holding the socket.
    Exit,
    PeerFin,
    PeerRst,
    /// A kernel timer (the orphan FIN_WAIT2 timeout).
    Timer,
    Unknown,
}

impl CauseKind {
    pub fn name(self) -> &'static str {
        match self {
            CauseKind::Call(Call::Shutdown) => "shutdown",
            CauseKind::Call(Call::Close) => "close",
            CauseKind::Call(Call::CloseRange) => "close_range",
            CauseKind::Call(Call::Dup2) => "dup2",
            CauseKind::Call(Call::Dup3) => "dup3",
            CauseKind::Exit => "exit",
            CauseKind::PeerFin => "peer_fin",
            CauseKind::PeerRst => "peer_rst",
            CauseKind::Timer => "timer",
            CauseKind::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    pub kind: CauseKind,
    /// shutdown's `how`.
    pub how: Option<i32>,
    /// The task that made the call (None for peer and timer causes).
    pub task: Option<Task>,
    pub fd: Option<i32>,
    /// Precise mode: the kernel's own tcp_close/tcp_shutdown on this socket named the task
    /// (rather than matching a syscall to the transition).
    pub exact: bool,
}

impl Cause {
    pub(crate) fn bare(kind: CauseKind) -> Self {
        Self {
            kind,
            how: None,
            task: None,
            fd: None,
            exact: false,
        }
    }
    fn exit(task: &Task) -> Self {
        Self {
            kind: CauseKind::Exit,
            how: None,
            task: Some(task.clone()),
            fd: None,
            exact: false,
        }
    }
    fn unknown() -> Self {
        Self::bare(CauseKind::Unknown)
    }
    pub fn is_close_like(&self) -> bool {
        !matches!(self.kind, CauseKind::Call(Call::Shutdown))
    }
}

/// A process holding the socket's file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: crate::event::Comm,
    pub fd: i32,
    /// The cgroup (v2 id) the holder was in when it obtained the socket, when the kernel said.
    pub cgroup_id: Option<u64>,
}

/// How a FIN_WAIT2 socket left that state: the tracepoint only ever says CLOSE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fw2Exit {
    /// The peer's FIN arrived: the socket is now in TIME_WAIT.
    TimeWait,
    /// The socket became a time-wait mini-socket in substate FIN_WAIT2: `ss` still shows
    /// FIN-WAIT-2 (ino 0) until the kernel frees it.
    OrphanTimewait,
    Reset,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransitionReport {
    pub ts_ns: u64,
    pub sock: u64,
    pub ends: Endpoints,
    pub old: u8,
    pub new: u8,
    pub cause: Option<Cause>,
    /// FIN_WAIT2 entries and exits: true once no process holds the socket any more.
    pub orphan: Option<bool>,
    /// CLOSE_WAIT entries: who must close it.
    pub owner: Option<Owner>,
    pub fw2_exit: Option<Fw2Exit>,
    pub since_fin_ns: Option<u64>,
    pub half_closed_ns: Option<u64>,
    pub close_wait_ns: Option<u64>,
    /// The durations count from the snapshot taken at start: the real ones are longer.
    pub at_least: bool,
    pub inode: u64,
    /// `tcp_fin_timeout` of the socket's network namespace, filled in by the tracer.
    pub fin_timeout_s: Option<u64>,
    /// The task whose call sent our FIN (its namespace is the socket's).
    pub fin_by: Option<Task>,
    /// The kernel's ownership record of the socket at the transition (`resolve` turns it into
    /// `owner`).
    pub recorded_owner: Option<KernelOwner>,
}

impl TransitionReport {
    /// A transition with nothing attributed yet.
    pub fn new(ts_ns: u64, sock: u64, ends: Endpoints, old: u8, new: u8, inode: u64) -> Self {
        Self {
            ts_ns,
            sock,
            ends,
            old,
            new,
            cause: None,
            orphan: None,
            owner: None,
            fw2_exit: None,
            since_fin_ns: None,
            half_closed_ns: None,
            close_wait_ns: None,
            at_least: false,
            inode,
            fin_timeout_s: None,
            fin_by: None,
            recorded_owner: None,
        }
    }

    /// The state as an operator sees it: the tracepoint says CLOSE where the socket went on to
    /// TIME_WAIT.
    pub fn effective_new(&self) -> u8 {
        match self.fw2_exit {
            Some(Fw2Exit::TimeWait) => st::TIME_WAIT,
            _ => self.new,
        }
    }
}

/// close() on an fd whose file has other references: no FIN, no state change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseNoFinReport {
    pub ts_ns: u64,
    pub sock: u64,
    pub call: Call,
    pub task: Task,
    pub fd: i32,
    /// References left after this close.
    pub remaining_refs: u64,
    /// Who still holds it (filled in from /proc by `resolve`).
    pub holders: Vec<Owner>,
    pub inode: u64,
    pub ends: Option<Endpoints>,
    pub state: Option<u8>,
    /// The kernel's ownership record as this close found it: another holder, or this caller
    /// (then marked stale).
    pub recorded_owner: Option<KernelOwner>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    Transition(TransitionReport),
    CloseNoFin(CloseNoFinReport),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub records: u64,
    pub transitions: u64,
    pub calls: u64,
    /// Precise mode: tcp_close/tcp_shutdown records.
    pub kernel_calls: u64,
    pub sockets_evicted: u64,
    pub threads_evicted: u64,
}

#[derive(Clone, Debug)]
struct PendingCall {
    call: Call,
    how: Option<i32>,
    task: Task,
    fd: i32,
}

impl PendingCall {
    fn cause(&self) -> Cause {
        Cause {
            kind: CauseKind::Call(self.call),
            how: self.how,
            task: Some(self.task.clone()),
            // -1: the call covered a range of fds and the kernel could not say which one.
            fd: (self.fd >= 0).then_some(self.fd),
            exact: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct SockState {
    state: Option<u8>,
    ends: Option<Endpoints>,
    /// A call on this socket whose effect may still be on its way (see module docs).
    pending: Option<PendingCall>,
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

pub struct Correlator {
    // Keys are kernel addresses and thread ids, which no process chooses: a fast hasher.
    socks: LruCache<u64, SockState, FastHash>,
    threads: LruCache<u32, ThreadState, FastHash>,
    /// Sockets that were already in CLOSE_WAIT or half-closed FIN_WAIT2 when finwait started:
    /// inode -> CLOSE_WAIT or FIN_WAIT2 since (at least) this time.
    seeds: std::collections::HashMap<u64, u64>,
    /// file_ref_t (6.13+) counts from zero.
    refs_zero_based: bool,
    stats: Stats,
}

const MAX_SOCKETS: usize = 262_144;
const MAX_THREADS: usize = 65_536;

impl Correlator {
    pub fn new(refs_zero_based: bool) -> Self {
        Self::with_capacity(refs_zero_based, MAX_SOCKETS, MAX_THREADS)
    }

    pub fn with_capacity(refs_zero_based: bool, socks: usize, threads: usize) -> Self {
        Self {
            socks: LruCache::with_hasher(
                NonZeroUsize::new(socks.max(1)).unwrap(),
                FastHash::default(),
            ),
            threads: LruCache::with_hasher(
                NonZeroUsize::new(threads.max(1)).unwrap(),
                FastHash::default(),
            ),
            seeds: Default::default(),
            refs_zero_based,
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// A socket found by the start-up snapshot in CLOSE_WAIT or half-closed FIN_WAIT2, keyed by
    /// inode (what sock_diag and the kernel hooks have in common).
    pub fn seed(&mut self, inode: u64, since_ns: u64) {
        if inode != 0 {
            self.seeds.insert(inode, since_ns);
        }
    }

    pub fn tracked_sockets(&self) -> usize {
        self.socks.len()
    }

    fn sock(&mut self, sock: u64) -> &mut SockState {
        if !self.socks.contains(&sock)
            && let Some((_, _)) = self.socks.push(sock, SockState::default())
        {
            self.stats.sockets_evicted += 1;
        }
        self.socks.get_mut(&sock).unwrap()
    }

    fn thread(&mut self, tid: u32) -> &mut ThreadState {
        if !self.threads.contains(&tid)
            && let Some((_, _)) = self.threads.push(tid, ThreadState::default())
        {
            self.stats.threads_evicted += 1;
        }
        self.threads.get_mut(&tid).unwrap()
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

    pub fn handle(&mut self, rec: Record, out: &mut Vec<Report>) {
        self.stats.records += 1;
        match rec.what {
            Decoded::Transition { .. } => self.stats.transitions += 1,
            Decoded::CallEnter { .. } => self.stats.calls += 1,
            _ => {}
        }
        let tid = rec.task.tid;
        match rec.what {
            Decoded::CallEnter {
                call,
                fd,
                arg,
                sock,
                inode,
                file_refs,
                owner,
            } => {
                let how = (call == Call::Shutdown).then_some(arg as i32);
                // close_range sends one record for the range, then one per socket it found.
                let per_fd = call == Call::CloseRange && sock.is_some();
                let fd = if call == Call::CloseRange && sock.is_none() {
                    -1
                } else {
                    fd
                };
                let pending = PendingCall {
                    call,
                    how,
                    task: rec.task.clone(),
                    fd,
                };
                if !per_fd {
                    self.retire_after(tid);
                    self.thread(tid).current = Some((pending.clone(), sock));
                }
                let Some(sock) = sock else { return };
                // close(), dup2() over the fd, close_range(): the socket only ends when this
                // drops the file's last reference.
                let remaining = file_refs.map(|r| {
                    if self.refs_zero_based {
                        r
                    } else {
                        r.saturating_sub(1)
                    }
                });
                if call != Call::Shutdown && remaining.is_some_and(|r| r > 0) {
                    let s = self.sock(sock);
                    out.push(Report::CloseNoFin(CloseNoFinReport {
                        ts_ns: rec.ts_ns,
                        sock,
                        call,
                        task: rec.task,
                        fd,
                        remaining_refs: remaining.unwrap_or(0),
                        holders: Vec::new(),
                        inode,
                        ends: s.ends.clone(),
                        state: s.state,
                        recorded_owner: owner,
                    }));
                    if let Some(t) = self.threads.get_mut(&tid).filter(|_| !per_fd) {
                        t.current = None;
                    }
                    return;
                }
                self.sock(sock).pending = Some(pending);
            }
            Decoded::CallExit { ret, .. } => {
                let t = self.thread(tid);
                let Some((call, sock)) = t.current.take() else {
                    return;
                };
                if ret < 0 {
                    // The call failed: it changed nothing.
                    if let Some(sock) = sock
                        && let Some(s) = self.socks.peek_mut(&sock)
                    {
                        s.pending = None;
                    }
                    return;
                }
                t.after = Some((call, sock));
            }
            Decoded::ProcessExit { .. } => {
                self.retire_after(tid);
                self.thread(tid).exiting = true;
            }
            Decoded::ReceiveReset { sock } => {
                if let Some(s) = self.socks.peek_mut(&sock) {
                    s.reset_received = true;
                } else {
                    self.sock(sock).reset_received = true;
                }
            }
            Decoded::SendReset { sock } => self.sock(sock).reset_sent = true,
            // Ownership news is the resolver's (the tracer hands it over directly).
            Decoded::Obtained { .. } => {}
            Decoded::KernelCall { call, how, sock } => {
                self.stats.kernel_calls += 1;
                let call = PendingCall {
                    call,
                    how,
                    task: rec.task,
                    fd: -1,
                };
                self.thread(tid).kernel_call = Some((sock, call));
            }
            Decoded::Transition {
                sock,
                old,
                new,
                ends,
                sk_flags,
                inode,
                owner,
            } => {
                let mut r =
                    self.transition(rec.ts_ns, &rec.task, sock, old, new, ends, sk_flags, inode);
                r.recorded_owner = owner;
                out.push(Report::Transition(r));
            }
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

    /// The call by this thread that may have caused a local transition of `sock`.
    fn local_cause(&mut self, sock: u64, task: &Task) -> Cause {
        let tid = task.tid;
        let kernel = self
            .threads
            .peek_mut(&tid)
            .and_then(|t| t.kernel_call.take_if(|(s, _)| *s == sock))
            .map(|(_, k)| k);
        if let Some(k) = kernel {
            // The kernel itself says this task ended this socket. The syscall that led there, if
            // one was seen, names the fd; otherwise the path had none we follow (io_uring, the
            // last reference of a file shared with another process, ...).
            let syscall = self
                .socks
                .peek_mut(&sock)
                .and_then(|s| s.pending.take())
                .filter(|p| {
                    p.task.tid == tid && (p.call == Call::Shutdown) == (k.call == Call::Shutdown)
                });
            let exiting = self.threads.peek(&tid).is_some_and(|t| t.exiting);
            let mut cause = match syscall {
                Some(p) => p.cause(),
                None if exiting && k.call == Call::Close => Cause::exit(task),
                None => k.cause(),
            };
            cause.exact = true;
            return cause;
        }
        if let Some(p) = self.socks.peek_mut(&sock).and_then(|s| s.pending.take()) {
            if p.task.tid == tid {
                return p.cause();
            }
            // The socket's file was last released elsewhere (io_uring, another path): not ours
            // to guess.
            return Cause::unknown();
        }
        if let Some(t) = self.threads.peek(&tid) {
            // Without fd -> socket resolution, a call whose socket is unknown is the best lead:
            // FIN_WAIT1 and LAST_ACK are only ever entered by the socket's own close/shutdown.
            for (p, resolved) in [&t.current, &t.after].into_iter().flatten() {
                if resolved.is_none() {
                    return p.cause();
                }
            }
            if t.exiting {
                // Exit closes in the exiting task's own context.
                return Cause::exit(task);
            }
        }
        Cause::unknown()
    }

    #[allow(clippy::too_many_arguments)]
    fn transition(
        &mut self,
        ts: u64,
        task: &Task,
        sock: u64,
        old: u8,
        new: u8,
        ends: Endpoints,
        sk_flags: Option<u64>,
        inode: u64,
    ) -> TransitionReport {
        let tid = task.tid;
        let exiting = self.threads.peek(&tid).is_some_and(|t| t.exiting);
        let mut r = TransitionReport::new(ts, sock, ends.clone(), old, new, inode);
        let dead = sk_flags.map(|f| f & SOCK_DEAD != 0);
        let peer_fin_seen = sk_flags.is_some_and(|f| f & SOCK_DONE != 0);
        // Leaving a state whose start finwait never saw: if the start-up snapshot found the
        // socket there, time it from the snapshot, as a lower bound.
        let unknown_since = match (old, self.socks.peek(&sock)) {
            (st::CLOSE_WAIT, s) => s.is_none_or(|s| s.close_wait_since_ns.is_none()),
            (st::FIN_WAIT2, s) => s.is_none_or(|s| s.half_closed_since_ns.is_none() && !s.orphan),
            _ => false,
        };
        let seed = if unknown_since {
            self.seeds.remove(&inode)
        } else {
            None
        };
        {
            let s = self.sock(sock);
            s.ends = Some(ends);
            s.state = Some(new);
            if let Some(since) = seed {
                match old {
                    st::CLOSE_WAIT => s.close_wait_since_ns = Some(since),
                    _ => s.half_closed_since_ns = Some(since),
                }
                s.since_snapshot = true;
            }
        }
        r.at_least = self.socks.peek(&sock).is_some_and(|s| s.since_snapshot);

        match (old, new) {
            // Our FIN: only a local close/shutdown (or exit) does this.
            (_, st::FIN_WAIT1) | (st::CLOSE_WAIT, st::LAST_ACK) => {
                let cause = self.local_cause(sock, task);
                let s = self.sock(sock);
                if new == st::LAST_ACK {
                    r.close_wait_ns = s.close_wait_since_ns.map(|t| ts.saturating_sub(t));
                }
                s.fin_cause = Some(cause.clone());
                s.fin_sent_ns = Some(ts);
                if cause.kind == CauseKind::Call(Call::Shutdown) {
                    s.half_closed_since_ns = Some(ts);
                }
                r.cause = Some(cause);
            }
            (st::FIN_WAIT1, st::FIN_WAIT2) => {
                let s = self.sock(sock);
                let cause = s.fin_cause.clone().unwrap_or_else(Cause::unknown);
                // The kernel's own flag says whether a process still holds the socket.
                let orphan = dead.unwrap_or_else(|| cause.is_close_like());
                s.orphan = orphan;
                s.fw2_since_ns = Some(ts);
                s.fw2_entered_by_tid = tid;
                r.orphan = Some(orphan);
                r.since_fin_ns = s.fin_sent_ns.map(|t| ts.saturating_sub(t));
                r.cause = Some(cause);
            }
            (st::ESTABLISHED, st::CLOSE_WAIT) => {
                // The owner is found from the inode in /proc, off this path (see `resolve`).
                self.sock(sock).close_wait_since_ns = Some(ts);
                r.cause = Some(Cause::bare(CauseKind::PeerFin));
            }
            (st::FIN_WAIT2, st::CLOSE) => {
                let pending_close = self
                    .socks
                    .peek(&sock)
                    .and_then(|s| s.pending.as_ref())
                    .is_some_and(|p| p.task.tid == tid && p.call != Call::Shutdown)
                    || self.kernel_call_by(sock, tid, true);
                let in_unresolved_close = self.threads.peek(&tid).is_some_and(|t| {
                    [&t.current, &t.after]
                        .into_iter()
                        .flatten()
                        .any(|(p, s)| s.is_none() && p.call != Call::Shutdown)
                });
                let s = self.socks.peek(&sock).cloned().unwrap_or_default();
                r.since_fin_ns = s.fin_sent_ns.map(|t| ts.saturating_sub(t));
                let half_closed =
                    |s: &SockState| s.half_closed_since_ns.map(|t| ts.saturating_sub(t));
                if s.reset_received {
                    r.fw2_exit = Some(Fw2Exit::Reset);
                    r.cause = Some(Cause::bare(CauseKind::PeerRst));
                } else if pending_close || (!s.orphan && (in_unresolved_close || exiting)) {
                    // The owner closed a half-closed socket: it becomes an orphan and, with the
                    // default tcp_fin_timeout, a time-wait mini-socket in substate FIN_WAIT2.
                    let cause = if pending_close || in_unresolved_close {
                        self.local_cause(sock, task)
                    } else {
                        Cause::exit(task)
                    };
                    r.fw2_exit = Some(if s.reset_sent {
                        Fw2Exit::Reset
                    } else {
                        Fw2Exit::OrphanTimewait
                    });
                    r.orphan = Some(true);
                    r.half_closed_ns = half_closed(&s);
                    r.cause = Some(cause);
                } else if peer_fin_seen {
                    r.fw2_exit = Some(Fw2Exit::TimeWait);
                    r.orphan = Some(s.orphan);
                    r.half_closed_ns = if s.orphan { None } else { half_closed(&s) };
                    r.cause = Some(Cause::bare(CauseKind::PeerFin));
                } else if s.orphan {
                    // Handed to the time-wait timer right at FIN_WAIT2 entry (default settings),
                    // or later by the orphan timer (tcp_fin_timeout above 60 s).
                    let immediate = s.fw2_entered_by_tid == tid
                        && s.fw2_since_ns
                            .is_some_and(|t| ts.saturating_sub(t) < 50_000_000);
                    r.fw2_exit = Some(if s.reset_sent {
                        Fw2Exit::Reset
                    } else {
                        Fw2Exit::OrphanTimewait
                    });
                    r.orphan = Some(true);
                    r.cause = Some(if immediate {
                        s.fin_cause.clone().unwrap_or_else(Cause::unknown)
                    } else {
                        Cause::bare(CauseKind::Timer)
                    });
                } else {
                    r.fw2_exit = Some(Fw2Exit::Other);
                    r.cause = Some(Cause::unknown());
                }
            }
            (st::LAST_ACK, st::CLOSE) | (st::CLOSING, st::CLOSE) | (st::FIN_WAIT1, st::CLOSING) => {
                let s = self.socks.peek(&sock).cloned().unwrap_or_default();
                r.since_fin_ns = s.fin_sent_ns.map(|t| ts.saturating_sub(t));
                r.cause = Some(if s.reset_received {
                    Cause::bare(CauseKind::PeerRst)
                } else {
                    s.fin_cause.clone().unwrap_or_else(Cause::unknown)
                });
                if (old, new) == (st::CLOSING, st::CLOSE) {
                    r.fw2_exit = Some(Fw2Exit::TimeWait);
                }
            }
            (_, st::CLOSE) => {
                // Straight to CLOSE: a reset (SO_LINGER 0, unread data at close, the peer's RST)
                // or an orphan that timed out.
                let has_pending = self.socks.peek(&sock).is_some_and(|s| s.pending.is_some())
                    || self.kernel_call_by(sock, tid, false);
                let s = self.socks.peek(&sock).cloned().unwrap_or_default();
                r.close_wait_ns = s.close_wait_since_ns.map(|t| ts.saturating_sub(t));
                r.since_fin_ns = s.fin_sent_ns.map(|t| ts.saturating_sub(t));
                r.cause = Some(if has_pending {
                    self.local_cause(sock, task)
                } else if s.reset_received {
                    Cause::bare(CauseKind::PeerRst)
                } else if matches!(old, st::ESTABLISHED | st::CLOSE_WAIT | st::FIN_WAIT1) {
                    let c = self.local_cause(sock, task);
                    if c.kind == CauseKind::Unknown && old == st::FIN_WAIT1 && s.orphan {
                        Cause::bare(CauseKind::Timer)
                    } else {
                        c
                    }
                } else {
                    Cause::unknown()
                });
            }
            _ => {}
        }
        r.fin_by = self
            .socks
            .peek(&sock)
            .and_then(|s| s.fin_cause.as_ref())
            .and_then(|c| c.task.clone());
        if new == st::CLOSE {
            // The socket is gone; its address may be reused by a new one.
            self.socks.pop(&sock);
        }
        r
    }
}

/// Unit tests drive the state machine with the exact record sequences the kernel produces on
/// loopback, including the traps from TCP-CLOSE.md.
#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn task(pid: u32, tid: u32, comm: &str) -> Task {
        Task {
            pid,
            tid,
            comm: comm.into(),
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
        Decoded::CallEnter {
            call,
            fd,
            arg,
            sock: Some(sock),
            inode: sock + 1000,
            file_refs: Some(refs),
            owner: None,
        }
    }
    fn exit(call: Call) -> Decoded {
        Decoded::CallExit { call, ret: 0 }
    }
    fn tr(sock: u64, old: u8, new: u8, flags: u64, lport: u16, rport: u16) -> Decoded {
        Decoded::Transition {
            sock,
            old,
            new,
            ends: ends(lport, rport),
            sk_flags: Some(flags),
            inode: sock + 1000,
            owner: None,
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
            rec(4, &a, tr(A, st::ESTABLISHED, st::FIN_WAIT1, 0, 40000, 80)),
            &mut out,
        );
        let cause = transitions(&out)[0].cause.clone().unwrap();
        assert_eq!(
            (cause.kind, cause.fd, cause.exact),
            (CauseKind::Call(Call::Close), Some(5), true)
        );
        assert_eq!(cause.task.unwrap().tid, 11);
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
                rec(4, &a, tr(A, st::ESTABLISHED, st::FIN_WAIT1, 0, 40000, 80)),
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
            rec(3, &a, tr(A, st::ESTABLISHED, st::FIN_WAIT1, 0, 40000, 80)),
            &mut out,
        );
        c.handle(rec(4, &a, exit(Call::Shutdown)), &mut out);
        c.handle(
            rec(5, &a, tr(A, st::FIN_WAIT1, st::FIN_WAIT2, 0, 40000, 80)),
            &mut out,
        );
        c.handle(
            rec(6, &a, Decoded::ProcessExit { group_dead: true }),
            &mut out,
        );
        c.handle(rec(7, &a, kernel(Call::Close, A, None)), &mut out);
        c.handle(
            rec(8, &a, tr(A, st::FIN_WAIT2, st::CLOSE, SOCK_DEAD, 40000, 80)),
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
            rec(3, &a, tr(A, st::ESTABLISHED, st::FIN_WAIT1, 0, 40000, 80)),
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
            rec(3, &a, tr(B, st::ESTABLISHED, st::FIN_WAIT1, 0, 40001, 80)),
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
            rec(2, &a, tr(A, st::ESTABLISHED, st::FIN_WAIT1, 0, 40000, 80)),
            &mut out,
        );
        c.handle(
            rec(3, &a, tr(B, st::ESTABLISHED, st::CLOSE_WAIT, 0, 80, 40000)),
            &mut out,
        );
        c.handle(
            rec(4, &a, tr(A, st::FIN_WAIT1, st::FIN_WAIT2, 0, 40000, 80)),
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
            rec(2, &a, tr(A, st::ESTABLISHED, st::FIN_WAIT1, 0, 40000, 80)),
            &mut out,
        );
        c.handle(rec(3, &a, exit(Call::Close)), &mut out);
        c.handle(
            rec(
                4,
                &softirq,
                tr(A, st::FIN_WAIT1, st::FIN_WAIT2, SOCK_DEAD, 40000, 80),
            ),
            &mut out,
        );
        c.handle(
            rec(
                5,
                &softirq,
                tr(A, st::FIN_WAIT2, st::CLOSE, SOCK_DEAD, 40000, 80),
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
            rec(3, &a, tr(A, st::ESTABLISHED, st::FIN_WAIT1, 0, 40000, 80)),
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
                tr(A, st::ESTABLISHED, st::FIN_WAIT1, 0, 40001, 80),
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
                tr(B, st::ESTABLISHED, st::CLOSE_WAIT, 0, 80, 40000),
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
                tr(B, st::CLOSE_WAIT, st::LAST_ACK, SOCK_DEAD, 80, 40000),
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
                    st::FIN_WAIT2,
                    st::CLOSE,
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
                tr(B, st::LAST_ACK, st::CLOSE, SOCK_DEAD, 80, 40000),
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
        assert_eq!(t[2].effective_new(), st::TIME_WAIT);
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
                tr(B, st::CLOSE_WAIT, st::LAST_ACK, 0, 80, 1),
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
            rec(20, &a, tr(A, st::ESTABLISHED, st::FIN_WAIT1, 0, 40000, 80)),
            &mut out,
        );
        c.handle(
            rec(30, &a, tr(A, st::FIN_WAIT1, st::FIN_WAIT2, 0, 40000, 80)),
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
                    st::FIN_WAIT2,
                    st::CLOSE,
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
                tr(A, st::ESTABLISHED, st::FIN_WAIT1, 0, 40000, 80),
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
            rec(2, &a, tr(A, st::ESTABLISHED, st::FIN_WAIT1, 0, 40000, 80)),
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
            rec(1, &softirq, tr(A, st::ESTABLISHED, st::FIN_WAIT1, 0, 1, 2)),
            &mut out,
        );
        c.handle(
            rec(2, &softirq, tr(A, st::FIN_WAIT1, st::FIN_WAIT2, 0, 1, 2)),
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
                tr(A, st::FIN_WAIT1, st::FIN_WAIT2, SOCK_DEAD, 1, 2),
            ),
            &mut out,
        );
        c.handle(rec(2, &a, enter(Call::Close, 5, 0, B, 1)), &mut out);
        c.handle(
            rec(3, &a, tr(B, st::ESTABLISHED, st::FIN_WAIT1, 0, 3, 4)),
            &mut out,
        );
        c.handle(
            rec(
                4,
                &softirq,
                tr(B, st::FIN_WAIT1, st::FIN_WAIT2, SOCK_DEAD, 3, 4),
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
                rec(sock, &a, tr(sock, st::ESTABLISHED, st::CLOSE_WAIT, 0, 1, 2)),
                &mut out,
            );
        }
        assert_eq!(c.tracked_sockets(), 2);
        assert_eq!(c.stats().sockets_evicted, 3);
    }
}
