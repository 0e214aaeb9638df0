//! Ownership records (`OWNERS`): who holds each socket, written when a task obtains an fd to it
//! (accept, dup, a passed fd, connect), read by the state hook and by the calls that end it.
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
};
use finwait_common::{Event, EventKind, OwnerRec, Site, counter, flags, owner_flags, tcp_state};

use crate::{
    CONNECTING, FILTER, OFFSETS, OWNERS, diag,
    event::{count, new_event, submit},
    fd::{inode_of_socket, sock_of_fd},
    filter::pid_traced,
    read::{config, read},
};

/// A socket entering SYN_SENT inside this thread's connect(): the caller holds it at the fd
/// connect() was given.
#[inline(always)]
pub(crate) fn connecting(site: Site, sk: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out at once.
    let Some(fd) = (unsafe { CONNECTING.get(pid_tgid as u32) }).copied() else {
        return;
    };
    let o = config(&OFFSETS);
    let inode = match read::<u64>(site, sk, o.sock_socket as u64) {
        Some(socket) if socket != 0 => inode_of_socket(site, socket, &o),
        _ => return,
    };
    insert_owner(site, sk, inode, fd, pid_tgid);
}

/// The socket's ownership record: by socket, else (sockets from before the start) by inode.
#[inline(always)]
pub(crate) fn owner_of(e: &mut Event) {
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

/// With `--pid`/`--comm`: a followed task made a call on the socket (this runs only for those):
/// its record says so, and its later transitions are forwarded whoever runs them (the peer's
/// ACK in softirq), as userspace shows a socket a followed process ended.
#[inline(always)]
pub(crate) fn follow_owner(sk: u64, inode: u64) {
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

/// Does the file behind a closed fd keep other references (`refs` as read before the call;
/// `u64::MAX`: unknown)? Then the close ends nothing: no FIN, no transition.
#[inline(always)]
pub(crate) fn others_remain(refs: u64) -> bool {
    // file_ref_t (6.13+) counts from zero; atomic_long_t f_count from one.
    refs != u64::MAX && refs > (config(&OFFSETS).file_ref_is_zero_based == 0) as u64
}

/// A close of `e.fd` (close, dup2/dup3 over it, close_range): copies the socket's ownership
/// record into the record; when other references to the file remain and the recorded holder is
/// the one closing, the record no longer names a holder: mark it stale.
#[inline(always)]
pub(crate) fn release_owner(e: &mut Event, refs: u64) {
    let Some(rec) = OWNERS.get_ptr_mut(e.sock) else {
        return;
    };
    // SAFETY: a map value pointer, valid for this program run.
    if unsafe { (*rec).inode } != e.inode {
        let _ = OWNERS.remove(e.sock); // an earlier socket's record
        return;
    }
    let others_remain = others_remain(refs);
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
pub(crate) fn record_owner(site: Site, fd: i64) {
    let Some(s) = sock_of_fd(site, fd) else {
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(rec) = insert_owner(site, s.sk, s.inode, fd as i32, pid_tgid) else {
        return;
    };
    let state = read::<u8>(site, s.sk, config(&OFFSETS).sock_state as u64);
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

/// Records the current task as the holder of `sk` at `fd`; None when the map was full (counted
/// and said).
#[inline(always)]
fn insert_owner(site: Site, sk: u64, inode: u64, fd: i32, pid_tgid: u64) -> Option<OwnerRec> {
    let tgid = (pid_tgid >> 32) as u32;
    let followed = config(&FILTER.pid_filter) != 0 && pid_traced(site, tgid);
    let rec = OwnerRec {
        // SAFETY: plain helper call.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        inode,
        // SAFETY: plain helper call.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tgid,
        fd,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        flags: if followed { owner_flags::FOLLOWED } else { 0 }
            | u32::from(pid_tgid as u32 == tgid) * owner_flags::MAIN_THREAD,
        _pad: 0,
    };
    if OWNERS.insert(sk, rec, 0).is_err() {
        count(counter::OWNERS_FULL);
        diag::owners_full(site, rec.tgid, fd);
        return None;
    }
    Some(rec)
}
