//! The sockets already on the close path when finwait starts (or when `snapshot` is asked):
//! who holds each one and whose job it is, in every network namespace of the host.
//!
//! `entry`: one socket's answer; `build`: sockets to answers, one at a time as the dump
//! streams in; `tally`: the per-process counts and their sentences.
use std::{cell::RefCell, collections::HashMap, sync::Arc};

use anyhow::Result;
use netlink_packet_sock_diag::inet::StateFlags;

mod build;
mod entry;
mod tally;

#[cfg(test)]
pub(crate) use build::build;
pub(crate) use build::{Builder, EpollFds, Inspector, Narrow};
pub(crate) use entry::{Entry, Inferred, Peer};
pub(crate) use tally::Tally;

use crate::{
    host::{
        cgroup::Cgroups,
        clock::monotonic_ns,
        namespaces::{self, Coverage},
        owners::{self, Index},
        procs,
        sockdiag::DiagSocket,
    },
    kernel::inventory,
    model::{Container, escape},
};

/// The states a snapshot reads, after the listeners (to infer owners of orphans).
fn close_path() -> StateFlags {
    StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK
        | StateFlags::CLOSING
        | StateFlags::TIME_WAIT
}

pub(crate) struct Snapshot {
    /// Every socket of the answer (empty when only the counts were asked for).
    pub(crate) entries: Vec<Entry>,
    /// The answer's counts, per process.
    pub(crate) tally: Tally,
    /// CLOCK_MONOTONIC when the dump was taken.
    pub(crate) taken_ns: u64,
    /// Every socket's holders, as the scan found them (live tracing seeds the kernel's
    /// ownership map from it).
    pub(crate) owners: Index,
    /// The network namespaces read, and those that could not be.
    pub(crate) coverage: Coverage,
    /// Where the holders came from: the kernel's socket inventory, or /proc (and why).
    pub(crate) holders: Holders,
}

/// Where a snapshot's holders came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Holders {
    /// The kernel's socket inventory (`iter/task_file`), in one pass.
    Kernel,
    /// Every process's fd links in /proc: the inventory could not run, for this reason.
    Proc(String),
}

impl Holders {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Holders::Kernel => "kernel",
            Holders::Proc(_) => "proc",
        }
    }
}

impl Snapshot {
    /// Says on stderr what the snapshot could not see (never silently empty).
    pub(crate) fn warn_unseen(&self) {
        if let Some(w) = self.coverage.warning() {
            eprintln!("finwait-trace: warning: {w}");
        }
        if let Holders::Proc(why) = &self.holders {
            eprintln!(
                "finwait-trace: note: socket holders read from /proc, not from the kernel's socket inventory ({why})"
            );
        }
    }

    /// Whether every socket's holder could be looked for: Err names what this process was not
    /// allowed to read, and how many sockets have no holder for it (their answer is unknown,
    /// not "nobody").
    pub(crate) fn complete(&self) -> Result<()> {
        let unread = self.owners.unreadable;
        let unowned = self.tally.unowned();
        if unread > 0 && unowned > 0 {
            anyhow::bail!(
                "incomplete: the open files of {unread} processes could not be read (permission \
                 denied), so {unowned} sockets show no holder; run as root (or with \
                 CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH)"
            );
        }
        Ok(())
    }

    /// Entries alone, as made up by tests.
    #[cfg(test)]
    pub(crate) fn of(entries: Vec<Entry>) -> Self {
        Self {
            tally: Tally::of(&entries),
            entries,
            taken_ns: 0,
            owners: Index::default(),
            coverage: Coverage::default(),
            holders: Holders::Kernel,
        }
    }
}

