//! What a tracing session found, per process: printed when tracing ends.
use std::collections::{BTreeMap, HashMap};

use finwait_common::{Call, tcp_state as st};
use serde_json::{Value, json};

use crate::{
    correlate::{CauseKind, Report, TransitionReport},
    event::Endpoints,
    output::how_name,
};

/// Per-process counts. Keyed by the process that made the call (FIN_WAIT2) or holds the socket
/// (CLOSE_WAIT).
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    /// FIN_WAIT2 entries still owned, by the call that half-closed them (e.g. "shutdown(SHUT_WR)").
    pub half_closed: BTreeMap<String, u64>,
    /// Of those, the ones that left FIN_WAIT2 while traced (closed, or the peer's FIN), by call.
    pub half_closed_ended: BTreeMap<String, u64>,
    /// FIN_WAIT2 entries orphaned, by call ("close()", "process exit", ...).
    pub orphaned: BTreeMap<String, u64>,
    pub close_wait: u64,
    /// CLOSE_WAIT sockets their owner then closed.
    pub close_wait_closed: u64,
}

/// Sockets still stuck when tracing ended.
#[derive(Debug, Clone)]
struct Open {
    since_ns: u64,
    who: u32,
    /// FIN_WAIT2 after this call (None: CLOSE_WAIT).
    half_closed_by: Option<String>,
    ends: Endpoints,
    fd: Option<i32>,
    /// Already reported by `--stuck`.
    reported: bool,
}

impl Open {
    fn what(&self) -> String {
        match &self.half_closed_by {
            Some(call) => format!("FIN_WAIT2 after {call}"),
            None => "CLOSE_WAIT".into(),
        }
    }
}

/// A socket still half-closed or in CLOSE_WAIT after the `--stuck` threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Stuck {
    pub sock: u64,
    pub what: String,
    pub pid: u32,
    pub comm: crate::event::Comm,
    pub fd: Option<i32>,
    pub ends: Endpoints,
    pub stuck_ns: u64,
}

#[derive(Default)]
pub struct Summary {
    /// pid -> (name, counts). The name is the process's (from /proc, via CLOSE_WAIT owners) once
    /// known, else the calling thread's.
    by_process: BTreeMap<u32, (crate::event::Comm, Counts)>,
    open: HashMap<u64, Open>,
    half_closed_ms: Histogram,
    close_wait_ms: Histogram,
    pub stuck_reported: u64,
}

/// Power-of-two buckets in milliseconds: `counts[i]` holds values in [2^(i-1), 2^i) ms.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    pub counts: Vec<u64>,
}

impl Histogram {
    pub fn add(&mut self, ns: u64) {
        let ms = ns / 1_000_000;
        let bucket = (u64::BITS - ms.leading_zeros()) as usize;
        if self.counts.len() <= bucket {
            self.counts.resize(bucket + 1, 0);
        }
        self.counts[bucket] += 1;
    }

    fn label(i: usize) -> String {
        if i == 0 {
            "<1 ms".into()
        } else {
            format!("<{} ms", 1u64 << i)
        }
    }

    pub fn json(&self) -> Value {
        Value::Array(
            self.counts
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| json!({"below_ms": 1u64 << i, "count": n}))
                .collect(),
        )
    }

    fn lines(&self) -> Vec<String> {
        let max = self.counts.iter().copied().max().unwrap_or(0).max(1);
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| {
                format!(
                    "    {:>10} {:>7} {}",
                    Self::label(i),
                    n,
                    "#".repeat((n * 40).div_ceil(max) as usize)
                )
            })
            .collect()
    }
}

fn call_name(kind: CauseKind, how: Option<i32>) -> String {
    match (kind, how) {
        (CauseKind::Call(Call::Shutdown), Some(h)) => format!("shutdown({})", how_name(h)),
        (CauseKind::Call(_), _) => format!("{}()", kind.name()),
        (CauseKind::Exit, _) => "process exit".into(),
        (k, _) => k.name().into(),
    }
}

