//! The syscalls that give the caller a socket, recorded as its holder (`owner`): accept(),
//! accept4(), dup(), pidfd_getfd() (the returned fd), connect() (at the socket's SYN_SENT,
//! inside the call). dup2/dup3 are in `calls`, recvmsg with SCM_RIGHTS in `scm`.
use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use finwait_common::Site;

use crate::{CONNECTING, owner::record_owner, syscall::SyscallArgs};

/// accept(), accept4(), dup(), pidfd_getfd(): the returned fd is the caller's new handle.
#[inline(always)]
fn new_fd_exit(ctx: &impl SyscallArgs, site: Site) {
    let fd = ctx.ret(site);
    if fd >= 0 {
        record_owner(site, fd);
    }
}

/// connect(): the fd, until the socket's SYN_SENT (`owner::connecting`) or the exit.
#[inline(always)]
fn connect_enter(ctx: &impl SyscallArgs, site: Site) {
    if let Some(fd) = ctx.arg(site, 0) {
        let tid = bpf_get_current_pid_tgid() as u32;
        let _ = CONNECTING.insert(tid, fd as i32, 0);
    }
}

#[inline(always)]
fn connect_exit() {
    // The owner was recorded at SYN_SENT, if the call got that far.
    let _ = CONNECTING.remove(bpf_get_current_pid_tgid() as u32);
}

syscall_hooks! {
    // One classic program serves every new-fd syscall; a wrapper's pair serves one each.
    exit sys_exit_new_fd, sys_exit_accept4_btf, sys_exit_accept4_btf2, "__x64_sys_accept4"
        => |c, s| new_fd_exit(c, s);
    enter sys_enter_connect, sys_enter_connect_btf, sys_enter_connect_btf2, "__x64_sys_connect"
        => |c, s, _| connect_enter(c, s);
    exit sys_exit_connect, sys_exit_connect_btf, sys_exit_connect_btf2, "__x64_sys_connect"
        => |_, _| connect_exit();
}

// The other new-fd syscalls' pairs (their classic tracepoint is `sys_exit_new_fd`).
syscall_pair!(exit sys_exit_accept_btf, sys_exit_accept_btf2, "__x64_sys_accept"
    => |c, s| new_fd_exit(c, s));
syscall_pair!(exit sys_exit_dup_btf, sys_exit_dup_btf2, "__x64_sys_dup"
    => |c, s| new_fd_exit(c, s));
syscall_pair!(exit sys_exit_pidfd_getfd_btf, sys_exit_pidfd_getfd_btf2, "__x64_sys_pidfd_getfd"
    => |c, s| new_fd_exit(c, s));
