//! Who holds a socket, from /proc: one process's fd links (to verify a candidate), or every
//! process's (a full scan: socket inode -> (pid, comm, fd)).
//!
//! Scanning /proc costs about a millisecond per hundred processes, so the live tracer never
//! scans on its event path: a background [`Scanner`] thread does, on request, coalescing
//! requests, and publishes each index stamped with when it was started.
use std::{
    collections::HashMap,
    sync::{Arc, Condvar, Mutex},
    thread,
};

use foldhash::fast::RandomState as FastHash;
use procfs::process::{FDTarget, all_processes};

use crate::{
    model::escape,
    model::{Comm, KernelOwner, Owner},
};

/// Socket inode -> holders, as seen by a scan that started at `built_ns`. Compact, since a busy
/// host has 100,000 sockets: one (pid, fd) per inode, the rare further holders aside, and each
/// process's name once.
#[derive(Default)]
pub(crate) struct Index {
    // Looked up once per socket of a 100,000-socket host: a fast hash (the keys are the
    // kernel's inode numbers, not an attacker's), not SipHash.
    first: HashMap<u64, (u32, i32), FastHash>,
    more: HashMap<u64, Vec<(u32, i32)>, FastHash>,
    comms: HashMap<u32, Comm, FastHash>,
    /// CLOCK_MONOTONIC (the kernel's event clock) when the scan started.
    pub(crate) built_ns: u64,
    /// Processes whose open files this process may not read (no privileges): the sockets they
    /// hold show no holder.
    pub(crate) unreadable: usize,
}

impl Index {
    /// `pid` holds socket `inode` at `fd`.
    pub(crate) fn add(&mut self, inode: u64, pid: u32, comm: &Comm, fd: i32) {
        self.add_with(inode, pid, fd, || comm.clone());
    }

    /// As [`Self::add`], the name made only for a process not seen yet; the same (pid, fd)
    /// twice (threads that share an fd table) counts once.
    pub(crate) fn add_with(&mut self, inode: u64, pid: u32, fd: i32, comm: impl FnOnce() -> Comm) {
        self.comms.entry(pid).or_insert_with(comm);
        let seen = |first: &(u32, i32), more: Option<&Vec<(u32, i32)>>| {
            *first == (pid, fd) || more.is_some_and(|m| m.contains(&(pid, fd)))
        };
        if let Some(first) = self.first.get(&inode)
            && seen(first, self.more.get(&inode))
        {
            return;
        }
        match self.first.entry(inode) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((pid, fd));
            }
            std::collections::hash_map::Entry::Occupied(mut o) => {
                // The lowest (pid, fd) stays first, as in a sorted list.
                let other = if (pid, fd) < *o.get() {
                    std::mem::replace(o.get_mut(), (pid, fd))
                } else {
                    (pid, fd)
                };
                self.more.entry(inode).or_default().push(other);
            }
        }
    }

    /// Every holder of socket `inode`, by (pid, fd).
    pub(crate) fn get(&self, inode: u64) -> Vec<Owner> {
        let Some(&first) = self.first.get(&inode) else {
            return Vec::new();
        };
        let mut all = vec![first];
        if let Some(more) = self.more.get(&inode) {
            all.extend(more);
            all.sort_unstable();
        }
        all.into_iter()
            .map(|(pid, fd)| self.owner(pid, fd))
            .collect()
    }

    /// Every socket inode with a holder.
    pub(crate) fn inodes(&self) -> impl Iterator<Item = u64> + '_ {
        self.first.keys().copied()
    }

    /// The first holder of socket `inode` (lowest pid, then fd).
    pub(crate) fn first(&self, inode: u64) -> Option<Owner> {
        self.get(inode).into_iter().next()
    }

    fn owner(&self, pid: u32, fd: i32) -> Owner {
        Owner {
            pid,
            comm: self.comms.get(&pid).cloned().unwrap_or_else(|| "".into()),
            fd,
            cgroup_id: None,
            container: None,
        }
    }
}

/// Reads every process's fd table.
pub(crate) fn scan() -> Index {
    let mut index = Index {
        built_ns: super::clock::monotonic_ns(),
        ..Index::default()
    };
    if let Ok(procs) = all_processes() {
        for p in procs.flatten() {
            let fds = match p.fd() {
                Ok(fds) => fds,
                Err(procfs::ProcError::PermissionDenied(_)) => {
                    index.unreadable += 1;
                    continue;
                }
                Err(_) => continue, // exited meanwhile
            };
            let mut comm: Option<Comm> = None;
            for fd in fds.flatten() {
                if let FDTarget::Socket(inode) = fd.target {
                    let comm = comm.get_or_insert_with(|| {
                        p.stat()
                            .map(|s| escape::sanitize(&s.comm))
                            .unwrap_or_default()
                            .into()
                    });
                    index.add(inode, p.pid as u32, comm, fd.fd);
                }
            }
        }
    }
    index
}

