//! One socket on the close path as the snapshot answers for it: its holders (or the process
//! inferred to have held it), whose job it is, what its owner is doing, and its peer.
use finwait_common::TcpState;

use crate::{
    host::sockdiag::DiagSocket,
    model::{
        Comm, Endpoints, Holder, Owner, Verdict,
        diagnosis::OwnerState,
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
    pub(crate) fn new(sock: DiagSocket, owners: Vec<Owner>) -> Option<Self> {
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
            Verdict::ApplicationMustClose(_) => sock.state == TcpState::FinWait2,
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
            (TcpState::FinWait2, Verdict::ApplicationMustClose(_)) => "fin_wait2_half_closed",
            (TcpState::FinWait2, _) => "fin_wait2_orphaned",
            (TcpState::CloseWait, _) => "close_wait",
            (TcpState::FinWait1, _) => "fin_wait1",
            (TcpState::LastAck, _) => "last_ack",
            (TcpState::Closing, _) => "closing",
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
        self.sock.state == TcpState::TimeWait
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
            (TcpState::FinWait2, Verdict::ApplicationMustClose(_)) => {
                "half-closed by shutdown()".into()
            }
            (TcpState::FinWait2, _) => format!("orphaned after close(){inferred}"),
            (TcpState::CloseWait, _) => "the peer closed".into(),
            (TcpState::FinWait1, Verdict::ApplicationMustClose(_)) => {
                "FIN sent by shutdown(), not yet acknowledged".into()
            }
            (TcpState::FinWait1, _) => {
                format!("FIN sent by close(), not yet acknowledged{inferred}")
            }
            (TcpState::LastAck, _) => {
                "closed by its owner after the peer; waiting for the peer's last ACK".into()
            }
            (TcpState::Closing, _) => {
                "both sides closed at once; waiting for the peer's ACK".into()
            }
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

/// The other end of a connection, when it is a socket on this host too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Peer {
    pub(crate) state: TcpState,
    pub(crate) netns: u64,
    /// Empty: no process holds it (an orphan, or a time-wait socket).
    pub(crate) owners: Vec<Owner>,
}

impl Peer {
    /// `its peer on this host, python3[9183] fd 3, is in CLOSE_WAIT: it has not closed its end`.
    pub(crate) fn sentence(&self) -> String {
        let state = self.state.name();
        let who = match self.owners.first() {
            Some(o) => format!("{}[{}] fd {}", o.comm, o.pid, o.fd),
            None => "held by no process".into(),
        };
        let then = match (self.state, self.owners.is_empty()) {
            (TcpState::CloseWait, false) => ": it has not closed its end",
            (TcpState::FinWait2, false) => ": half-closed, still open",
            _ => "",
        };
        format!("its peer on this host, {who}, is in {state}{then}")
    }
}
