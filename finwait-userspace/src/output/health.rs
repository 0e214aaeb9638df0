//! The tracer's health as it reports it: what it runs (`Start`, once the programs are attached)
//! and everything it counted (`Stats`, at exit and with `--stats-every`). Every sink shows them;
//! the JSON contract serializes them as they are.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::kernel::loader::{CallHook, Mode, Sizes, StateHook, SyscallHook};

/// Printed once the programs are attached.
#[derive(Serialize, Clone, Debug, Default)]
pub(crate) struct Start {
    pub(crate) mode: Mode,
    pub(crate) state_hook: StateHook,
    pub(crate) call_hook: Option<CallHook>,
    pub(crate) syscall_hook: SyscallHook,
    pub(crate) precise_unavailable: Option<String>,
    pub(crate) fd_resolution: bool,
    pub(crate) kernel: String,
    /// The architecture (`x86_64`, `aarch64`): which syscall wrappers and numbers are used.
    pub(crate) arch: &'static str,
    pub(crate) tcp_fin_timeout_s: u64,
    pub(crate) attached: usize,
    pub(crate) attach_failed: usize,
    pub(crate) pids: Vec<u32>,
    pub(crate) comms: Vec<String>,
    /// Where the start-up snapshot's holders come from: `iter/task_file` (the kernel's socket
    /// inventory) or `proc`.
    pub(crate) inventory: &'static str,
    /// finwait's own sandbox: `seccomp`, or `off (why)`.
    pub(crate) sandbox: String,
    /// The kernel maps' capacities, sized from this host, and how their entries are allocated.
    pub(crate) maps: Sizes,
}

/// Every counter: at exit, and with `--stats-every`.
#[derive(Serialize, Clone, Debug, Default)]
pub(crate) struct Stats {
    pub(crate) records: u64,
    pub(crate) transitions: u64,
    pub(crate) calls: u64,
    pub(crate) kernel_calls: u64,
    pub(crate) lost_ring_full: u64,
    pub(crate) kernel_skipped_nested: u64,
    /// False where the kernel does not count skipped runs (before 5.12).
    pub(crate) kernel_skips_counted: bool,
    /// `kernel_skipped_nested` per program, the programs that skipped none left out.
    pub(crate) kernel_skipped_by_program: BTreeMap<String, u64>,
    /// State changes the kernel skipped the first BTF state program for, which the second
    /// caught (not losses; they say how often the kernel nests or preempts it).
    pub(crate) kernel_recovered_nested: u64,
    /// Second reports of one state change (both state programs reported it), dropped.
    pub(crate) duplicates_dropped: u64,
    pub(crate) kernel_read_failed: u64,
    /// Transitions of reported sockets that never arrived, seen from each one's next transition.
    pub(crate) transitions_missed: u64,
    pub(crate) pid_insert_failed: u64,
    pub(crate) in_call_full: u64,
    pub(crate) owner_map_full: u64,
    pub(crate) scm_rights_unread: u64,
    pub(crate) sockets_evicted: u64,
    pub(crate) tracked_sockets: usize,
    pub(crate) threads_evicted: u64,
    pub(crate) attach_failed: usize,
    pub(crate) owners_from_kernel: u64,
    pub(crate) owners_verified: u64,
    pub(crate) owner_scans: u64,
    pub(crate) owner_lookups_timed_out: u64,
    /// Tasks whose container could not be found (their cgroup was gone).
    pub(crate) containers_unresolved: u64,
    pub(crate) rss_kib: u64,
    /// Memory of each of finwait's BPF maps, as the kernel accounts it (`memlock` in the map's
    /// fdinfo; before Linux 6.4 what it charged at creation).
    pub(crate) bpf_map_bytes: BTreeMap<String, u64>,
    pub(crate) kernel_run_time: BTreeMap<String, RunTime>,
}

/// One program's run time, from the kernel's own accounting.
#[derive(Serialize, Clone, Copy, Debug, Default)]
pub(crate) struct RunTime {
    pub(crate) runs: u64,
    pub(crate) ns_per_run: u64,
}
