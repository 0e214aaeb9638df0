//! The tracer's own counters: the kernel's (per-CPU counters, runs each program skipped, run
//! times) and userspace's, gathered into the `stats` event; and warnings as losses grow.
use std::os::fd::AsFd;

use aya::maps::{MapData, PerCpuArray};
use finwait_common::counter;

use super::pipeline::Pipeline;
use crate::{
    kernel::prog_stats,
    output::{Stats, json::RunTime},
};

/// The kernel side's counters.
pub(crate) struct KernelCounters {
    counters: PerCpuArray<MapData, u64>,
    attach_failed: usize,
}

impl KernelCounters {
    pub(crate) fn new(counters: PerCpuArray<MapData, u64>, attach_failed: usize) -> Self {
        Self {
            counters,
            attach_failed,
        }
    }

    fn sum(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Every counter, for the `stats` event.
    pub(crate) fn stats(&self, ebpf: &aya::Ebpf, p: &Pipeline) -> Stats {
        let c = p.correlator.stats();
        let o = p.resolver.stats;
        Stats {
            records: c.records,
            transitions: c.transitions,
            calls: c.calls,
            kernel_calls: c.kernel_calls,
            lost_ring_full: self.sum(counter::RING_FULL),
            kernel_skipped_nested: nested_misses(ebpf),
            kernel_skips_counted: skips_counted(ebpf),
            kernel_skipped_by_program: misses_by_program(ebpf),
            kernel_read_failed: self.sum(counter::READ_FAILED),
            transitions_missed: p.transitions_missed,
            pid_insert_failed: self.sum(counter::PID_INSERT_FAILED),
            in_call_full: self.sum(counter::IN_CALL_FULL),
            owner_map_full: self.sum(counter::OWNERS_FULL),
            scm_rights_unread: self.sum(counter::SCM_RIGHTS_UNREAD),
            sockets_evicted: c.sockets_evicted,
            tracked_sockets: p.correlator.tracked_sockets(),
            threads_evicted: c.threads_evicted,
            attach_failed: self.attach_failed,
            owners_from_kernel: o.from_kernel,
            owners_verified: o.verified,
            owner_scans: p.resolver.scans(),
            owner_lookups_timed_out: o.timed_out,
            containers_unresolved: p.cgroups.unresolved,
            rss_kib: rss_kib(),
            kernel_run_time: run_time(ebpf),
        }
    }
}

/// Per program: runs and mean nanoseconds per run, where `kernel.bpf_stats_enabled` is on.
fn run_time(ebpf: &aya::Ebpf) -> std::collections::BTreeMap<String, RunTime> {
    ebpf.programs()
        .filter_map(|(name, p)| {
            let (runs, ns) = prog_stats::run_time(p.fd().ok()?.as_fd())?;
            let ns_per_run = ns / runs;
            Some((name.to_string(), RunTime { runs, ns_per_run }))
        })
        .collect()
}

/// Whether this kernel counts the runs it skips (`bpf_prog_info.recursion_misses`, Linux 5.12
/// and later): where it does not, `kernel_skipped_nested` reads 0 without meaning.
pub(crate) fn skips_counted(ebpf: &aya::Ebpf) -> bool {
    ebpf.programs()
        .filter_map(|(_, p)| p.fd().ok())
        .any(|fd| prog_stats::recursion_misses(fd.as_fd()).is_some())
}

/// Events the kernel dropped because one of our programs (or another) was already running on
/// the CPU, summed over our programs.
fn nested_misses(ebpf: &aya::Ebpf) -> u64 {
    ebpf.programs()
        .filter_map(|(_, p)| p.fd().ok())
        .filter_map(|fd| prog_stats::recursion_misses(fd.as_fd()))
        .sum()
}

/// Per program that skipped any: the runs the kernel skipped (which hook loses events).
fn misses_by_program(ebpf: &aya::Ebpf) -> std::collections::BTreeMap<String, u64> {
    ebpf.programs()
        .filter_map(|(name, p)| {
            let misses = prog_stats::recursion_misses(p.fd().ok()?.as_fd())?;
            (misses > 0).then(|| (name.to_string(), misses))
        })
        .collect()
}

fn rss_kib() -> u64 {
    procfs::process::Process::myself()
        .and_then(|p| p.status())
        .ok()
        .and_then(|s| s.vmrss)
        .unwrap_or(0)
}

/// Losses already warned about: each warning says what is new.
#[derive(Default)]
pub(crate) struct Warned {
    skipped: u64,
    lost: u64,
    missed: u64,
}

impl Warned {
    /// `missed`: transitions of reported sockets that never arrived, so far.
    pub(crate) fn warn(&mut self, ebpf: &aya::Ebpf, k: &KernelCounters, missed: u64) {
        if missed > self.missed {
            eprintln!(
                "finwait-trace: warning: {} transitions of reported sockets never arrived (the socket's next transition left another state; transitions_missed)",
                missed - self.missed
            );
            self.missed = missed;
        }
        let skipped = nested_misses(ebpf);
        if skipped > self.skipped {
            let by: Vec<String> = misses_by_program(ebpf)
                .iter()
                .map(|(name, n)| format!("{name}: {n}"))
                .collect();
            eprintln!(
                "finwait-trace: warning: {} events skipped by the kernel (a BPF program was already running on that CPU; so far per program: {})",
                skipped - self.skipped,
                by.join(", ")
            );
            self.skipped = skipped;
        }
        let lost = k.sum(counter::RING_FULL);
        if lost > self.lost {
            eprintln!(
                "finwait-trace: warning: {} events lost (ring buffer full; raise --ring-buffer-kib)",
                lost - self.lost
            );
            self.lost = lost;
        }
    }
}
