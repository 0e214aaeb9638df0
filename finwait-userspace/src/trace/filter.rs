//! What the user asked to see (`--pid`, `--comm`, `--port`, `--state`, `-4`/`-6`): a report
//! passes or not. The kernel already dropped most of what is not followed; this decides the rest.
use std::collections::HashSet;

use finwait_common::TcpState;

use aya::maps::{HashMap as BpfHashMap, MapData};

use crate::{
    model::{Report, Verdict},
    output::endpoint::OwnConnections,
};

/// The followed processes, as the kernel keeps them (children join at fork, leave at exit).
pub(crate) trait PidSet {
    fn contains(&self, pid: u32) -> bool;
    fn is_empty(&self) -> bool;
    /// Drops the processes `alive` says are gone: one that exited before the exit program was
    /// attached (or before the set was seeded) would otherwise stay followed forever.
    fn forget_gone(&mut self, alive: &dyn Fn(u32) -> bool);
}

impl PidSet for BpfHashMap<MapData, u32, u8> {
    fn contains(&self, pid: u32) -> bool {
        self.get(&pid, 0).is_ok()
    }

    fn is_empty(&self) -> bool {
        self.keys().next().is_none()
    }

    fn forget_gone(&mut self, alive: &dyn Fn(u32) -> bool) {
        let gone: Vec<u32> = self.keys().flatten().filter(|&p| !alive(p)).collect();
        for pid in gone {
            let _ = self.remove(&pid); // already removed by its exit: the same outcome
        }
    }
}

pub(crate) struct Filter {
    comms: Vec<String>,
    ports: Vec<u16>,
    states: Vec<TcpState>,
    ipv6: Option<bool>,
    /// `--needs-action`: only reports whose verdict asks a process to act.
    needs_action: bool,
    /// `--metrics`' own connections: its scrapes are finwait's traffic, not the host's.
    own: Option<OwnConnections>,
    /// The kernel's set of followed processes (None: every process is followed).
    traced: Option<Box<dyn PidSet>>,
    /// Sockets with a transition shown: their later transitions are shown too. (A close without
    /// FIN adds none: it may come after the socket's last transition, which would leave the
    /// entry to whatever socket takes the address next.)
    shown: HashSet<u64>,
}

impl Filter {
    pub(crate) fn new(o: &super::Options) -> Self {
        Self {
            comms: o.load.comms.clone(),
            ports: o.load.ports.clone(),
            states: o.states.clone(),
            ipv6: o.ipv6,
            needs_action: o.needs_action,
            own: None,
            traced: None,
            shown: HashSet::new(),
        }
    }

    /// `--needs-action`: is a report with this verdict shown? (Asked once the verdict is known;
    /// the summary still counts what it hides.)
    pub(crate) fn shows_verdict(&self, verdict: Option<&Verdict>) -> bool {
        !self.needs_action || verdict.is_some_and(Verdict::needs_action)
    }

    /// Leave out the `--metrics` endpoint's own connections.
    pub(crate) fn exclude(&mut self, own: OwnConnections) {
        self.own = Some(own);
    }

    /// Follow the processes in the kernel's map (`--pid`, `--comm`).
    pub(crate) fn follow(&mut self, traced: impl PidSet + 'static) {
        self.traced = Some(Box::new(traced));
    }

    /// True once every followed process has exited, whenever it did (start-up included).
    pub(crate) fn none_left(&mut self, alive: &dyn Fn(u32) -> bool) -> bool {
        self.traced.as_mut().is_some_and(|m| {
            m.forget_gone(alive);
            m.is_empty()
        })
    }

    /// Followed now (the kernel's set loses a process when it exits).
    fn is_traced(&self, pid: u32) -> bool {
        self.traced.as_ref().is_none_or(|m| m.contains(pid))
    }

    /// `--state`, `-4`/`-6` and `--port`, and not the endpoint's own connections.
    fn matches(&self, r: &Report) -> bool {
        if let (Some(own), Some(e)) = (&self.own, r.ends())
            && own.contains(e)
        {
            return false;
        }
        if let Report::Transition(t) = r {
            let states = &self.states;
            if !states.is_empty()
                && ![t.old, t.new, t.effective_new()]
                    .iter()
                    .any(|s| states.contains(s))
            {
                return false;
            }
            if self.ipv6.is_some_and(|v6| t.ends.is_ipv6() != v6) {
                return false;
            }
        }
        self.ports.is_empty()
            || r.ends()
                .is_some_and(|e| self.ports.contains(&e.lport) || self.ports.contains(&e.rport))
    }