impl Summary {
    pub fn add(&mut self, r: &Report) {
        let Report::Transition(t) = r else { return };
        match (t.old, t.new) {
            (st::FIN_WAIT1, st::FIN_WAIT2) => self.fin_wait2(t),
            (st::ESTABLISHED, st::CLOSE_WAIT) => {
                if let Some(o) = &t.owner {
                    let entry = self.by_process.entry(o.pid).or_default();
                    entry.0 = o.comm.clone(); // the process's own name
                    entry.1.close_wait += 1;
                    self.open.insert(
                        t.sock,
                        Open {
                            since_ns: t.ts_ns,
                            who: o.pid,
                            half_closed_by: None,
                            ends: t.ends.clone(),
                            fd: Some(o.fd),
                            reported: false,
                        },
                    );
                }
            }
            (st::CLOSE_WAIT, _) => {
                if let Some(ns) = t.close_wait_ns {
                    self.close_wait_ms.add(ns);
                }
                if let Some(o) = self.open.remove(&t.sock) {
                    self.by_process
                        .entry(o.who)
                        .or_default()
                        .1
                        .close_wait_closed += 1;
                }
            }
            (st::FIN_WAIT2, _) => {
                if let Some(ns) = t.half_closed_ns {
                    self.half_closed_ms.add(ns);
                }
                if let Some(o) = self.open.remove(&t.sock)
                    && let Some(call) = o.half_closed_by
                {
                    let counts = &mut self.by_process.entry(o.who).or_default().1;
                    *counts.half_closed_ended.entry(call).or_default() += 1;
                }
            }
            _ => {}
        }
        if t.new == st::CLOSE {
            self.open.remove(&t.sock);
        }
    }

    fn fin_wait2(&mut self, t: &TransitionReport) {
        let Some(c) = &t.cause else { return };
        let Some(task) = &c.task else { return };
        let who = task.pid;
        let call = call_name(c.kind, c.how);
        let entry = self.by_process.entry(who).or_default();
        if entry.0.is_empty() {
            entry.0 = task.comm.clone();
        }
        let counts = &mut entry.1;
        if t.orphan == Some(false) {
            *counts.half_closed.entry(call.clone()).or_default() += 1;
            self.open.insert(
                t.sock,
                Open {
                    since_ns: t.ts_ns,
                    who,
                    half_closed_by: Some(call.clone()),
                    ends: t.ends.clone(),
                    fd: c.fd,
                    reported: false,
                },
            );
        } else {
            *counts.orphaned.entry(call).or_default() += 1;
        }
    }

    /// Sockets stuck for at least `threshold_ns` and not reported yet (each is reported once).
    pub fn take_stuck(&mut self, now_ns: u64, threshold_ns: u64) -> Vec<Stuck> {
        let mut out = Vec::new();
        for (sock, o) in self.open.iter_mut() {
            let age = now_ns.saturating_sub(o.since_ns);
            if o.reported || age < threshold_ns {
                continue;
            }
            o.reported = true;
            let comm = self
                .by_process
                .get(&o.who)
                .map(|(c, _)| c.clone())
                .unwrap_or_default();
            out.push(Stuck {
                sock: *sock,
                what: o.what(),
                pid: o.who,
                comm,
                fd: o.fd,
                ends: o.ends.clone(),
                stuck_ns: age,
            });
        }
        self.stuck_reported += out.len() as u64;
        out.sort_by_key(|s| std::cmp::Reverse(s.stuck_ns));
        out
    }

    pub fn counts(&self) -> &BTreeMap<u32, (crate::event::Comm, Counts)> {
        &self.by_process
    }

