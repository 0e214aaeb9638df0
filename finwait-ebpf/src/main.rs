//! finwait's eBPF programs: TCP state changes plus the syscalls that end sockets.
//!
//! The programs only record facts (who, which fd, which socket, which state); every decision about
//! cause and responsibility is made in userspace, where it can be tested. Field offsets come from
//! userspace as globals, so nothing here depends on one kernel's layout.
//!
//! Where a counter records a loss, a diagnostic (aya-log, shown by `-v`) says which program lost
//! what: see `mod diag`.
#![no_std]
// For the one BPF_XADD in `count` (aya-ebpf needs RUSTC_BOOTSTRAP for the same feature).
#![feature(asm_experimental_arch)]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::{btf_tracepoint, fentry, fexit, kprobe, map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, TracePointContext,
    },
};
use finwait_common::{
    Call, Event, EventKind, FilterConfig, GUARD_CLOSE, GUARD_SHUTDOWN, GUARD_STATE, GUARDED,
    KernelOffsets, MAX_COMMS, MAX_PORTS, OWNERS_MAX, OtherTpLayout, OwnerRec, StateTpLayout,
    counter, flags, guard_slot, owner_flags, tcp_state,
};

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
    sock_state: 0,
    inventory: 0,
    task_tgid: 0,
    task_comm: 0,
    sock_net: 0,
    net_ns_inum: 0,
    file_dentry: 0,
    dentry_name: 0,
};
mod inventory;

#[unsafe(no_mangle)]
static FILTER: FilterConfig = FilterConfig {
    all_transitions: 0,
    pid_filter: 0,
    wakeup_bytes: 0,
    comm_count: 0,
    port_count: 0,
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

/// Resized by userspace (`--ring-buffer-kib`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
static COUNTERS: Array<u64> = Array::with_max_entries(counter::COUNT, BPF_F_MMAPABLE);

/// Threads inside a call whose enter was forwarded: only their exits are forwarded too. Not an
/// LRU (its evictions would be silent): entries leave at sys_exit or at the thread's exit, and a
/// full map is counted.
#[map]
static IN_CALL: HashMap<u32, u8> = HashMap::with_max_entries(16384, 0);

/// Tgids to follow when `--pid` is given; children are added at fork, removed at exit.
#[map]
static TRACED_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(65536, 0);

/// Who holds each socket (see `OwnerRec`): written when a task obtains an fd to a TCP socket,
/// read by the state hook, removed when the socket reaches CLOSE. Preallocated (older kernels
/// refuse other hash maps in tracing programs); a full map is counted.
#[map]
static OWNERS: HashMap<u64, OwnerRec> = HashMap::with_max_entries(OWNERS_MAX, 0);

/// recvmsg() calls in progress that may carry fds (a control buffer): tid -> user msghdr.
#[map]
static RECVMSG: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);

/// connect() calls in progress: tid -> fd. The socket's CLOSE -> SYN_SENT transition, which
/// runs inside the call in the caller's context, records the owner.
#[map]
static CONNECTING: HashMap<u32, i32> = HashMap::with_max_entries(16384, 0);

const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u16 = 1;
const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

#[inline(always)]
fn config<T>(global: &T) -> T {
    // SAFETY: the globals are plain data; a volatile read stops the compiler from folding the
    // defaults in, so the values userspace wrote are used.
    unsafe { core::ptr::read_volatile(global) }
}

#[inline(always)]
fn count(index: u32) {
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

/// The program a diagnostic comes from, by its name in the object.
type Hook = &'static str;

/// A field of the tracepoint's record. A failed read is counted like `read`'s: every read the
/// programs rely on either succeeds or shows in `kernel_read_failed`.
#[inline(always)]
fn field<T>(ctx: &TracePointContext, hook: Hook, offset: u32) -> Option<T> {
    // SAFETY: offsets come from this kernel's format file; the helper checks the address.
    match unsafe { ctx.read_at::<T>(offset as usize) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(counter::READ_FAILED);
            diag::field_failed(hook, offset);
            None
        }
    }
}

#[inline(always)]
fn read<T>(hook: Hook, base: u64, offset: u64) -> Option<T> {
    checked(hook, probe(base, offset))
}

/// A read's value; its failure counted and said.
#[inline(always)]
fn checked<T>(hook: Hook, read: Result<T, u64>) -> Option<T> {
    match read {
        Ok(v) => Some(v),
        Err(offset) => {
            count(counter::READ_FAILED);
            diag::read_failed(hook, offset);
            None
        }
    }
}

/// A read of kernel memory, not counted: Err holds the offset, for the caller to count and say.
#[inline(always)]
fn probe<T>(base: u64, offset: u64) -> Result<T, u64> {
    // SAFETY: bpf_probe_read_kernel checks the address; a fault is reported, not taken.
    unsafe { bpf_probe_read_kernel((base + offset) as *const T) }.map_err(|_| offset)
}

/// What `-v` shows: each loss a counter records, said through aya-log with the program and the
/// offset, fd or pid. Integers only: the verifier refuses to take a typed pointer apart into a
/// log record's bytes.
///
/// Out of line, so a program carries one copy of each and calls it only on failure. Without
/// `-v`, userspace loads `AYA_LOG_LEVEL` as 0 into read-only data: the verifier sees the macros'
/// level check as a constant and removes what it guards; the call and the level's load remain.
mod diag {
    use aya_log_ebpf::warn;

    use super::Hook;

    #[inline(never)]
    pub(super) fn read_failed(hook: Hook, offset: u64) {
        warn!(&(), "{}: read failed at offset {}", hook, offset);
    }

    #[inline(never)]
    pub(super) fn field_failed(hook: Hook, offset: u32) {
        warn!(
            &(),
            "{}: tracepoint field at offset {} unreadable", hook, offset
        );
    }

    /// A read on the way from `fd` to its socket failed (the socket is still known when only its
    /// inode or reference count was missed).
    #[inline(never)]
    pub(super) fn fd_read_failed(hook: Hook, fd: i64, offset: u64) {
        warn!(&(), "{}: fd {}: read failed at offset {}", hook, fd, offset);
    }

    #[inline(never)]
    pub(super) fn owners_full(hook: Hook, tgid: u32, fd: i32) {
        warn!(
            &(),
            "{}: ownership map full: pid {} fd {} has no owner record", hook, tgid, fd
        );
    }

    #[inline(never)]
    pub(super) fn in_call_full(hook: Hook, tid: u32) {
        warn!(
            &(),
            "{}: in-call map full: the exit of thread {} is not forwarded", hook, tid
        );
    }

