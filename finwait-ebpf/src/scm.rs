//! Fds passed over a unix socket (SCM_RIGHTS): recvmsg() gives the receiver each one, recorded
//! as its holder (`owner`).
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user};
use finwait_common::{Site, counter};

use crate::{RECVMSG, diag, event::count, owner::record_owner, syscall::SyscallArgs};

// struct user_msghdr and struct cmsghdr on 64-bit kernels.
const MSG_CONTROL: u64 = 32;
const MSG_CONTROLLEN: u64 = 40;
const CMSG_HDR: u64 = 16;
const SOL_SOCKET: i32 = 1;
const SCM_RIGHTS: i32 = 1;
/// fds read from one SCM_RIGHTS message; the rest are counted as unread.
const SCM_FDS: usize = 4;

/// Keeps the call's msghdr (`RECVMSG`) until the exit, if it can receive fds.
#[inline(always)]
fn recvmsg_enter(ctx: &impl SyscallArgs, site: Site) {
    let Some(msg) = ctx.arg(site, 1) else {
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

/// Records the fds the call received; fds it could not record are counted and said.
#[inline(always)]
fn recvmsg_exit(ctx: &impl SyscallArgs, site: Site) {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out at once.
    let Some(msg) = (unsafe { RECVMSG.get(tid) }).copied() else {
        return;
    };
    let _ = RECVMSG.remove(tid);
    if ctx.ret(site) >= 0 && received_fds(site, msg).is_none() {
        count(counter::SCM_RIGHTS_UNREAD);
        diag::fds_not_recorded(site, tid);
    }
}

/// Records the fds an SCM_RIGHTS message (the first control message) delivered. None: it had
/// fds that could not all be read.
#[inline(always)]
fn received_fds(site: Site, msg: u64) -> Option<()> {
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
                record_owner(site, *fd as i64);
            }
        }
        (n <= SCM_FDS).then_some(())
    }
}

syscall_hooks! {
    enter sys_enter_recvmsg, sys_enter_recvmsg_btf, sys_enter_recvmsg_btf2, "__x64_sys_recvmsg"
        => |c, s, _| recvmsg_enter(c, s);
    exit sys_exit_recvmsg, sys_exit_recvmsg_btf, sys_exit_recvmsg_btf2, "__x64_sys_recvmsg"
        => |c, s| recvmsg_exit(c, s);
}
