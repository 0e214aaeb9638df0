//! `net.ipv4.tcp_fin_timeout` is per network namespace: read it in the namespace of the thread
//! that closed the socket, not the tracer's.
use std::{
    collections::HashMap,
    fs,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

/// The sysctl can change: re-read it when the cached value is older than this.
const REREAD_AFTER: Duration = Duration::from_secs(1);

const FIN_TIMEOUT: &str = "/proc/sys/net/ipv4/tcp_fin_timeout";

/// Threads whose namespace is remembered (a thread rarely changes namespace; bounded).
const MAX_THREADS: usize = 4096;

#[derive(Default)]
pub(crate) struct FinTimeouts {
    /// By namespace identity (`net:[inode]`): value and when it was read.
    by_ns: HashMap<String, (u64, Instant)>,
    /// By thread: the value, and when its namespace was looked up (one /proc link a second).
    by_tid: HashMap<u32, (u64, Instant)>,
}

pub(crate) fn own_fin_timeout() -> u64 {
    parse(fs::read_to_string(FIN_TIMEOUT).ok()).unwrap_or(crate::model::DEFAULT_FIN_TIMEOUT_S)
}

fn parse(s: Option<String>) -> Option<u64> {
    s?.trim().parse().ok()
}

impl FinTimeouts {
    /// The fin timeout in force in `tid`'s network namespace, if the thread still exists, as of
    /// `now`.
    pub(crate) fn for_thread(&mut self, tid: u32, now: Instant) -> Option<u64> {
        if let Some(&(v, at)) = self.by_tid.get(&tid)
            && now.saturating_duration_since(at) < REREAD_AFTER
        {
            return Some(v);
        }
        let v = self.lookup(tid)?;
        if self.by_tid.len() >= MAX_THREADS {
            self.by_tid.clear();
        }
        self.by_tid.insert(tid, (v, Instant::now()));
        Some(v)
    }

    fn lookup(&mut self, tid: u32) -> Option<u64> {
        let ns_path = format!("/proc/{tid}/ns/net");
        let ns = fs::read_link(&ns_path).ok()?.to_string_lossy().into_owned();
        if let Some(&(v, at)) = self.by_ns.get(&ns)
            && at.elapsed() < REREAD_AFTER
        {
            return Some(v);
        }
        let file = fs::File::open(&ns_path).ok()?;
        // /proc/sys/net shows the namespace of the reading thread: read it from a thread that
        // joined the target namespace, so the tracer's own threads never move.
        let value = std::thread::spawn(move || {
            // SAFETY: valid fd; setns affects only this short-lived thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            parse(fs::read_to_string(FIN_TIMEOUT).ok())
        })
        .join()
        .ok()??;
        // Pods come and go for days: their namespaces are forgotten in bulk.
        if self.by_ns.len() >= MAX_THREADS {
            self.by_ns.clear();
        }
        self.by_ns.insert(ns, (value, Instant::now()));
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn our_own_namespace() {
        // setns(), even into our own namespace, needs CAP_SYS_ADMIN: `cargo xtask test` is root.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: reading through setns() needs root");
            return;
        }
        let me = unsafe { libc::gettid() } as u32;
        assert_eq!(
            super::FinTimeouts::default().for_thread(me, std::time::Instant::now()),
            Some(super::own_fin_timeout())
        );
    }
}