    /// A socket the start-up inventory found in `state` (its holder already chosen by
    /// `--pid`/`--comm`): `--state`, `-4`/`-6`, `--port`, and not the endpoint's own.
    pub(crate) fn inventory_wanted(&self, e: &crate::model::Endpoints, state: TcpState) -> bool {
        let own = self.own.as_ref().is_some_and(|o| o.contains(e));
        let states = self.states.is_empty() || self.states.contains(&state);
        let family = self.ipv6.is_none_or(|v6| e.is_ipv6() == v6);
        let ports =
            self.ports.is_empty() || self.ports.contains(&e.lport) || self.ports.contains(&e.rport);
        !own && states && family && ports
    }

    /// A socket is followed once a followed process made a call on it or holds it; an owner
    /// matching `--comm` counts even if it made no call yet.
    ///
    /// Decided by what was true when the kernel saw the event, not now: a child that shut a
    /// socket down and exited before its reports got here has left the kernel's set, but its
    /// reports are still its. A cause that names a task comes from a call (or exit) record, and
    /// with `--pid`/`--comm` the kernel forwards those only for followed processes; an owner
    /// counts when the kernel recorded it as obtained by a followed process, or (an owner
    /// found in /proc) when it is followed now.
    fn followed(&self, r: &Report) -> bool {
        match r {
            Report::Transition(t) => {
                t.cause.as_ref().is_some_and(|c| c.task.is_some())
                    || t.recorded_owner.as_ref().is_some_and(|k| k.followed)
                    || t.owner.as_ref().is_some_and(|o| {
                        self.comms.iter().any(|c| **c == *o.comm) || self.is_traced(o.pid)
                    })
            }
            // A close is forwarded only for followed processes.
            Report::CloseNoFin(_) => true,
        }
    }

    /// Did this transition's socket miss one before it, as the user sees the socket? With
    /// `--pid`/`--comm` the kernel forwards the transitions of followed sockets only, so a gap
    /// before a socket's first shown transition is the filter's doing (an earlier socket at the
    /// address, not followed, whose CLOSE the kernel kept); once one of its transitions was
    /// shown, every later one is forwarded (the kernel follows a socket a followed process
    /// obtained or made a call on) and a gap is a loss. Asked before `wanted`.
    pub(crate) fn missed_transition(&self, r: &Report) -> bool {
        matches!(r, Report::Transition(t) if t.missed_before) && self.transition_shown(r.sock())
    }

    /// `wanted`, and how many transitions the report shows never arrived, as the user sees
    /// sockets: a gap before it in its socket if it is shown (`missed_transition`), and the
    /// CLOSE of an earlier socket at its address if that one was shown, whether this one is or
    /// not (without `--pid`/`--comm` no socket is remembered: if this one is).
    pub(crate) fn pass(&mut self, r: &Report) -> (bool, u64) {
        let missed = self.missed_transition(r);
        let earlier = matches!(r, Report::Transition(t) if t.earlier_socket_lost);
        let earlier_shown = earlier && self.traced.is_some() && self.shown.contains(&r.sock());
        let wanted = self.wanted(r);
        let earlier_counted = earlier_shown || (earlier && wanted && self.traced.is_none());
        (
            wanted,
            u64::from(wanted && missed) + u64::from(earlier_counted),
        )
    }

    /// A transition of the socket was shown (without `--pid`/`--comm`: every socket's are).
    pub(crate) fn transition_shown(&self, sock: u64) -> bool {
        self.traced.is_none() || self.shown.contains(&sock)
    }

    pub(crate) fn wanted(&mut self, r: &Report) -> bool {
        let sock = r.sock();
        // The entry was the earlier socket's: this one is shown on its own merits.
        if let Report::Transition(t) = r
            && t.earlier_socket_lost
        {
            self.shown.remove(&sock);
        }
        let wanted = self.matches(r)
            // Without --pid/--comm everything passes: no per-socket bookkeeping on this path.
            && (self.traced.is_none() || self.shown.contains(&sock) || self.followed(r));
        if wanted && self.traced.is_some() && matches!(r, Report::Transition(_)) {
            self.shown.insert(sock);
        }
        if let Report::Transition(t) = r
            && t.new == TcpState::Close
        {
            self.shown.remove(&sock);
        }
        wanted
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, net::IpAddr, rc::Rc};

    use finwait_common::{Call, TcpState};

