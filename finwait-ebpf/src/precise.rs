//! Precise mode: the kernel functions that end a TCP socket, whatever path called them (close(),
//! exit, io_uring, the last fput of a shared file). Userspace attaches the fentry pairs, or the
//! kprobes where fentry is refused, or neither (then calls are matched by correlation).
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};
use finwait_common::{Call, EventKind, Site};

use crate::{
    event::{new_event, submit},
    filter::pid_traced,
};

/// `call` ended or half-ended `sk` in the current task.
#[inline(always)]
fn kernel_call(site: Site, call: Call, sk: u64, how_mask: i64) {
    if sk == 0 || !pid_traced(site, (bpf_get_current_pid_tgid() >> 32) as u32) {
        return;
    }
    let mut e = new_event(EventKind::KernelCall);
    e.call = call as u8;
    e.sock = sk;
    // inet_shutdown() passes SHUT_RD/SHUT_WR/SHUT_RDWR + 1 (a RCV/SEND_SHUTDOWN mask).
    e.arg = how_mask - 1;
    submit(&e);
}

// The fentry programs are guarded pairs like the state hook's: from Linux 7.0 they run
// preemptibly, and another task's tcp_close() on the same CPU skips the program a preempted
// task is in. A duplicate kernel call is harmless (userspace keeps the thread's last one).

guarded! {
    #[fentry(function = "tcp_close")]
    fn tcp_close_fentry, tcp_close_fentry2(ctx: FEntryContext) {
        let sk: u64 = ctx.arg(0);
    }
    mark event(sk, 1);
    run |site, _| kernel_call(site, Call::Close, sk, 0);
}

guarded! {
    #[fentry(function = "tcp_shutdown")]
    fn tcp_shutdown_fentry, tcp_shutdown_fentry2(ctx: FEntryContext) {
        let sk: u64 = ctx.arg(0);
        let how = ctx.arg::<i32>(1) as i64;
    }
    mark event(sk, (1 << 32) | how as u64);
    run |site, _| kernel_call(site, Call::Shutdown, sk, how);
}

#[kprobe]
fn tcp_close_kprobe(ctx: ProbeContext) -> u32 {
    kernel_call(
        const { Site::of("tcp_close_kprobe") },
        Call::Close,
        ctx.arg(0).unwrap_or(0),
        0,
    );
    0
}

#[kprobe]
fn tcp_shutdown_kprobe(ctx: ProbeContext) -> u32 {
    let how: i32 = ctx.arg(1).unwrap_or(0);
    kernel_call(
        const { Site::of("tcp_shutdown_kprobe") },
        Call::Shutdown,
        ctx.arg(0).unwrap_or(0),
        how as i64,
    );
    0
}