    #[inline(never)]
    pub(super) fn pid_insert_failed(hook: Hook, tgid: u32) {
        warn!(&(), "{}: pid map full: pid {} is not followed", hook, tgid);
    }

    /// Fds passed over a unix socket (SCM_RIGHTS): more than are read, or an unreadable message.
    #[inline(never)]
    pub(super) fn fds_not_recorded(hook: Hook, tid: u32) {
        warn!(
            &(),
            "{}: fds received by thread {} not all recorded", hook, tid
        );
    }
}

/// With `--pid`/`--comm`: is this process followed? A process matching `--comm` joins the set,
/// so its children are followed too.
#[inline(always)]
fn pid_traced(hook: Hook, tgid: u32) -> bool {
    // SAFETY: the value is a u8 copied out immediately.
    if config(&FILTER.pid_filter) == 0 || unsafe { TRACED_PIDS.get(tgid) }.is_some() {
        return true;
    }
    let comm_count = config(&FILTER.comm_count);
    if comm_count == 0 {
        return false;
    }
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    if !comm_followed(&comm) {
        return false;
    }
    if TRACED_PIDS.insert(tgid, 1u8, 0).is_err() {
        count(counter::PID_INSERT_FAILED);
        diag::pid_insert_failed(hook, tgid);
    }
    true
}

