//! The snapshot's summary: per process, how many sockets of each class, folded one socket at a
//! time (a host's 100,000 sockets need not be kept to be counted), and the sentences for it.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use super::Entry;
use crate::model::{
    Container, Verdict,
    diagnosis::readings_words,
    summary::{PeerCount, by_peer, peers_words},
};

/// Distinct peers counted per process at most (a server's thousands of clients need not be).
const MAX_PEERS: usize = 4096;

/// Per process: counts by class (and how many were inferred).
#[derive(Default, Debug, PartialEq, Eq)]
pub(crate) struct Group {
    pub(crate) counts: BTreeMap<&'static str, usize>,
    pub(crate) inferred: usize,
    /// CLOSE_WAIT by what the owner did with the FIN (`fin_not_read`, `read_eof_not_closed`).
    pub(crate) readings: BTreeMap<&'static str, usize>,
    /// The verdict of each class, for the words.
    verdicts: BTreeMap<&'static str, Verdict>,
    /// The process's container, where it runs in one.
    pub(crate) container: Option<Arc<Container>>,
    /// Its command line, short (filled in once the tally is done: see [`Tally::name`]).
    pub(crate) cmdline: Option<String>,
    /// Its sockets a process must close, by peer (bounded: [`MAX_PEERS`]).
    peers: HashMap<(IpAddr, u16), u64>,
}

impl Group {
    /// Where its sockets that a process must close go, most first.
    pub(crate) fn peers(&self) -> Vec<PeerCount> {
        by_peer(&self.peers)
    }
}

/// Sockets on the close path by responsible process ((0, "(no owner found)") when none), and
/// the TIME_WAIT count.
#[derive(Default, Debug)]
pub(crate) struct Tally {
    pub(crate) groups: BTreeMap<(u32, String), Group>,
    pub(crate) time_wait: usize,
    /// Sockets counted, TIME_WAIT aside.
    pub(crate) sockets: usize,
}

impl Tally {
    /// Counts `entries`.
    #[cfg(test)]
    pub(crate) fn of(entries: &[Entry]) -> Self {
        let mut t = Self::default();
        entries.iter().for_each(|e| t.add(e));
        t
    }

    /// Counts one socket.
    pub(crate) fn add(&mut self, e: &Entry) {
        if e.is_time_wait() {
            self.time_wait += 1;
            return;
        }
        self.sockets += 1;
        let (pid, comm, inferred) = e
            .responsible()
            .map(|(p, c, i)| (p, c.to_string(), i))
            .unwrap_or((0, "(no owner found)".into(), false));
        let g = self.groups.entry((pid, comm)).or_default();
        if g.container.is_none() && !inferred {
            g.container = e.owners.first().and_then(|o| o.container.clone());
        }
        *g.counts.entry(e.class()).or_default() += 1;
        g.verdicts
            .entry(e.class())
            .or_insert_with(|| e.verdict.clone());
        g.inferred += usize::from(inferred);
        let s = &e.sock;
        if e.verdict.needs_action()
            && (g.peers.len() < MAX_PEERS || g.peers.contains_key(&(s.remote, s.rport)))
        {
            *g.peers.entry((s.remote, s.rport)).or_default() += 1;
        }
        if let Some(r) = e.owner_state.as_ref().and_then(|o| o.reading) {
            *g.readings.entry(r.name()).or_default() += 1;
        }
    }

    /// Sockets for which no holder was found.
    pub(crate) fn unowned(&self) -> usize {
        self.groups
            .iter()
            .filter(|((pid, _), _)| *pid == 0)
            .map(|(_, g)| g.counts.values().sum::<usize>())
            .sum()
    }

    /// Each process's command line, from `cmdline` (the caller reads /proc).
    pub(crate) fn name(&mut self, cmdline: impl Fn(u32) -> Option<String>) {
        for ((pid, _), g) in &mut self.groups {
            if *pid != 0 {
                g.cmdline = cmdline(*pid);
            }
        }
    }

    /// One sentence per process, most stuck sockets first, then the TIME_WAIT count.
    pub(crate) fn lines(&self) -> Vec<String> {
        let mut rows: Vec<_> = self.groups.iter().collect();
        rows.sort_by_key(|(_, g)| std::cmp::Reverse(g.counts.values().sum::<usize>()));
        let mut lines: Vec<String> = rows
            .into_iter()
            .map(|((pid, comm), g)| group_line(*pid, comm, g))
            .collect();
        lines.push(format!(
            "TIME_WAIT: {} (normal after an active close; the kernel frees them)",
            self.time_wait
        ));
        lines
    }
}

/// One process's sentence: `nginx[12]: 8 FIN_WAIT2: ...; 3 CLOSE_WAIT held open: ...`.
fn group_line(pid: u32, comm: &str, g: &Group) -> String {
    let n = |c: &str| g.counts.get(c).copied().unwrap_or(0);
    // No holder found: the sentence names nobody ("whoever holds them").
    let holder = if pid == 0 { "whoever holds them" } else { comm };
    let whose = |c: &str| {
        g.verdicts
            .get(c)
            .map(|v| v.plural(holder).to_string())
            .unwrap_or_default()
    };
    let mut parts = Vec::new();
    let (half, orphaned) = (n("fin_wait2_half_closed"), n("fin_wait2_orphaned"));
    if half + orphaned > 0 {
        let mut kinds = Vec::new();
        if orphaned > 0 {
            let inferred = match g.inferred {
                0 => String::new(),
                i => format!("; {i} inferred from the listening port"),
            };
            let whose = whose("fin_wait2_orphaned");
            kinds.push(format!(
                "{orphaned} orphaned after close() ({whose}{inferred})"
            ));
        }
        if half > 0 {
            let whose = whose("fin_wait2_half_closed");
            kinds.push(format!(
                "{half} half-closed by shutdown() and still open ({whose})"
            ));
        }
        parts.push(format!(
            "{} FIN_WAIT2: {}",
            half + orphaned,
            kinds.join(", ")
        ));
    }
    if n("close_wait") > 0 {
        let whose = whose("close_wait");
        parts.push(format!(
            "{} CLOSE_WAIT held open{}: {whose}",
            n("close_wait"),
            readings_words(|k| g.readings.get(k).map_or(0, |n| *n as u64))
        ));
    }
    for (c, label) in [
        ("fin_wait1", "FIN_WAIT1"),
        ("last_ack", "LAST_ACK"),
        ("closing", "CLOSING"),
    ] {
        if n(c) > 0 {
            parts.push(format!("{} {label}", n(c)));
        }
    }
    let peers = g.peers();
    if !peers.is_empty() {
        parts.push(format!("by peer: {}", peers_words(&peers)));
    }
    format!("{}: {}", who(pid, comm, g), parts.join("; "))
}

/// `python3[1463] (python3 app.py --pool 8) (docker:3f2a9c1b7d4e)`, or `no holder found`.
fn who(pid: u32, comm: &str, g: &Group) -> String {
    let mut who = match (pid, &g.cmdline) {
        (0, _) => "no holder found".to_string(),
        (_, Some(c)) => format!("{comm}[{pid}] ({c})"),
        (_, None) => format!("{comm}[{pid}]"),
    };
    crate::model::container::write_short(&mut who, g.container.as_deref());
    who
}
