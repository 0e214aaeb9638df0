//! Fills in who holds a socket (CLOSE_WAIT owners, the holders left after a close without FIN)
//! without ever blocking the event path: reports wait, in order, until a /proc index taken after
//! their event exists, while the ring buffer keeps being drained.
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use finwait_common::tcp_state as st;

use crate::{
    correlate::{Owner, Report},
    owners::{Index, Scanner},
};

/// Past this, a report goes out with the owner it has (possibly none) rather than waiting on.
const MAX_WAIT: Duration = Duration::from_secs(2);
/// Owners remembered from CLOSE_WAIT entries, for the later LAST_ACK (bounded).
const REMEMBER: usize = 65_536;

pub struct Resolver {
    scanner: Scanner,
    queue: VecDeque<(Report, Instant)>,
    /// inode -> owner at CLOSE_WAIT entry.
    close_wait_owner: HashMap<u64, Owner>,
    pub timed_out: u64,
}

/// The task whose call ended this transition's socket, as its owner (it held an fd to it).
fn closer(t: &crate::correlate::TransitionReport) -> Option<Owner> {
    let c = t.cause.as_ref()?;
    let task = c.task.as_ref()?;
    Some(Owner {
        pid: task.pid,
        comm: task.comm.clone(),
        fd: c.fd?,
    })
}

/// Does this report need the holders of its inode, as of after its event?
fn needs_scan(r: &Report) -> Option<(u64, u64)> {
    match r {
        Report::Transition(t) if t.new == st::CLOSE_WAIT && t.inode != 0 => {
            Some((t.inode, t.ts_ns))
        }
        Report::CloseNoFin(n) if n.inode != 0 => Some((n.inode, n.ts_ns)),
        _ => None,
    }
}

impl Resolver {
    pub fn new(scanner: Scanner) -> Self {
        Self {
            scanner,
            queue: VecDeque::new(),
            close_wait_owner: HashMap::new(),
            timed_out: 0,
        }
    }

    /// The owner of a socket found in CLOSE_WAIT by the start-up snapshot.
    pub fn remember(&mut self, inode: u64, owner: Owner) {
        self.close_wait_owner.insert(inode, owner);
    }

    pub fn scans(&self) -> u64 {
        self.scanner.scans()
    }

    pub fn push(&mut self, r: Report) {
        self.queue.push_back((r, Instant::now()));
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Moves every report that can go out now, in order, to `out`. `flush`: do not wait.
    pub fn ready(&mut self, out: &mut Vec<Report>, flush: bool) {
        let mut latest: Option<Arc<Index>> = self.scanner.latest();
        while let Some((head, since)) = self.queue.front() {
            if let Some((_, event_ns)) = needs_scan(head) {
                let fresh = latest.as_ref().is_some_and(|i| i.built_ns > event_ns);
                if !fresh && !flush && since.elapsed() < MAX_WAIT {
                    self.scanner.request();
                    return;
                }
                if !fresh {
                    self.timed_out += 1;
                    latest = None;
                }
            }
            let (mut r, _) = self.queue.pop_front().unwrap();
            self.fill(&mut r, latest.as_deref());
            out.push(r);
        }
    }

    /// The task that closed `sock` out of CLOSE_WAIT, if that close is already queued: it held
    /// the socket, so it is the owner even when it closed before /proc could be read.
    fn closer_of(&self, sock: u64) -> Option<Owner> {
        self.queue.iter().find_map(|(r, _)| match r {
            Report::Transition(t) if t.sock == sock && t.old == st::CLOSE_WAIT => closer(t),
            _ => None,
        })
    }

    fn fill(&mut self, r: &mut Report, index: Option<&Index>) {
        match r {
            Report::Transition(t) if t.new == st::CLOSE_WAIT => {
                t.owner = index
                    .and_then(|i| i.get(t.inode).first().cloned())
                    .or_else(|| self.closer_of(t.sock));
                if let Some(o) = &t.owner {
                    if self.close_wait_owner.len() >= REMEMBER {
                        self.close_wait_owner.clear();
                    }
                    self.close_wait_owner.insert(t.inode, o.clone());
                }
            }
            Report::Transition(t) if t.old == st::CLOSE_WAIT => {
                t.owner = self.close_wait_owner.remove(&t.inode).or_else(|| closer(t));
            }
            Report::CloseNoFin(n) => {
                let (pid, fd) = (n.task.pid, n.fd);
                n.holders = index
                    .map(|i| {
                        i.get(n.inode)
                            .iter()
                            .filter(|h| h.pid != pid || h.fd != fd)
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{correlate::TransitionReport, event::Endpoints, owners::monotonic_ns};

    fn transition(ts_ns: u64, old: u8, new: u8, inode: u64) -> Report {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let ends = Endpoints {
            local: lo,
            lport: 1,
            remote: lo,
            rport: 2,
        };
        Report::Transition(TransitionReport::new(ts_ns, 1, ends, old, new, inode))
    }

    fn owner_of(r: &Report) -> Option<Owner> {
        match r {
            Report::Transition(t) => t.owner.clone(),
            _ => None,
        }
    }

    /// A CLOSE_WAIT waits for an index newer than itself, keeps later reports behind it, and its
    /// owner is remembered for the LAST_ACK.
    #[test]
    fn waits_for_a_fresh_index_and_keeps_order() {
        let scanner = Scanner::start(|| Index {
            map: HashMap::from([(
                7,
                vec![Owner {
                    pid: 20,
                    comm: "srv".into(),
                    fd: 9,
                }],
            )]),
            built_ns: monotonic_ns(),
        });
        let mut r = Resolver::new(scanner);
        let now = monotonic_ns();
        r.push(transition(now, st::ESTABLISHED, st::CLOSE_WAIT, 7));
        r.push(transition(now + 1, st::ESTABLISHED, st::FIN_WAIT1, 8));
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.len() < 2 && Instant::now() < deadline {
            r.ready(&mut out, false);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(out.len(), 2);
        assert_eq!(owner_of(&out[0]).unwrap().pid, 20);
        r.push(transition(now + 2, st::CLOSE_WAIT, st::LAST_ACK, 7));
        r.ready(&mut out, false);
        assert_eq!(owner_of(&out[2]).unwrap().fd, 9);
    }
}
