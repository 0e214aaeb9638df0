//! The sockets already stuck when finwait starts: who holds each one and whose job it is.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use anyhow::Result;
use finwait_common::tcp_state as st;
use netlink_packet_sock_diag::inet::StateFlags;
use serde_json::{Value, json};

use crate::{
    correlate::Owner,
    output::state_name,
    sockdiag::{self, DiagSocket, TimerLeft},
};

/// What a stuck socket is, and so whose job it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// FIN_WAIT2, shut down and still held by a process: it must close it; no kernel timeout.
    HalfClosed,
    /// FIN_WAIT2 after close(): the kernel's, freed within tcp_fin_timeout.
    Orphaned,
    /// CLOSE_WAIT: the peer closed; the holder must close it. Never times out.
    CloseWait,
    FinWait1,
    LastAck,
    Closing,
    TimeWait,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::HalfClosed => "fin_wait2_half_closed",
            Class::Orphaned => "fin_wait2_orphaned",
            Class::CloseWait => "close_wait",
            Class::FinWait1 => "fin_wait1",
            Class::LastAck => "last_ack",
            Class::Closing => "closing",
            Class::TimeWait => "time_wait",
        }
    }
}

/// A process that probably owned an orphan: the one listening on its local port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inferred {
    pub pid: u32,
    pub comm: crate::event::Comm,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub sock: DiagSocket,
    pub class: Class,
    pub owners: Vec<Owner>,
    pub inferred: Option<Inferred>,
}

impl Entry {
    /// The process the summary files this socket under.
    pub fn responsible(&self) -> Option<(u32, &str, bool)> {
        if let Some(o) = self.owners.first() {
            return Some((o.pid, &o.comm, false));
        }
        self.inferred.as_ref().map(|i| (i.pid, &*i.comm, true))
    }

    /// The answer in words.
    pub fn answer(&self) -> String {
        let holder = match self.owners.first() {
            Some(o) if self.owners.len() > 1 => format!(
                "{}[{}] and {} other holder(s)",
                o.comm,
                o.pid,
                self.owners.len() - 1
            ),
            Some(o) => format!("{}[{}] fd {}", o.comm, o.pid, o.fd),
            None => "its owner (not found)".into(),
        };
        let left = |t: Option<TimerLeft>| {
            t.map(|t| format!(" (about {} left)", secs(t.left())))
                .unwrap_or_default()
        };
        let inferred = match &self.inferred {
            Some(i) => format!(
                "; closed by {}[{}] (inferred: it listens on port {})",
                i.comm, i.pid, self.sock.lport
            ),
            None => String::new(),
        };
        match self.class {
            Class::HalfClosed => format!(
                "half-closed by shutdown() and still held by {holder}: it must close it (no kernel timeout)"
            ),
            Class::Orphaned => format!(
                "orphaned after close(){inferred}: the kernel frees it{}",
                left(self.sock.timer)
            ),
            Class::CloseWait => format!(
                "the peer closed; {holder} must close it (a leak if it stays: CLOSE_WAIT never times out)"
            ),
            Class::FinWait1 => format!(
                "FIN sent, not yet acknowledged{}",
                if self.owners.is_empty() {
                    inferred
                } else {
                    format!("; held by {holder}")
                }
            ),
            Class::LastAck => {
                "closed by its owner after the peer; waiting for the peer's last ACK".into()
            }
            Class::Closing => "both sides closed at once; waiting for the peer's ACK".into(),
            Class::TimeWait => format!("TIME_WAIT{}", left(self.sock.timer)),
        }
    }
}

