//! TCP state changes (`sock:inet_sock_set_state`): the classic tracepoint program, and the same
//! hook as a guarded pair of BTF tracepoint programs, which userspace prefers where it can.
use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use finwait_common::{Event, EventKind, KernelOffsets, Site, flags, tcp_state};

use crate::{
    FILTER, OFFSETS, OWNERS, STATE_TP,
    event::{new_event, submit},
    fd::{AF_INET6, IPPROTO_TCP, inode_of_socket},
    filter::{owner_followed, port_wanted},
    owner::{connecting, owner_of},
    read::{config, field, read},
};

#[tracepoint]
fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_state(&ctx);
    0
}

/// The classic tracepoint's record, at the offsets of this kernel's format file (`STATE_TP`).
fn try_state(ctx: &TracePointContext) -> Option<()> {
    const SITE: Site = Site::of("inet_sock_set_state");
    let l = config(&STATE_TP);
    let protocol = if l.protocol_size == 1 {
        field::<u8>(ctx, SITE, l.protocol)? as u16
    } else {
        field::<u16>(ctx, SITE, l.protocol)?
    };
    if protocol != IPPROTO_TCP {
        return None;
    }
    let old = field::<i32>(ctx, SITE, l.oldstate)? as u8;
    let new = field::<i32>(ctx, SITE, l.newstate)? as u8;
    if !needed(old, new) {
        return None;
    }
    let sk = field::<u64>(ctx, SITE, l.skaddr)?;
    let mut e = transition_event(SITE, sk, old, new)?;
    e.sport = field::<u16>(ctx, SITE, l.sport)?;
    e.dport = field::<u16>(ctx, SITE, l.dport)?;
    e.family = field::<u16>(ctx, SITE, l.family)?;
    if e.family == AF_INET6 {
        e.saddr = field::<[u8; 16]>(ctx, SITE, l.saddr_v6)?;
        e.daddr = field::<[u8; 16]>(ctx, SITE, l.daddr_v6)?;
    } else {
        let s = field::<[u8; 4]>(ctx, SITE, l.saddr)?;
        let d = field::<[u8; 4]>(ctx, SITE, l.daddr)?;
        e.saddr[..4].copy_from_slice(&s);
        e.daddr[..4].copy_from_slice(&d);
    }
    emit_state(SITE, e);
    Some(())
}

guarded! {
    /// The same hook as a BTF tracepoint: the kernel skips it only when it would interrupt
    /// itself, where a classic tracepoint is skipped whenever any BPF program runs on the CPU (a
    /// softirq landing in one of our syscall programs would lose its state change). It can still
    /// interrupt itself (a softirq's state change while a task's runs it, and on kernels that
    /// run tracepoint programs preemptibly, another task's on the same CPU): hence the pair.
    /// A socket cannot make one change twice in a row, so userspace drops a `MAYBE_DUPLICATE`
    /// repeating the change just before.
    #[btf_tracepoint(function = "inet_sock_set_state")]
    fn inet_sock_set_state_btf, inet_sock_set_state_btf2(ctx: BtfTracePointContext) {
        let old = ctx.arg::<i32>(1) as u8;
        let new = ctx.arg::<i32>(2) as u8;
        // Most of a connection's changes need nothing: leave before the guard's work.
        if !needed(old, new) {
            return 0;
        }
        let sk: u64 = ctx.arg(0);
    }
    mark event(sk, states_key(old, new));
    run |site, flags| try_state_btf(site, sk, old, new, flags);
}

/// Does this change need the hook at all: a report, an owner to record (SYN_SENT, inside
/// connect()) or one to forget (CLOSE)? Else (SYN_SENT -> ESTABLISHED, SYN_RECV ->
/// ESTABLISHED, CLOSE -> LISTEN, ... about a third of a connection's changes) it returns at once.
#[inline(always)]
fn needed(old: u8, new: u8) -> bool {
    new == tcp_state::SYN_SENT
        || new == tcp_state::CLOSE
        || config(&FILTER.all_transitions) != 0
        || tcp_state::worth_reporting(old, new)
}

