//! close_range() closes many fds at once: one record per socket among the first
//! `CLOSE_RANGE_SCAN` fds of the range, plus one for the range itself (for fds beyond it and for
//! kernels without offsets).
use finwait_common::{Call, Event, EventKind, Site};

use crate::{
    OFFSETS,
    calls::{EXIT_ALWAYS, enter_call},
    event::{new_event, submit},
    fd::{set_sock, walk_fd},
    owner::follow_owner,
    read::config,
    syscall::SyscallArgs,
};

const CLOSE_RANGE_SCAN: u32 = 8;
const CLOSE_RANGE_CLOEXEC: i64 = 1 << 2;

/// close_range(`first`, `last`, flags)'s enter: `e` is the call's record, `extra` its flags.
#[inline(always)]
pub(crate) fn enter(
    ctx: &impl SyscallArgs,
    site: Site,
    mut e: Event,
    first: i64,
    last: i64,
    extra: u8,
) -> Option<()> {
    let range_flags = ctx.arg(site, 2)?;
    if range_flags & CLOSE_RANGE_CLOEXEC != 0 {
        return None; // only marks the fds close-on-exec
    }
    enter_call(site, e.pid_tgid as u32, EXIT_ALWAYS);
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
