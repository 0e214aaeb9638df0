//! Processes: an exit (the last thread's closes every fd it still held, without a syscall
//! each), and with `--pid`/`--comm` a fork (the child is followed too).
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::tracepoint,
    programs::TracePointContext,
};
use finwait_common::{EventKind, Site, flags};

use crate::{
    FILTER, IN_CALL, OFFSETS, OTHER_TP, TRACED_PIDS,
    event::{new_event, submit},
    filter::{follow_pid, pid_traced},
    read::{config, field, read},
};

/// Is the exiting thread its process's last? do_exit() has already counted it out of
/// `signal->live` when the tracepoint fires. Without the offsets: whether it is the main thread.
#[inline(always)]
fn group_dead(site: Site, is_main_thread: bool) -> bool {
    let o = config(&OFFSETS);
    if o.task_signal == 0 || o.signal_live == 0 {
        return is_main_thread;
    }
    // SAFETY: plain helper call; the pointer is only used through probe reads.
    let task = unsafe { bpf_get_current_task() };
    match read::<u64>(site, task, o.task_signal as u64)
        .and_then(|s| read::<i32>(site, s, o.signal_live as u64))
    {
        Some(live) => live == 0,
        None => is_main_thread,
    }
}

#[tracepoint]
fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    const SITE: Site = Site::of("sched_process_exit");
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // Untraced processes stop here: no reads of their task for the group check.
    if !pid_traced(SITE, tgid) {
        return 0;
    }
    let dead = group_dead(SITE, pid_tgid as u32 == tgid);
    let mut e = new_event(EventKind::ProcessExit);
    if dead {
        e.flags |= flags::GROUP_DEAD;
    }
    submit(&e);
    // A thread that never reached sys_exit (its exit program failed to attach) leaves here.
    let _ = IN_CALL.remove(pid_tgid as u32);
    if config(&FILTER.pid_filter) != 0 && dead {
        let _ = TRACED_PIDS.remove(tgid);
    }
    0
}

#[tracepoint]
fn sched_process_fork(ctx: TracePointContext) -> u32 {
    const SITE: Site = Site::of("sched_process_fork");
    if config(&FILTER.pid_filter) == 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: single-entry lookup, value not kept.
    if unsafe { TRACED_PIDS.get(parent) }.is_none() {
        return 0;
    }
    if let Some(child) = field::<i32>(&ctx, SITE, config(&OTHER_TP).fork_child_pid) {
        follow_pid(SITE, child as u32);
    }
    0
}
