//! A process's name as `ps` shows it (its main thread's, `/proc/PID/comm`), never the name a
//! thread gave itself: a thread called `nginx` in a Python process does not make it nginx.
//!
//! The kernel records the calling thread's name. A call by the main thread carries the process's
//! own name, exactly, at no cost; for any other thread the process's name is read from /proc
//! once a second at most, and where that is no longer possible (the process is gone and was
//! never seen) the answer is `unknown`, not the thread's word. Beside the name, the process's
//! network namespace: what a live report says its socket is in.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::model::Comm;

/// A name read from /proc is trusted this long (a process may rename its main thread, or exec).
const FRESH: Duration = Duration::from_secs(1);
/// Processes remembered at most (cleared when full: the next call reads again).
const MAX: usize = 8192;

/// The name given when a process cannot be asked.
pub(crate) const UNKNOWN: &str = "unknown";

#[derive(Default)]
pub(crate) struct Names {
    known: HashMap<u32, (Comm, Instant)>,
    netns: HashMap<u32, (Option<u64>, Instant)>,
}

impl Names {
    /// The name of process `pid` when its thread `tid`, named `thread`, made a call now.
    pub(crate) fn of_task(&mut self, pid: u32, tid: u32, thread: &Comm, now: Instant) -> Comm {
        if pid == tid {
            self.remember(pid, thread.clone(), now);
            return thread.clone();
        }
        self.of_process(pid, now).unwrap_or_else(|| UNKNOWN.into())
    }

    /// The name of process `pid` (None: gone before it was ever seen).
    pub(crate) fn of_process(&mut self, pid: u32, now: Instant) -> Option<Comm> {
        if let Some((name, at)) = self.known.get(&pid)
            && now.saturating_duration_since(*at) < FRESH
        {
            return Some(name.clone());
        }
        match read_comm(pid) {
            Some(name) => {
                self.remember(pid, name.clone(), now);
                Some(name)
            }
            // Gone: the last name seen is still its own (a pid is reused only after a while).
            None => self.known.get(&pid).map(|(n, _)| n.clone()),
        }
    }

    /// The network namespace of task `tid` of process `pid` (`net:[INODE]`; a thread may have
    /// joined another: `setns()`), read once a second at most; the last one seen once gone.
    pub(crate) fn netns(&mut self, pid: u32, tid: u32, now: Instant) -> Option<u64> {
        if let Some((ns, at)) = self.netns.get(&tid)
            && now.saturating_duration_since(*at) < FRESH
        {
            return *ns;
        }
        let read = std::fs::metadata(format!("/proc/{pid}/task/{tid}/ns/net"))
            .ok()
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let ns = read.or_else(|| self.netns.get(&tid).and_then(|(ns, _)| *ns));
        bounded_insert(&mut self.netns, tid, (ns, now));
        ns
    }

    fn remember(&mut self, pid: u32, name: Comm, now: Instant) {
        bounded_insert(&mut self.known, pid, (name, now));
    }
}

/// Inserts, first clearing a map that holds [`MAX`] others (the next calls read again).
fn bounded_insert<V>(map: &mut HashMap<u32, V>, key: u32, value: V) {
    if map.len() >= MAX && !map.contains_key(&key) {
        map.clear();
    }
    map.insert(key, value);
}

/// `/proc/PID/comm`, escaped like every name (a process chooses its own).
fn read_comm(pid: u32) -> Option<Comm> {
    let raw = std::fs::read(format!("/proc/{pid}/comm")).ok()?;
    let raw = raw.strip_suffix(b"\n").unwrap_or(&raw);
    Some(crate::model::escape::sanitize(&String::from_utf8_lossy(raw)).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_names_only_itself() {
        let mut n = Names::default();
        let now = Instant::now();
        let me = std::process::id();
        let own = read_comm(me).unwrap();
        // A thread of this process calling itself "nginx": the process keeps its name.
        assert_eq!(n.of_task(me, me + 1, &"nginx".into(), now), own);
        // The main thread's call carries the process's name itself.
        assert_eq!(n.of_task(7, 7, &"main".into(), now), "main".into());
        assert_eq!(n.of_task(7, 8, &"spoof".into(), now), "main".into());
    }

    #[test]
    fn a_process_is_in_its_network_namespace() {
        let mut n = Names::default();
        let me = std::process::id();
        let own = super::super::namespaces::of_pid(me);
        assert!(own.is_some());
        assert_eq!(n.netns(me, me, Instant::now()), own);
        assert_eq!(n.netns(1 << 23, 1 << 23, Instant::now()), None);
    }

    #[test]
    fn a_process_never_seen_and_gone_is_unknown() {
        let mut n = Names::default();
        // Above pid_max (2^22): no such process.
        let gone = 1 << 23;
        assert_eq!(
            n.of_task(gone, gone + 1, &"nginx".into(), Instant::now()),
            UNKNOWN.into()
        );
    }

    #[test]
    fn a_gone_process_keeps_the_last_name_seen() {
        let mut n = Names::default();
        let gone = 1 << 23;
        let then = Instant::now();
        n.of_task(gone, gone, &"server".into(), then);
        let later = then + FRESH * 5;
        assert_eq!(
            n.of_task(gone, gone + 1, &"x".into(), later),
            "server".into()
        );
    }
}