/// Reads the sockets and their owners. `pids`: keep only sockets held by (or inferred to belong
/// to) these processes and their descendants; empty keeps all. `kernel`: the loaded object
/// whose socket inventory names the holders (else, or if it fails, /proc does). `narrow`: the
/// rest of what was asked. `keep_entries`: every socket, not only the counts.
pub(crate) fn take(
    pids: &[u32],
    kernel: Result<&mut aya::Ebpf, String>,
    narrow: Narrow,
    keep_entries: bool,
) -> Result<Snapshot> {
    let taken_ns = monotonic_ns();
    // The holders and the sockets are read at once: both are mostly the kernel's work (the
    // inventory's walk of every fd, sock_diag's of the TCP table), one core each. The sockets
    // wait in a buffer until the holders are known (sized by the sockets on the close path,
    // smaller than the kernel BTF parsed while loading, the peak before this).
    let passes = [StateFlags::LISTEN, close_path()];
    let (from, dumped) = std::thread::scope(|scope| {
        let dump = scope.spawn(|| {
            let mut buffered = Buffered::default();
            namespaces::dump_passes(&passes, |pass, s| buffered.push(pass, s))
                .map(|c| (c, buffered))
        });
        let from = kernel.and_then(|k| from_kernel(k).map_err(|e| format!("{e:#}")));
        let dumped = dump
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the thread reading the sockets failed")));
        (from, dumped)
    });
    let (coverage, buffered) = dumped?;
    let (owners, epoll, holders) = match from {
        Ok((index, epoll)) => (index, Some(epoll), Holders::Kernel),
        Err(why) => (owners::scan(), None, Holders::Proc(why)),
    };
    let keep: Vec<u32> = if pids.is_empty() {
        Vec::new()
    } else {
        procs::with_descendants(pids)
    };
    let containers = RefCell::new(Containers::default());
    let owners_of = |inode| {
        let mut found = owners.get(inode);
        for o in &mut found {
            o.container = containers.borrow_mut().of(o.pid);
        }
        found
    };
    let mut b =
        Builder::new(owners_of, &keep, narrow, keep_entries).inspecting(Inspector::new(epoll));
    // Each namespace's listeners come before its other sockets (to infer who accepted an
    // orphan), as the dump read them.
    buffered.drain(|pass, s| match pass {
        0 => b.listener(&s),
        _ => b.socket(s),
    });
    let (entries, mut tally) = b.finish();
    // The holders' command lines: one read per process the answer names.
    tally.name(procs::cmdline);
    Ok(Snapshot {
        entries,
        tally,
        taken_ns,
        owners,
        coverage,
        holders,
    })
}

/// Every socket's holders, and every process's epoll fds, from the kernel's socket inventory.
fn from_kernel(ebpf: &mut aya::Ebpf) -> Result<(Index, EpollFds)> {
    let mut index = Index::default();
    index.built_ns = monotonic_ns();
    let mut epoll = EpollFds::new();
    inventory::read(ebpf, |r| {
        if r.state == finwait_common::FD_EPOLL {
            let fds = epoll.entry(r.tgid).or_default();
            // Threads that share the fd table are visited once each on some kernels.
            if !fds.contains(&(r.fd as i32)) {
                fds.push(r.fd as i32);
            }
            return;
        }
        index.add_with(r.inode, r.tgid, r.fd as i32, || {
            escape::sanitize(&inventory::comm(&r.comm)).into()
        });
    })?;
    Ok((index, epoll))
}

/// The sockets as the dump read them, with their pass, in chunks (never one large buffer
/// copied as it grows).
#[derive(Default)]
struct Buffered {
    chunks: Vec<Vec<(u8, DiagSocket)>>,
}

impl Buffered {
    const CHUNK: usize = 4096;

    fn push(&mut self, pass: usize, s: DiagSocket) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < Self::CHUNK => c.push((pass as u8, s)),
            _ => {
                let mut c = Vec::with_capacity(Self::CHUNK);
                c.push((pass as u8, s));
                self.chunks.push(c);
            }
        }
    }

    /// Hands each socket on in order, freeing each chunk once handed on.
    fn drain(self, mut each: impl FnMut(usize, DiagSocket)) {
        for chunk in self.chunks {
            for (pass, s) in chunk {
                each(usize::from(pass), s);
            }
        }
    }
}

/// Each owner's container, read once per process.
#[derive(Default)]
struct Containers {
    cgroups: Option<Cgroups>,
    by_pid: HashMap<u32, Option<Arc<Container>>, foldhash::fast::RandomState>,
}

impl Containers {
    fn of(&mut self, pid: u32) -> Option<Arc<Container>> {
        let cgroups = self.cgroups.get_or_insert_with(Cgroups::new);
        self.by_pid
            .entry(pid)
            .or_insert_with(|| cgroups.of(0, pid))
            .clone()
    }
}
