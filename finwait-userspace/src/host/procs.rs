//! Process-tree lookups for `--pid`, and the processes of containers, pods and namespaces.
use std::collections::{HashMap, HashSet};

use anyhow::{Result, bail};
use procfs::process::{Process, all_processes};

/// Fails clearly for a pid that does not exist, or that names a thread rather than a process
/// (/proc lists threads too, but the kernel filter follows processes).
pub(crate) fn check_exists(pids: &[u32]) -> Result<()> {
    for &pid in pids {
        let tgid = Process::new(pid as i32)
            .and_then(|p| p.status())
            .map(|s| s.tgid as u32);
        match tgid {
            Err(_) => bail!("--pid {pid}: no such process"),
            Ok(tgid) if tgid != pid => {
                bail!("--pid {pid} is a thread of process {tgid}: pass --pid {tgid}")
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Running processes whose name (`comm`) is one of `names`.
/// Containers (ids or prefixes), pods (UIDs, names, NAMESPACE/NAME) and network namespaces.
pub(crate) struct Workloads<'a> {
    pub(crate) containers: &'a [String],
    pub(crate) pods: &'a [String],
    pub(crate) netns: &'a [u64],
}

/// The processes in the containers, pods and network namespaces `w` names, and those of them
/// that have none (for an error: a typo must not trace nothing silently).
pub(crate) fn in_workloads(w: &Workloads<'_>) -> Result<(Vec<u32>, Vec<String>)> {
    let mut cgroups = super::cgroup::Cgroups::new();
    let mut found = Vec::new();
    let (mut ids_seen, mut pods_seen, mut ns_seen) = (Vec::new(), Vec::new(), Vec::new());
    for p in all_processes()?.flatten() {
        let pid = p.pid as u32;
        if !w.netns.is_empty()
            && let Some(ns) = super::namespaces::of_pid(pid).filter(|ns| w.netns.contains(ns))
        {
            ns_seen.push(ns);
            found.push(pid);
            continue;
        }
        if w.containers.is_empty() && w.pods.is_empty() {
            continue;
        }
        let Some(c) = cgroups.of(0, pid) else {
            continue;
        };
        for id in w.containers {
            if c.is_one_of(std::slice::from_ref(id), &[]) {
                ids_seen.push(id.clone());
                found.push(pid);
            }
        }
        for pod in w.pods {
            if c.is_one_of(&[], std::slice::from_ref(pod)) {
                pods_seen.push(pod.clone());
                found.push(pid);
            }
        }
    }
    let mut missing: Vec<String> = Vec::new();
    missing.extend(
        w.containers
            .iter()
            .filter(|c| !ids_seen.contains(c))
            .map(|c| format!("container {c}")),
    );
    missing.extend(
        w.pods
            .iter()
            .filter(|p| !pods_seen.contains(p))
            .map(|p| format!("pod {p}")),
    );
    missing.extend(
        w.netns
            .iter()
            .filter(|n| !ns_seen.contains(n))
            .map(|n| format!("net:[{n}]")),
    );
    found.sort_unstable();
    found.dedup();
    Ok((found, missing))
}

pub(crate) fn with_comm(names: &[String]) -> Vec<u32> {
    if names.is_empty() {
        return Vec::new();
    }
    let Ok(procs) = all_processes() else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter(|p| p.stat().is_ok_and(|s| names.contains(&s.comm)))
        .map(|p| p.pid as u32)
        .collect()
}

/// The given pids and all their current descendants.
pub(crate) fn with_descendants(pids: &[u32]) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(procs) = all_processes() {
        for p in procs.flatten() {
            if let Ok(stat) = p.stat() {
                children
                    .entry(stat.ppid as u32)
                    .or_default()
                    .push(p.pid as u32);
            }
        }
    }
    let mut seen: HashSet<u32> = HashSet::new();
    let mut stack: Vec<u32> = pids.to_vec();
    while let Some(pid) = stack.pop() {
        if seen.insert(pid) {
            stack.extend(children.get(&pid).into_iter().flatten());
        }
    }
    let mut all: Vec<u32> = seen.into_iter().collect();
    all.sort_unstable();
    all
}

/// Whether `pid` runs: one of its threads is not a zombie. (Its main thread may have exited
/// while others run: the process is alive, its leader a zombie; every thread a zombie is a
/// process that exited and waits for its parent.)
/// `pid`'s command line, short and escaped (see [`short_cmdline`]); None when it has exited, is
/// a kernel thread, or cannot be read.
pub(crate) fn cmdline(pid: u32) -> Option<String> {
    short_cmdline(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?)
}

/// A command line as people recognise it: the program's file name and its arguments, cut at
/// [`CMDLINE_MAX`] characters, escaped like every name (a process writes its own).
pub(crate) fn short_cmdline(raw: &[u8]) -> Option<String> {
    let mut args = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy);
    let program = args.next()?;
    let program = program.rsplit('/').next().unwrap_or(&program).to_string();
    let mut line = std::iter::once(program)
        .chain(args.map(std::borrow::Cow::into_owned))
        .collect::<Vec<_>>()
        .join(" ");
    if let Some((cut, _)) = line.char_indices().nth(CMDLINE_MAX) {
        line.truncate(cut);
        line.push_str("...");
    }
    Some(crate::model::escape::sanitize(&line))
}

/// Characters of a command line shown at most.
const CMDLINE_MAX: usize = 60;

/// What this process uses, for the standard `process_*` metrics.
pub(crate) struct Usage {
    pub(crate) cpu_seconds: f64,
    pub(crate) rss_bytes: u64,
    pub(crate) vsize_bytes: u64,
    pub(crate) open_fds: usize,
    pub(crate) max_fds: u64,
    pub(crate) start_time_seconds: f64,
}

/// This process's usage from /proc/self; None where /proc cannot say.
pub(crate) fn own_usage() -> Option<Usage> {
    let me = Process::myself().ok()?;
    let stat = me.stat().ok()?;
    let ticks = procfs::ticks_per_second() as f64;
    let page = procfs::page_size();
    let boot = procfs::boot_time_secs().ok()? as f64;
    let max_fds = me
        .limits()
        .ok()
        .and_then(|l| match l.max_open_files.soft_limit {
            procfs::process::LimitValue::Value(v) => Some(v),
            procfs::process::LimitValue::Unlimited => None,
        })
        .unwrap_or(0);
    Some(Usage {
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
        rss_bytes: stat.rss * page,
        vsize_bytes: stat.vsize,
        open_fds: me.fd_count().ok()?,
        max_fds,
        start_time_seconds: boot + stat.starttime as f64 / ticks,
    })
}

/// /proc that cannot be read (out of fds, say) is no answer: alive until a later check says.
pub(crate) fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    let tasks = match Process::new(pid).and_then(|p| p.tasks()) {
        Ok(tasks) => tasks,
        Err(e) => return !gone(&e),
    };
    tasks.into_iter().any(|t| match t.and_then(|t| t.stat()) {
        Ok(s) => s.state != 'Z' && s.state != 'X',
        Err(e) => !gone(&e),
    })
}

