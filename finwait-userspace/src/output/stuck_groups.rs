//! `--stuck` at incident scale: the sockets one check found, grouped by who must act and why,
//! so that 2,000 sockets of one leak read as one line (the JSON sink keeps one per socket).
use std::{collections::BTreeMap, net::IpAddr};

use crate::model::{
    Stuck,
    diagnosis::{FinReading, Polled},
};

/// Sockets of one check that share holder, state, verdict and diagnosis.
pub(crate) struct Group<'a> {
    /// The first of them, whose words the line uses.
    pub(crate) first: &'a Stuck,
    pub(crate) count: usize,
    /// The holder's fds, ascending.
    pub(crate) fds: Vec<i32>,
    pub(crate) youngest_ns: u64,
    pub(crate) oldest_ns: u64,
    /// Some were stuck before tracing started (their ages count from the inventory).
    pub(crate) at_least: bool,
    pub(crate) peers: Peers,
}

/// What the group's sockets share of their other end: one peer (a client pool's leak to one
/// back-end), one local port (a server's sockets from many clients), or neither.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Peers {
    One(IpAddr, u16),
    OnPort(u16),
    Many(usize),
}

/// What makes two stuck sockets "like each other": same process, state, verdict and what the
/// owner does about them (the diagnosis, without the fd it names).
type Key = (
    u32,
    String,
    &'static str,
    Option<&'static str>,
    Option<bool>,
);

fn key(s: &Stuck) -> Key {
    let o = s.owner_state.as_ref();
    (
        s.holder.pid,
        s.what.clone(),
        s.verdict.name(),
        o.and_then(|o| o.reading).map(FinReading::name),
        o.and_then(|o| o.polled.as_ref())
            .and_then(Polled::registered),
    )
}

/// `stuck` in groups, the largest first (ties in the order first seen).
pub(crate) fn group(stuck: &[Stuck]) -> Vec<Group<'_>> {
    let mut by_key: BTreeMap<Key, Vec<&Stuck>> = BTreeMap::new();
    let mut order: Vec<Key> = Vec::new();
    for s in stuck {
        let k = key(s);
        let list = by_key.entry(k.clone()).or_default();
        if list.is_empty() {
            order.push(k);
        }
        list.push(s);
    }
    let mut groups: Vec<Group<'_>> = order
        .into_iter()
        .filter_map(|k| by_key.remove(&k))
        .map(|members| summarize(&members))
        .collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.count));
    groups
}

fn summarize<'a>(members: &[&'a Stuck]) -> Group<'a> {
    let first = members[0];
    let mut fds: Vec<i32> = members.iter().filter_map(|s| s.holder.fd).collect();
    fds.sort_unstable();
    fds.dedup();
    let ages = members.iter().map(|s| s.stuck_ns);
    Group {
        first,
        count: members.len(),
        fds,
        youngest_ns: ages.clone().min().unwrap_or(0),
        oldest_ns: ages.max().unwrap_or(0),
        at_least: members.iter().any(|s| s.at_least),
        peers: peers(members),
    }
}

fn peers(members: &[&Stuck]) -> Peers {
    let e = &members[0].ends;
    if members
        .iter()
        .all(|s| (s.ends.remote, s.ends.rport) == (e.remote, e.rport))
    {
        return Peers::One(e.remote, e.rport);
    }
    if members.iter().all(|s| s.ends.lport == e.lport) {
        return Peers::OnPort(e.lport);
    }
    let mut all: Vec<(IpAddr, u16)> = members
        .iter()
        .map(|s| (s.ends.remote, s.ends.rport))
        .collect();
    all.sort_unstable();
    all.dedup();
    Peers::Many(all.len())
}

/// `fds` as short ranges: `3-7, 9, 12-14`, at most `max` items then `, ...`.
pub(crate) fn fd_ranges(fds: &[i32], max: usize) -> String {
    let mut items: Vec<String> = Vec::new();
    let mut i = 0;
    while i < fds.len() {
        let start = fds[i];
        let mut end = start;
        while i + 1 < fds.len() && fds[i + 1] == end + 1 {
            i += 1;
            end = fds[i];
        }
        items.push(if end == start {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    if items.len() > max {
        items.truncate(max);
        items.push("...".into());
    }
    items.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoints, Holder, Verdict, diagnosis::OwnerState};

    fn stuck(pid: u32, fd: i32, lport: u16, rport: u16, age_s: u64, reading: FinReading) -> Stuck {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        Stuck {
            sock: u64::from(pid) << 16 | fd as u64,
            what: "CLOSE_WAIT".into(),
            holder: Holder {
                pid,
                comm: "python3".into(),
                fd: Some(fd),
                others: 0,
                container: None,
            },
            verdict: Verdict::OwnerMustClose(None),
            owner_state: Some(OwnerState {
                reading: Some(reading),
                unread_bytes: 0,
                polled: None,
                threads: None,
            }),
            ends: Endpoints {
                local: lo,
                lport,
                remote: lo,
                rport,
            },
            stuck_ns: age_s * 1_000_000_000,
            at_least: false,
            netns: None,
        }
    }

    /// 2,000 sockets of one pool's leak are one group, with their fds as ranges and the one
    /// back-end they all went to; another process, and another diagnosis, are groups of
    /// their own.
    #[test]
    fn a_leak_of_thousands_is_one_group() {
        let not_read = FinReading::NotRead { unread_bytes: 0 };
        let mut all: Vec<Stuck> = (0..2000)
            .map(|i| {
                stuck(
                    1463,
                    3 + i,
                    40000 + i as u16,
                    8080,
                    20 + u64::from(i as u16 % 300),
                    not_read,
                )
            })
            .collect();
        all.push(stuck(1463, 5000, 41000, 8080, 5, FinReading::ReadEof));
        all.push(stuck(900, 7, 8080, 51000, 9, not_read));
        all.push(stuck(900, 8, 8080, 51001, 9, not_read));
        let groups = group(&all);
        assert_eq!(
            groups.iter().map(|g| g.count).collect::<Vec<_>>(),
            [2000, 2, 1]
        );
        let pool = &groups[0];
        assert_eq!(pool.peers, Peers::One("127.0.0.1".parse().unwrap(), 8080));
        assert_eq!(fd_ranges(&pool.fds, 4), "3-2002");
        assert_eq!(
            (pool.youngest_ns, pool.oldest_ns),
            (20_000_000_000, 319_000_000_000)
        );
        assert_eq!(groups[1].peers, Peers::OnPort(8080));
        assert_eq!(groups[2].first.holder.fd, Some(5000));
    }

    #[test]
    fn fds_as_ranges() {
        assert_eq!(fd_ranges(&[3, 4, 5, 7, 9, 10], 10), "3-5, 7, 9-10");
        assert_eq!(fd_ranges(&[1, 3, 5, 7], 2), "1, 3, ...");
        assert_eq!(fd_ranges(&[], 2), "");
    }
}
