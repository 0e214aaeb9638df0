//! The domain, as every stage sees it: tasks, connections, causes, owners, and the reports the
//! tracer and the snapshot produce. No I/O here; whose job a socket is lives in [`verdict`].
use std::{fmt, net::IpAddr, sync::Arc};

use finwait_common::{Call, TcpState};

pub(crate) mod container;
pub(crate) mod diagnosis;
pub(crate) mod escape;
pub(crate) mod ledger;
pub(crate) mod summary;
pub(crate) mod verdict;

pub(crate) use container::Container;
pub(crate) use verdict::{Holder, Verdict};

/// A process name, escaped for terminals; shared, so copies cost nothing.
pub(crate) type Comm = Arc<str>;

/// A process context: who was running when the kernel recorded the event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Task {
    pub(crate) pid: u32,
    pub(crate) tid: u32,
    /// The process's name (its main thread's: see `host::names`).
    pub(crate) comm: Comm,
    /// The calling thread's own name, when it is not the process's (a thread names itself).
    pub(crate) thread_comm: Option<Comm>,
    /// The task's cgroup v2 id when it made the call (0: not recorded).
    pub(crate) cgroup_id: u64,
    /// What that cgroup says (enriched for reports that are shown).
    pub(crate) container: Option<Arc<Container>>,
}

/// A connection's two ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoints {
    pub(crate) local: IpAddr,
    pub(crate) lport: u16,
    pub(crate) remote: IpAddr,
    pub(crate) rport: u16,
}

impl Endpoints {
    pub(crate) fn is_ipv6(&self) -> bool {
        self.local.is_ipv6()
    }

    pub(crate) fn key(&self) -> EndsKey {
        ends_key(self.local, self.lport, self.remote, self.rport)
    }
}

/// A connection as the reports and sock_diag both name it (v4-mapped addresses as IPv4): the
/// key of every table by ends.
pub(crate) type EndsKey = (IpAddr, u16, IpAddr, u16);

pub(crate) fn ends_key(local: IpAddr, lport: u16, remote: IpAddr, rport: u16) -> EndsKey {
    (local.to_canonical(), lport, remote.to_canonical(), rport)
}

/// The kernel's record of who holds a socket: the task that last obtained an fd to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KernelOwner {
    pub(crate) pid: u32,
    pub(crate) fd: i32,
    pub(crate) comm: Comm,
    pub(crate) cgroup_id: u64,
    /// That task closed its fd while others still referenced the file: the holder is elsewhere.
    pub(crate) stale: bool,
    /// When the record was made (CLOCK_MONOTONIC ns).
    pub(crate) since_ns: u64,
    /// The task that obtained the socket was followed (`--pid`, `--comm`) then, or a followed
    /// task made a call on it since.
    pub(crate) followed: bool,
    /// Recorded by the process's main thread: `comm` is the process's own name then.
    pub(crate) main_thread: bool,
}

/// A process holding the socket's file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) pid: u32,
    pub(crate) comm: Comm,
    pub(crate) fd: i32,
    /// The cgroup (v2 id) the holder was in when it obtained the socket, when the kernel said.
    pub(crate) cgroup_id: Option<u64>,
    /// What the holder's cgroup says (enriched for what is shown).
    pub(crate) container: Option<Arc<Container>>,
}

impl From<&KernelOwner> for Owner {
    fn from(k: &KernelOwner) -> Self {
        Owner {
            pid: k.pid,
            comm: k.comm.clone(),
            fd: k.fd,
            cgroup_id: Some(k.cgroup_id),
            container: None,
        }
    }
}

/// A duration in words: `250 ms` under a second; from a second on `42.3 s` ([`Dur::tenths`],
/// the reports' times) or `42 s` ([`Dur::whole`], a time left).
pub(crate) struct Dur {
    ns: u64,
    tenths: bool,
}

impl Dur {
    pub(crate) fn tenths(ns: u64) -> Self {
        Self { ns, tenths: true }
    }

    pub(crate) fn whole(d: std::time::Duration) -> Self {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Self { ns, tenths: false }
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tenths {
            let ms = self.ns as f64 / 1e6;
            return if ms >= 1000.0 {
                write!(f, "{:.1} s", ms / 1000.0)
            } else {
                write!(f, "{ms:.0} ms")
            };
        }
        match self.ns {
            ns if ns >= 1_000_000_000 => write!(f, "{} s", ns / 1_000_000_000),
            ns => write!(f, "{} ms", ns / 1_000_000),
        }
    }
}

