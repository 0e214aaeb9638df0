//! Who holds a socket: socket inode -> (pid, comm, fd), from /proc/*/fd.
//!
//! Scanning /proc costs about a millisecond per hundred processes, so the live tracer never
//! scans on its event path: a background [`Scanner`] thread does, on request, coalescing
//! requests, and publishes each index stamped with when it was started.
use std::{
    collections::HashMap,
    sync::{Arc, Condvar, Mutex},
    thread,
};

use procfs::process::{FDTarget, all_processes};

use crate::{correlate::Owner, escape};

/// Socket inode -> holders, as seen by a scan that started at `built_ns`.
#[derive(Default)]
pub struct Index {
    pub map: HashMap<u64, Vec<Owner>>,
    /// CLOCK_MONOTONIC (the kernel's event clock) when the scan started.
    pub built_ns: u64,
}

impl Index {
    pub fn get(&self, inode: u64) -> &[Owner] {
        self.map.get(&inode).map(Vec::as_slice).unwrap_or_default()
    }
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads every process's fd table.
pub fn scan() -> Index {
    let built_ns = monotonic_ns();
    let mut map: HashMap<u64, Vec<Owner>> = HashMap::new();
    if let Ok(procs) = all_processes() {
        for p in procs.flatten() {
            let Ok(fds) = p.fd() else { continue };
            let mut comm = None;
            for fd in fds.flatten() {
                if let FDTarget::Socket(inode) = fd.target {
                    let comm = comm.get_or_insert_with(|| {
                        p.stat()
                            .map(|s| escape::sanitize(&s.comm))
                            .unwrap_or_default()
                    });
                    map.entry(inode).or_default().push(Owner {
                        pid: p.pid as u32,
                        comm: comm.clone(),
                        fd: fd.fd,
                    });
                }
            }
        }
    }
    for owners in map.values_mut() {
        owners.sort_by_key(|o| (o.pid, o.fd));
    }
    Index { map, built_ns }
}

#[derive(Default)]
struct Shared {
    latest: Option<Arc<Index>>,
    wanted: bool,
    scans: u64,
}

/// A thread that rescans /proc when asked; requests made while a scan runs share the next one.
#[derive(Clone)]
pub struct Scanner {
    shared: Arc<(Mutex<Shared>, Condvar)>,
}

impl Scanner {
    pub fn start(scan_fn: impl Fn() -> Index + Send + 'static) -> Self {
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
    pub fn latest(&self) -> Option<Arc<Index>> {
        self.shared.0.lock().unwrap().latest.clone()
    }

    pub fn request(&self) {
        let (lock, cv) = &*self.shared;
        lock.lock().unwrap().wanted = true;
        cv.notify_one();
    }

    pub fn scans(&self) -> u64 {
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
        let owners = index.get(inode);
        assert_eq!(owners.len(), 1);
        assert_eq!((owners[0].pid, owners[0].fd), (std::process::id(), fd));
    }
}
