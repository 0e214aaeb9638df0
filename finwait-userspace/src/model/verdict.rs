//! Whose job it is to finish closing a socket: decided once, in [`whose_job`], for every output
//! (live reports, the summary, `--stuck`, the snapshot), and put into words here too.
//!
//! The rules (docs/close-path.md): CLOSE_WAIT never times out, so its owner must close it; a
//! socket whose FIN we sent and that a process still holds was half-closed by shutdown(), and
//! that process must close it (no kernel timeout); one no process holds any more is an orphan,
//! which the kernel frees within a bound; LAST_ACK, CLOSING, TIME_WAIT and CLOSE need nobody.
use std::{
    fmt::{self, Write as _},
    sync::Arc,
    time::Duration,
};

use finwait_common::TcpState;

use super::{Comm, Container, Dur, Fw2Exit, Owner, TransitionReport, container};

/// Who holds a socket, as the answers name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) pid: u32,
    pub(crate) comm: Comm,
    pub(crate) fd: Option<i32>,
    /// Further processes holding it too.
    pub(crate) others: usize,
    pub(crate) container: Option<Arc<Container>>,
}

impl Holder {
    /// The first of `owners`, naming how many more there are.
    pub(crate) fn of(owners: &[Owner]) -> Option<Self> {
        let o = owners.first()?;
        Some(Self {
            others: owners.len() - 1,
            ..Self::from(o)
        })
    }
}

impl From<&Owner> for Holder {
    fn from(o: &Owner) -> Self {
        Self {
            pid: o.pid,
            comm: o.comm.clone(),
            fd: Some(o.fd),
            others: 0,
            container: o.container.clone(),
        }
    }
}

impl Holder {
    /// `nginx[12] fd 9`, or `nginx[12] and 2 other holder(s)`, into `out` (on every line that
    /// names an owner: no `core::fmt`).
    pub(crate) fn write(&self, out: &mut String) {
        let mut n = itoa::Buffer::new();
        out.push_str(&self.comm);
        out.push('[');
        out.push_str(n.format(self.pid));
        out.push(']');
        container::write_short(out, self.container.as_deref());
        match (self.others, self.fd) {
            (0, Some(fd)) => {
                out.push_str(" fd ");
                out.push_str(n.format(fd));
            }
            (0, None) => {}
            (others, _) => {
                out.push_str(" and ");
                out.push_str(n.format(others));
                out.push_str(" other holder(s)");
            }
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        self.write(&mut s);
        f.write_str(&s)
    }
}

/// How long the kernel may keep an orphan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bound {
    /// tcp_fin_timeout of the socket's namespace, in seconds.
    FinTimeout(u64),
    /// At most this many seconds (what is left of tcp_fin_timeout).
    Within(u64),
    /// The socket's own timer says what is left.
    Left(Duration),
    /// Bounded by retransmissions (tcp_orphan_retries), not a timeout finwait knows.
    Retries,
}

/// Whose job the rest of the close is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Half-closed by shutdown() and still held: the application must close it; no kernel
    /// timeout. The holder, where the answer names it apart from the call.
    ApplicationMustClose(Option<Holder>),
    /// An orphan: the kernel frees it, within this bound.
    KernelFrees(Bound),
    /// CLOSE_WAIT: the peer closed; the owner (None: not found) must close it. Never times out.
    OwnerMustClose(Option<Holder>),
    /// Nobody needs to act: closed, or the kernel finishing a normal close.
    Done,
    /// It cannot be known (the call that sent our FIN was not seen).
    Unknown,
}

/// What the verdict rests on, from a live transition or a socket in the snapshot.
#[derive(Clone, Debug)]
pub(crate) struct Facts {
    /// The socket's state as `ss` shows it now.
    pub(crate) state: TcpState,
    /// A process still holds the socket's file (None: not known).
    pub(crate) held: Option<bool>,
    pub(crate) holder: Option<Holder>,
    /// For an orphan: how long the kernel may keep it.
    pub(crate) bound: Bound,
}