    use super::*;
    use crate::model::{
        Cause, CauseKind, CloseNoFinReport, Endpoints, KernelOwner, Owner, Task, TransitionReport,
    };

    /// The kernel's set, shared with the test so that a process can exit under the filter.
    #[derive(Clone, Default)]
    struct Pids(Rc<RefCell<HashSet<u32>>>);

    impl PidSet for Pids {
        fn contains(&self, pid: u32) -> bool {
            self.0.borrow().contains(&pid)
        }

        fn is_empty(&self) -> bool {
            self.0.borrow().is_empty()
        }

        fn forget_gone(&mut self, alive: &dyn Fn(u32) -> bool) {
            self.0.borrow_mut().retain(|&p| alive(p));
        }
    }

    /// A followed process that exited before the kernel could say so (during start-up) is
    /// forgotten at the next check: tracing stops instead of waiting forever.
    #[test]
    fn a_process_gone_before_its_exit_was_seen_leaves_none() {
        let (mut f, _set) = following(&[41, 42]);
        assert!(!f.none_left(&|_| true));
        assert!(!f.none_left(&|p| p == 42));
        assert!(f.none_left(&|_| false));
    }

    fn following(pids: &[u32]) -> (Filter, Pids) {
        let set = Pids::default();
        set.0.borrow_mut().extend(pids);
        let filter = Filter {
            comms: Vec::new(),
            ports: Vec::new(),
            states: Vec::new(),
            ipv6: None,
            needs_action: false,
            own: None,
            traced: Some(Box::new(set.clone())),
            shown: HashSet::new(),
        };
        (filter, set)
    }

    fn transition(sock: u64, old: TcpState, new: TcpState) -> TransitionReport {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let ends = Endpoints {
            local: lo,
            lport: 80,
            remote: lo,
            rport: 40000,
        };
        TransitionReport::new(1, sock, ends, old, new, 7)
    }

    fn shutdown_by(pid: u32) -> Option<Cause> {
        Some(Cause {
            how: Some(1),
            task: Some(Task {
                pid,
                tid: pid,
                ..Default::default()
            }),
            fd: Some(3),
            ..Cause::bare(CauseKind::Call(Call::Shutdown))
        })
    }

    /// A child that shut its socket down and exited before the reports got through the
    /// pipeline: they are still shown (its calls reached userspace because it was followed).
    #[test]
    fn a_child_gone_before_its_reports_are_written_is_still_followed() {
        let (mut f, pids) = following(&[10, 11]);
        let mut fw1 = transition(1, TcpState::Established, TcpState::FinWait1);
        fw1.cause = shutdown_by(11);
        let mut fw2 = transition(1, TcpState::FinWait1, TcpState::FinWait2);
        fw2.cause = shutdown_by(11);
        pids.0.borrow_mut().remove(&11); // the child exited
        assert!(f.wanted(&Report::Transition(fw1)));
        assert!(f.wanted(&Report::Transition(fw2)));
        // Another socket: no call of a followed process, no followed owner.
        let mut other = transition(2, TcpState::Established, TcpState::CloseWait);
        other.cause = Some(Cause::bare(CauseKind::PeerFin));
        assert!(!f.wanted(&Report::Transition(other)));
    }

    /// With `--pid`, a gap before a socket's first shown transition is the kernel filter's (an
    /// earlier, unfollowed socket at the address); a gap in a shown socket is a loss. Without a
    /// filter every gap is.
    #[test]
    fn a_gap_counts_once_the_socket_is_shown() {
        let (mut f, _pids) = following(&[10]);
        // A fork-per-accept parent's close of its copy comes first: no transition shown yet.
        let no_fin = Report::CloseNoFin(CloseNoFinReport {
            ts_ns: 1,
            sock: 1,
            call: Call::Close,
            task: Task {
                pid: 10,
                tid: 10,
                ..Default::default()
            },
            fd: 4,
            remaining_refs: 1,
            holders: Vec::new(),
            inode: 7,
            ends: None,
            state: None,
            recorded_owner: None,
            netns: None,
        });
        assert!(f.wanted(&no_fin));
        assert!(
            !f.transition_shown(1),
            "a close without FIN does not show the socket"
        );
        let mut fw1 = transition(1, TcpState::Established, TcpState::FinWait1);
        fw1.cause = shutdown_by(11);
        fw1.missed_before = true; // the last socket at this address was left in LAST_ACK
        let fw1 = Report::Transition(fw1);
        assert!(!f.missed_transition(&fw1));
        assert!(f.wanted(&fw1));
        let mut close = transition(1, TcpState::FinWait2, TcpState::Close);
        close.cause = shutdown_by(10);
        close.missed_before = true; // FIN_WAIT1 -> FIN_WAIT2 never arrived
        let close = Report::Transition(close);
        assert!(f.missed_transition(&close));
        assert!(f.wanted(&close));
        f.traced = None;
        assert!(f.missed_transition(&fw1));
    }