/// Does `pid`'s fd `fd` refer to socket `inode`? One readlink.
fn holds(pid: u32, fd: i32, inode: u64) -> bool {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .is_ok_and(|l| l.as_os_str().as_encoded_bytes() == format!("socket:[{inode}]").as_bytes())
}

/// `pid`'s fds that refer to socket `inode`.
fn fds_of(pid: u32, inode: u64) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&fd| holds(pid, fd, inode))
        .collect()
}

/// `pid`'s children (every thread's), from /proc/PID/task/*/children.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_ascii_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn comm_of(pid: u32) -> Comm {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| escape::sanitize(c.trim_end_matches('\n')))
        .unwrap_or_default()
        .into()
}

fn owner(pid: u32, fd: i32) -> Owner {
    Owner {
        pid,
        comm: comm_of(pid),
        fd,
        cgroup_id: None,
        container: None,
    }
}

/// The holder of socket `inode` among the processes that can hold it after the kernel's record
/// `hint`: the recorded process at its fd, its children at the same fd (an inherited copy), then
/// the recorded process's other fds (a dup). None: a full scan must answer.
pub(crate) fn verify(inode: u64, hint: Option<&KernelOwner>) -> Option<Owner> {
    let k = hint?;
    if holds(k.pid, k.fd, inode) {
        return Some(owner(k.pid, k.fd));
    }
    if let Some(child) = children(k.pid).into_iter().find(|&c| holds(c, k.fd, inode)) {
        return Some(owner(child, k.fd));
    }
    fds_of(k.pid, inode).first().map(|&fd| owner(k.pid, fd))
}

/// Who else holds socket `inode` after `pid` closed its `fd` and references remained: its
/// children at the same fd, and its own other fds. Empty: a full scan must answer.
pub(crate) fn verify_others(inode: u64, pid: u32, fd: i32) -> Vec<Owner> {
    let mut found: Vec<Owner> = children(pid)
        .into_iter()
        .filter(|&c| holds(c, fd, inode))
        .map(|c| owner(c, fd))
        .collect();
    found.extend(
        fds_of(pid, inode)
            .into_iter()
            .filter(|&f| f != fd)
            .map(|f| owner(pid, f)),
    );
    found
}

#[derive(Default)]
struct Shared {
    latest: Option<Arc<Index>>,
    wanted: bool,
    scans: u64,
}

/// A thread that rescans /proc when asked; requests made while a scan runs share the next one.
#[derive(Clone)]
pub(crate) struct Scanner {
    shared: Arc<(Mutex<Shared>, Condvar)>,
}

impl Scanner {
    pub(crate) fn start(scan_fn: impl Fn() -> Index + Send + 'static) -> Self {
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let worker = shared.clone();
        thread::Builder::new()
            .name("finwait-owners".into())
            .spawn(move || {
                let (lock, cv) = &*worker;
                loop {
                    {
                        let mut s = lock.lock().unwrap();
                        while !s.wanted {
                            s = cv.wait(s).unwrap();
                        }
                        s.wanted = false;
                    }
                    let index = Arc::new(scan_fn());
                    let mut s = lock.lock().unwrap();
                    s.latest = Some(index);
                    s.scans += 1;
                }
            })
            .expect("spawn the owner scanner");
        Self { shared }
    }

    /// The newest index, if any scan finished.
    pub(crate) fn latest(&self) -> Option<Arc<Index>> {
        self.shared.0.lock().unwrap().latest.clone()
    }

    pub(crate) fn request(&self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap().wanted = true;
        cv.notify_one();
    }

    pub(crate) fn scans(&self) -> u64 {
        self.shared.0.lock().unwrap().scans
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn finds_our_own_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = listener.as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let inode: u64 = link
            .to_str()
            .unwrap()
            .trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap();
        let index = scan();
        // Other tests in this process spawn children: one caught between fork and exec holds a
        // copy of every fd for a moment.
        let owners: Vec<_> = index
            .get(inode)
            .into_iter()
            .filter(|o| o.pid == std::process::id())
            .collect();
        assert_eq!(owners.len(), 1, "{owners:?}");
        let mut two = Index::default();
        two.add(7, 20, &"b".into(), 5);
        two.add(7, 10, &"a".into(), 9);
        let all: Vec<_> = two.get(7).into_iter().map(|o| (o.pid, o.fd)).collect();
        assert_eq!(all, [(10, 9), (20, 5)], "sorted by pid, then fd");
        assert_eq!((owners[0].pid, owners[0].fd), (std::process::id(), fd));
    }
}
