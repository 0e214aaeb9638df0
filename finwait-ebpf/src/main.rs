//! finwait's eBPF programs: TCP state changes plus the syscalls that end sockets.
//!
//! The programs only record facts (who, which fd, which socket, which state); every decision about
//! cause and responsibility is made in userspace, where it can be tested. Field offsets come from
//! userspace as globals, so nothing here depends on one kernel's layout.
//!
//! Where a counter records a loss, a diagnostic (aya-log, shown by `-v`) says which program lost
//! what: see `diag`.
//!
//! This file holds what userspace sees of the object besides the programs: the globals it
//! rewrites before load, the maps, the licence. The programs live one family per module:
//! - `state`: TCP state changes (the classic tracepoint, and the guarded BTF pair);
//! - `calls`, `close_range`: the syscalls that end sockets (close, shutdown, dup2/dup3,
//!   close_range);
//! - `new_fd`, `scm`: the syscalls that give a task a socket (accept, dup, pidfd_getfd, connect;
//!   recvmsg with SCM_RIGHTS);
//! - `process`: exit and fork; `reset`: resets sent and received;
//! - `precise`: precise mode (`tcp_close`, `tcp_shutdown`);
//! - `noop`: the benchmark's floor; `inventory`: the socket inventory (`iter/task_file`).
//!
//! What they share: `guard` (guarded pairs), `syscall` (a syscall's three programs, its
//! arguments), `owner` (ownership records), `fd` (from an fd to its socket), `filter`
//! (`--pid`, `--comm`, `--port`), `event` (records and counters), `read` (kernel reads), `diag`
//! (what `-v` shows).
#![no_std]
// For the one BPF_XADD in `event::count` (aya-ebpf needs RUSTC_BOOTSTRAP for the same feature).
#![feature(asm_experimental_arch)]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, RingBuf},
};
use finwait_common::{
    FilterConfig, KernelOffsets, MAX_COMMS, MAX_PORTS, OWNERS_MAX, OtherTpLayout, OwnerRec,
    StateTpLayout, SyscallRegs, counter,
};

// The macros first: `guarded!` (a guarded pair), then `syscall_hooks!` and `syscall_pair!`.
#[macro_use]
mod guard;
#[macro_use]
mod syscall;

mod calls;
mod close_range;
mod diag;
mod event;
mod fd;
mod filter;
mod inventory;
mod new_fd;
mod noop;
mod owner;
mod precise;
mod process;
mod read;
mod reset;
mod scm;
mod state;

// Globals rewritten by userspace before load (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static STATE_TP: StateTpLayout = StateTpLayout {
    skaddr: 8,
    oldstate: 16,
    newstate: 20,
    sport: 24,
    dport: 26,
    family: 28,
    protocol: 30,
    protocol_size: 2,
    saddr: 32,
    daddr: 36,
    saddr_v6: 40,
    daddr_v6: 56,
};
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    valid: 0,
    file_ref_is_zero_based: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    file_private_data: 0,
    file_f_inode: 0,
    file_count: 0,
    socket_sk: 0,
    socket_type: 0,
    sock_family: 0,
    sock_socket: 0,
    sock_flags: 0,
    socket_to_inode: 0,
    inode_ino: 0,
    inode_mode: 0,
    state_btf: 0,
    sock_protocol: 0,
    inet_sport: 0,
    sock_dport: 0,
    inet_saddr: 0,
    sock_daddr: 0,
    sock_v6_rcv_saddr: 0,
    sock_v6_daddr: 0,
    task_signal: 0,
    signal_live: 0,
    sock_ends: 0,
    sock_state: 0,
    inventory: 0,
    task_tgid: 0,
    task_comm: 0,
    sock_net: 0,
    net_ns_inum: 0,
    file_dentry: 0,
    dentry_name: 0,
};
#[unsafe(no_mangle)]
static FILTER: FilterConfig = FilterConfig {
    all_transitions: 0,
    pid_filter: 0,
    wakeup_bytes: 0,
    comm_count: 0,
    port_count: 0,
    close_ends: 0,
    comms: [[0; 16]; MAX_COMMS],
    ports: [0; MAX_PORTS],
};
#[unsafe(no_mangle)]
static OTHER_TP: OtherTpLayout = OtherTpLayout {
    fork_child_pid: 20,
    send_reset_skaddr: 16,
    receive_reset_skaddr: 8,
    _pad: 0,
};
/// The architecture's: x86-64's di, si, dx here.
#[unsafe(no_mangle)]
static SYSCALL_REGS: SyscallRegs = SyscallRegs {
    args: [112, 104, 96],
    _pad: 0,
};

/// The hash maps' entries are allocated as they are written; userspace sets them preallocated
/// before Linux 6.1 (where run-time allocation in kprobe and tracepoint programs makes the kernel
/// warn) and sizes every map from the host before load.
const NO_PREALLOC: u32 = BPF_F_NO_PREALLOC;

/// Resized by userspace (`--ring-buffer-kib`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// The loss counters (`finwait_common::counter`): one array for all CPUs, added to atomically
/// (`event::count`), which userspace reads through a shared mapping.
#[map]
static COUNTERS: Array<u64> = Array::with_max_entries(counter::COUNT, BPF_F_MMAPABLE);

/// Threads inside a call whose enter was forwarded: only their exits are forwarded too. Not an
/// LRU (its evictions would be silent): entries leave at sys_exit or at the thread's exit, and a
/// full map is counted.
#[map]
static IN_CALL: HashMap<u32, u8> = HashMap::with_max_entries(16384, NO_PREALLOC);

/// Tgids to follow when `--pid` is given; children are added at fork, removed at exit.
#[map]
static TRACED_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(65536, NO_PREALLOC);

/// Who holds each socket (see `OwnerRec`): written when a task obtains an fd to a TCP socket,
/// read by the state hook, removed when the socket reaches CLOSE. A full map is counted.
#[map]
static OWNERS: HashMap<u64, OwnerRec> = HashMap::with_max_entries(OWNERS_MAX, NO_PREALLOC);

/// recvmsg() calls in progress that may carry fds (a control buffer): tid -> user msghdr.
#[map]
static RECVMSG: HashMap<u32, u64> = HashMap::with_max_entries(16384, NO_PREALLOC);

/// connect() calls in progress: tid -> fd. The socket's CLOSE -> SYN_SENT transition, which
/// runs inside the call in the caller's context, records the owner.
#[map]
static CONNECTING: HashMap<u32, i32> = HashMap::with_max_entries(16384, NO_PREALLOC);

// `GUARDS`, the marks between a guarded pair's two programs, is `guard`'s own.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