#[inline(always)]
fn submit(event: &Event) {
    let wakeup_bytes = config(&FILTER.wakeup_bytes);
    let wake = if wakeup_bytes == 0 {
        0
    } else if EVENTS.query(aya_ebpf::bindings::BPF_RB_AVAIL_DATA as u64) >= wakeup_bytes as u64 {
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

#[inline(always)]
fn new_event(kind: EventKind) -> Event {
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

#[tracepoint]
fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_state(&ctx);
    0
}

fn try_state(ctx: &TracePointContext) -> Option<()> {
    const HOOK: Hook = "inet_sock_set_state";
    let l = config(&STATE_TP);
    let protocol = if l.protocol_size == 1 {
        field::<u8>(ctx, HOOK, l.protocol)? as u16
    } else {
        field::<u16>(ctx, HOOK, l.protocol)?
    };
    if protocol != IPPROTO_TCP {
        return None;
    }
    let old = field::<i32>(ctx, HOOK, l.oldstate)? as u8;
    let new = field::<i32>(ctx, HOOK, l.newstate)? as u8;
    let sk = field::<u64>(ctx, HOOK, l.skaddr)?;
    let mut e = transition_event(HOOK, sk, old, new)?;
    e.sport = field::<u16>(ctx, HOOK, l.sport)?;
    e.dport = field::<u16>(ctx, HOOK, l.dport)?;
    e.family = field::<u16>(ctx, HOOK, l.family)?;
    if e.family == AF_INET6 {
        e.saddr = field::<[u8; 16]>(ctx, HOOK, l.saddr_v6)?;
        e.daddr = field::<[u8; 16]>(ctx, HOOK, l.daddr_v6)?;
    } else {
        let s = field::<[u8; 4]>(ctx, HOOK, l.saddr)?;
        let d = field::<[u8; 4]>(ctx, HOOK, l.daddr)?;
        e.saddr[..4].copy_from_slice(&s);
        e.daddr[..4].copy_from_slice(&d);
    }
    emit_state(HOOK, e);
    Some(())
}

/// Is this transition forwarded? One that is not still ends the socket's ownership record when
/// it reaches CLOSE (a connect() that failed, a reset in SYN_RECV, ...).
#[inline(always)]
fn wanted_transition(hook: Hook, sk: u64, old: u8, new: u8) -> bool {
    if new == tcp_state::SYN_SENT {
        connecting(hook, sk);
    }
    if config(&FILTER.all_transitions) != 0 || tcp_state::worth_reporting(old, new) {
        return true;
    }
    if new == tcp_state::CLOSE {
        let _ = OWNERS.remove(sk);
    }
    false
}

/// A socket entering SYN_SENT inside this thread's connect(): the caller holds it at the fd
/// connect() was given.
#[inline(always)]
fn connecting(hook: Hook, sk: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out at once.
    let Some(fd) = (unsafe { CONNECTING.get(pid_tgid as u32) }).copied() else {
        return;
    };
    let o = config(&OFFSETS);
    let inode = match read::<u64>(hook, sk, o.sock_socket as u64) {
        Some(socket) if socket != 0 => inode_of_socket(hook, socket, &o),
        _ => return,
    };
    insert_owner(hook, sk, inode, fd, pid_tgid);
}

/// `--port`: does this socket have one of the wanted ports (local or remote)?
#[inline(always)]
fn port_wanted(sport: u16, dport: u16) -> bool {
    let count = config(&FILTER.port_count);
    if count == 0 {
        return true;
    }
    for i in 0..MAX_PORTS {
        let p = config(&FILTER.ports[i]);
        if (i as u32) < count && (p == sport || p == dport) {
            return true;
        }
    }
    false
}

#[inline(always)]
fn emit_state(hook: Hook, mut e: Event) {
    let wanted = port_wanted(e.sport, e.dport);
    if wanted {
        sock_details(hook, &mut e);
        owner_of(&mut e);
    }
    if e.new_state == tcp_state::CLOSE {
        // The socket is gone (its address may be reused): its record goes, after the copy.
        let _ = OWNERS.remove(e.sock);
    }
    if wanted && owner_followed(hook, &e) {
        submit(&e);
    }
}

/// The socket's ownership record: by socket, else (sockets from before the start) by inode.
#[inline(always)]
fn owner_of(e: &mut Event) {
    // SAFETY: the value is copied out at once.
    let by_sock = unsafe { OWNERS.get(e.sock) }.copied();
    if let Some(o) = by_sock {
        if e.inode == 0 || o.inode == e.inode {
            e.owner = o;
            e.flags |= flags::OWNER_VALID;
            return;
        }
        // An earlier socket's record at this address (its CLOSE was missed): not this one's.
        let _ = OWNERS.remove(e.sock);
    }
    if e.inode != 0 {
        // SAFETY: the value is copied out at once.
        if let Some(o) = unsafe { OWNERS.get(e.inode) } {
            e.owner = *o;
            e.flags |= flags::OWNER_VALID;
        }
    }
}

/// With `--pid`/`--comm`: a transition reaches userspace when its socket's owner is followed,
/// or was when it obtained the socket (it may have exited since: a prefork child that closed
/// in FIN_WAIT1 and exited before the peer's ACK), when the running task is followed (process
/// context), or when the owner is not known.
#[inline(always)]
fn owner_followed(hook: Hook, e: &Event) -> bool {
    if config(&FILTER.pid_filter) == 0
        || e.flags & flags::OWNER_VALID == 0
        || e.owner.flags & owner_flags::FOLLOWED != 0
    {
        return true;
    }
    // SAFETY: the value is a u8 copied out immediately.
    if unsafe { TRACED_PIDS.get(e.owner.tgid) }.is_some() || comm_followed(&e.owner.comm) {
        return true;
    }
    pid_traced(hook, (e.pid_tgid >> 32) as u32)
}

#[inline(always)]
fn comm_followed(comm: &[u8; 16]) -> bool {
    let comm_count = config(&FILTER.comm_count);
    for i in 0..MAX_COMMS {
        if (i as u32) < comm_count && config(&FILTER.comms[i]) == *comm {
            return true;
        }
    }
    false
}

/// Per CPU and guarded hook (`finwait_common::GUARDED`), between its two programs: how many
/// runs of the first are under way, and the last event it finished.
#[repr(C)]
struct Guard {
    busy: u64,
    a: u64,
    b: u64,
}

#[map]
static GUARDS: PerCpuArray<Guard> = PerCpuArray::with_max_entries(GUARDED.len() as u32, 0);

/// The first program of a guarded hook: `run` inside the busy mark, then the event `(a, b)`
/// marked done (`b` is never 0, so a cleared mark matches nothing).
#[inline(always)]
fn first_copy(slot: u32, a: u64, b: u64, run: impl FnOnce()) {
    let guard = GUARDS.get_ptr_mut(slot);
    if let Some(g) = guard {
        // SAFETY: this CPU's slot; only this program writes `busy`, and the kernel never runs
        // it nested on one CPU.
        unsafe { (*g).busy += 1 };
    }
    run();
    if let Some(g) = guard {
        // SAFETY: as above.
        unsafe {
            (*g).busy -= 1;
            (*g).a = a;
            (*g).b = b;
        }
    }
}

/// The second program of a guarded hook, attached to run after the first: None when the first
/// finished this event on this CPU. Else Some(recovered): the kernel skips the first only while
/// it runs on the CPU (`busy`), so that report is a recovery (counted); otherwise it is the rare
/// duplicate of an event whose mark a nested one overwrote, which userspace drops.
#[inline(always)]
fn second_copy(slot: u32, a: u64, b: u64) -> Option<bool> {
    let g = GUARDS.get_ptr_mut(slot)?;
    // SAFETY: this CPU's slot (see `first_copy`).
    let recovered = unsafe {
        if (*g).a == a && (*g).b == b {
            (*g).b = 0;
            return None;
        }
        (*g).busy > 0
    };
    if recovered {
        count(counter::RECOVERED + slot);
    }
    Some(recovered)
}

/// `second_copy` for a syscall pair: a report is counted as recovered even where the first was
/// not running (`busy` 0). There the kernel may still have skipped the first: another task was
/// preempted in the trampoline just before or after its body (7.x preempts there), a window
/// `busy` cannot cover. The other case, a duplicate (this task was preempted between the two
/// programs and another one's event overwrote the mark), is harmless for a thread's syscall:
/// an exit finds its call gone, a marked entry repeating the call in progress is dropped by
/// userspace. So the recovered count can exceed the skips by those rare duplicates, never
/// miss a recovery the way counting only `busy` did (a loss reported that was not one).
#[inline(always)]
fn second_copy_of_call(slot: u32) -> Option<u8> {
    let sure = second_copy(slot, bpf_get_current_pid_tgid(), call_mark(slot))?;
    if sure {
        return Some(0);
    }
    count(counter::RECOVERED + slot);
    Some(flags::MAYBE_DUPLICATE)
}

/// `first_copy` for a syscall pair: the event is the current thread's call at this hook.
#[inline(always)]
fn first_copy_of_call(slot: u32, run: impl FnOnce()) {
    first_copy(slot, bpf_get_current_pid_tgid(), call_mark(slot), run);
}

/// A syscall pair's mark (never 0: a cleared mark matches nothing).
#[inline(always)]
fn call_mark(slot: u32) -> u64 {
    slot as u64 + 1
}

/// A state change as the guard keeps it.
#[inline(always)]
fn states_key(old: u8, new: u8) -> u64 {
    (1 << 16) | ((old as u64) << 8) | new as u64
}

/// The same hook as a BTF tracepoint: the kernel skips it only when it would interrupt itself,
/// where a classic tracepoint is skipped whenever any BPF program runs on the CPU (a softirq
/// landing in one of our syscall programs would lose its state change). It can still interrupt
/// itself: a softirq's state change while a task's runs it (and on kernels that run tracepoint
/// programs preemptibly, another task's on the same CPU). `inet_sock_set_state_btf2` catches
/// those.
#[btf_tracepoint(function = "inet_sock_set_state")]
fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let old = ctx.arg::<i32>(1) as u8;
    let new = ctx.arg::<i32>(2) as u8;
    first_copy(GUARD_STATE, sk, states_key(old, new), || {
        let _ = try_state_btf(sk, old, new, 0);
    });
    0
}

/// The state hook's second program (a tracepoint runs its programs in attach order).
/// Userspace drops a duplicate by `MAYBE_DUPLICATE`: a socket cannot make one change twice in a
/// row.
#[btf_tracepoint(function = "inet_sock_set_state")]
fn inet_sock_set_state_btf2(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let old = ctx.arg::<i32>(1) as u8;
    let new = ctx.arg::<i32>(2) as u8;
    if let Some(recovered) = second_copy(GUARD_STATE, sk, states_key(old, new)) {
        let extra = if recovered { 0 } else { flags::MAYBE_DUPLICATE };
        let _ = try_state_btf(sk, old, new, extra);
    }
    0
}

/// A transition record for `sk`, if this transition is one to report.
#[inline(always)]
fn transition_event(hook: Hook, sk: u64, old: u8, new: u8) -> Option<Event> {
    if !wanted_transition(hook, sk, old, new) {
        return None;
    }
    let mut e = new_event(EventKind::Transition);
    e.sock = sk;
    e.old_state = old;
    e.new_state = new;
    Some(e)
}

fn try_state_btf(sk: u64, old: u8, new: u8, extra_flags: u8) -> Option<()> {
    const HOOK: Hook = "inet_sock_set_state_btf";
    let o = config(&OFFSETS);
    if read::<u16>(HOOK, sk, o.sock_protocol as u64)? != IPPROTO_TCP {
        return None;
    }
    let mut e = transition_event(HOOK, sk, old, new)?;
    e.flags |= extra_flags;
    e.family = read::<u16>(HOOK, sk, o.sock_family as u64)?;
    e.sport = u16::from_be(read::<u16>(HOOK, sk, o.inet_sport as u64)?);
    e.dport = u16::from_be(read::<u16>(HOOK, sk, o.sock_dport as u64)?);
    if e.family == AF_INET6 {
        e.saddr = read::<[u8; 16]>(HOOK, sk, o.sock_v6_rcv_saddr as u64)?;
        e.daddr = read::<[u8; 16]>(HOOK, sk, o.sock_v6_daddr as u64)?;
    } else {
        let s = read::<[u8; 4]>(HOOK, sk, o.inet_saddr as u64)?;
        let d = read::<[u8; 4]>(HOOK, sk, o.sock_daddr as u64)?;
        e.saddr[..4].copy_from_slice(&s);
        e.daddr[..4].copy_from_slice(&d);
    }
    emit_state(HOOK, e);
    Some(())
}

/// Socket flags (orphaned? peer FIN seen?) and inode (to find the owner in /proc).
#[inline(always)]
fn sock_details(hook: Hook, e: &mut Event) {
    let o = config(&OFFSETS);
    if o.valid == 0 || e.sock == 0 {
        return;
    }
    if let Some(f) = read::<u64>(hook, e.sock, o.sock_flags as u64) {
        e.sk_flags = f;
        e.flags |= flags::SK_FLAGS_VALID;
    }
    if let Some(socket) = read::<u64>(hook, e.sock, o.sock_socket as u64) {
        if socket != 0 {
            e.inode = inode_of_socket(hook, socket, &o);
        }
    }
}

#[inline(always)]
fn inode_of_socket(hook: Hook, socket: u64, o: &KernelOffsets) -> u64 {
    checked(hook, socket_ino(socket, o)).unwrap_or(0)
}

#[inline(always)]
fn socket_ino(socket: u64, o: &KernelOffsets) -> Result<u64, u64> {
    // A `struct socket` lives inside `struct socket_alloc`, next to its inode.
    let inode = socket.wrapping_add(o.socket_to_inode as i64 as u64);
    probe::<u64>(inode, o.inode_ino as u64)
}

/// The stream socket behind a file descriptor of the current task.
#[derive(Clone, Copy)]
struct FdSock {
    sk: u64,
    inode: u64,
    /// Raw reference count of the file; `u64::MAX` when it could not be read.
    refs: u64,
}

/// The stream socket behind `fd`, if it is one.
#[inline(always)]
fn sock_of_fd(hook: Hook, fd: i64) -> Option<FdSock> {
    let (found, failed) = walk_fd(fd);
    if let Some(offset) = failed {
        diag::fd_read_failed(hook, fd, offset);
    }
    found
}

/// Walks task -> files -> fdtable -> file -> socket -> sock with offsets from BTF. A failed read
/// is counted here and its offset returned, to be said once per walk (a diagnostic per read
/// would be verified once per read per fd of close_range()'s scan).
#[inline(always)]
fn walk_fd(fd: i64) -> (Option<FdSock>, Option<u64>) {
    let (sk, socket, file) = match fd_chain(fd) {
        Ok(Some(found)) => found,
        Ok(None) => return (None, None),
        Err(offset) => {
            count(counter::READ_FAILED);
            return (None, Some(offset));
        }
    };
    let o = config(&OFFSETS);
    let inode = socket_ino(socket, &o);
    let refs = probe::<u64>(file, o.file_count as u64);
    let mut failed = None;
    for r in [&inode, &refs] {
        if let Err(offset) = r {
            count(counter::READ_FAILED);
            failed = Some(*offset);
        }
    }
    let s = FdSock {
        sk,
        inode: inode.unwrap_or(0),
        refs: refs.unwrap_or(u64::MAX),
    };
    (Some(s), failed)
}

/// The fd's (sock, socket, file), if it is an IPv4 or IPv6 stream socket; Err: the offset of the
/// read that failed.
#[inline(always)]
fn fd_chain(fd: i64) -> Result<Option<(u64, u64, u64)>, u64> {
    let o = config(&OFFSETS);
    if o.valid == 0 || fd < 0 {
        return Ok(None);
    }
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    let files = probe::<u64>(task, o.task_files as u64)?;
    let fdt = probe::<u64>(files, o.files_fdt as u64)?;
    let max_fds = probe::<u32>(fdt, o.fdtable_max_fds as u64)?;
    if fd as u64 >= max_fds as u64 {
        return Ok(None);
    }
    let fd_array = probe::<u64>(fdt, o.fdtable_fd as u64)?;
    let file = probe::<u64>(fd_array, fd as u64 * 8)?;
    if file == 0 {
        return Ok(None);
    }
    let f_inode = probe::<u64>(file, o.file_f_inode as u64)?;
    let mode = probe::<u16>(f_inode, o.inode_mode as u64)?;
    Ok(stream_sock(file, mode, &o)?.map(|(sk, socket)| (sk, socket, file)))
}

/// The (sock, socket) behind `file`, whose inode's mode is `mode`, if it is an IPv4 or IPv6
/// stream socket; Err: the offset of the read that failed.
#[inline(always)]
fn stream_sock(file: u64, mode: u16, o: &KernelOffsets) -> Result<Option<(u64, u64)>, u64> {
    if mode & S_IFMT != S_IFSOCK {
        return Ok(None);
    }
    let socket = probe::<u64>(file, o.file_private_data as u64)?;
    if socket == 0 || probe::<u16>(socket, o.socket_type as u64)? != SOCK_STREAM {
        return Ok(None);
    }
    let sk = probe::<u64>(socket, o.socket_sk as u64)?;
    // A socket without its sock (being torn down): nothing to read through.
    if sk == 0 {
        return Ok(None);
    }
    let family = probe::<u16>(sk, o.sock_family as u64)?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(None);
    }
    Ok(Some((sk, socket)))
}

