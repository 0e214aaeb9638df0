//! Finds a task's cgroup path: from the cgroup v2 id the kernel recorded with the call (the
//! cgroup directory's inode number), else from `/proc/PID/cgroup` (v1-only hosts, snapshot
//! owners found by scanning /proc).
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use super::pods::Pods;
use crate::model::Container;

/// Cgroups remembered at most (a host has hundreds to a few thousand).
const MAX_KNOWN: usize = 16_384;
/// The cgroup tree is walked again for an unknown id at most this often (new containers).
const REINDEX_AFTER: Duration = Duration::from_secs(2);
/// A process's /proc answer is reused this long (a pid is reused only after wrapping around).
const PROC_ANSWER_FOR: Duration = Duration::from_secs(10);

pub(crate) struct Cgroups {
    /// Where cgroup v2 is mounted (None on v1-only hosts).
    root: Option<PathBuf>,
    /// id -> what its path says.
    known: HashMap<u64, Arc<Container>>,
    indexed_at: Option<Instant>,
    /// pid -> what its /proc/PID/cgroup said, and when (where the id says nothing).
    by_pid: HashMap<u32, (Instant, Option<Arc<Container>>)>,
    /// Tasks whose cgroup could not be found (exited, and their cgroup removed).
    pub(crate) unresolved: u64,
    /// The time the cached answers are judged by, set once per batch of reports ([`Self::now`]):
    /// a clock read per report was 4% of the tracer's CPU.
    now: Instant,
    /// Pod names by UID.
    pods: Pods,
}

impl Cgroups {
    pub(crate) fn new() -> Self {
        Self::at(v2_mount())
    }

    fn at(root: Option<PathBuf>) -> Self {
        Self {
            root,
            known: HashMap::new(),
            indexed_at: None,
            by_pid: HashMap::new(),
            unresolved: 0,
            now: Instant::now(),
            pods: Pods::new(),
        }
    }

    /// What `path` says, with the pod's name where the node shows it.
    fn container(&mut self, path: &str) -> Arc<Container> {
        let mut c = Container::from_path(path);
        if let Some(uid) = &c.pod_uid {
            c.pod = self.pods.name(uid);
        }
        Arc::new(c)
    }

    /// Sets the time for the next lookups (once per batch).
    pub(crate) fn now(&mut self, now: Instant) {
        self.now = now;
    }

    /// The container of the task `pid` whose cgroup id was `id` (0: not recorded).
    pub(crate) fn of(&mut self, id: u64, pid: u32) -> Option<Arc<Container>> {
        // Id 1 is the v2 root: what a v1-only host reports for every task.
        if id > 1 && self.root.is_some() {
            if let Some(c) = self.known.get(&id) {
                return Some(c.clone());
            }
            if self
                .indexed_at
                .is_none_or(|at| self.now.duration_since(at) >= REINDEX_AFTER)
            {
                self.index();
                if let Some(c) = self.known.get(&id) {
                    return Some(c.clone());
                }
            }
        }
        self.of_process(pid)
    }

    /// From /proc/PID/cgroup, each process read once per [`PROC_ANSWER_FOR`].
    fn of_process(&mut self, pid: u32) -> Option<Arc<Container>> {
        if let Some((at, c)) = self.by_pid.get(&pid)
            && self.now.duration_since(*at) < PROC_ANSWER_FOR
        {
            return c.clone();
        }
        let found = from_proc(pid).map(|p| self.container(&p));
        if found.is_none() {
            self.unresolved += 1;
        }
        if self.by_pid.len() >= MAX_KNOWN {
            self.by_pid.clear();
        }
        self.by_pid.insert(pid, (self.now, found.clone()));
        found
    }

    /// Walks the cgroup v2 tree: every directory's inode is a cgroup id.
    fn index(&mut self) {
        self.indexed_at = Some(self.now);
        let Some(root) = self.root.clone() else {
            return;
        };
        if self.known.len() >= MAX_KNOWN {
            self.known.clear();
        }
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                if !meta.is_dir() || self.known.len() >= MAX_KNOWN {
                    continue;
                }
                let path = e.path();
                if !self.known.contains_key(&meta.ino()) {
                    let rel = Path::new("/").join(path.strip_prefix(&root).unwrap_or(&path));
                    let c = self.container(&rel.to_string_lossy());
                    self.known.insert(meta.ino(), c);
                }
                dirs.push(path);
            }
        }
    }
}

/// Where cgroup v2 is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts.
pub(crate) fn v2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| {
            let (fields, fs) = l.split_once(" - ")?;
            fs.starts_with("cgroup2 ")
                .then(|| fields.split(' ').nth(4).map(PathBuf::from))?
        })
        .collect();
    // The shortest: a container's own nested mounts come after the host's.
    mounts.sort_by_key(|p| p.as_os_str().len());
    mounts.into_iter().next()
}

/// The cgroup path `/proc/PID/cgroup` gives: the v2 line (`0::/path`), else systemd's v1
/// hierarchy (which names services and container scopes alike), else the first path.
fn from_proc(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    path_of(&text)
}

fn path_of(proc_cgroup: &str) -> Option<String> {
    let lines: Vec<(&str, &str)> = proc_cgroup
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            Some((controllers, path))
        })
        .collect();
    let pick = |want: &str| lines.iter().find(|(c, _)| *c == want).map(|(_, p)| *p);
    let v2 = pick("").filter(|p| *p != "/");
    let chosen = v2
        .or_else(|| pick("name=systemd"))
        .or_else(|| lines.iter().map(|(_, p)| *p).find(|p| *p != "/"))
        .or(pick(""))?;
    Some(chosen.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_line_first_then_systemd_then_any() {
        assert_eq!(
            path_of("0::/system.slice/nginx.service\n").as_deref(),
            Some("/system.slice/nginx.service")
        );
        // Hybrid host, process in the v2 root: systemd's v1 hierarchy names it.
        let hybrid = "12:memory:/docker/abc\n1:name=systemd:/system.slice/docker-abc.scope\n0::/\n";
        assert_eq!(
            path_of(hybrid).as_deref(),
            Some("/system.slice/docker-abc.scope")
        );
        assert_eq!(
            path_of("4:cpu,cpuacct:/lxc/db\n").as_deref(),
            Some("/lxc/db")
        );
        assert_eq!(path_of("0::/\n").as_deref(), Some("/"));
        assert_eq!(path_of(""), None);
    }

    #[test]
    fn ids_are_directory_inodes() {
        let dir = std::env::temp_dir().join(format!("finwait-cg-{}", std::process::id()));
        let id = ("docker-", "0".repeat(64), ".scope");
        let scope = dir
            .join("system.slice")
            .join(format!("{}{}{}", id.0, id.1, id.2));
        std::fs::create_dir_all(&scope).unwrap();
        let ino = std::fs::metadata(&scope).unwrap().ino();
        let mut cg = Cgroups::at(Some(dir.clone()));
        let c = cg.of(ino, u32::MAX).expect("found by inode");
        assert_eq!(c.id.as_deref(), Some(id.1.as_str()));
        assert!(c.cgroup.starts_with("/system.slice/docker-"));
        // Unknown id, no such process: counted, not guessed.
        assert_eq!(cg.of(u64::MAX, u32::MAX), None);
        assert_eq!(cg.unresolved, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
