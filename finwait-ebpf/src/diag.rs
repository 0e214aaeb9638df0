//! What `-v` shows: each loss a counter records, said through aya-log with the offset, fd or pid,
//! and where: the program's `Site`, a number first in the message, which userspace replaces with
//! the program's name (`finwait-trace: kernel: warn sys_exit_recvmsg: ...`). Integers only: the
//! verifier refuses to take a typed pointer apart into a log record's bytes.
//!
//! Out of line, so a program carries one copy of each and calls it only on failure. Without
//! `-v`, userspace loads `AYA_LOG_LEVEL` as 0 into read-only data: the verifier sees the macros'
//! level check as a constant and removes what it guards; the call and the level's load remain.
use aya_log_ebpf::warn;
use finwait_common::Site;

#[inline(never)]
pub(crate) fn read_failed(site: Site, offset: u64) {
    warn!(&(), "{}: read failed at offset {}", site.0, offset);
}

#[inline(never)]
pub(crate) fn field_failed(site: Site, offset: u32) {
    warn!(
        &(),
        "{}: tracepoint field at offset {} unreadable", site.0, offset
    );
}

/// A read on the way from `fd` to its socket failed (the socket is still known when only its
/// inode or reference count was missed).
#[inline(never)]
pub(crate) fn fd_read_failed(site: Site, fd: i64, offset: u64) {
    warn!(
        &(),
        "{}: fd {}: read failed at offset {}", site.0, fd, offset
    );
}

#[inline(never)]
pub(crate) fn owners_full(site: Site, tgid: u32, fd: i32) {
    warn!(
        &(),
        "{}: ownership map full: pid {} fd {} has no owner record", site.0, tgid, fd
    );
}

#[inline(never)]
pub(crate) fn in_call_full(site: Site, tid: u32) {
    warn!(
        &(),
        "{}: in-call map full: the exit of thread {} is not forwarded", site.0, tid
    );
}

#[inline(never)]
pub(crate) fn pid_insert_failed(site: Site, tgid: u32) {
    warn!(
        &(),
        "{}: pid map full: pid {} is not followed", site.0, tgid
    );
}

/// Fds passed over a unix socket (SCM_RIGHTS): more than are read, or an unreadable message.
#[inline(never)]
pub(crate) fn fds_not_recorded(site: Site, tid: u32) {
    warn!(
        &(),
        "{}: fds received by thread {} not all recorded", site.0, tid
    );
}
