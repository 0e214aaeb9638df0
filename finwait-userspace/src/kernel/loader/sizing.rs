//! The kernel maps' sizes, from this host, and whether their hash maps are preallocated.
//!
//! Sized for the largest host, the maps cost every host its memory (44 MiB on a quiet one,
//! charged to the pod on Kubernetes); sized from what this host has, they cost what it needs.
//! From Linux 6.1 a hash map's entries are allocated as they are written, so a capacity costs
//! only its bucket array (16 bytes an entry). Before, the kernel warns (`WARN_ONCE`: a stack trace
//! in the log and a tainted kernel, a panic where `panic_on_warn` is set) when a kprobe or
//! tracepoint program uses a hash map allocated at run time, so there they stay preallocated.
use serde::Serialize;

use super::Options;

/// What the sizes are derived from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Host {
    /// TCP sockets allocated on the host, every namespace (`/proc/net/sockstat`'s `alloc`).
    pub(crate) tcp_sockets: u64,
    /// Threads on the host (`/proc/loadavg`'s fourth field).
    pub(crate) threads: u64,
    pub(crate) cpus: u64,
}

impl Host {
    /// Read from /proc; what cannot be read counts as a small host (the maps still count what
    /// does not fit).
    pub(crate) fn read() -> Self {
        let read = |path| std::fs::read_to_string(path).unwrap_or_default();
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        Self {
            tcp_sockets: sockstat_tcp_alloc(&read("/proc/net/sockstat")).unwrap_or(0),
            threads: loadavg_threads(&read("/proc/loadavg")).unwrap_or(0),
            cpus: u64::try_from(cpus).unwrap_or(1).max(1),
        }
    }
}

/// How the hash maps hold their entries, as the start event says it.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Allocation {
    /// Entries allocated as they are written (Linux 6.1+).
    #[default]
    ByNeed,
    /// Every entry allocated at load (older kernels).
    Preallocated,
}

impl std::fmt::Display for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ByNeed => "allocated by need",
            Self::Preallocated => "preallocated (before Linux 6.1)",
        })
    }
}

/// The maps' capacities (entries; the ring in bytes).
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sizes {
    pub(crate) allocation: Allocation,
    /// `OWNERS`: one entry per socket a task holds.
    pub(crate) owners: u32,
    /// `IN_CALL`, `RECVMSG`, `CONNECTING`: one entry per thread inside a call.
    pub(crate) per_thread: u32,
    /// `TRACED_PIDS`: one per followed process (1 when nothing is selected: it is unused).
    pub(crate) traced_pids: u32,
    pub(crate) ring_bytes: u32,
}

/// Room for sockets opened after the start, and the least any map holds.
const OWNERS_LEAST: u64 = 16_384;
const OWNERS_MOST: u64 = 1 << 22;
const PER_THREAD_LEAST: u64 = 1_024;
const PER_THREAD_MOST: u64 = 65_536;
/// The ring: this much per CPU (the rate the host can produce grows with its CPUs), within
/// bounds.
const RING_PER_CPU: u64 = 1 << 20;
const RING_LEAST: u64 = 4 << 20;
const RING_MOST: u64 = 16 << 20;

/// The sizes for this host: the flags where given, else from `host`.
pub(crate) fn sizes(opts: &Options, host: &Host, by_need: bool) -> Sizes {
    let within = |n: u64, least: u64, most: u64| {
        u32::try_from(n.clamp(least, most).next_power_of_two().min(most)).unwrap_or(u32::MAX)
    };
    // Every socket at the start may be seeded, and as many more may open while tracing.
    let owners = opts.owners_max.unwrap_or_else(|| {
        within(
            host.tcp_sockets
                .saturating_mul(2)
                .saturating_add(OWNERS_LEAST),
            OWNERS_LEAST,
            OWNERS_MOST,
        )
    });
    let per_thread = within(
        host.threads
            .saturating_mul(2)
            .saturating_add(PER_THREAD_LEAST),
        PER_THREAD_LEAST,
        PER_THREAD_MOST,
    );
    let ring_bytes = opts.ring_bytes.unwrap_or_else(|| {
        within(
            host.cpus.saturating_mul(RING_PER_CPU),
            RING_LEAST,
            RING_MOST,
        )
    });
    Sizes {
        allocation: if by_need {
            Allocation::ByNeed
        } else {
            Allocation::Preallocated
        },
        owners,
        per_thread,
        traced_pids: if opts.following() { per_thread } else { 1 },
        ring_bytes,
    }
}