/// A state change as the guard keeps it (never 0).
#[inline(always)]
fn states_key(old: u8, new: u8) -> u64 {
    (1 << 16) | ((old as u64) << 8) | new as u64
}

/// The BTF tracepoint's transition: the socket's fields read through `OFFSETS`.
fn try_state_btf(site: Site, sk: u64, old: u8, new: u8, extra_flags: u8) -> Option<()> {
    let o = config(&OFFSETS);
    if read::<u16>(site, sk, o.sock_protocol as u64)? != IPPROTO_TCP {
        return None;
    }
    let mut e = transition_event(site, sk, old, new)?;
    e.flags |= extra_flags;
    read_ends(site, sk, &o, &mut e)?;
    emit_state(site, e);
    Some(())
}

/// The socket's family, ports and addresses into `e` (the `sock_ends` offsets).
#[inline(always)]
pub(crate) fn read_ends(site: Site, sk: u64, o: &KernelOffsets, e: &mut Event) -> Option<()> {
    e.family = read::<u16>(site, sk, o.sock_family as u64)?;
    e.sport = u16::from_be(read::<u16>(site, sk, o.inet_sport as u64)?);
    e.dport = u16::from_be(read::<u16>(site, sk, o.sock_dport as u64)?);
    if e.family == AF_INET6 {
        e.saddr = read::<[u8; 16]>(site, sk, o.sock_v6_rcv_saddr as u64)?;
        e.daddr = read::<[u8; 16]>(site, sk, o.sock_v6_daddr as u64)?;
    } else {
        let s = read::<[u8; 4]>(site, sk, o.inet_saddr as u64)?;
        let d = read::<[u8; 4]>(site, sk, o.sock_daddr as u64)?;
        e.saddr[..4].copy_from_slice(&s);
        e.daddr[..4].copy_from_slice(&d);
    }
    Some(())
}

/// A transition record for `sk`, if this transition is one to report.
#[inline(always)]
fn transition_event(site: Site, sk: u64, old: u8, new: u8) -> Option<Event> {
    if !wanted_transition(site, sk, old, new) {
        return None;
    }
    let mut e = new_event(EventKind::Transition);
    e.sock = sk;
    e.old_state = old;
    e.new_state = new;
    Some(e)
}

/// Is this transition forwarded? One that is not still ends the socket's ownership record when
/// it reaches CLOSE (a connect() that failed, a reset in SYN_RECV, ...).
#[inline(always)]
fn wanted_transition(site: Site, sk: u64, old: u8, new: u8) -> bool {
    if new == tcp_state::SYN_SENT {
        connecting(site, sk);
    }
    if config(&FILTER.all_transitions) != 0 || tcp_state::worth_reporting(old, new) {
        return true;
    }
    if new == tcp_state::CLOSE {
        let _ = OWNERS.remove(sk);
    }
    false
}

/// Completes and sends a transition: the socket's details and owner, when its port is wanted
/// and its owner followed.
#[inline(always)]
fn emit_state(site: Site, mut e: Event) {
    let wanted = port_wanted(e.sport, e.dport);
    if wanted {
        sock_details(site, &mut e);
        owner_of(&mut e);
    }
    if e.new_state == tcp_state::CLOSE {
        // The socket is gone (its address may be reused): its record goes, after the copy.
        let _ = OWNERS.remove(e.sock);
    }
    if wanted && owner_followed(site, &e) {
        submit(&e);
    }
}

/// Socket flags (orphaned? peer FIN seen?) and inode (to find the owner in /proc).
#[inline(always)]
fn sock_details(site: Site, e: &mut Event) {
    let o = config(&OFFSETS);
    if o.valid == 0 || e.sock == 0 {
        return;
    }
    if let Some(f) = read::<u64>(site, e.sock, o.sock_flags as u64) {
        e.sk_flags = f;
        e.flags |= flags::SK_FLAGS_VALID;
    }
    if let Some(socket) = read::<u64>(site, e.sock, o.sock_socket as u64) {
        if socket != 0 {
            e.inode = inode_of_socket(site, socket, &o);
        }
    }
}