/// shutdown()'s `how`.
pub(crate) fn how_name(how: i32) -> &'static str {
    match how {
        0 => "SHUT_RD",
        1 => "SHUT_WR",
        2 => "SHUT_RDWR",
        _ => "SHUT_?",
    }
}

/// What made a transition happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CauseKind {
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
    /// The JSON contract's name (`call` in a cause).
    pub(crate) fn name(self) -> &'static str {
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

/// The call as a person writes it: `shutdown(SHUT_WR)`, `close()`, `process exit`, `peer_fin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CallName(pub(crate) CauseKind, pub(crate) Option<i32>);

impl fmt::Display for CallName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CallName(CauseKind::Call(Call::Shutdown), Some(how)) => {
                write!(f, "shutdown({})", how_name(how))
            }
            CallName(k @ CauseKind::Call(_), _) => write!(f, "{}()", k.name()),
            CallName(CauseKind::Exit, _) => f.write_str("process exit"),
            CallName(k, _) => f.write_str(k.name()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cause {
    pub(crate) kind: CauseKind,
    /// shutdown's `how`.
    pub(crate) how: Option<i32>,
    /// The task that made the call (None for peer and timer causes).
    pub(crate) task: Option<Task>,
    pub(crate) fd: Option<i32>,
    /// Precise mode: the kernel's own tcp_close/tcp_shutdown on this socket named the task
    /// (rather than matching a syscall to the transition).
    pub(crate) exact: bool,
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

    pub(crate) fn exit(task: &Task) -> Self {
        Self {
            task: Some(task.clone()),
            ..Self::bare(CauseKind::Exit)
        }
    }

    pub(crate) fn unknown() -> Self {
        Self::bare(CauseKind::Unknown)
    }

    /// Anything but shutdown() gives the socket up.
    pub(crate) fn is_close_like(&self) -> bool {
        !matches!(self.kind, CauseKind::Call(Call::Shutdown))
    }

    pub(crate) fn call_name(&self) -> CallName {
        CallName(self.kind, self.how)
    }
}

/// How a FIN_WAIT2 socket left that state: the tracepoint only ever says CLOSE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fw2Exit {
    /// The peer's FIN arrived: the socket is now in TIME_WAIT.
    TimeWait,
    /// The socket became a time-wait mini-socket in substate FIN_WAIT2: `ss` still shows
    /// FIN-WAIT-2 (ino 0) until the kernel frees it.
    OrphanTimewait,
    Reset,
    Other,
}

/// What a state change means on the close path, classified once from (old, new) when its report
/// is made. Every stage matches on this, without a catch-all, so a new kind is a compile error
/// wherever it is not handled. The rules are in docs/close-path.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TransitionKind {
    /// Into FIN_WAIT1: our FIN, sent first, by a local call (or exit).
    FinSent,
    /// CLOSE_WAIT -> LAST_ACK: the owner closed after the peer's FIN; our FIN is the second.
    CloseWaitClosed,
    /// FIN_WAIT1 -> FIN_WAIT2: the peer acknowledged our FIN; half-closed or orphaned.
    FinWait2Entered,
    /// ESTABLISHED -> CLOSE_WAIT: the peer's FIN; the owner must close.
    PeerFin,
    /// FIN_WAIT2 -> CLOSE: the peer's FIN (TIME_WAIT), a reset, the owner closing a half-closed
    /// socket, or an orphan handed to the time-wait timer: the tracepoint says CLOSE for all.
    FinWait2Left,
    /// LAST_ACK -> CLOSE: the peer acknowledged our FIN; the socket is freed.
    LastAckDone,
    /// FIN_WAIT1 -> CLOSING: both FINs crossed.
    FinsCrossed,
    /// CLOSING -> CLOSE: after crossed FINs, into TIME_WAIT.
    ClosingDone,
    /// Any other state straight to CLOSE: a reset, an abort, or an orphan that timed out.
    Aborted,
    /// Any other change (none of the close path's rules is about it).
    Other,
}

