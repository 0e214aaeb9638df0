//! The syscalls that end or half-end a socket: close, shutdown, dup2/dup3 over an fd, and
//! close_range (`close_range`). Each enter is forwarded with the socket behind its fd, and each
//! exit of a forwarded call with its result.
use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use finwait_common::{Call, EventKind, Site, counter, flags};

use crate::{
    FILTER, IN_CALL, OFFSETS, close_range, diag,
    event::{count, new_event, submit},
    fd::{set_sock, sock_of_fd},
    filter::pid_traced,
    owner::{follow_owner, others_remain, record_owner, release_owner},
    read::config,
    state::read_ends,
    syscall::SyscallArgs,
};

/// `IN_CALL` values: which exits of the call are forwarded.
pub(crate) const EXIT_ALWAYS: u8 = 1;
/// The call named its socket: userspace matches its effects by socket and retires it at the
/// thread's next call, so only a failure (it changed nothing) needs saying.
const EXIT_ON_FAILURE: u8 = 2;

/// A close-path call's enter: forwarded with the socket behind its fd (with offsets, only calls
/// on stream sockets are); `extra`: the report's flags (`MAYBE_DUPLICATE` from a guarded pair).
#[inline(always)]
fn call_enter(ctx: &impl SyscallArgs, site: Site, call: Call, extra: u8) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !pid_traced(site, (pid_tgid >> 32) as u32) {
        return None;
    }
    let (arg0, arg1) = (ctx.arg(site, 0)?, ctx.arg(site, 1)?);
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
        return close_range::enter(ctx, site, e, arg0, arg1, extra);
    }
    match sock_of_fd(site, fd) {
        Some(s) => {
            set_sock(&mut e, s);
            follow_owner(s.sk, s.inode);
            if call != Call::Shutdown {
                release_owner(&mut e, s.refs);
                // A close that ends nothing: no transition will name the socket's ends
                // (`--port` needs them). Only then: it is rare, and costs six reads.
                if others_remain(s.refs) && config(&FILTER.close_ends) != 0 {
                    let o = config(&OFFSETS);
                    if o.sock_ends != 0 && read_ends(site, s.sk, &o, &mut e).is_some() {
                        e.flags |= flags::ENDS_VALID;
                    }
                }
            }
        }
        // Without offsets every call is forwarded; with them, only calls on stream sockets.
        None if config(&OFFSETS).valid != 0 => return None,
        None => {}
    }
    let resolved = e.flags & flags::SOCK_RESOLVED != 0;
    enter_call(
        site,
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

/// Marks the thread as inside a forwarded call, so that its exit is forwarded too.
#[inline(always)]
pub(crate) fn enter_call(site: Site, tid: u32, exits: u8) {
    if IN_CALL.insert(tid, exits, 0).is_err() {
        count(counter::IN_CALL_FULL);
        diag::in_call_full(site, tid);
    }
}

/// A close-path call's exit: dup2/dup3 give the caller a new handle; a forwarded call's result
/// is forwarded when `IN_CALL` says so.
#[inline(always)]
fn call_exit(ctx: &impl SyscallArgs, site: Site, call: Call) {
    if matches!(call, Call::Dup2 | Call::Dup3) {
        let newfd = ctx.ret(site);
        if newfd >= 0 {
            record_owner(site, newfd);
        }
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out at once.
    let Some(exits) = (unsafe { IN_CALL.get(tid) }).copied() else {
        return;
    };
    let _ = IN_CALL.remove(tid);
    let ret = ctx.ret(site);
    if exits == EXIT_ON_FAILURE && ret >= 0 {
        return;
    }
    let mut e = new_event(EventKind::CallExit);
    e.call = call as u8;
    e.arg = ret;
    submit(&e);
}

/// A close-path call's enter and exit hooks (`syscall_hooks!`): `call_enter` and `call_exit`
/// for `Call::$call`.
macro_rules! call_hooks {
    ($($call:ident: $tp_enter:ident, $first_enter:ident, $second_enter:ident;
        $tp_exit:ident, $first_exit:ident, $second_exit:ident; $func:literal;)*) => {$(
        syscall_hooks! {
            enter $tp_enter, $first_enter, $second_enter, $func
                => |c, s, f| { let _ = call_enter(c, s, Call::$call, f); };
            exit $tp_exit, $first_exit, $second_exit, $func
                => |c, s| call_exit(c, s, Call::$call);
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
