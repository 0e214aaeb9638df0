//! `--pid`, `--comm`, `--port`: which processes and sockets are followed, decided in the kernel
//! so that the rest never reaches userspace.
use aya_ebpf::helpers::bpf_get_current_comm;
use finwait_common::{Event, MAX_COMMS, MAX_PORTS, Site, counter, flags, owner_flags};

use crate::{FILTER, TRACED_PIDS, diag, event::count, read::config};

/// With `--pid`/`--comm`: is this process followed? A process matching `--comm` joins the set,
/// so its children are followed too.
#[inline(always)]
pub(crate) fn pid_traced(site: Site, tgid: u32) -> bool {
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
    follow_pid(site, tgid);
    true
}

/// Adds `tgid` to the followed processes; a full map is counted and said.
#[inline(always)]
pub(crate) fn follow_pid(site: Site, tgid: u32) {
    if TRACED_PIDS.insert(tgid, 1u8, 0).is_err() {
        count(counter::PID_INSERT_FAILED);
        diag::pid_insert_failed(site, tgid);
    }
}

/// `--comm`: is this one of the names followed?
#[inline(always)]
pub(crate) fn comm_followed(comm: &[u8; 16]) -> bool {
    let comm_count = config(&FILTER.comm_count);
    for i in 0..MAX_COMMS {
        if (i as u32) < comm_count && config(&FILTER.comms[i]) == *comm {
            return true;
        }
    }
    false
}

/// `--port`: does this socket have one of the wanted ports (local or remote)?
#[inline(always)]
pub(crate) fn port_wanted(sport: u16, dport: u16) -> bool {
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

/// With `--pid`/`--comm`: a transition reaches userspace when its socket's owner is followed,
/// or was when it obtained the socket (it may have exited since: a prefork child that closed
/// in FIN_WAIT1 and exited before the peer's ACK), when the running task is followed (process
/// context), or when the owner is not known.
#[inline(always)]
pub(crate) fn owner_followed(site: Site, e: &Event) -> bool {
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
    pid_traced(site, (e.pid_tgid >> 32) as u32)
}