impl TransitionKind {
    pub(crate) fn of(old: TcpState, new: TcpState) -> Self {
        use TcpState as S;
        match (old, new) {
            (_, S::FinWait1) => Self::FinSent,
            (S::CloseWait, S::LastAck) => Self::CloseWaitClosed,
            (S::FinWait1, S::FinWait2) => Self::FinWait2Entered,
            (S::Established, S::CloseWait) => Self::PeerFin,
            (S::FinWait2, S::Close) => Self::FinWait2Left,
            (S::LastAck, S::Close) => Self::LastAckDone,
            (S::FinWait1, S::Closing) => Self::FinsCrossed,
            (S::Closing, S::Close) => Self::ClosingDone,
            (_, S::Close) => Self::Aborted,
            _ => Self::Other,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TransitionReport {
    pub(crate) ts_ns: u64,
    pub(crate) sock: u64,
    pub(crate) ends: Endpoints,
    pub(crate) old: TcpState,
    pub(crate) new: TcpState,
    /// What (old, new) means, classified once.
    pub(crate) kind: TransitionKind,
    pub(crate) cause: Option<Cause>,
    /// FIN_WAIT2 entries and exits: true once no process holds the socket any more.
    pub(crate) orphan: Option<bool>,
    /// CLOSE_WAIT entries: who must close it.
    pub(crate) owner: Option<Owner>,
    pub(crate) fw2_exit: Option<Fw2Exit>,
    pub(crate) since_fin_ns: Option<u64>,
    pub(crate) half_closed_ns: Option<u64>,
    pub(crate) close_wait_ns: Option<u64>,
    /// The durations count from the snapshot taken at start: the real ones are longer.
    pub(crate) at_least: bool,
    pub(crate) inode: u64,
    /// `tcp_fin_timeout` of the socket's network namespace (enriched), else the tracer's own.
    pub(crate) fin_timeout_s: u64,
    /// The task whose call sent our FIN (its namespace is the socket's).
    pub(crate) fin_by: Option<Task>,
    /// The kernel's ownership record of the socket at the transition (`resolve` turns it into
    /// `owner`).
    pub(crate) recorded_owner: Option<KernelOwner>,
    /// The socket left a state other than the one its last transition here entered: at least
    /// one transition in between never arrived.
    pub(crate) missed_before: bool,
    /// The socket's network namespace (its holder's, else the caller's; None: not known).
    pub(crate) netns: Option<u64>,
    /// Another socket had this address before (its ends were others: the kernel freed it and
    /// reused the memory) and its transition to CLOSE never arrived: that socket's gap, and
    /// nothing of it carries over to this one.
    pub(crate) earlier_socket_lost: bool,
}

impl TransitionReport {
    /// A transition with nothing attributed yet.
    pub(crate) fn new(
        ts_ns: u64,
        sock: u64,
        ends: Endpoints,
        old: TcpState,
        new: TcpState,
        inode: u64,
    ) -> Self {
        Self {
            ts_ns,
            sock,
            ends,
            old,
            new,
            kind: TransitionKind::of(old, new),
            cause: None,
            orphan: None,
            owner: None,
            fw2_exit: None,
            since_fin_ns: None,
            half_closed_ns: None,
            close_wait_ns: None,
            at_least: false,
            inode,
            fin_timeout_s: DEFAULT_FIN_TIMEOUT_S,
            fin_by: None,
            recorded_owner: None,
            missed_before: false,
            earlier_socket_lost: false,
            netns: None,
        }
    }

    /// The state as an operator sees it: the tracepoint says CLOSE where the socket went on to
    /// TIME_WAIT.
    pub(crate) fn effective_new(&self) -> TcpState {
        match self.fw2_exit {
            Some(Fw2Exit::TimeWait) => TcpState::TimeWait,
            _ => self.new,
        }
    }

    /// An orphan kept as a full socket in FIN_WAIT2 whose timer found no time left: the kernel
    /// reset and freed it, tcp_fin_timeout after it entered FIN_WAIT2.
    pub(crate) fn orphan_timed_out(&self) -> bool {
        self.fw2_exit == Some(Fw2Exit::Reset)
            && self.orphan == Some(true)
            && self
                .cause
                .as_ref()
                .is_some_and(|c| c.kind == CauseKind::Timer)
    }

    /// Seconds until the kernel frees an orphan handed to the time-wait timer: `tcp_fin_timeout`
    /// when handed over at FIN_WAIT2 entry, what is left beyond 60 s when the orphan timer did.
    pub(crate) fn frees_within_s(&self) -> u64 {
        match self.cause.as_ref().map(|c| c.kind) {
            Some(CauseKind::Timer) => self.fin_timeout_s.saturating_sub(60),
            _ => self.fin_timeout_s,
        }
    }

    /// FIN_WAIT2 entered or left: the answers depend on tcp_fin_timeout.
    pub(crate) fn touches_fin_wait2(&self) -> bool {
        self.new == TcpState::FinWait2 || self.old == TcpState::FinWait2
    }

    /// CLOSE_WAIT entered or left: the answers name its owner.
    pub(crate) fn touches_close_wait(&self) -> bool {
        self.new == TcpState::CloseWait || self.old == TcpState::CloseWait
    }
}

/// Linux's default `net.ipv4.tcp_fin_timeout`.
pub(crate) const DEFAULT_FIN_TIMEOUT_S: u64 = 60;

/// close() on an fd whose file has other references: no FIN, no state change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CloseNoFinReport {
    pub(crate) ts_ns: u64,
    pub(crate) sock: u64,
    pub(crate) call: Call,
    pub(crate) task: Task,
    pub(crate) fd: i32,
    /// References left after this close.
    pub(crate) remaining_refs: u64,
    /// Who still holds it (filled in by `resolve`).
    pub(crate) holders: Vec<Owner>,
    pub(crate) inode: u64,
    pub(crate) ends: Option<Endpoints>,
    pub(crate) state: Option<TcpState>,
    /// The kernel's ownership record as this close found it: another holder, or this caller
    /// (then marked stale).
    pub(crate) recorded_owner: Option<KernelOwner>,
    /// The caller's network namespace (None: not known).
    pub(crate) netns: Option<u64>,
}

/// What the correlator says about one kernel record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Report {
    Transition(TransitionReport),
    CloseNoFin(CloseNoFinReport),
}

impl Report {
    pub(crate) fn ts_ns(&self) -> u64 {
        match self {
            Report::Transition(t) => t.ts_ns,
            Report::CloseNoFin(n) => n.ts_ns,
        }
    }

