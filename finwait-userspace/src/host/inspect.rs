//! What one process is doing, from /proc, for the owner of a stuck socket only: its epoll sets
//! (`/proc/PID/fdinfo/EPFD` lists each registered fd as a `tfd:` line) and its threads' states
//! and blocking syscalls (`/proc/PID/task/TID/{stat,syscall}`).
use std::{collections::HashMap, fs};

use crate::{
    kernel::arch,
    model::diagnosis::{Polled, Threads},
};

/// A process's epoll sets: registered fd -> (epoll fd, events), and how many sets it has.
#[derive(Default, Debug)]
pub(crate) struct EpollSets {
    sets: usize,
    by_fd: HashMap<i32, Vec<(i32, u32)>>,
}

impl EpollSets {
    /// Reads every epoll set of `pid` (None: its fds cannot be read). Its every fd link is
    /// read to find them: [`Self::of_epoll_fds`] when they are known.
    pub(crate) fn of(pid: u32) -> Option<Self> {
        let mut epfds = Vec::new();
        for entry in fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
            let Ok(link) = fs::read_link(entry.path()) else {
                continue;
            };
            if link.as_os_str() != "anon_inode:[eventpoll]" {
                continue;
            }
            let name = entry.file_name();
            if let Some(epfd) = name.to_str().and_then(|n| n.parse::<i32>().ok()) {
                epfds.push(epfd);
            }
        }
        Some(Self::of_epoll_fds(pid, &epfds))
    }

    /// The epoll sets of `pid` at `epfds` (its epoll fds, from the kernel's inventory).
    pub(crate) fn of_epoll_fds(pid: u32, epfds: &[i32]) -> Self {
        let mut me = Self::default();
        for &epfd in epfds {
            me.sets += 1;
            let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{epfd}")) else {
                continue;
            };
            for (fd, events) in registered(&info) {
                me.by_fd.entry(fd).or_default().push((epfd, events));
            }
        }
        me
    }

    /// Whether `fd` is in one of the sets.
    pub(crate) fn polled(&self, fd: i32) -> Polled {
        match (self.sets, self.by_fd.get(&fd)) {
            (0, _) => Polled::NoEpoll,
            (_, Some(sets)) => Polled::Registered(sets.clone()),
            (sets, None) => Polled::NotRegistered { sets },
        }
    }
}

/// The `tfd:` lines of an epoll fd's fdinfo: (registered fd, events mask).
fn registered(fdinfo: &str) -> impl Iterator<Item = (i32, u32)> + '_ {
    fdinfo.lines().filter_map(|l| {
        let mut words = l.split_whitespace();
        if words.next()? != "tfd:" {
            return None;
        }
        let fd = words.next()?.parse().ok()?;
        if words.next()? != "events:" {
            return None;
        }
        let events = u32::from_str_radix(words.next()?, 16).ok()?;
        Some((fd, events))
    })
}

/// Threads of `pid` by what they wait in: the syscall a blocked thread is in, else `running`
/// (None: its tasks cannot be read).
pub(crate) fn threads(pid: u32) -> Option<Threads> {
    let mut t = Threads::default();
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let path = task.path();
        let stat = fs::read_to_string(path.join("stat")).unwrap_or_default();
        // The state follows the `(comm)` field, which may hold spaces and parentheses.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?");
        let syscall = fs::read_to_string(path.join("syscall")).unwrap_or_default();
        let wait = match (state, syscall.split_whitespace().next()) {
            ("R", _) | (_, Some("running")) => "running".to_string(),
            (_, Some(nr)) => nr.parse::<i64>().map_or_else(
                |_| "?".into(),
                |nr| format!("{}()", arch::HOST.syscall_name(nr)),
            ),
            _ => "?".into(),
        };
        t.total += 1;
        *t.by_wait.entry(wait).or_default() += 1;
    }
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tfd_lines() {
        let info = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\n\
                    tfd:        5 events:       19 data:                5  pos:0 ino:2a1f sdev:8\n\
                    tfd:       57 events:     2001 data:               39  pos:0 ino:2a20 sdev:8\n";
        let got: Vec<_> = registered(info).collect();
        assert_eq!(got, [(5, 0x19), (57, 0x2001)]);
    }

    /// This test process: one epoll set holding one fd, and its own threads.
    #[test]
    fn finds_our_own_epoll_set_and_threads() {
        // SAFETY: plain syscalls on fds we own.
        let (ep, fd) = unsafe {
            let ep = libc::epoll_create1(0);
            let fd = libc::eventfd(0, 0);
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: 0,
            };
            libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev);
            (ep, fd)
        };
        let sets = EpollSets::of(std::process::id()).unwrap();
        // The kernel adds EPOLLERR|EPOLLHUP to every registration.
        assert_eq!(sets.polled(fd), Polled::Registered(vec![(ep, 0x19)]));
        assert!(matches!(
            sets.polled(fd + 1000),
            Polled::NotRegistered { .. }
        ));
        let t = threads(std::process::id()).unwrap();
        assert!(
            t.total >= 1 && t.by_wait.values().sum::<usize>() == t.total,
            "{t:?}"
        );
        // SAFETY: closing our own fds.
        unsafe {
            libc::close(fd);
            libc::close(ep);
        }
    }
}
