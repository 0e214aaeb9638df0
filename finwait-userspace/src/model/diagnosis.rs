//! Why a socket is still open: what its owner did with the peer's FIN (Recv-Q), whether it
//! still polls the fd, and what its threads are doing; with the words for each.
//!
//! For a CLOSE_WAIT socket Recv-Q is `rcv_nxt - copied_seq`: the unread data plus one for a FIN
//! the application has not read. 0: it read the EOF (recv() returned 0) and did not close; 1: it
//! never read the FIN; N: N-1 bytes of the peer's data are unread too (docs/close-path.md).
use std::{collections::BTreeMap, fmt};

use finwait_common::TcpState;

/// What the owner did with the peer's FIN, from Recv-Q.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FinReading {
    /// It read the EOF and kept the socket: a missing close() after EOF.
    ReadEof,
    /// It never read the FIN, nor `unread_bytes` bytes before it: it is not reading the socket.
    NotRead { unread_bytes: u32 },
}

impl FinReading {
    /// From a CLOSE_WAIT socket's Recv-Q.
    pub(crate) fn of_close_wait(recv_queue: u32) -> Self {
        match recv_queue {
            0 => FinReading::ReadEof,
            n => FinReading::NotRead {
                unread_bytes: n - 1,
            },
        }
    }

    /// The JSON contract's name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            FinReading::ReadEof => "read_eof_not_closed",
            FinReading::NotRead { .. } => "fin_not_read",
        }
    }
}

impl fmt::Display for FinReading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FinReading::ReadEof => f.write_str(
                "it read the EOF (recv() returned 0) and did not close: a close() is missing after EOF",
            ),
            FinReading::NotRead { unread_bytes: 0 } => f.write_str(
                "it never read the peer's FIN: it is not reading this socket (not polled, a thread blocked elsewhere, or forgotten in a pool)",
            ),
            FinReading::NotRead { unread_bytes } => write!(
                f,
                "it never read the peer's FIN, nor {unread_bytes} byte(s) before it: it is not reading this socket (not polled, a thread blocked elsewhere, or forgotten in a pool)"
            ),
        }
    }
}

/// The split of many CLOSE_WAIT sockets by what their owner did with the FIN, from counts by
/// [`FinReading::name`]: ` (1790 never read the peer's FIN: not reading these sockets; 3 read
/// EOF and did not close)`, or nothing when none was read.
pub(crate) fn readings_words(count: impl Fn(&str) -> u64) -> String {
    let parts: Vec<String> = [
        (
            FinReading::NotRead { unread_bytes: 0 },
            "never read the peer's FIN: not reading these sockets",
        ),
        (FinReading::ReadEof, "read EOF and did not close"),
    ]
    .into_iter()
    .filter_map(|(r, words)| {
        let n = count(r.name());
        (n > 0).then(|| format!("{n} {words}"))
    })
    .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join("; "))
    }
}

/// Whether the owner still has the fd in one of its epoll sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Polled {
    /// The owner has no epoll set: it polls otherwise, or not at all.
    NoEpoll,
    /// In none of its `sets` epoll sets.
    NotRegistered { sets: usize },
    /// In these sets: (epoll fd, events mask).
    Registered(Vec<(i32, u32)>),
}

impl Polled {
    pub(crate) fn registered(&self) -> Option<bool> {
        match self {
            Polled::NoEpoll => None,
            Polled::NotRegistered { .. } => Some(false),
            Polled::Registered(_) => Some(true),
        }
    }
}

/// `EPOLLIN|EPOLLRDHUP`, for an events mask.
pub(crate) fn epoll_events(mask: u32) -> String {
    const NAMES: [(u32, &str); 10] = [
        (0x001, "EPOLLIN"),
        (0x004, "EPOLLOUT"),
        (0x002, "EPOLLPRI"),
        (0x008, "EPOLLERR"),
        (0x010, "EPOLLHUP"),
        (0x2000, "EPOLLRDHUP"),
        (1 << 31, "EPOLLET"),
        (1 << 30, "EPOLLONESHOT"),
        (1 << 29, "EPOLLWAKEUP"),
        (1 << 28, "EPOLLEXCLUSIVE"),
    ];
    let names: Vec<&str> = NAMES
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        format!("{mask:#x}")
    } else {
        names.join("|")
    }
}

/// The owner's threads: how many, and what each waits in (`futex()`, `epoll_wait()`,
/// `running`, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Threads {
    pub(crate) total: usize,
    pub(crate) by_wait: BTreeMap<String, usize>,
}