/// Can hash maps used by kprobe and tracepoint programs allocate at run time without a kernel
/// warning? From Linux 6.1 (the BPF memory allocator).
pub(crate) fn by_need_allowed(release: &str) -> bool {
    !crate::kernel::release_before(release, (6, 1))
}

/// `TCP: inuse 5 orphan 0 tw 0 alloc 7 mem 1`: the `alloc` count.
fn sockstat_tcp_alloc(sockstat: &str) -> Option<u64> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "alloc")?;
    words.next()?.parse().ok()
}

/// `0.10 0.20 0.30 2/345 6789`: 345.
fn loadavg_threads(loadavg: &str) -> Option<u64> {
    loadavg
        .split_whitespace()
        .nth(3)?
        .split('/')
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::loader::Mode;

    fn opts() -> Options {
        Options {
            all_transitions: false,
            pids: vec![],
            comms: vec![],
            ports: vec![],
            ring_bytes: None,
            noop: false,
            mode: Mode::Auto,
            owners_max: None,
            diagnostics: false,
            prealloc: false,
        }
    }

    #[test]
    fn host_files_are_parsed_and_garbage_is_none() {
        let sockstat =
            "sockets: used 290\nTCP: inuse 5 orphan 0 tw 2 alloc 20007 mem 3\nUDP: inuse 1 mem 0\n";
        assert_eq!(sockstat_tcp_alloc(sockstat), Some(20_007));
        assert_eq!(sockstat_tcp_alloc("TCP: inuse 5"), None);
        assert_eq!(sockstat_tcp_alloc("TCP: alloc x"), None);
        assert_eq!(loadavg_threads("0.10 0.20 0.30 2/345 6789\n"), Some(345));
        assert_eq!(loadavg_threads("0.10 0.20"), None);
        assert_eq!(loadavg_threads(""), None);
    }

    #[test]
    fn maps_follow_the_host_within_bounds() {
        let quiet = Host {
            tcp_sockets: 40,
            threads: 300,
            cpus: 2,
        };
        let s = sizes(&opts(), &quiet, true);
        assert_eq!(s.owners, 32_768, "room for new sockets, to a power of two");
        assert_eq!(s.per_thread, 2_048);
        assert_eq!(s.traced_pids, 1, "unused without --pid or --comm");
        assert_eq!(s.ring_bytes, 4 << 20);
        assert_eq!(s.allocation, Allocation::ByNeed);

        // 100,000 sockets, 60,000 threads, 64 CPUs.
        let busy = Host {
            tcp_sockets: 100_000,
            threads: 60_000,
            cpus: 64,
        };
        let following = Options {
            pids: vec![1],
            ..opts()
        };
        let s = sizes(&following, &busy, false);
        assert_eq!(s.owners, 262_144, "every socket seeded, as many again");
        assert_eq!(s.per_thread, 65_536, "at most");
        assert_eq!(s.traced_pids, 65_536);
        assert_eq!(s.ring_bytes, 16 << 20, "at most");
        assert_eq!(s.allocation, Allocation::Preallocated);

        // Unreadable /proc, and a host past every bound.
        let s = sizes(&opts(), &Host::default(), true);
        assert_eq!(
            (s.owners, s.per_thread, s.ring_bytes),
            (16_384, 1_024, 4 << 20)
        );
        let huge = Host {
            tcp_sockets: u64::MAX,
            threads: u64::MAX,
            cpus: u64::MAX,
        };
        let s = sizes(&opts(), &huge, true);
        assert_eq!(
            (s.owners, s.per_thread, s.ring_bytes),
            (1 << 22, 65_536, 16 << 20)
        );
    }

    #[test]
    fn flags_win() {
        let o = Options {
            owners_max: Some(7),
            ring_bytes: Some(8192),
            ..opts()
        };
        let s = sizes(&o, &Host::default(), true);
        assert_eq!((s.owners, s.ring_bytes), (7, 8192));
    }

    #[test]
    fn by_need_from_linux_6_1() {
        assert!(!by_need_allowed("5.10.0-32-cloud-amd64"));
        assert!(!by_need_allowed("6.0.9"));
        assert!(by_need_allowed("6.1.0-13-amd64"));
        assert!(by_need_allowed("7.2.13+deb14-cloud-amd64"));
        assert!(!by_need_allowed(""), "unreadable: the safe choice");
    }
}