fn secs(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// The states a snapshot reads (LISTEN only to infer owners of orphans).
pub fn states() -> StateFlags {
    StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK
        | StateFlags::CLOSING
        | StateFlags::TIME_WAIT
        | StateFlags::LISTEN
}

pub fn classify(s: &DiagSocket, owners: &[Owner]) -> Option<Class> {
    Some(match s.state {
        // A FIN_WAIT2 socket that a process still holds has been shut down; without a holder
        // (no inode, or a time-wait mini-socket) it was closed.
        st::FIN_WAIT2 if s.inode != 0 && !owners.is_empty() => Class::HalfClosed,
        st::FIN_WAIT2 => Class::Orphaned,
        st::CLOSE_WAIT => Class::CloseWait,
        st::FIN_WAIT1 => Class::FinWait1,
        st::LAST_ACK => Class::LastAck,
        st::CLOSING => Class::Closing,
        st::TIME_WAIT => Class::TimeWait,
        _ => return None,
    })
}

pub struct Snapshot {
    pub entries: Vec<Entry>,
    /// CLOCK_MONOTONIC when the dump was taken.
    pub taken_ns: u64,
    /// Every socket's holders, as the scan found them (live tracing seeds the kernel's
    /// ownership map from it).
    pub owners: crate::owners::Index,
}

/// Reads the sockets and their owners. `pids`: keep only sockets held by (or inferred to belong
/// to) these processes; empty keeps all.
pub fn take(pids: &[u32]) -> Result<Snapshot> {
    let taken_ns = crate::owners::monotonic_ns();
    let sockets = sockdiag::dump(states())?;
    let owners = crate::owners::scan();
    Ok(Snapshot {
        entries: build(sockets, |inode| owners.get(inode), pids),
        taken_ns,
        owners,
    })
}

/// Classifies sockets given an owner lookup (pure: unit-tested with made-up sockets).
pub fn build(
    sockets: Vec<DiagSocket>,
    owners_of: impl Fn(u64) -> Vec<Owner>,
    pids: &[u32],
) -> Vec<Entry> {
    // Listening sockets by (address, port), to infer who accepted a now-orphaned connection.
    let mut listeners: HashMap<(Option<IpAddr>, u16), Inferred> = HashMap::new();
    for s in sockets.iter().filter(|s| s.state == st::LISTEN) {
        if let Some(o) = owners_of(s.inode).into_iter().next() {
            let any = s.local.is_unspecified();
            listeners.insert(
                (if any { None } else { Some(s.local) }, s.lport),
                Inferred {
                    pid: o.pid,
                    comm: o.comm,
                },
            );
        }
    }
    let keep: Option<HashSet<u32>> =
        (!pids.is_empty()).then(|| crate::procs::with_descendants(pids).into_iter().collect());
    let mut entries = Vec::new();
    for s in sockets.into_iter().filter(|s| s.state != st::LISTEN) {
        let owners = if s.inode != 0 {
            owners_of(s.inode)
        } else {
            Vec::new()
        };
        let Some(class) = classify(&s, &owners) else {
            continue;
        };
        let inferred = if owners.is_empty() && class != Class::TimeWait {
            listeners
                .get(&(Some(s.local), s.lport))
                .or_else(|| listeners.get(&(None, s.lport)))
                .cloned()
        } else {
            None
        };
        let mut e = Entry {
            sock: s,
            class,
            owners,
            inferred,
        };
        if let Some(keep) = &keep {
            // The processes asked about come first: the summary speaks of them.
            e.owners.sort_by_key(|o| !keep.contains(&o.pid));
            let held = e.owners.iter().any(|o| keep.contains(&o.pid));
            let inferred = e.inferred.as_ref().is_some_and(|i| keep.contains(&i.pid));
            if !held && !inferred {
                continue;
            }
        }
        entries.push(e);
    }
    entries
}

/// Per process: counts by class (and how many were inferred).
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Group {
    pub counts: BTreeMap<Class, usize>,
    pub inferred: usize,
}

pub fn summarize(entries: &[Entry]) -> BTreeMap<(u32, String), Group> {
    let mut groups: BTreeMap<(u32, String), Group> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.class != Class::TimeWait) {
        let (pid, comm, inferred) = e
            .responsible()
            .map(|(p, c, i)| (p, c.to_string(), i))
            .unwrap_or((0, "(no owner found)".into(), false));
        let g = groups.entry((pid, comm)).or_default();
        *g.counts.entry(e.class).or_default() += 1;
        g.inferred += inferred as usize;
    }
    groups
}

