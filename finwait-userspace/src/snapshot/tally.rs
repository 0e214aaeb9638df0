//! The snapshot's summary: per process, how many sockets of each class, folded one socket at a
//! time (a host's 100,000 sockets need not be kept to be counted), and the sentences for it.
use std::{collections::BTreeMap, sync::Arc};

use super::Entry;
use crate::model::{Container, Verdict, diagnosis::readings_words};

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
    let mut who = if pid == 0 {
        "no holder found".to_string()
    } else {
        format!("{comm}[{pid}]")
    };
    crate::model::container::write_short(&mut who, g.container.as_deref());
    format!("{who}: {}", parts.join("; "))
}
