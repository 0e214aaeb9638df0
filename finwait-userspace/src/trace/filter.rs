//! What the user asked to see (`--pid`, `--comm`, `--port`, `--state`, `-4`/`-6`): a report
//! passes or not. The kernel already dropped most of what is not followed; this decides the rest.
use std::collections::HashSet;

use aya::maps::{HashMap as BpfHashMap, MapData};

use crate::model::Report;

pub(crate) struct Filter {
    comms: Vec<String>,
    ports: Vec<u16>,
    states: Vec<u8>,
    ipv6: Option<bool>,
    /// `--metrics`' own port: its scrapes are finwait's traffic, not the host's (either end).
    own_port: Option<u16>,
    /// The kernel's set of followed processes (None: every process is followed).
    traced: Option<BpfHashMap<MapData, u32, u8>>,
    /// Sockets already shown: their later transitions are shown too.
    shown: HashSet<u64>,
}

impl Filter {
    pub(crate) fn new(o: &super::Options) -> Self {
        Self {
            comms: o.comms.clone(),
            ports: o.ports.clone(),
            states: o.states.clone(),
            ipv6: o.ipv6,
            own_port: o.metrics.map(|a| a.port()),
            traced: None,
            shown: HashSet::new(),
        }
    }

    /// Follow the processes in the kernel's map (`--pid`, `--comm`).
    pub(crate) fn follow(&mut self, traced: BpfHashMap<MapData, u32, u8>) {
        self.traced = Some(traced);
    }

    /// True once every followed process has exited.
    pub(crate) fn none_left(&self) -> bool {
        self.traced
            .as_ref()
            .is_some_and(|m| m.keys().next().is_none())
    }

    fn is_traced(&self, pid: u32) -> bool {
        match &self.traced {
            None => true,
            Some(map) => map.get(&pid, 0).is_ok(),
        }
    }

    /// `--state`, `-4`/`-6` and `--port`, and not the endpoint's own connections.
    fn matches(&self, r: &Report) -> bool {
        if let (Some(p), Some(e)) = (self.own_port, r.ends())
            && (e.lport == p || e.rport == p)
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

    /// A socket is followed once a followed process made a call on it or holds it; an owner
    /// matching `--comm` counts even if it made no call yet.
    fn followed(&self, r: &Report) -> bool {
        match r {
            Report::Transition(t) => {
                t.cause
                    .iter()
                    .filter_map(|c| c.task.as_ref())
                    .any(|task| self.is_traced(task.pid))
                    || t.owner.as_ref().is_some_and(|o| {
                        self.comms.iter().any(|c| **c == *o.comm) || self.is_traced(o.pid)
                    })
            }
            Report::CloseNoFin(n) => self.is_traced(n.task.pid),
        }
    }

    pub(crate) fn wanted(&mut self, r: &Report) -> bool {
        let sock = r.sock();
        let wanted = self.matches(r)
            // Without --pid/--comm everything passes: no per-socket bookkeeping on this path.
            && (self.traced.is_none() || self.shown.contains(&sock) || self.followed(r));
        if wanted && self.traced.is_some() {
            self.shown.insert(sock);
        }
        if let Report::Transition(t) = r
            && t.new == finwait_common::tcp_state::CLOSE
        {
            self.shown.remove(&sock);
        }
        wanted
    }
}
