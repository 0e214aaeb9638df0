//! Who holds a socket: socket inode -> (pid, comm, fd), from /proc/*/fd.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use procfs::process::{FDTarget, all_processes};

use crate::{correlate::Owner, escape};

/// How stale the index may be before a miss triggers a rescan. Scanning /proc costs about a
/// millisecond per hundred processes, so bursts of lookups share one scan.
const RESCAN_AFTER: Duration = Duration::from_millis(20);
const TRUST_FOR: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct ProcOwners {
    index: HashMap<u64, Vec<Owner>>,
    built: Option<Instant>,
    pub scans: u64,
}

impl ProcOwners {
    fn rescan(&mut self) {
        self.index.clear();
        self.scans += 1;
        self.built = Some(Instant::now());
        let Ok(procs) = all_processes() else { return };
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
                    self.index.entry(inode).or_default().push(Owner {
                        pid: p.pid as u32,
                        comm: comm.clone(),
                        fd: fd.fd,
                    });
                }
            }
        }
        for owners in self.index.values_mut() {
            owners.sort_by_key(|o| (o.pid, o.fd));
        }
    }
}

impl crate::correlate::OwnerLookup for ProcOwners {
    fn owners(&mut self, inode: u64) -> Vec<Owner> {
        let age = self.built.map(|b| b.elapsed());
        let fresh_hit = age.is_some_and(|a| a < TRUST_FOR) && self.index.contains_key(&inode);
        if !fresh_hit && age.is_none_or(|a| a >= RESCAN_AFTER) {
            self.rescan();
        }
        self.index.get(&inode).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::correlate::OwnerLookup;

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
        let owners = ProcOwners::default().owners(inode);
        assert_eq!(
            owners,
            vec![Owner {
                pid: std::process::id(),
                comm: owners[0].comm.clone(),
                fd
            }]
        );
    }
}
