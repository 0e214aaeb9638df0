//! Process-tree lookups for `--pid`.
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

#[cfg(test)]
mod tests {
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
