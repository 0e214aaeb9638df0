//! What reaches userspace: records in the ring buffer, and the loss counters.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    },
};
use finwait_common::{Event, EventKind, counter};

use crate::{COUNTERS, EVENTS, FILTER, read::config};

/// Adds one to the counter `index` (`finwait_common::counter`).
#[inline(always)]
pub(crate) fn count(index: u32) {
    // One array for all CPUs, added to atomically: userspace reads it through a shared
    // mapping, with no map syscall (a lookup holds the CPU's "BPF running" mark, and on kernels
    // that preempt it the kernel skips every classic tracepoint program that CPU runs
    // meanwhile). The counters count rare losses: no contention.
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // BPF_XADD (the target's core has no atomic add; its result is not fetched, which
        // every kernel since 4.x verifies).
        // SAFETY: an aligned u64 in the map's value area, only ever added to atomically.
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({slot} + 0) += {one}",
                slot = in(reg) slot,
                one = in(reg) 1u64,
            );
        }
    }
}

/// Sends `event` to userspace; a full ring buffer is counted. Userspace is woken on every record,
/// or once `FILTER.wakeup_bytes` wait.
#[inline(always)]
pub(crate) fn submit(event: &Event) {
    let wakeup_bytes = config(&FILTER.wakeup_bytes);
    let wake = if wakeup_bytes == 0 {
        0
    } else if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= wakeup_bytes as u64 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    };
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(*event);
            entry.submit(wake);
        }
        None => count(counter::RING_FULL),
    }
}

/// A record of `kind` made now by the current task.
#[inline(always)]
pub(crate) fn new_event(kind: EventKind) -> Event {
    let mut e = Event::zeroed();
    e.kind = kind as u8;
    // SAFETY: plain helper calls.
    e.ts_ns = unsafe { bpf_ktime_get_ns() };
    e.pid_tgid = bpf_get_current_pid_tgid();
    e.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    // The caller's container; a transition's task is whoever the packet interrupted.
    if !matches!(
        kind,
        EventKind::Transition | EventKind::ReceiveReset | EventKind::SendReset
    ) {
        // SAFETY: a plain helper call.
        e.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    }
    e
}