/// An error that says the process or thread is not there, rather than that it was not read.
fn gone(e: &procfs::ProcError) -> bool {
    match e {
        procfs::ProcError::NotFound(_) => true,
        procfs::ProcError::Io(e, _) => e.raw_os_error() == Some(libc::ESRCH),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::short_cmdline;

    #[test]
    fn command_lines_short_and_escaped() {
        assert_eq!(
            short_cmdline(b"/usr/bin/python3\0app.py\0--pool\08\0").as_deref(),
            Some("python3 app.py --pool 8")
        );
        assert_eq!(short_cmdline(b""), None);
        let long = format!("/x/y\0{}\0", "a".repeat(100));
        let s = short_cmdline(long.as_bytes()).unwrap();
        assert!(s.ends_with("...") && s.chars().count() == 63, "{s}");
        assert_eq!(
            short_cmdline(b"evil\x1b[2J\0").as_deref(),
            Some("evil\\u{1b}[2J")
        );
        // nginx rewrites its argv into one string: kept as it is.
        assert_eq!(
            short_cmdline(b"nginx: worker process\0").as_deref(),
            Some("nginx: worker process")
        );
    }

    /// A process whose main thread exited while another runs is alive; one that exited and
    /// waits for its parent (a zombie) is not.
    #[test]
    fn alive_means_a_thread_still_runs() {
        assert!(super::alive(std::process::id()));
        assert!(!super::alive(u32::MAX));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!super::alive(pid), "a zombie is not alive");
        child.wait().unwrap();
        let leader_gone = std::process::Command::new("python3")
            .args(["-c", "import threading,time,ctypes\nthreading.Thread(target=time.sleep,args=(5,)).start()\nctypes.CDLL(None).pthread_exit(None)"])
            .spawn();
        if let Ok(mut p) = leader_gone {
            std::thread::sleep(std::time::Duration::from_millis(500));
            assert!(super::alive(p.id()), "its main thread exited, another runs");
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    #[test]
    fn a_child_is_a_descendant() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let all = super::with_descendants(&[me]);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(all.contains(&me) && all.contains(&child.id()), "{all:?}");
        assert!(super::check_exists(&[u32::MAX - 1]).is_err());
    }
}