#[inline(always)]
fn set_sock(e: &mut Event, s: FdSock) {
    e.sock = s.sk;
    e.inode = s.inode;
    e.flags |= flags::SOCK_RESOLVED;
    if s.refs != u64::MAX {
        e.file_refs = s.refs;
        e.flags |= flags::REFS_VALID;
    }
}

#[inline(always)]
fn call_enter(ctx: &impl SyscallArgs, hook: Hook, call: Call, extra: u8) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !pid_traced(hook, (pid_tgid >> 32) as u32) {
        return None;
    }
    let (arg0, arg1) = (ctx.arg(hook, 0)?, ctx.arg(hook, 1)?);
    let mut e = new_event(EventKind::CallEnter);
    e.call = call as u8;
    e.flags |= extra;
    // dup2/dup3 end the socket behind their second argument (the fd that gets replaced).
    let fd = match call {
        Call::Dup2 | Call::Dup3 => arg1,
        _ => arg0,
    };
    e.fd = fd as i32;
    e.arg = match call {
        Call::Shutdown | Call::CloseRange => arg1,
        _ => arg0,
    };
    if call == Call::CloseRange {
        return close_range_enter(ctx, hook, e, arg0, arg1, extra);
    }
    match sock_of_fd(hook, fd) {
        Some(s) => {
            set_sock(&mut e, s);
            follow_owner(s.sk, s.inode);
            if call != Call::Shutdown {
                release_owner(&mut e, s.refs);
            }
        }
        // Without offsets every call is forwarded; with them, only calls on stream sockets.
        None if config(&OFFSETS).valid != 0 => return None,
        None => {}
    }
    let resolved = e.flags & flags::SOCK_RESOLVED != 0;
    enter_call(
        hook,
        pid_tgid as u32,
        if resolved {
            EXIT_ON_FAILURE
        } else {
            EXIT_ALWAYS
        },
    );
    submit(&e);
    Some(())
}