    /// The kernel skipped a shown socket's last transition (FIN_WAIT2 -> CLOSE in softirq) and
    /// its memory went to the test's client sockets, then to another server socket: the clients
    /// (not followed; their CLOSE_WAIT ran in a followed child) are not shown, and the one loss
    /// counts once, not once per socket that took the address.
    #[test]
    #[allow(clippy::too_many_lines)] // a scenario reads best whole
    fn a_lost_close_counts_once_and_shows_no_later_socket_at_the_address() {
        use crate::trace::{
            correlate::Correlator,
            decode::{CallEnter, Decoded, Record, StateChange},
        };
        let (mut f, _pids) = following(&[20]);
        let mut c = Correlator::new(false);
        let child = Task {
            pid: 20,
            tid: 20,
            ..Default::default()
        };
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let ends = |lport, rport| Endpoints {
            local: lo,
            lport,
            remote: lo,
            rport,
        };
        let state = |old, new, ends| {
            Decoded::Transition(StateChange {
                sock: 1,
                old,
                new,
                ends,
                sk_flags: Some(0),
                inode: 0,
                owner: None,
                maybe_duplicate: false,
            })
        };
        let shutdown = Decoded::CallEnter(CallEnter {
            call: Call::Shutdown,
            fd: 4,
            arg: 1,
            sock: Some(1),
            inode: 7,
            file_refs: Some(1),
            owner: None,
            ends: None,
            maybe_duplicate: false,
        });
        use TcpState::{CloseWait, Established, FinWait1, FinWait2};
        let records = [
            // The server socket: shown, its FIN_WAIT2 -> CLOSE never arrives.
            shutdown.clone(),
            state(Established, FinWait1, ends(80, 40000)),
            state(FinWait1, FinWait2, ends(80, 40000)),
            // Two clients of the test, one after the other at the same address.
            state(Established, CloseWait, ends(40002, 80)),
            state(Established, CloseWait, ends(40004, 80)),
            // A server socket again, complete.
            shutdown,
            state(Established, FinWait1, ends(80, 40006)),
            state(FinWait1, FinWait2, ends(80, 40006)),
            state(FinWait2, TcpState::Close, ends(80, 40006)),
        ];
        let (mut shown, mut gaps) = (Vec::new(), 0);
        let mut out = Vec::new();
        for (ts, what) in records.into_iter().enumerate() {
            let rec = Record {
                ts_ns: ts as u64 + 1,
                task: child.clone(),
                what,
            };
            c.handle(rec, &mut out);
            for r in out.drain(..) {
                let (wanted, missed) = f.pass(&r);
                gaps += missed;
                if wanted {
                    shown.push(r.ends().map(|e| e.lport));
                }
            }
        }
        assert_eq!(
            shown,
            [Some(80), Some(80), Some(80), Some(80), Some(80)],
            "the clients are not shown"
        );
        assert_eq!(gaps, 1, "one transition never arrived");
    }

    /// An owner the kernel recorded as obtained by a followed process counts after it exited;
    /// one found in /proc counts if it is followed now.
    #[test]
    fn an_owner_counts_by_the_kernels_record_or_by_now() {
        let (mut f, _pids) = following(&[10]);
        let owner = |pid: u32, followed: bool| KernelOwner {
            pid,
            fd: 4,
            comm: "srv".into(),
            cgroup_id: 0,
            stale: false,
            since_ns: 0,
            followed,
            main_thread: true,
        };
        let mut cw = transition(3, TcpState::Established, TcpState::CloseWait);
        cw.cause = Some(Cause::bare(CauseKind::PeerFin));
        cw.recorded_owner = Some(owner(12, true)); // a child, gone since
        cw.owner = Some(Owner::from(&owner(12, true)));
        assert!(f.wanted(&Report::Transition(cw.clone())));
        cw.sock = 4;
        cw.recorded_owner = Some(owner(12, false));
        assert!(!f.wanted(&Report::Transition(cw.clone())));
        cw.sock = 5;
        cw.recorded_owner = None;
        cw.owner = Some(Owner::from(&owner(10, false)));
        assert!(f.wanted(&Report::Transition(cw)));
    }
}
