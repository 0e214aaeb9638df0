//! `--bench-noop`, the benchmark's floor: userspace attaches these at the same hooks instead of
//! the other programs. A check of a load-time flag in every program would stay in production:
//! the verifier keeps a branch whose target (the shared `return 0`) other paths reach.
use aya_ebpf::{
    macros::{btf_tracepoint, fentry, kprobe, tracepoint},
    programs::{BtfTracePointContext, FEntryContext, ProbeContext, TracePointContext},
};

#[tracepoint]
fn noop_tracepoint(_ctx: TracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
fn noop_state_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[fentry(function = "tcp_close")]
fn noop_tcp_close_fentry(_ctx: FEntryContext) -> i32 {
    0
}

#[fentry(function = "tcp_shutdown")]
fn noop_tcp_shutdown_fentry(_ctx: FEntryContext) -> i32 {
    0
}

#[kprobe]
fn noop_tcp_close_kprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[kprobe]
fn noop_tcp_shutdown_kprobe(_ctx: ProbeContext) -> u32 {
    0
}