/// With `--pid`/`--comm`: a followed task made a call on the socket (this runs only for those):
/// its record says so, and its later transitions are forwarded whoever runs them (the peer's
/// ACK in softirq), as userspace shows a socket a followed process ended.
#[inline(always)]
fn follow_owner(sk: u64, inode: u64) {
    if config(&FILTER.pid_filter) == 0 {
        return;
    }
    if let Some(rec) = OWNERS.get_ptr_mut(sk) {
        // SAFETY: a map value pointer, valid for this program run; plain integer fields.
        unsafe {
            if (*rec).inode == inode {
                (*rec).flags |= owner_flags::FOLLOWED;
            }
        }
    }
}

/// A close of `e.fd` (close, dup2/dup3 over it, close_range): copies the socket's ownership
/// record into the record; when other references to the file remain and the recorded holder is
/// the one closing, the record no longer names a holder: mark it stale.
#[inline(always)]
fn release_owner(e: &mut Event, refs: u64) {
    let Some(rec) = OWNERS.get_ptr_mut(e.sock) else {
        return;
    };
    // SAFETY: a map value pointer, valid for this program run.
    if unsafe { (*rec).inode } != e.inode {
        let _ = OWNERS.remove(e.sock); // an earlier socket's record
        return;
    }
    let o = config(&OFFSETS);
    // file_ref_t (6.13+) counts from zero; atomic_long_t f_count from one.
    let others_remain = refs != u64::MAX && refs > (o.file_ref_is_zero_based == 0) as u64;
    // SAFETY: a map value pointer, valid for this program run; plain integer fields.
    unsafe {
        if others_remain && (*rec).tgid == (e.pid_tgid >> 32) as u32 && (*rec).fd == e.fd {
            (*rec).flags |= owner_flags::STALE;
        }
        e.owner = *rec;
    }
    e.flags |= flags::OWNER_VALID;
}