/// The one place that decides whose job a socket is. None: the socket is not on the close path.
pub(crate) fn whose_job(f: Facts) -> Option<Verdict> {
    Some(match (f.state, f.held) {
        (TcpState::CloseWait, _) => Verdict::OwnerMustClose(f.holder),
        (TcpState::FinWait1 | TcpState::FinWait2, Some(true)) => {
            Verdict::ApplicationMustClose(f.holder)
        }
        (TcpState::FinWait1 | TcpState::FinWait2, Some(false)) => Verdict::KernelFrees(f.bound),
        (TcpState::FinWait1 | TcpState::FinWait2, None) => Verdict::Unknown,
        (TcpState::LastAck | TcpState::Closing | TcpState::TimeWait | TcpState::Close, _) => {
            Verdict::Done
        }
        _ => return None,
    })
}

impl TransitionReport {
    /// The facts after this transition.
    pub(crate) fn facts(&self) -> Facts {
        let mut bound = Bound::FinTimeout(self.fin_timeout_s);
        let (state, held) = match (self.new, self.fw2_exit) {
            // Our FIN is out: after shutdown() the caller still holds the socket.
            (TcpState::FinWait1, _) => {
                bound = Bound::Retries;
                let known = self
                    .cause
                    .as_ref()
                    .filter(|c| c.kind != super::CauseKind::Unknown);
                (TcpState::FinWait1, known.map(|c| !c.is_close_like()))
            }
            (TcpState::FinWait2, _) => (TcpState::FinWait2, self.orphan.map(|o| !o)),
            // A time-wait mini-socket in substate FIN_WAIT2: `ss` still shows FIN-WAIT-2.
            (TcpState::Close, Some(Fw2Exit::OrphanTimewait)) => {
                bound = Bound::Within(self.frees_within_s());
                (TcpState::FinWait2, Some(false))
            }
            _ => (self.effective_new(), None),
        };
        let holder = self.owner.as_ref().map(Holder::from);
        Facts {
            state,
            held,
            holder,
            bound,
        }
    }

    /// Whose job the socket is after this transition (None: not on the close path), once its
    /// owner and tcp_fin_timeout are known. The pipeline asks once per report and hands the
    /// answer to every output.
    pub(crate) fn verdict(&self) -> Option<Verdict> {
        whose_job(self.facts())
    }
}

impl Verdict {
    /// A process must act (close, or finish with, the socket); `--needs-action` keeps these.
    pub(crate) fn needs_action(&self) -> bool {
        matches!(
            self,
            Verdict::ApplicationMustClose(_) | Verdict::OwnerMustClose(_)
        )
    }

    /// The JSON contract's name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Verdict::ApplicationMustClose(_) => "application_must_close",
            Verdict::KernelFrees(_) => "kernel_frees",
            Verdict::OwnerMustClose(_) => "owner_must_close",
            Verdict::Done => "done",
            Verdict::Unknown => "unknown",
        }
    }

    /// The answer for one socket: `the kernel frees it within tcp_fin_timeout (60 s)`.
    pub(crate) fn clause(&self) -> Clause<'_> {
        Clause(self)
    }

    /// The answer for many sockets of one process (`who`): `nginx must close them`.
    pub(crate) fn plural<'a>(&'a self, who: &'a str) -> Plural<'a> {
        Plural(self, who)
    }
}

/// See [`Verdict::clause`].
pub(crate) struct Clause<'a>(&'a Verdict);

impl fmt::Display for Clause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        self.0.write_clause(&mut s);
        f.write_str(&s)
    }
}

