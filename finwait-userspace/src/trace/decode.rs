//! Decoding of ring-buffer records into typed events.
use std::{
    cell::RefCell,
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use finwait_common::{Call, Event, EventKind, OwnerRec, TcpState, flags, owner_flags};

use crate::model::{Comm, Endpoints, KernelOwner, Task};

fn task_of(e: &Event) -> Task {
    Task {
        pid: (e.pid_tgid >> 32) as u32,
        tid: e.pid_tgid as u32,
        comm: comm(&e.comm),
        thread_comm: None,
        cgroup_id: e.cgroup_id,
        container: None,
    }
}

/// Distinct names decoded so far (a host has few; bounded all the same).
const MAX_COMMS: usize = 4096;

type CommMap = HashMap<[u8; 16], Comm, foldhash::quality::RandomState>;

thread_local! {
    // Names are chosen by processes: a seeded hasher, and a bounded map.
    static COMMS: RefCell<CommMap> = RefCell::new(CommMap::default());
}

/// A process names itself: escape it before it can reach a terminal. Each distinct name is
/// decoded once.
fn comm(raw: &[u8; 16]) -> Comm {
    COMMS.with_borrow_mut(|known| {
        if let Some(c) = known.get(raw) {
            return c.clone();
        }
        let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let c: Comm = crate::model::escape::sanitize(&String::from_utf8_lossy(&raw[..len])).into();
        if known.len() >= MAX_COMMS {
            known.clear();
        }
        known.insert(*raw, c.clone());
        c
    })
}

fn kernel_owner_of(e: &Event) -> Option<KernelOwner> {
    (e.flags & flags::OWNER_VALID != 0).then(|| kernel_owner(&e.owner))
}

/// An entry of the kernel's ownership map.
pub(crate) fn kernel_owner(o: &OwnerRec) -> KernelOwner {
    KernelOwner {
        pid: o.tgid,
        fd: o.fd,
        comm: comm(&o.comm),
        cgroup_id: o.cgroup_id,
        stale: o.flags & owner_flags::STALE != 0,
        followed: o.flags & owner_flags::FOLLOWED != 0,
        main_thread: o.flags & owner_flags::MAIN_THREAD != 0,
        since_ns: o.ts_ns,
    }
}

/// A TCP state change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StateChange {
    pub(crate) sock: u64,
    pub(crate) old: TcpState,
    pub(crate) new: TcpState,
    pub(crate) ends: Endpoints,
    /// Kernel socket flags at the transition, when known.
    pub(crate) sk_flags: Option<u64>,
    pub(crate) inode: u64,
    pub(crate) owner: Option<KernelOwner>,
    /// The second state program's report of a change the first may have reported already.
    pub(crate) maybe_duplicate: bool,
}

/// A close-path call entered (close, shutdown, close_range, dup2, dup3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CallEnter {
    pub(crate) call: Call,
    pub(crate) fd: i32,
    /// `how` for shutdown, the last fd for close_range.
    pub(crate) arg: i64,
    /// The socket behind `fd`, when the kernel could resolve it.
    pub(crate) sock: Option<u64>,
    pub(crate) inode: u64,
    /// Raw reference count of the file, when known (its meaning depends on the kernel).
    pub(crate) file_refs: Option<u64>,
    /// The socket's ownership record, as this close found it.
    pub(crate) owner: Option<KernelOwner>,
    /// The socket's ends, read where the call leaves other references to it (no transition
    /// will name them).
    pub(crate) ends: Option<Endpoints>,
    /// A guarded syscall hook's second program's report of a call the first may have reported.
    pub(crate) maybe_duplicate: bool,
}

/// One ring-buffer record, by kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Transition(StateChange),
    CallEnter(CallEnter),
    CallExit {
        call: Call,
        ret: i64,
    },
    /// A thread exited; `group_dead`: it was its process's last.
    ProcessExit {
        group_dead: bool,
    },
    ReceiveReset {
        sock: u64,
    },
    SendReset {
        sock: u64,
    },
    /// Precise mode: tcp_close/tcp_shutdown ran on `sock` in this task.
    KernelCall {
        call: Call,
        how: Option<i32>,
        sock: u64,
    },
    /// A task obtained an fd to a socket already in CLOSE_WAIT (accepted after the peer's FIN).
    Obtained {
        sock: u64,
        owner: KernelOwner,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) ts_ns: u64,
    pub(crate) task: Task,
    pub(crate) what: Decoded,
}