    pub(crate) fn sock(&self) -> u64 {
        match self {
            Report::Transition(t) => t.sock,
            Report::CloseNoFin(n) => n.sock,
        }
    }

    pub(crate) fn inode(&self) -> u64 {
        match self {
            Report::Transition(t) => t.inode,
            Report::CloseNoFin(n) => n.inode,
        }
    }

    pub(crate) fn ends(&self) -> Option<&Endpoints> {
        match self {
            Report::Transition(t) => Some(&t.ends),
            Report::CloseNoFin(n) => n.ends.as_ref(),
        }
    }
}

/// A socket still half-closed or in CLOSE_WAIT after the `--stuck` threshold.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stuck {
    pub(crate) sock: u64,
    /// `CLOSE_WAIT`, or `FIN_WAIT2 after shutdown(SHUT_WR)`.
    pub(crate) what: String,
    pub(crate) holder: Holder,
    /// Whose job it is (names `holder`).
    pub(crate) verdict: Verdict,
    /// What the holder is doing about it, where it could be read.
    pub(crate) owner_state: Option<diagnosis::OwnerState>,
    pub(crate) ends: Endpoints,
    pub(crate) stuck_ns: u64,
    /// Stuck before tracing started: `stuck_ns` counts from the start-up inventory.
    pub(crate) at_least: bool,
    /// The holder's network namespace (None: not known).
    pub(crate) netns: Option<u64>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn durations_in_words() {
        assert_eq!(Dur::tenths(250_400_000).to_string(), "250 ms");
        assert_eq!(Dur::tenths(42_340_000_000).to_string(), "42.3 s");
        assert_eq!(
            Dur::whole(Duration::from_millis(42_900)).to_string(),
            "42 s"
        );
        assert_eq!(Dur::whole(Duration::from_millis(250)).to_string(), "250 ms");
    }

    #[test]
    fn every_transition_is_classified_once_by_its_states() {
        use TcpState::*;
        use TransitionKind as K;
        let cases = [
            (Established, FinWait1, K::FinSent),
            (CloseWait, LastAck, K::CloseWaitClosed),
            (FinWait1, FinWait2, K::FinWait2Entered),
            (Established, CloseWait, K::PeerFin),
            (FinWait2, Close, K::FinWait2Left),
            (LastAck, Close, K::LastAckDone),
            (FinWait1, Closing, K::FinsCrossed),
            (Closing, Close, K::ClosingDone),
            (Established, Close, K::Aborted),
            (CloseWait, Close, K::Aborted),
            (FinWait2, TimeWait, K::Other),
            (SynSent, Established, K::Other),
        ];
        for (old, new, kind) in cases {
            assert_eq!(TransitionKind::of(old, new), kind, "{old:?} -> {new:?}");
        }
    }
}