impl Verdict {
    /// [`Verdict::clause`] into `out`: the human sink writes it on many lines, so the fixed
    /// words are pushed as they are (only a time left goes through `core::fmt`).
    pub(crate) fn write_clause(&self, out: &mut String) {
        let mut n = itoa::Buffer::new();
        match self {
            Verdict::ApplicationMustClose(None) => {
                out.push_str("the application still owns it and must close it (no kernel timeout)");
            }
            Verdict::ApplicationMustClose(Some(h)) => {
                h.write(out);
                out.push_str(" still holds it and must close it (no kernel timeout)");
            }
            Verdict::KernelFrees(bound) => {
                out.push_str("the kernel frees it");
                match bound {
                    Bound::FinTimeout(s) => {
                        out.push_str(" within tcp_fin_timeout (");
                        out.push_str(n.format(*s));
                        out.push_str(" s)");
                    }
                    Bound::Within(s) => {
                        out.push_str(" within ");
                        out.push_str(n.format(*s));
                        out.push_str(" s");
                    }
                    Bound::Left(d) => {
                        let _ = write!(out, " (about {} left)", Dur::whole(*d));
                    }
                    Bound::Retries => out.push_str(" once its retransmissions end"),
                }
            }
            Verdict::OwnerMustClose(who) => {
                match who {
                    Some(h) => h.write(out),
                    None => out.push_str("its owner (not found)"),
                }
                out.push_str(" must close it (CLOSE_WAIT never times out)");
            }
            Verdict::Done => out.push_str("nobody needs to act"),
            Verdict::Unknown => {
                out.push_str(
                    "whose job it is is unknown (the call that sent the FIN was not seen)",
                );
            }
        }
    }
}

/// See [`Verdict::plural`].
pub(crate) struct Plural<'a>(&'a Verdict, &'a str);

impl fmt::Display for Plural<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = self.1;
        match self.0 {
            Verdict::ApplicationMustClose(_) => write!(f, "{who} must close them"),
            Verdict::KernelFrees(_) => f.write_str("the kernel frees them"),
            Verdict::OwnerMustClose(_) => write!(f, "{who} must close them (a leak if they stay)"),
            Verdict::Done => f.write_str("nobody needs to act"),
            Verdict::Unknown => f.write_str("whose job they are is unknown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(state: TcpState, held: Option<bool>) -> Facts {
        Facts {
            state,
            held,
            holder: None,
            bound: Bound::FinTimeout(60),
        }
    }

    /// Every state on the close path has exactly one answer.
    #[test]
    fn one_answer_per_state() {
        let v = |state, held| whose_job(facts(state, held)).map(|v| v.name());
        assert_eq!(v(TcpState::CloseWait, None), Some("owner_must_close"));
        assert_eq!(
            v(TcpState::FinWait2, Some(true)),
            Some("application_must_close")
        );
        assert_eq!(v(TcpState::FinWait2, Some(false)), Some("kernel_frees"));
        assert_eq!(v(TcpState::FinWait1, None), Some("unknown"));
        assert_eq!(v(TcpState::TimeWait, None), Some("done"));
        assert_eq!(v(TcpState::LastAck, None), Some("done"));
        assert_eq!(v(TcpState::Established, None), None);
    }

    #[test]
    fn words_name_the_holder_and_the_bound() {
        let h = Holder {
            pid: 9,
            comm: "python3".into(),
            fd: Some(4),
            others: 0,
            container: None,
        };
        assert_eq!(
            Verdict::OwnerMustClose(Some(h.clone()))
                .clause()
                .to_string(),
            "python3[9] fd 4 must close it (CLOSE_WAIT never times out)"
        );
        assert_eq!(
            Verdict::KernelFrees(Bound::Left(Duration::from_secs(42)))
                .clause()
                .to_string(),
            "the kernel frees it (about 42 s left)"
        );
        let two = Holder { others: 1, ..h };
        assert_eq!(two.to_string(), "python3[9] and 1 other holder(s)");
        assert_eq!(
            Verdict::OwnerMustClose(None).plural("java").to_string(),
            "java must close them (a leak if they stay)"
        );
    }
}
