//! Every network namespace of this host, and the TCP sockets of each: what reads "what is stuck
//! now" must look in all of them (every pod has its own), not only finwait's own.
//!
//! A namespace is found through a process in it (`/proc/PID/ns/net`) or a bind mount of it
//! (`ip netns add`, under `/run/netns`). Its sockets are read with sock_diag from a socket made
//! by a short-lived thread that joined it (`setns()` needs CAP_SYS_ADMIN); without that, from
//! `/proc/PID/net/tcp{,6}` of a process in it (no timers); where neither works, the namespace
//! is named as unseen, never silently left out.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    net::IpAddr,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow};
use finwait_common::TcpState;
use netlink_packet_sock_diag::inet::StateFlags;

use super::sockdiag::{Diag, DiagSocket, unmap};

/// Where the bind mounts of named namespaces live (iproute2's, and Docker's).
const NAMED: [&str; 3] = ["/run/netns", "/var/run/netns", "/run/docker/netns"];

/// Namespaces looked at, at most: a host with more is said to have more (each costs a thread
/// and a sock_diag dump per pass).
const MAX_NAMESPACES: usize = 4096;

/// One network namespace and the ways into it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NetNs {
    /// Its identity: the inode of its nsfs file (`net:[INODE]`).
    pub(crate) inode: u64,
    /// The lowest pid of a process in it, if any.
    pub(crate) pid: Option<u32>,
    /// A file that names it (`/proc/PID/ns/net` or a bind mount).
    path: PathBuf,
}

/// The inode of finwait's own network namespace.
pub(crate) fn own() -> Option<u64> {
    fs::metadata("/proc/self/ns/net").ok().map(|m| m.ino())
}

/// The network namespace `pid` lives in.
pub(crate) fn of_pid(pid: u32) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

/// Every network namespace found, finwait's own first; and the processes whose namespace could
/// not be read (without the right to, another user's are hidden).
pub(crate) fn all() -> (Vec<NetNs>, Vec<u32>) {
    let mut found: BTreeMap<u64, NetNs> = BTreeMap::new();
    let mut hidden = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            match fs::metadata(&path) {
                Ok(m) => {
                    let ns = found.entry(m.ino()).or_insert_with(|| NetNs {
                        inode: m.ino(),
                        pid: Some(pid),
                        path,
                    });
                    // The lowest pid is the steadiest way in (its init, or the pod's pause).
                    if ns.pid.is_none_or(|p| pid < p) {
                        ns.pid = Some(pid);
                        ns.path = PathBuf::from(format!("/proc/{pid}/ns/net"));
                    }
                }
                // A process that exited meanwhile is not hidden.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => hidden.push(pid),
                Err(_) => {}
            }
        }
    }
    for dir in NAMED {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if let Ok(m) = fs::metadata(&path) {
                found.entry(m.ino()).or_insert(NetNs {
                    inode: m.ino(),
                    pid: None,
                    path,
                });
            }
        }
    }
    let own = own();
    let mut all: Vec<NetNs> = found.into_values().collect();
    all.sort_by_key(|n| (Some(n.inode) != own, n.inode));
    (all, hidden)
}

/// sock_diag sockets by namespace, made once each: to ask about one socket in the namespace of
/// the process that holds it.
#[derive(Default)]
pub(crate) struct Diags {
    by_ns: HashMap<u64, Option<Diag>>,
    ns_of_pid: HashMap<u32, Option<u64>>,
    /// A namespace that cannot be entered: its /proc/PID/net table by ends, and when it was
    /// read (one read answers a burst of lookups, not one read per socket).
    tables: HashMap<
        u64,
        (
            std::time::Instant,
            HashMap<crate::model::EndsKey, DiagSocket>,
        ),
    >,
}

/// A namespace's /proc/PID/net table is reused this long.
const TABLE_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Processes and namespaces remembered at most (pods come and go for days).
const MAX_REMEMBERED: usize = 4096;

impl Diags {
    /// The one TCP socket with these ends in `pid`'s network namespace: asked of sock_diag
    /// there, else (no way in without CAP_SYS_ADMIN) read from `/proc/PID/net/tcp{,6}`.
    pub(crate) fn find(
        &mut self,
        pid: u32,
        local: IpAddr,
        lport: u16,
        remote: IpAddr,
        rport: u16,
    ) -> Option<DiagSocket> {
        if let Some(diag) = self.of_pid(pid) {
            return super::sockdiag::find(diag, local, lport, remote, rport).ok()?;
        }
        let netns = (*self.ns_of_pid.get(&pid)?)?;
        let fresh = self
            .tables
            .get(&netns)
            .is_some_and(|(at, _)| at.elapsed() < TABLE_FOR);
        if !fresh {
            let mut table = HashMap::new();
            proc_net(pid, netns, &[StateFlags::all()], &mut |_, s: DiagSocket| {
                table.entry(s.key()).or_insert(s);
            })
            .ok()?;
            self.tables
                .insert(netns, (std::time::Instant::now(), table));
        }
        let key = crate::model::ends_key(local, lport, remote, rport);
        self.tables.get(&netns)?.1.get(&key).cloned()
    }