/// Records the current task as the holder of the TCP socket behind `fd` (it just obtained it).
/// A socket the peer already closed (its FIN came before accept() returned) is also reported:
/// its CLOSE_WAIT transition could not name an owner.
#[inline(always)]
fn record_owner(hook: Hook, fd: i64) {
    let Some(s) = sock_of_fd(hook, fd) else {
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(rec) = insert_owner(hook, s.sk, s.inode, fd as i32, pid_tgid) else {
        return;
    };
    let state = read::<u8>(hook, s.sk, config(&OFFSETS).sock_state as u64);
    if state == Some(tcp_state::CLOSE_WAIT) {
        let mut e = new_event(EventKind::Obtained);
        e.sock = s.sk;
        e.inode = s.inode;
        e.fd = fd as i32;
        e.owner = rec;
        e.flags |= flags::OWNER_VALID;
        submit(&e);
    }
}

/// Records the current task as the holder of `sk` at `fd`; None when the map was full.
#[inline(always)]
fn insert_owner(hook: Hook, sk: u64, inode: u64, fd: i32, pid_tgid: u64) -> Option<OwnerRec> {
    let tgid = (pid_tgid >> 32) as u32;
    let followed = config(&FILTER.pid_filter) != 0 && pid_traced(hook, tgid);
    let rec = OwnerRec {
        // SAFETY: plain helper call.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        inode,
        // SAFETY: plain helper call.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tgid,
        fd,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        flags: if followed { owner_flags::FOLLOWED } else { 0 },
        _pad: 0,
    };
    if OWNERS.insert(sk, rec, 0).is_err() {
        count(counter::OWNERS_FULL);
        diag::owners_full(hook, rec.tgid, fd);
        return None;
    }
    Some(rec)
}

/// Where a syscall's arguments and return value come from: a classic sys_enter/sys_exit
/// tracepoint's record, or the `struct pt_regs` that the x86-64 syscall wrapper (`__x64_sys_*`)
/// receives, at its fentry/fexit.
trait SyscallArgs {
    fn arg(&self, hook: Hook, n: u32) -> Option<i64>;
    /// The return value (exits only); -1 if unreadable.
    fn ret(&self, hook: Hook) -> i64;
}

impl SyscallArgs for TracePointContext {
    /// 8-byte slots from offset 16 on every kernel.
    #[inline(always)]
    fn arg(&self, hook: Hook, n: u32) -> Option<i64> {
        field::<i64>(self, hook, 16 + 8 * n)
    }

    /// At offset 16 of every sys_exit record.
    #[inline(always)]
    fn ret(&self, hook: Hook) -> i64 {
        field::<i64>(self, hook, 16).unwrap_or(-1)
    }
}

/// At a syscall wrapper's fentry: the user registers it gets (`struct pt_regs *`).
struct Regs(u64);

impl SyscallArgs for Regs {
    #[inline(always)]
    fn arg(&self, hook: Hook, n: u32) -> Option<i64> {
        // x86-64 struct pt_regs: di, si, dx, r10, r8, r9 carry the arguments (an ABI).
        let offset = match n {
            0 => 112,
            1 => 104,
            2 => 96,
            _ => return None,
        };
        read::<i64>(hook, self.0, offset)
    }

    /// An entry has none.
    #[inline(always)]
    fn ret(&self, _hook: Hook) -> i64 {
        -1
    }
}

/// At a syscall wrapper's fexit: what it returned (exits read no argument).
struct Returned(i64);

impl SyscallArgs for Returned {
    #[inline(always)]
    fn arg(&self, _hook: Hook, _n: u32) -> Option<i64> {
        None
    }

    #[inline(always)]
    fn ret(&self, _hook: Hook) -> i64 {
        self.0
    }
}

/// accept(), accept4(), dup(), pidfd_getfd(): the returned fd is the caller's new handle.
#[inline(always)]
fn new_fd_exit(ctx: &impl SyscallArgs, hook: Hook) {
    let fd = ctx.ret(hook);
    if fd >= 0 {
        record_owner(hook, fd);
    }
}

#[inline(always)]
fn connect_enter(ctx: &impl SyscallArgs, hook: Hook) {
    if let Some(fd) = ctx.arg(hook, 0) {
        let tid = bpf_get_current_pid_tgid() as u32;
        let _ = CONNECTING.insert(tid, fd as i32, 0);
    }
}

#[inline(always)]
fn connect_exit() {
    // The owner was recorded at SYN_SENT, if the call got that far.
    let _ = CONNECTING.remove(bpf_get_current_pid_tgid() as u32);
}

// struct user_msghdr and struct cmsghdr on 64-bit kernels.
const MSG_CONTROL: u64 = 32;
const MSG_CONTROLLEN: u64 = 40;
const CMSG_HDR: u64 = 16;
const SOL_SOCKET: i32 = 1;
const SCM_RIGHTS: i32 = 1;
/// fds read from one SCM_RIGHTS message; the rest are counted as unread.
const SCM_FDS: usize = 4;

#[inline(always)]
fn recvmsg_enter(ctx: &impl SyscallArgs, hook: Hook) {
    let Some(msg) = ctx.arg(hook, 1) else {
        return;
    };
    let msg = msg as u64;
    // Only calls with room for a control message can receive fds. An unreadable msghdr is the
    // caller's fault (the call fails with EFAULT): not counted.
    // SAFETY: user memory is read through the helper.
    let room = unsafe { bpf_probe_read_user((msg + MSG_CONTROLLEN) as *const u64) }.unwrap_or(0);
    if room >= CMSG_HDR + 4 {
        let tid = bpf_get_current_pid_tgid() as u32;
        let _ = RECVMSG.insert(tid, msg, 0);
    }
}

#[inline(always)]
fn recvmsg_exit(ctx: &impl SyscallArgs, hook: Hook) {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out at once.
    let Some(msg) = (unsafe { RECVMSG.get(tid) }).copied() else {
        return;
    };
    let _ = RECVMSG.remove(tid);
    if ctx.ret(hook) >= 0 && received_fds(hook, msg).is_none() {
        count(counter::SCM_RIGHTS_UNREAD);
        diag::fds_not_recorded(hook, tid);
    }
}

/// Records the fds an SCM_RIGHTS message (the first control message) delivered. None: it had
/// fds that could not all be read.
#[inline(always)]
fn received_fds(hook: Hook, msg: u64) -> Option<()> {
    // SAFETY: user memory, read through the helper; the kernel wrote the lengths back.
    unsafe {
        let len = bpf_probe_read_user((msg + MSG_CONTROLLEN) as *const u64).ok()?;
        if len < CMSG_HDR + 4 {
            return Some(()); // no control message came
        }
        let control = bpf_probe_read_user((msg + MSG_CONTROL) as *const u64).ok()?;
        let hdr = bpf_probe_read_user(control as *const [u64; 2]).ok()?;
        let (level, kind) = (hdr[1] as i32, (hdr[1] >> 32) as i32);
        if level != SOL_SOCKET || kind != SCM_RIGHTS {
            return Some(());
        }
        let n = (hdr[0].saturating_sub(CMSG_HDR) / 4) as usize;
        let fds = bpf_probe_read_user((control + CMSG_HDR) as *const [i32; SCM_FDS]).ok()?;
        for (i, fd) in fds.iter().enumerate() {
            if i < n {
                record_owner(hook, *fd as i64);
            }
        }
        (n <= SCM_FDS).then_some(())
    }
}

/// close_range() closes many fds at once: forward one record per socket among the first
/// `CLOSE_RANGE_SCAN` fds of the range, plus one for the range itself (for fds beyond it and for
/// kernels without offsets).
const CLOSE_RANGE_SCAN: u32 = 8;
const CLOSE_RANGE_CLOEXEC: i64 = 1 << 2;

#[inline(always)]
fn close_range_enter(
    ctx: &impl SyscallArgs,
    hook: Hook,
    mut e: Event,
    first: i64,
    last: i64,
    extra: u8,
) -> Option<()> {
    let range_flags = ctx.arg(hook, 2)?;
    if range_flags & CLOSE_RANGE_CLOEXEC != 0 {
        return None; // only marks the fds close-on-exec
    }
    enter_call(hook, e.pid_tgid as u32, EXIT_ALWAYS);
    e.fd = first as i32;
    e.arg = last;
    submit(&e);
    if config(&OFFSETS).valid == 0 || first < 0 {
        return Some(());
    }
    let count = (last - first + 1).clamp(0, CLOSE_RANGE_SCAN as i64) as u32;
    for i in 0..CLOSE_RANGE_SCAN {
        if i >= count {
            break;
        }
        let fd = first + i as i64;
        // A failed read is counted, not said: anything carried from one fd to the next (or a
        // diagnostic per fd) multiplies the verifier's states by each fd: Linux 6.1 refused
        // this program at 1M instructions that way.
        let (found, _) = walk_fd(fd);
        if let Some(s) = found {
            let mut one = new_event(EventKind::CallEnter);
            one.call = Call::CloseRange as u8;
            one.flags |= extra;
            one.fd = fd as i32;
            one.arg = last;
            set_sock(&mut one, s);
            follow_owner(s.sk, s.inode);
            submit(&one);
        }
    }
    Some(())
}

/// `IN_CALL` values: which exits of the call are forwarded.
const EXIT_ALWAYS: u8 = 1;
/// The call named its socket: userspace matches its effects by socket and retires it at the
/// thread's next call, so only a failure (it changed nothing) needs saying.
const EXIT_ON_FAILURE: u8 = 2;

/// Marks the thread as inside a forwarded call, so that its exit is forwarded too.
#[inline(always)]
fn enter_call(hook: Hook, tid: u32, exits: u8) {
    if IN_CALL.insert(tid, exits, 0).is_err() {
        count(counter::IN_CALL_FULL);
        diag::in_call_full(hook, tid);
    }
}

#[inline(always)]
fn call_exit(ctx: &impl SyscallArgs, hook: Hook, call: Call) {
    if matches!(call, Call::Dup2 | Call::Dup3) {
        let newfd = ctx.ret(hook);
        if newfd >= 0 {
            record_owner(hook, newfd);
        }
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out at once.
    let Some(exits) = (unsafe { IN_CALL.get(tid) }).copied() else {
        return;
    };
    let _ = IN_CALL.remove(tid);
    let ret = ctx.ret(hook);
    if exits == EXIT_ON_FAILURE && ret >= 0 {
        return;
    }
    let mut e = new_event(EventKind::CallExit);
    e.call = call as u8;
    e.arg = ret;
    submit(&e);
}

/// Each syscall hook three times: the classic tracepoint program, and the guarded pair on the
/// x86-64 syscall wrapper (fentry for an enter, fexit for an exit) that userspace prefers where
/// the kernel has it. A classic tracepoint is skipped while any BPF program holds the CPU's
/// `bpf_prog_active`, which from Linux 7.0 includes a preempted one; the pair is skipped only
/// for itself, and its second program catches that (see `first_copy`).
///
/// `enter`: `$body(args, hook, extra_flags)`; `exit`: `$body(args, hook)` (a repeated exit
/// finds its thread's call gone, so it needs no mark).
macro_rules! syscall_hooks {
    ($($kind:ident $tp:ident, $first:ident, $second:ident, $func:literal => $body:expr;)*) => {$(
        syscall_hooks!(@tp $kind $tp $body);
        syscall_hooks!(@$kind $first, $second, $func, $body);
    )*};
    (@tp enter $tp:ident $body:expr) => {
        #[tracepoint]
        fn $tp(ctx: TracePointContext) -> u32 {
            ($body)(&ctx, stringify!($tp), 0);
            0
        }
    };
    (@tp exit $tp:ident $body:expr) => {
        #[tracepoint]
        fn $tp(ctx: TracePointContext) -> u32 {
            ($body)(&ctx, stringify!($tp));
            0
        }
    };
    (@enter $first:ident, $second:ident, $func:literal, $body:expr) => {
        #[fentry(function = $func)]
        fn $first(ctx: FEntryContext) -> i32 {
            const SLOT: u32 = guard_slot(stringify!($first));
            let regs = Regs(ctx.arg(0));
            first_copy_of_call(SLOT, || ($body)(&regs, stringify!($first), 0));
            0
        }
        #[fentry(function = $func)]
        fn $second(ctx: FEntryContext) -> i32 {
            const SLOT: u32 = guard_slot(stringify!($first));
            let regs = Regs(ctx.arg(0));
            if let Some(extra) = second_copy_of_call(SLOT) {
                ($body)(&regs, stringify!($second), extra);
            }
            0
        }
    };
    (@exit $first:ident, $second:ident, $func:literal, $body:expr) => {
        #[fexit(function = $func)]
        fn $first(ctx: FExitContext) -> i32 {
            const SLOT: u32 = guard_slot(stringify!($first));
            // Only the return value (after the wrapper's one argument): an exit needs no
            // argument, and 5.10's BTF types some wrappers' `regs` as a bare declaration, which
            // its verifier refuses to read.
            let ret = Returned(ctx.arg(1));
            first_copy_of_call(SLOT, || ($body)(&ret, stringify!($first)));
            0
        }
        #[fexit(function = $func)]
        fn $second(ctx: FExitContext) -> i32 {
            const SLOT: u32 = guard_slot(stringify!($first));
            let ret = Returned(ctx.arg(1));
            if second_copy_of_call(SLOT).is_some() {
                ($body)(&ret, stringify!($second));
            }
            0
        }
    };
}

/// A close-path call's entry and exit: `call_enter` and `call_exit` for `Call::$call`.
macro_rules! call_hooks {
    ($($call:ident: $tp_enter:ident, $first_enter:ident, $second_enter:ident;
        $tp_exit:ident, $first_exit:ident, $second_exit:ident; $func:literal;)*) => {$(
        syscall_hooks! {
            enter $tp_enter, $first_enter, $second_enter, $func
                => |c, h, x| { let _ = call_enter(c, h, Call::$call, x); };
            exit $tp_exit, $first_exit, $second_exit, $func
                => |c, h| call_exit(c, h, Call::$call);
        }
    )*};
}

call_hooks! {
    Shutdown: sys_enter_shutdown, sys_enter_shutdown_btf, sys_enter_shutdown_btf2;
        sys_exit_shutdown, sys_exit_shutdown_btf, sys_exit_shutdown_btf2; "__x64_sys_shutdown";
    Close: sys_enter_close, sys_enter_close_btf, sys_enter_close_btf2;
        sys_exit_close, sys_exit_close_btf, sys_exit_close_btf2; "__x64_sys_close";
    CloseRange: sys_enter_close_range, sys_enter_close_range_btf, sys_enter_close_range_btf2;
        sys_exit_close_range, sys_exit_close_range_btf, sys_exit_close_range_btf2;
        "__x64_sys_close_range";
    Dup2: sys_enter_dup2, sys_enter_dup2_btf, sys_enter_dup2_btf2;
        sys_exit_dup2, sys_exit_dup2_btf, sys_exit_dup2_btf2; "__x64_sys_dup2";
    Dup3: sys_enter_dup3, sys_enter_dup3_btf, sys_enter_dup3_btf2;
        sys_exit_dup3, sys_exit_dup3_btf, sys_exit_dup3_btf2; "__x64_sys_dup3";
}

syscall_hooks! {
    // One classic program serves every new-fd syscall; a wrapper's pair serves one each.
    exit sys_exit_new_fd, sys_exit_accept4_btf, sys_exit_accept4_btf2, "__x64_sys_accept4"
        => |c, h| new_fd_exit(c, h);
    enter sys_enter_connect, sys_enter_connect_btf, sys_enter_connect_btf2, "__x64_sys_connect"
        => |c, h, _| connect_enter(c, h);
    exit sys_exit_connect, sys_exit_connect_btf, sys_exit_connect_btf2, "__x64_sys_connect"
        => |_, _| connect_exit();
    enter sys_enter_recvmsg, sys_enter_recvmsg_btf, sys_enter_recvmsg_btf2, "__x64_sys_recvmsg"
        => |c, h, _| recvmsg_enter(c, h);
    exit sys_exit_recvmsg, sys_exit_recvmsg_btf, sys_exit_recvmsg_btf2, "__x64_sys_recvmsg"
        => |c, h| recvmsg_exit(c, h);
}

/// The other new-fd syscalls' pairs (their classic tracepoints share `sys_exit_new_fd`).
macro_rules! new_fd_pairs {
    ($($first:ident, $second:ident, $func:literal;)*) => {$(
        syscall_hooks!(@exit $first, $second, $func, |c, h| new_fd_exit(c, h));
    )*};
}

new_fd_pairs! {
    sys_exit_accept_btf, sys_exit_accept_btf2, "__x64_sys_accept";
    sys_exit_dup_btf, sys_exit_dup_btf2, "__x64_sys_dup";
    sys_exit_pidfd_getfd_btf, sys_exit_pidfd_getfd_btf2, "__x64_sys_pidfd_getfd";
}

/// Is the exiting thread its process's last? do_exit() has already counted it out of
/// `signal->live` when the tracepoint fires. Without the offsets: whether it is the main thread.
#[inline(always)]
fn group_dead(hook: Hook, is_main_thread: bool) -> bool {
    let o = config(&OFFSETS);
    if o.task_signal == 0 || o.signal_live == 0 {
        return is_main_thread;
    }
    // SAFETY: plain helper call; the pointer is only used through probe reads.
    let task = unsafe { bpf_get_current_task() };
    match read::<u64>(hook, task, o.task_signal as u64)
        .and_then(|s| read::<i32>(hook, s, o.signal_live as u64))
    {
        Some(live) => live == 0,
        None => is_main_thread,
    }
}

#[tracepoint]
fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    const HOOK: Hook = "sched_process_exit";
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // Untraced processes stop here: no reads of their task for the group check.
    if !pid_traced(HOOK, tgid) {
        return 0;
    }
    let dead = group_dead(HOOK, pid_tgid as u32 == tgid);
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
    const HOOK: Hook = "sched_process_fork";
    if config(&FILTER.pid_filter) == 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: single-entry lookup, value not kept.
    if unsafe { TRACED_PIDS.get(parent) }.is_none() {
        return 0;
    }
    if let Some(child) = field::<i32>(&ctx, HOOK, config(&OTHER_TP).fork_child_pid) {
        if TRACED_PIDS.insert(child as u32, 1u8, 0).is_err() {
            count(counter::PID_INSERT_FAILED);
            diag::pid_insert_failed(HOOK, child as u32);
        }
    }
    0
}

#[inline(always)]
fn reset(ctx: &TracePointContext, hook: Hook, skaddr_offset: u32, kind: EventKind) {
    if let Some(sk) = field::<u64>(ctx, hook, skaddr_offset) {
        if sk != 0 {
            let mut e = new_event(kind);
            e.sock = sk;
            submit(&e);
        }
    }
}

#[tracepoint]
fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    reset(
        &ctx,
        "tcp_receive_reset",
        config(&OTHER_TP).receive_reset_skaddr,
        EventKind::ReceiveReset,
    );
    0
}