/// Decodes one ring-buffer item. Returns None for a short or unknown record.
pub(crate) fn decode(bytes: &[u8]) -> Option<Record> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: length checked; Event is plain old data; the ring gives no alignment guarantee.
    let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let what = match EventKind::from_u8(e.kind)? {
        EventKind::Transition => Decoded::Transition(StateChange {
            sock: e.sock,
            old: TcpState::from_u8(e.old_state),
            new: TcpState::from_u8(e.new_state),
            ends: endpoints(&e),
            sk_flags: (e.flags & flags::SK_FLAGS_VALID != 0).then_some(e.sk_flags),
            inode: e.inode,
            owner: kernel_owner_of(&e),
            maybe_duplicate: e.flags & flags::MAYBE_DUPLICATE != 0,
        }),
        EventKind::CallEnter => Decoded::CallEnter(CallEnter {
            call: Call::from_u8(e.call)?,
            fd: e.fd,
            arg: e.arg,
            sock: (e.flags & flags::SOCK_RESOLVED != 0).then_some(e.sock),
            inode: e.inode,
            file_refs: (e.flags & flags::REFS_VALID != 0).then_some(e.file_refs),
            owner: kernel_owner_of(&e),
            ends: (e.flags & flags::ENDS_VALID != 0).then(|| endpoints(&e)),
            maybe_duplicate: e.flags & flags::MAYBE_DUPLICATE != 0,
        }),
        EventKind::CallExit => Decoded::CallExit {
            call: Call::from_u8(e.call)?,
            ret: e.arg,
        },
        EventKind::ProcessExit => Decoded::ProcessExit {
            group_dead: e.flags & flags::GROUP_DEAD != 0,
        },
        EventKind::ReceiveReset => Decoded::ReceiveReset { sock: e.sock },
        EventKind::SendReset => Decoded::SendReset { sock: e.sock },
        EventKind::KernelCall => {
            let call = Call::from_u8(e.call)?;
            Decoded::KernelCall {
                call,
                how: (call == Call::Shutdown).then_some(e.arg as i32),
                sock: e.sock,
            }
        }
        EventKind::Obtained => Decoded::Obtained {
            sock: e.sock,
            owner: kernel_owner_of(&e)?,
        },
    };
    Some(Record {
        ts_ns: e.ts_ns,
        task: task_of(&e),
        what,
    })
}

const AF_INET6: u16 = 10;

fn endpoints(e: &Event) -> Endpoints {
    let addr = |raw: &[u8; 16]| -> IpAddr {
        if e.family == AF_INET6 {
            let v6 = Ipv6Addr::from(*raw);
            // A v4-mapped address is an IPv4 peer on a dual-stack socket: show it as IPv4.
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        } else {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        }
    };
    Endpoints {
        local: addr(&e.saddr),
        lport: e.sport,
        remote: addr(&e.daddr),
        rport: e.dport,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(e: &Event) -> Vec<u8> {
        // SAFETY: Event is plain old data.
        unsafe { std::slice::from_raw_parts((e as *const Event).cast::<u8>(), size_of::<Event>()) }
            .to_vec()
    }

    #[test]
    fn decodes_a_v4_mapped_transition_as_ipv4() {
        let mut e = Event::zeroed();
        e.kind = EventKind::Transition as u8;
        e.family = AF_INET6;
        e.pid_tgid = (10u64 << 32) | 11;
        e.comm[..5].copy_from_slice(b"nginx");
        e.saddr[10] = 0xff;
        e.saddr[11] = 0xff;
        e.saddr[12..].copy_from_slice(&[127, 0, 0, 1]);
        e.daddr[15] = 1; // ::1
        e.sport = 80;
        let r = decode(&raw(&e)).unwrap();
        assert_eq!(
            r.task,
            Task {
                pid: 10,
                tid: 11,
                comm: "nginx".into(),
                thread_comm: None,
                ..Default::default()
            }
        );
        let Decoded::Transition(StateChange { ends, sk_flags, .. }) = r.what else {
            panic!()
        };
        assert_eq!(ends.local, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(ends.remote, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(sk_flags, None);
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert!(decode(&[0u8; 8]).is_none());
        let mut e = Event::zeroed();
        e.kind = 200;
        assert!(decode(&raw(&e)).is_none());
    }
}
