//! The kernel side, from userspace: the architecture's syscall interface, this kernel's layouts (tracefs formats, BTF), loading and
//! attaching the embedded eBPF programs, their counters, the kernel's per-program statistics, and
//! the programs' own diagnostics (`-v`), and the kernel's socket inventory.
pub(crate) mod arch;
pub(crate) mod btf;
pub(crate) mod counters;
pub(crate) mod diagnostics;
pub(crate) mod inventory;
pub(crate) mod load_error;
pub(crate) mod loader;
pub(crate) mod map_memory;
pub(crate) mod prog_stats;
pub(crate) mod tracefs;

/// This kernel's release (`/proc/sys/kernel/osrelease`, trimmed); empty if unreadable.
pub(crate) fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Is `release` ("5.10.0-32-cloud-amd64") older than `major.minor`? Unreadable: assumed old.
pub(crate) fn release_before(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release.trim().split(['.', '-', '+']);
    let number = |p: Option<&str>| p.and_then(|p| p.parse::<u32>().ok());
    match (number(parts.next()), number(parts.next())) {
        (Some(a), Some(b)) => (a, b) < (major, minor),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::release_before;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(release_before("5.10.0-32-cloud-amd64\n", (6, 1)));
        assert!(!release_before("6.1.0-25-amd64", (6, 1)));
        assert!(!release_before("7.2.13+deb14-cloud-amd64", (6, 1)));
        assert!(!release_before("6.18.0-finwait", (6, 1)));
        assert!(release_before("", (6, 1)));
    }
}