#[tracepoint]
fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    reset(
        &ctx,
        "tcp_send_reset",
        config(&OTHER_TP).send_reset_skaddr,
        EventKind::SendReset,
    );
    0
}

// `--bench-noop`, the benchmark's floor: userspace attaches these at the same hooks instead of
// the programs above. A check of a load-time flag in every program would stay in production:
// the verifier keeps a branch whose target (the shared `return 0`) other paths reach.

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

// Precise mode: the kernel functions that end a TCP socket, whatever path called them (close(),
// exit, io_uring, the last fput of a shared file). Userspace attaches the fentry pair, or the
// kprobe pair where fentry is refused, or neither (then calls are matched by correlation).

#[inline(always)]
fn kernel_call(hook: Hook, call: Call, sk: u64, how_mask: i64) {
    if sk == 0 || !pid_traced(hook, (bpf_get_current_pid_tgid() >> 32) as u32) {
        return;
    }
    let mut e = new_event(EventKind::KernelCall);
    e.call = call as u8;
    e.sock = sk;
    // inet_shutdown() passes SHUT_RD/SHUT_WR/SHUT_RDWR + 1 (a RCV/SEND_SHUTDOWN mask).
    e.arg = how_mask - 1;
    submit(&e);
}

// fentry programs are guarded like the state hook: from Linux 7.0 they run preemptibly, and
// another task's tcp_close() on the same CPU skips the program a preempted task is in. A
// duplicate kernel call is harmless (userspace keeps the thread's last one).