    /// A sock_diag socket in `pid`'s network namespace (None: the process is gone, or its
    /// namespace cannot be entered).
    pub(crate) fn of_pid(&mut self, pid: u32) -> Option<&mut Diag> {
        if self.ns_of_pid.len() >= MAX_REMEMBERED || self.by_ns.len() >= MAX_REMEMBERED {
            self.ns_of_pid.clear();
            self.by_ns.clear();
            self.tables.clear();
        }
        let ns = (*self.ns_of_pid.entry(pid).or_insert_with(|| of_pid(pid)))?;
        self.by_ns
            .entry(ns)
            .or_insert_with(|| {
                if Some(ns) == own() {
                    Diag::new(ns).ok()
                } else {
                    enter(Path::new(&format!("/proc/{pid}/ns/net")), ns).ok()
                }
            })
            .as_mut()
    }
}

/// How a namespace's sockets were read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Read {
    /// sock_diag, from inside it: everything, with timers.
    SockDiag,
    /// `/proc/PID/net/tcp{,6}` of a process in it: no timers.
    ProcNet,
}

/// What a read of every namespace could and could not see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Coverage {
    /// The namespaces read (their inodes): a socket of another one was not looked for.
    pub(crate) read: Vec<u64>,
    /// Namespaces read, by sock_diag and by /proc/PID/net.
    pub(crate) sock_diag: usize,
    pub(crate) proc_net: usize,
    /// Namespaces found but not read, each with why.
    pub(crate) unseen: Vec<(u64, String)>,
    /// Processes whose namespace could not be read (not allowed), lowest pid first.
    pub(crate) hidden: Vec<u32>,
    /// More namespaces than [`MAX_NAMESPACES`]: those past it were not read.
    pub(crate) skipped: usize,
}