/// One sentence per process, most stuck sockets first.
pub fn summary_lines(entries: &[Entry]) -> Vec<String> {
    let groups = summarize(entries);
    let mut rows: Vec<_> = groups.iter().collect();
    rows.sort_by_key(|(_, g)| std::cmp::Reverse(g.counts.values().sum::<usize>()));
    let mut lines = Vec::new();
    for ((pid, comm), g) in rows {
        let n = |c: Class| g.counts.get(&c).copied().unwrap_or(0);
        let who = if *pid == 0 {
            comm.clone()
        } else {
            format!("{comm}[{pid}]")
        };
        let mut parts = Vec::new();
        let fw2 = n(Class::HalfClosed) + n(Class::Orphaned);
        if fw2 > 0 {
            let inferred = if g.inferred > 0 {
                format!(", {} inferred from the listening port", g.inferred)
            } else {
                String::new()
            };
            let mut kinds = Vec::new();
            if n(Class::Orphaned) > 0 {
                kinds.push(format!(
                    "{} orphaned after close() (the kernel frees them{inferred})",
                    n(Class::Orphaned)
                ));
            }
            if n(Class::HalfClosed) > 0 {
                kinds.push(format!(
                    "{} half-closed by shutdown() and still open (the process must close them)",
                    n(Class::HalfClosed)
                ));
            }
            parts.push(format!("{fw2} FIN_WAIT2: {}", kinds.join(", ")));
        }
        if n(Class::CloseWait) > 0 {
            parts.push(format!(
                "{} CLOSE_WAIT held open (the process must close them; a leak if they stay)",
                n(Class::CloseWait)
            ));
        }
        for (c, label) in [
            (Class::FinWait1, "FIN_WAIT1"),
            (Class::LastAck, "LAST_ACK"),
            (Class::Closing, "CLOSING"),
        ] {
            if n(c) > 0 {
                parts.push(format!("{} {label}", n(c)));
            }
        }
        lines.push(format!("{who}: {}", parts.join("; ")));
    }
    let tw = entries
        .iter()
        .filter(|e| e.class == Class::TimeWait)
        .count();
    lines.push(format!(
        "TIME_WAIT: {tw} (normal after an active close; the kernel frees them)"
    ));
    lines
}

pub fn entry_json(e: &Entry) -> Value {
    let s = &e.sock;
    json!({
        "event": "snapshot",
        "family": if s.local.is_ipv6() { "ipv6" } else { "ipv4" },
        "laddr": s.local.to_string(),
        "lport": s.lport,
        "raddr": s.remote.to_string(),
        "rport": s.rport,
        "state": state_name(s.state),
        "class": e.class.name(),
        "inode": (s.inode != 0).then_some(s.inode),
        "uid": s.uid,
        "timer": s.timer.map(|t| json!({"kind": t.name(), "left_ms": t.left().as_millis() as u64})),
        "recv_queue": s.recv_queue,
        "send_queue": s.send_queue,
        "owners": e.owners.iter().map(|o| json!({"pid": o.pid, "comm": o.comm, "fd": o.fd})).collect::<Vec<_>>(),
        "inferred_owner": e.inferred.as_ref().map(|i| json!({"pid": i.pid, "comm": i.comm})),
        "answer": e.answer(),
    })
}

pub fn summary_json(entries: &[Entry]) -> Value {
    let groups: Vec<Value> = summarize(entries)
        .into_iter()
        .map(|((pid, comm), g)| {
            let counts: serde_json::Map<String, Value> = g.counts.iter().map(|(c, n)| (c.name().to_string(), json!(n))).collect();
            json!({"pid": (pid != 0).then_some(pid), "comm": comm, "counts": counts, "inferred": g.inferred})
        })
        .collect();
    json!({
        "event": "snapshot_summary",
        "sockets": entries.iter().filter(|e| e.class != Class::TimeWait).count(),
        "time_wait": entries.iter().filter(|e| e.class == Class::TimeWait).count(),
        "processes": groups,
    })
}

