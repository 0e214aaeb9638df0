//! The tracer's own counters: the kernel's (loss counters, runs each program skipped, run
//! times) and userspace's, gathered into the `stats` event; and warnings as losses grow.
use std::os::fd::AsFd;

use std::collections::BTreeMap;

use finwait_common::{GUARD_STATE, GUARDED, counter};

use super::pipeline::Pipeline;
use crate::{
    kernel::{counters::Counters, prog_stats},
    output::{Stats, health::RunTime},
};

/// The kernel side's counters.
pub(crate) struct KernelCounters {
    counters: Counters,
    attach_failed: usize,
    /// The kernel counts the runs it skips (the loader's probe).
    skips_counted: bool,
}

impl KernelCounters {
    pub(crate) fn new(counters: Counters, attach_failed: usize, skips_counted: bool) -> Self {
        Self {
            counters,
            attach_failed,
            skips_counted,
        }
    }

    /// Per guarded hook (`GUARDED`), the events its second program recovered.
    fn recovered(&self) -> [u64; GUARDED.len()] {
        std::array::from_fn(|i| self.counters.get(counter::RECOVERED + i as u32))
    }

    /// Per program that lost any: the events lost because the kernel skipped it (a BPF program
    /// was already running on that CPU); and the events the guarded hooks recovered.
    /// `state_recovered_here`: the state hook's recoveries only userspace could tell.
    fn losses(&self, ebpf: &aya::Ebpf, state_recovered_here: u64) -> (BTreeMap<String, u64>, u64) {
        // Skips first, recoveries after: a skip is counted before its recovery, so this order
        // can only show a loss late, never one that the second program caught.
        let misses: Vec<_> = ebpf
            .programs()
            .filter_map(|(name, p)| {
                let misses = prog_stats::recursion_misses(p.fd().ok()?.as_fd())?;
                Some((name.to_string(), misses))
            })
            .collect();
        let mut recovered = self.recovered();
        recovered[GUARD_STATE as usize] += state_recovered_here;
        (
            losses(misses.into_iter(), recovered),
            recovered.iter().sum(),
        )
    }

    /// Every counter, for the `stats` event.
    pub(crate) fn stats(&self, ebpf: &aya::Ebpf, p: &Pipeline) -> Stats {
        let c = p.correlator.stats();
        let d = p.dedup.stats();
        let o = p.resolver.stats;
        let (losses, recovered) = self.losses(ebpf, d.state_recovered_here);
        Stats {
            records: d.records,
            transitions: c.transitions,
            calls: c.calls,
            kernel_calls: c.kernel_calls,
            lost_ring_full: self.counters.get(counter::RING_FULL),
            kernel_skipped_nested: losses.values().sum(),
            kernel_skips_counted: self.skips_counted,
            kernel_skipped_by_program: losses,
            kernel_recovered_nested: recovered,
            duplicates_dropped: d.duplicates_dropped,
            kernel_read_failed: self.counters.get(counter::READ_FAILED),
            transitions_missed: p.transitions_missed,
            pid_insert_failed: self.counters.get(counter::PID_INSERT_FAILED),
            in_call_full: self.counters.get(counter::IN_CALL_FULL),
            owner_map_full: self.counters.get(counter::OWNERS_FULL),
            scm_rights_unread: self.counters.get(counter::SCM_RIGHTS_UNREAD),
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
            bpf_map_bytes: crate::kernel::map_memory::by_map(),
            kernel_run_time: run_time(ebpf),
        }
    }
}

/// Per program: runs and mean nanoseconds per run, where `kernel.bpf_stats_enabled` is on.
fn run_time(ebpf: &aya::Ebpf) -> BTreeMap<String, RunTime> {
    ebpf.programs()
        .filter_map(|(name, p)| {
            let (runs, ns) = prog_stats::run_time(p.fd().ok()?.as_fd())?;
            let ns_per_run = ns / runs;
            Some((name.to_string(), RunTime { runs, ns_per_run }))
        })
        .collect()
}

/// The runs each program lost, from the kernel's skips (`misses`, per program) and what the
/// second program of each guarded hook recovered. The first program's skips are losses less
/// what the second caught; the second's are not (it runs after the first, which was not skipped
/// for that event then: where both were, the first's count holds it).
fn losses(
    misses: impl Iterator<Item = (String, u64)>,
    recovered: [u64; GUARDED.len()],
) -> BTreeMap<String, u64> {
    misses
        .filter(|(name, _)| !GUARDED.iter().any(|(_, second)| name == second))
        .map(|(name, n)| {
            let caught = GUARDED
                .iter()
                .position(|(first, _)| *first == name)
                .map_or(0, |i| recovered[i]);
            (name, n.saturating_sub(caught))
        })
        .filter(|(_, n)| *n > 0)
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
    /// Says what was lost since the last call: skipped programs, a full ring, and transitions
    /// of reported sockets that never arrived.
    pub(crate) fn warn(&mut self, ebpf: &aya::Ebpf, k: &KernelCounters, p: &Pipeline) {
        let missed = p.transitions_missed;
        if missed > self.missed {
            eprintln!(
                "finwait-trace: warning: {} transitions of reported sockets never arrived (the socket's next transition left another state, or another socket took its address; transitions_missed)",
                missed - self.missed
            );
            self.missed = missed;
        }
        let (losses, _) = k.losses(ebpf, p.dedup.stats().state_recovered_here);
        let skipped = losses.values().sum();
        if skipped > self.skipped {
            let by: Vec<String> = losses
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
        let lost = k.counters.get(counter::RING_FULL);
        if lost > self.lost {
            eprintln!(
                "finwait-trace: warning: {} events lost (ring buffer full; raise --ring-buffer-kib)",
                lost - self.lost
            );
            self.lost = lost;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn misses(list: &[(&str, u64)]) -> impl Iterator<Item = (String, u64)> {
        list.iter()
            .map(|(n, m)| (n.to_string(), *m))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn skips_the_second_program_caught_are_not_losses() {
        let m = misses(&[
            (GUARDED[0].0, 35),
            (GUARDED[0].1, 12),
            (GUARDED[1].0, 7),
            (GUARDED[1].1, 2),
            ("sys_enter_close", 0),
        ]);
        let mut caught = [0; GUARDED.len()];
        caught[..2].copy_from_slice(&[35, 7]);
        assert!(losses(m, caught).is_empty());
    }

    #[test]
    fn skips_both_programs_missed_are_losses_of_the_first() {
        let m = misses(&[(GUARDED[0].0, 35), (GUARDED[0].1, 3), (GUARDED[2].0, 1)]);
        let mut caught = [0; GUARDED.len()];
        caught[0] = 32;
        let l = losses(m, caught);
        let want = [(GUARDED[0].0.to_string(), 3), (GUARDED[2].0.to_string(), 1)];
        assert_eq!(l, BTreeMap::from(want));
    }

    #[test]
    fn other_programs_skips_are_losses_as_counted() {
        let m = misses(&[("sys_enter_close", 2), ("inet_sock_set_state", 4)]);
        let l = losses(m, [0; GUARDED.len()]);
        assert_eq!(l.values().sum::<u64>(), 6);
        assert_eq!(l["inet_sock_set_state"], 4);
    }
}