impl Coverage {
    /// One sentence for an operator when something was not seen, None when all was.
    pub(crate) fn warning(&self) -> Option<String> {
        let mut parts = Vec::new();
        if !self.unseen.is_empty() {
            let first = &self.unseen[0];
            parts.push(format!(
                "{} network namespace(s) not read (net:[{}]: {})",
                self.unseen.len(),
                first.0,
                first.1
            ));
        }
        if let Some(first) = self.hidden.first() {
            // SAFETY: no preconditions.
            let hint = if unsafe { libc::geteuid() } == 0 {
                ""
            } else {
                "; run as root, or with CAP_SYS_PTRACE"
            };
            parts.push(format!(
                "the network namespace of {} process(es) could not be read (pid {first}: permission denied{hint})",
                self.hidden.len()
            ));
        }
        if self.skipped > 0 {
            parts.push(format!(
                "{} namespace(s) past the first {MAX_NAMESPACES} not read",
                self.skipped
            ));
        }
        if self.proc_net > 0 {
            parts.push(format!(
                "{} namespace(s) read from /proc/PID/net without timers (setns() needs CAP_SYS_ADMIN)",
                self.proc_net
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// Hands every TCP socket in one of `states`, in every network namespace, to `each` (tagged
/// with its namespace). Fails only when finwait's own namespace cannot be read.
pub(crate) fn dump_everywhere(
    states: &StateFlags,
    each: impl FnMut(DiagSocket),
) -> Result<Coverage> {
    dump_where(states, |_| true, each)
}

/// As [`dump_everywhere`], in the namespaces `wanted` keeps (finwait's own is always read).
/// Each dump walks the kernel's whole TCP table: reading only the namespaces that matter keeps
/// a host of many namespaces cheap.
pub(crate) fn dump_where(
    states: &StateFlags,
    wanted: impl Fn(u64) -> bool,
    mut each: impl FnMut(DiagSocket),
) -> Result<Coverage> {
    passes_where(std::slice::from_ref(states), wanted, |_, s| each(s))
}

/// Each namespace's TCP sockets in `passes` order (pass index, socket): one namespace's
/// listeners, say, before its other sockets.
pub(crate) fn dump_passes(
    passes: &[StateFlags],
    each: impl FnMut(usize, DiagSocket),
) -> Result<Coverage> {
    passes_where(passes, |_| true, each)
}

fn passes_where(
    passes: &[StateFlags],
    wanted: impl Fn(u64) -> bool,
    mut each: impl FnMut(usize, DiagSocket),
) -> Result<Coverage> {
    let (mut all, hidden) = all();
    let own = own();
    all.retain(|n| Some(n.inode) == own || wanted(n.inode));
    let mut cov = Coverage {
        hidden,
        ..Coverage::default()
    };
    if own.is_none_or(|o| all.first().is_none_or(|n| n.inode != o)) {
        // No /proc/self/ns (an odd /proc): the own namespace is still read.
        let mut here = Diag::here()?;
        for (pass, states) in passes.iter().enumerate() {
            here.dump_each(states, |s| each(pass, s))?;
        }
        cov.sock_diag += 1;
        cov.read.push(here.netns());
    }
    for (i, ns) in all.iter().enumerate() {
        if i >= MAX_NAMESPACES {
            cov.skipped = all.len() - MAX_NAMESPACES;
            break;
        }
        let mine = Some(ns.inode) == own;
        let read = read_one(ns, mine, passes, &mut each);
        if read.is_ok() {
            cov.read.push(ns.inode);
        }
        match read {
            Ok(Read::SockDiag) => cov.sock_diag += 1,
            Ok(Read::ProcNet) => cov.proc_net += 1,
            Err(e) if mine => return Err(e),
            Err(e) => cov.unseen.push((ns.inode, format!("{e:#}"))),
        }
    }
    Ok(cov)
}

fn read_one(
    ns: &NetNs,
    mine: bool,
    passes: &[StateFlags],
    each: &mut impl FnMut(usize, DiagSocket),
) -> Result<Read> {
    let entered = if mine {
        Diag::new(ns.inode)
    } else {
        enter(&ns.path, ns.inode)
    };
    match entered {
        Ok(mut diag) => {
            for (pass, states) in passes.iter().enumerate() {
                diag.dump_each(states, |s| each(pass, s))?;
            }
            Ok(Read::SockDiag)
        }
        Err(e) if mine => Err(e),
        Err(setns) => {
            let Some(pid) = ns.pid else {
                return Err(setns);
            };
            proc_net(pid, ns.inode, passes, each)
                .with_context(|| format!("{setns:#}; /proc/{pid}/net"))?;
            Ok(Read::ProcNet)
        }
    }
}

/// A sock_diag socket made inside the namespace `path` names, by a thread that joins it and
/// ends (finwait's own threads never move).
fn enter(path: &Path, inode: u64) -> Result<Diag> {
    let file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    std::thread::spawn(move || {
        // SAFETY: a valid fd; setns affects only this short-lived thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow!("setns: {}", std::io::Error::last_os_error()));
        }
        Diag::new(inode)
    })
    .join()
    .map_err(|_| anyhow!("the thread that joins the namespace failed"))?
}

/// The namespace's sockets from a process's view of /proc/net (no timers there).
fn proc_net(
    pid: u32,
    netns: u64,
    passes: &[StateFlags],
    each: &mut impl FnMut(usize, DiagSocket),
) -> Result<Read> {
    let p = procfs::process::Process::new(pid as i32)?;
    let mut all = p.tcp()?;
    all.extend(p.tcp6().unwrap_or_default()); // a kernel without IPv6 has no tcp6
    for (pass, states) in passes.iter().enumerate() {
        for e in &all {
            let raw = e.state.clone() as u8;
            if states.bits() & (1u32 << raw) == 0 {
                continue;
            }
            each(
                pass,
                DiagSocket {
                    state: TcpState::from_u8(raw),
                    local: unmap(e.local_address.ip()),
                    lport: e.local_address.port(),
                    remote: unmap(e.remote_address.ip()),
                    rport: e.remote_address.port(),
                    inode: e.inode,
                    uid: e.uid,
                    timer: None,
                    recv_queue: e.rx_queue,
                    send_queue: e.tx_queue,
                    netns,
                },
            );
        }
    }
    Ok(Read::ProcNet)
}

/// What the ledgers are checked against (a model type: the check is theirs).
pub(crate) use crate::model::ledger::CloseTable;

/// The sockets in CLOSE_WAIT or FIN_WAIT2 of the namespaces these pids are in: what the metrics'
/// gauges are checked against. Only those namespaces are read. None: the read failed.
pub(crate) fn close_path_of(pids: &HashSet<u32>) -> Option<CloseTable> {
    let ns_of: HashMap<u32, Option<u64>> = pids.iter().map(|&p| (p, of_pid(p))).collect();
    let needed: HashSet<u64> = ns_of.values().flatten().copied().collect();
    // Ends repeat across namespaces (every pod has its own 127.0.0.1): keyed by both.
    let mut sockets = HashMap::new();
    let states = StateFlags::CLOSE_WAIT | StateFlags::FIN_WAIT2;
    let coverage = dump_where(
        &states,
        |ns| needed.contains(&ns),
        |s| {
            sockets.insert((s.netns, s.key()), (s.state, s.inode));
        },
    )
    .ok()?;
    Some(CloseTable {
        ns_of,
        read: coverage.read.into_iter().collect(),
        sockets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_comes_first() {
        let (all, _) = all();
        assert_eq!(all.first().map(|n| n.inode), own());
        assert_eq!(of_pid(std::process::id()), own());
    }

    #[test]
    fn coverage_says_what_was_not_seen() {
        assert_eq!(Coverage::default().warning(), None);
        let c = Coverage {
            unseen: vec![(4026532000, "setns: Operation not permitted".into())],
            hidden: vec![1, 7, 9],
            ..Coverage::default()
        };
        let w = c.warning().unwrap();
        assert!(
            w.contains("1 network namespace(s) not read (net:[4026532000]: setns"),
            "{w}"
        );
        assert!(w.contains("3 process(es) could not be read (pid 1"), "{w}");
    }
}