    /// One sentence per process: shutdown() or close(), and whose job the clean-up is.
    pub fn sentences(&self) -> Vec<String> {
        self.by_process
            .iter()
            .map(|(pid, (comm, c))| {
                let mut parts = Vec::new();
                for (call, n) in &c.half_closed {
                    let ended = c.half_closed_ended.get(call).copied().unwrap_or(0).min(*n);
                    let open = n - ended;
                    parts.push(format!(
                        "{n} FIN_WAIT2 after {call}, {ended} ended later, {open} still half-closed{}",
                        if open > 0 {
                            format!(": {comm} must close them")
                        } else {
                            String::new()
                        }
                    ));
                }
                for (call, n) in &c.orphaned {
                    parts.push(format!(
                        "{n} FIN_WAIT2 after {call}: orphans, the kernel frees them"
                    ));
                }
                if c.close_wait > 0 {
                    let open = c.close_wait - c.close_wait_closed.min(c.close_wait);
                    parts.push(format!(
                        "{} CLOSE_WAIT, {} closed later, {open} never closed while traced{}",
                        c.close_wait,
                        c.close_wait_closed,
                        if open > 0 {
                            format!(": {comm} must close them (a leak if they stay)")
                        } else {
                            String::new()
                        }
                    ));
                }
                format!("{comm}[{pid}]: {}", parts.join("; "))
            })
            .collect()
    }

    fn longest(&self, now_ns: u64, n: usize) -> Vec<(&u64, &Open, u64)> {
        let mut v: Vec<_> = self
            .open
            .iter()
            .map(|(s, o)| (s, o, now_ns.saturating_sub(o.since_ns)))
            .collect();
        v.sort_by_key(|(_, _, age)| std::cmp::Reverse(*age));
        v.truncate(n);
        v
    }

    pub fn json(&self, now_ns: u64) -> Value {
        let processes: Vec<Value> = self
            .by_process
            .iter()
            .zip(self.sentences())
            .map(|((pid, (comm, c)), sentence)| {
                json!({
                    "pid": pid,
                    "comm": comm,
                    "fin_wait2_half_closed": c.half_closed,
                    "fin_wait2_half_closed_ended": c.half_closed_ended,
                    "fin_wait2_orphaned": c.orphaned,
                    "close_wait": c.close_wait,
                    "close_wait_closed": c.close_wait_closed,
                    "answer": sentence,
                })
            })
            .collect();
        let longest: Vec<Value> = self
            .longest(now_ns, 10)
            .into_iter()
            .map(|(sock, o, age)| {
                let comm = self.by_process.get(&o.who).map(|(c, _)| &**c).unwrap_or("");
                json!({"sock": format!("{sock:#x}"), "state": o.what(), "pid": o.who, "comm": comm, "stuck_ms": age as f64 / 1e6})
            })
            .collect();
        json!({
            "event": "summary",
            "processes": processes,
            "half_closed_ms": self.half_closed_ms.json(),
            "close_wait_ms": self.close_wait_ms.json(),
            "still_stuck": self.open.len(),
            "longest_stuck": longest,
            "stuck_reported": self.stuck_reported,
        })
    }