/// `finwait-trace snapshot`.
pub fn run(pids: &[u32], json: bool, detail: bool) -> Result<()> {
    crate::procs::check_exists(pids)?;
    let snap = take(pids)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    print(&snap.entries, json, detail, &mut out)?;
    std::io::Write::flush(&mut out)?;
    Ok(())
}

pub fn print(
    entries: &[Entry],
    json: bool,
    detail: bool,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    if json {
        writeln!(out, "{}", summary_json(entries))?;
        for e in entries.iter().filter(|e| e.class != Class::TimeWait) {
            writeln!(out, "{}", entry_json(e))?;
        }
        return Ok(());
    }
    writeln!(out, "Sockets on the close path now:")?;
    for line in summary_lines(entries) {
        writeln!(out, "  {line}")?;
    }
    if detail {
        for e in entries.iter().filter(|e| e.class != Class::TimeWait) {
            let s = &e.sock;
            writeln!(
                out,
                "{}:{} > {}:{} {}: {}",
                s.local,
                s.lport,
                s.remote,
                s.rport,
                state_name(s.state),
                e.answer()
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(state: u8, lport: u16, inode: u64, timer: Option<TimerLeft>) -> DiagSocket {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        DiagSocket {
            state,
            local: lo,
            lport,
            remote: lo,
            rport: 40000,
            inode,
            uid: 0,
            timer,
            recv_queue: 0,
            send_queue: 0,
            shutdown: None,
        }
    }
    fn owner(pid: u32, comm: &str, fd: i32) -> Owner {
        Owner {
            pid,
            comm: comm.into(),
            fd,
            cgroup_id: None,
        }
    }

    #[test]
    fn classifies_and_infers_the_listener() {
        let owners = |inode: u64| match inode {
            1 => vec![owner(10, "nginx", 6)],   // listener on :80
            2 => vec![owner(11, "nginx", 9)],   // half-closed, held
            3 => vec![owner(99, "python3", 4)], // CLOSE_WAIT
            _ => vec![],
        };
        let tw = Some(TimerLeft::TimeWait(Duration::from_secs(42)));
        let sockets = vec![
            sock(st::LISTEN, 80, 1, None),
            sock(st::FIN_WAIT2, 80, 2, None),
            sock(st::FIN_WAIT2, 80, 0, tw),
            sock(st::CLOSE_WAIT, 5432, 3, None),
            sock(st::TIME_WAIT, 80, 0, tw),
            sock(st::FIN_WAIT2, 5555, 0, tw),
        ];
        let e = build(sockets, owners, &[]);
        let classes: Vec<Class> = e.iter().map(|e| e.class).collect();
        assert_eq!(
            classes,
            [
                Class::HalfClosed,
                Class::Orphaned,
                Class::CloseWait,
                Class::TimeWait,
                Class::Orphaned
            ]
        );
        assert_eq!(
            e[1].inferred,
            Some(Inferred {
                pid: 10,
                comm: "nginx".into()
            })
        );
        assert_eq!(
            e[4].inferred, None,
            "no listener on a client port: no guess"
        );
        let lines = summary_lines(&e);
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("nginx[10]: 1 FIN_WAIT2: 1 orphaned after close()")),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("python3[99]: 1 CLOSE_WAIT held open")),
            "{lines:?}"
        );
        assert_eq!(
            lines.last().unwrap(),
            "TIME_WAIT: 1 (normal after an active close; the kernel frees them)"
        );
        assert!(
            e[1].answer().contains("about 42 s left"),
            "{}",
            e[1].answer()
        );
    }
}
