//! `snapshot --detail` for people: one socket a line in aligned columns (state, ends, holder,
//! fd, Recv-Q, whose job, what the owner did), short words; the explanation is the summary's.
use crate::{
    model::{Verdict, diagnosis::FinReading, verdict::Bound},
    snapshot::Entry,
};

const HEADER: [&str; 8] = [
    "STATE",
    "LOCAL",
    "REMOTE",
    "HOLDER",
    "FD",
    "RECV-Q",
    "WHOSE JOB",
    "NOTE",
];

/// The table's lines, header first (no line for TIME_WAIT: the summary counts them).
pub(crate) fn lines<'a>(entries: impl Iterator<Item = &'a Entry>) -> Vec<String> {
    let rows: Vec<[String; 8]> = std::iter::once(HEADER.map(String::from))
        .chain(entries.filter(|e| !e.is_time_wait()).map(row))
        .collect();
    let mut widths = [0usize; 8];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|r| {
            let mut line = String::new();
            for (i, (cell, w)) in r.iter().zip(widths).enumerate() {
                line.push_str(cell);
                if i + 1 < r.len() {
                    line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
                }
            }
            line.trim_end().to_string()
        })
        .collect()
}

fn row(e: &Entry) -> [String; 8] {
    let s = &e.sock;
    let state = match e.class() {
        "fin_wait2_half_closed" => "FIN_WAIT2 half-closed".to_string(),
        "fin_wait2_orphaned" => "FIN_WAIT2 orphan".to_string(),
        _ => s.state.name().to_string(),
    };
    let (holder, fd) = match (e.owners.first(), &e.inferred) {
        (Some(o), _) => {
            let more = match e.owners.len() {
                1 => String::new(),
                n => format!(" +{}", n - 1),
            };
            (format!("{}[{}]{more}", o.comm, o.pid), o.fd.to_string())
        }
        (None, Some(i)) => (format!("{}[{}]?", i.comm, i.pid), "-".into()),
        (None, None) => ("-".into(), "-".into()),
    };
    [
        state,
        format!("{}:{}", s.local, s.lport),
        format!("{}:{}", s.remote, s.rport),
        holder,
        fd,
        s.recv_queue.to_string(),
        job(&e.verdict),
        note(e),
    ]
}

/// The verdict in two or three words.
fn job(v: &Verdict) -> String {
    match v {
        Verdict::ApplicationMustClose(_) => "application must close".into(),
        Verdict::OwnerMustClose(_) => "owner must close".into(),
        Verdict::KernelFrees(Bound::Left(d)) => format!("kernel frees, {} s left", d.as_secs()),
        Verdict::KernelFrees(Bound::Within(s) | Bound::FinTimeout(s)) => {
            format!("kernel frees, within {s} s")
        }
        Verdict::KernelFrees(Bound::Retries) => "kernel frees (retries)".into(),
        Verdict::Done => "done".into(),
        Verdict::Unknown => "unknown".into(),
    }
}

/// What the owner did with the peer's FIN, or the peer on this host.
fn note(e: &Entry) -> String {
    let reading = e
        .owner_state
        .as_ref()
        .and_then(|o| o.reading)
        .map(|r| match r {
            FinReading::ReadEof => "read EOF, not closed".to_string(),
            FinReading::NotRead { .. } => "FIN not read".to_string(),
        });
    let peer = e.peer.as_ref().map(|p| match p.owners.first() {
        Some(o) => format!("peer {}[{}] {}", o.comm, o.pid, p.state.name()),
        None => format!("peer {}", p.state.name()),
    });
    match (reading, peer) {
        (Some(r), Some(p)) => format!("{r}; {p}"),
        (r, p) => r.or(p).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use finwait_common::TcpState;

    use super::*;
    use crate::{host::sockdiag::DiagSocket, model::Owner};

    fn entry(state: TcpState, lport: u16, owner: Option<(u32, &str, i32)>, recv_q: u32) -> Entry {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let sock = DiagSocket {
            state,
            local: lo,
            lport,
            remote: lo,
            rport: 8080,
            inode: u64::from(owner.is_some()),
            uid: 0,
            timer: None,
            recv_queue: recv_q,
            send_queue: 0,
            netns: 0,
        };
        let owners = owner
            .map(|(pid, comm, fd)| Owner {
                pid,
                comm: comm.into(),
                fd,
                cgroup_id: None,
                container: None,
            })
            .into_iter()
            .collect();
        Entry::new(sock, owners).unwrap()
    }

    /// One aligned line per socket under the header, short words, no TIME_WAIT.
    #[test]
    fn one_aligned_line_per_socket() {
        let entries = [
            entry(TcpState::CloseWait, 40001, Some((1463, "python3", 7)), 1),
            entry(TcpState::CloseWait, 40002, Some((1463, "python3", 12)), 0),
            entry(TcpState::FinWait2, 40003, None, 0),
            entry(TcpState::TimeWait, 40004, None, 0),
        ];
        let lines = lines(entries.iter());
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].starts_with("STATE"), "{}", lines[0]);
        let col = |l: &str| l.find("127.0.0.1:8080").unwrap();
        assert!(
            lines.iter().skip(1).all(|l| col(l) == col(&lines[1])),
            "{lines:#?}"
        );
        assert!(lines[1].contains("python3[1463]") && lines[1].ends_with("FIN not read"));
        assert!(lines[2].ends_with("read EOF, not closed"), "{}", lines[2]);
        assert!(lines[3].starts_with("FIN_WAIT2 orphan") && lines[3].contains("kernel frees"));
    }
}