impl fmt::Display for Threads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut waits: Vec<(&String, &usize)> = self.by_wait.iter().collect();
        waits.sort_by_key(|(w, n)| (std::cmp::Reverse(**n), (*w).clone()));
        let parts: Vec<String> = waits
            .into_iter()
            .map(|(w, n)| match w.as_str() {
                "running" => format!("{n} running"),
                w => format!("{n} in {w}"),
            })
            .collect();
        write!(f, "{} thread(s): {}", self.total, parts.join(", "))
    }
}

/// What the owner of a stuck socket is doing about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OwnerState {
    /// CLOSE_WAIT only.
    pub(crate) reading: Option<FinReading>,
    /// FIN_WAIT2 half-closed: unread bytes of the peer's data (the application is not reading
    /// what still arrives).
    pub(crate) unread_bytes: u32,
    /// None: the owner's fds could not be read.
    pub(crate) polled: Option<Polled>,
    pub(crate) threads: Option<Threads>,
}

impl OwnerState {
    /// For a socket in `state` with this Recv-Q.
    pub(crate) fn new(state: TcpState, recv_queue: u32) -> Self {
        let close_wait = state == TcpState::CloseWait;
        Self {
            reading: close_wait.then(|| FinReading::of_close_wait(recv_queue)),
            unread_bytes: if close_wait {
                recv_queue.saturating_sub(1)
            } else {
                recv_queue
            },
            polled: None,
            threads: None,
        }
    }

    /// The diagnosis in words, for the owner `who` holding it at `fd`.
    pub(crate) fn sentence(&self, who: &str, fd: Option<i32>) -> String {
        let fd = fd.map_or_else(|| "the fd".to_string(), |fd| format!("fd {fd}"));
        let mut parts = vec![self.reading_words()];
        match &self.polled {
            Some(Polled::NotRegistered { sets }) => parts.push(format!(
                "{fd} is not in any epoll set of {who} (it has {sets})"
            )),
            Some(Polled::Registered(sets)) => {
                let list: Vec<String> = sets
                    .iter()
                    .map(|(ep, ev)| format!("epoll fd {ep} for {}", epoll_events(*ev)))
                    .collect();
                parts.push(format!("{fd} is registered in {}", list.join(", ")));
            }
            Some(Polled::NoEpoll) | None => {}
        }
        if let Some(t) = &self.threads {
            parts.push(format!("{who} has {t}"));
        }
        parts.join("; ")
    }

    /// What the Recv-Q (and, half-closed, the epoll registration) says about the reading.
    fn reading_words(&self) -> String {
        if let Some(r) = self.reading {
            return r.to_string();
        }
        // Half-closed by shutdown(): the peer may still send; is the application reading?
        match (self.unread_bytes, self.polls_input()) {
            (0, true) => "it is still reading it (EPOLLIN registered: lingering, as nginx and httpd do on purpose)".into(),
            (0, false) => "it has read everything the peer sent so far".into(),
            (n, _) => format!("{n} byte(s) of the peer's data unread: it is not reading the half-closed socket"),
        }
    }

    /// The fd is in an epoll set for EPOLLIN.
    fn polls_input(&self) -> bool {
        match &self.polled {
            Some(Polled::Registered(sets)) => sets.iter().any(|(_, ev)| ev & 0x001 != 0),
            _ => false,
        }
    }

    /// Half-closed: is the application still reading (EPOLLIN registered, nothing unread)?
    /// None where not half-closed, or where the owner has no epoll set to tell.
    pub(crate) fn still_reading(&self) -> Option<bool> {
        if self.reading.is_some() {
            return None;
        }
        self.polled.as_ref()?.registered()?;
        Some(self.unread_bytes == 0 && self.polls_input())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recv-Q 0, 1 and N in CLOSE_WAIT: the three answers of the nginx mailing-list case.
    #[test]
    fn recv_q_tells_eof_read_from_fin_unread() {
        assert_eq!(FinReading::of_close_wait(0), FinReading::ReadEof);
        assert_eq!(
            FinReading::of_close_wait(1),
            FinReading::NotRead { unread_bytes: 0 }
        );
        assert_eq!(
            FinReading::of_close_wait(6),
            FinReading::NotRead { unread_bytes: 5 }
        );
        assert_eq!(epoll_events(0x2001), "EPOLLIN|EPOLLRDHUP");
        let mut s = OwnerState::new(TcpState::CloseWait, 1);
        s.polled = Some(Polled::NotRegistered { sets: 1 });
        let t = Threads {
            total: 212,
            by_wait: [("futex()".to_string(), 200), ("epoll_wait()".into(), 12)].into(),
        };
        s.threads = Some(t);
        assert_eq!(
            s.sentence("java[812]", Some(57)),
            "it never read the peer's FIN: it is not reading this socket (not polled, a thread blocked elsewhere, or forgotten in a pool); fd 57 is not in any epoll set of java[812] (it has 1); java[812] has 212 thread(s): 200 in futex(), 12 in epoll_wait()"
        );
    }
}