#[fentry(function = "tcp_close")]
fn tcp_close_fentry(ctx: FEntryContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    first_copy(GUARD_CLOSE, sk, 1, || {
        kernel_call("tcp_close_fentry", Call::Close, sk, 0);
    });
    0
}

#[fentry(function = "tcp_close")]
fn tcp_close_fentry2(ctx: FEntryContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if second_copy(GUARD_CLOSE, sk, 1).is_some() {
        kernel_call("tcp_close_fentry2", Call::Close, sk, 0);
    }
    0
}

#[fentry(function = "tcp_shutdown")]
fn tcp_shutdown_fentry(ctx: FEntryContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let how = ctx.arg::<i32>(1) as i64;
    first_copy(GUARD_SHUTDOWN, sk, (1 << 32) | how as u64, || {
        kernel_call("tcp_shutdown_fentry", Call::Shutdown, sk, how);
    });
    0
}

#[fentry(function = "tcp_shutdown")]
fn tcp_shutdown_fentry2(ctx: FEntryContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let how = ctx.arg::<i32>(1) as i64;
    if second_copy(GUARD_SHUTDOWN, sk, (1 << 32) | how as u64).is_some() {
        kernel_call("tcp_shutdown_fentry2", Call::Shutdown, sk, how);
    }
    0
}

#[kprobe]
fn tcp_close_kprobe(ctx: ProbeContext) -> u32 {
    kernel_call("tcp_close_kprobe", Call::Close, ctx.arg(0).unwrap_or(0), 0);
    0
}

#[kprobe]
fn tcp_shutdown_kprobe(ctx: ProbeContext) -> u32 {
    let how: i32 = ctx.arg(1).unwrap_or(0);
    kernel_call(
        "tcp_shutdown_kprobe",
        Call::Shutdown,
        ctx.arg(0).unwrap_or(0),
        how as i64,
    );
    0
}