    pub fn human(&self, now_ns: u64) -> Vec<String> {
        let mut out = vec!["Summary:".to_string()];
        if self.by_process.is_empty() {
            out.push("  nothing on the close path was attributed to a process".into());
        }
        out.extend(self.sentences().into_iter().map(|s| format!("  {s}")));
        for (name, h) in [
            ("Time half-closed in FIN_WAIT2", &self.half_closed_ms),
            ("Time in CLOSE_WAIT before close", &self.close_wait_ms),
        ] {
            if !h.counts.is_empty() {
                out.push(format!("  {name}:"));
                out.extend(h.lines());
            }
        }
        let longest = self.longest(now_ns, 5);
        if !longest.is_empty() {
            out.push("  Longest stuck, still open:".into());
            for (_, o, age) in longest {
                let comm = self.by_process.get(&o.who).map(|(c, _)| &**c).unwrap_or("");
                out.push(format!(
                    "    {} {comm}[{}] for {:.1} s",
                    o.what(),
                    o.who,
                    age as f64 / 1e9
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        correlate::{Cause, Owner},
        event::{Endpoints, Task},
    };

    fn tr(sock: u64, old: u8, new: u8) -> TransitionReport {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        TransitionReport::new(
            sock * 10,
            sock,
            Endpoints {
                local: lo,
                lport: 1,
                remote: lo,
                rport: 2,
            },
            old,
            new,
            0,
        )
    }
    fn cause(kind: CauseKind, how: Option<i32>) -> Option<Cause> {
        Some(Cause {
            kind,
            how,
            task: Some(Task {
                pid: 7,
                tid: 7,
                comm: "nginx".into(),
            }),
            fd: Some(3),
            exact: false,
        })
    }

    #[test]
    fn counts_answers_and_histograms() {
        let mut s = Summary::default();
        for sock in 1..=3 {
            let mut t = tr(sock, st::FIN_WAIT1, st::FIN_WAIT2);
            t.cause = cause(CauseKind::Call(Call::Shutdown), Some(1));
            t.orphan = Some(false);
            s.add(&Report::Transition(t));
        }
        let mut t = tr(4, st::FIN_WAIT1, st::FIN_WAIT2);
        t.cause = cause(CauseKind::Call(Call::Close), None);
        t.orphan = Some(true);
        s.add(&Report::Transition(t));
        for sock in 5..=6 {
            let mut t = tr(sock, st::ESTABLISHED, st::CLOSE_WAIT);
            t.owner = Some(Owner {
                pid: 9,
                comm: "python3".into(),
                fd: 4,
                cgroup_id: None,
            });
            s.add(&Report::Transition(t));
        }
        let mut t = tr(5, st::CLOSE_WAIT, st::LAST_ACK);
        t.close_wait_ns = Some(300_000_000);
        s.add(&Report::Transition(t));
        // The first half-closed socket is closed: an orphan now, no longer the process's job.
        let mut t = tr(1, st::FIN_WAIT2, st::CLOSE);
        t.cause = cause(CauseKind::Call(Call::Close), None);
        t.half_closed_ns = Some(3_000_000_000);
        s.add(&Report::Transition(t));

        let c = &s.counts()[&7].1;
        assert_eq!(c.half_closed["shutdown(SHUT_WR)"], 3);
        assert_eq!(c.half_closed_ended["shutdown(SHUT_WR)"], 1);
        assert_eq!(c.orphaned["close()"], 1);
        let p = &s.counts()[&9].1;
        assert_eq!((p.close_wait, p.close_wait_closed), (2, 1));
        let sentences = s.sentences();
        assert_eq!(
            sentences[0],
            "nginx[7]: 3 FIN_WAIT2 after shutdown(SHUT_WR), 1 ended later, 2 still half-closed: nginx must close them; 1 FIN_WAIT2 after close(): orphans, the kernel frees them"
        );
        assert_eq!(
            sentences[1],
            "python3[9]: 2 CLOSE_WAIT, 1 closed later, 1 never closed while traced: python3 must close them (a leak if they stay)"
        );
        // 300 ms falls in [256, 512).
        assert_eq!(
            s.json(1_000)["close_wait_ms"],
            json!([{"below_ms": 512, "count": 1}])
        );
        assert_eq!(
            s.json(1_000)["still_stuck"],
            3,
            "2 half-closed + 1 CLOSE_WAIT"
        );
        // --stuck: each once, oldest first; the CLOSE_WAIT names its owner's fd.
        let stuck = s.take_stuck(2_000_000_000, 1_000_000_000);
        assert_eq!(stuck.len(), 3);
        assert!(s.take_stuck(3_000_000_000, 1_000_000_000).is_empty());
        assert!(
            stuck
                .iter()
                .any(|x| x.what == "CLOSE_WAIT" && x.pid == 9 && x.fd == Some(4))
        );
        assert_eq!(s.json(0)["stuck_reported"], 3);
    }
}
