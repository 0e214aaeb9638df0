//! Types shared by the eBPF programs and userspace: the ring-buffer record, the load-time
//! configuration the programs read as globals, and the counters they keep.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of pointers, so both sides see the same bytes.
#![no_std]

/// What a record in the ring buffer describes.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `sock:inet_sock_set_state` for a TCP socket.
    Transition = 1,
    /// A syscall that may end or half-end a socket has started (`call`, `fd`, `arg`).
    CallEnter = 2,
    /// That syscall returned (`arg` holds the return value).
    CallExit = 3,
    /// A process's last thread exited (closes every fd it still held, without a syscall each).
    ProcessExit = 4,
    /// `tcp:tcp_receive_reset`: the peer reset this socket.
    ReceiveReset = 5,
    /// `tcp:tcp_send_reset`: this host reset the connection.
    SendReset = 6,
    /// Precise mode: the kernel's `tcp_close` or `tcp_shutdown` ran on `sock` in this task
    /// (`call` is Close or Shutdown; `arg` is shutdown's `how`). Whatever path dropped the last
    /// reference (close(), exit, io_uring, ...), this is the task that ended the socket.
    KernelCall = 7,
    /// A task obtained an fd (`fd`, in `owner`) to a socket already in CLOSE_WAIT: the peer's FIN
    /// came before accept() returned, so the CLOSE_WAIT transition could not name it.
    Obtained = 8,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Transition,
            2 => Self::CallEnter,
            3 => Self::CallExit,
            4 => Self::ProcessExit,
            5 => Self::ReceiveReset,
            6 => Self::SendReset,
            7 => Self::KernelCall,
            8 => Self::Obtained,
            _ => return None,
        })
    }
}

/// The syscalls we follow. Values are stable: they travel in [`Event::call`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    Shutdown = 1,
    Close = 2,
    CloseRange = 3,
    Dup2 = 4,
    Dup3 = 5,
}

impl Call {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Shutdown,
            2 => Self::Close,
            3 => Self::CloseRange,
            4 => Self::Dup2,
            5 => Self::Dup3,
            _ => return None,
        })
    }
}

/// `Event::flags` bits.
pub mod flags {
    /// `sock` was resolved from the caller's fd table (it is the socket behind `fd`).
    pub const SOCK_RESOLVED: u8 = 1 << 0;
    /// `file_refs` holds the raw reference count of the file behind `fd`.
    pub const REFS_VALID: u8 = 1 << 1;
    /// `sk_flags` holds `sock::sk_flags` as read at the transition.
    pub const SK_FLAGS_VALID: u8 = 1 << 2;
    /// `owner` holds the kernel's ownership record of `sock` (see [`super::OwnerRec`]).
    pub const OWNER_VALID: u8 = 1 << 3;
    /// ProcessExit: the exiting thread was its process's last (the process is gone).
    pub const GROUP_DEAD: u8 = 1 << 4;
    /// Transition, CallEnter: sent by a guarded pair's second program while the first was not
    /// running on the CPU, so the first may have sent it too (a nested event overwrote its
    /// mark): userspace drops a transition if the same change of the same socket came just
    /// before, a call's entry if it repeats the call in progress.
    pub const MAYBE_DUPLICATE: u8 = 1 << 5;
    /// CallEnter: `family`, the ports and the addresses hold the socket's ends, for a close that
    /// leaves other references (no transition will name them).
    pub const ENDS_VALID: u8 = 1 << 6;
}

/// `OwnerRec::flags` bits.
pub mod owner_flags {
    /// The recorded holder closed its fd while other references to the file remained (a forked
    /// child, a dup, a passed fd): someone else holds the socket now, the kernel cannot say who.
    pub const STALE: u32 = 1 << 0;
    /// The record was made by the process's main thread: its `comm` is the process's own name
    /// then (another thread's name is only the thread's).
    pub const MAIN_THREAD: u32 = 1 << 1;
    /// With `--pid`/`--comm`: the task that obtained the socket was followed then, or a followed
    /// task made a call on it since. Its transitions stay followed after that task exits (an
    /// orphan's FIN_WAIT2 in softirq).
    pub const FOLLOWED: u32 = 1 << 2;
}

/// `SocketFdRec::state` of an epoll fd (not a socket): `inode` and `netns` are 0.
pub const FD_EPOLL: u8 = 0xff;

/// One TCP socket fd of one process (or one of its epoll fds,
/// `state` [`FD_EPOLL`]), as the socket inventory
/// (`iter/task_file`) writes it: userspace reads these back to back from the iterator's file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketFdRec {
    /// The socket's inode (what sock_diag and /proc name it by).
    pub inode: u64,
    /// The socket's network namespace (its inode, `net:[INODE]`).
    pub netns: u32,
    pub tgid: u32,
    pub fd: u32,
    pub state: u8,
    pub _pad: [u8; 3],
    /// The task's name (the thread the iterator visited: the first of its process that holds
    /// this fd table).
    pub comm: [u8; 16],
}

/// Who holds a socket, recorded in the kernel when a task obtains an fd to it (accept, connect,
/// dup, an fd received over a unix socket, pidfd_getfd): the `OWNERS` map's value, copied into
/// each transition's record so the owner travels with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerRec {
    /// `bpf_get_current_cgroup_id()` of the task (cgroup v2 id; 0 where there is none).
    pub cgroup_id: u64,
    /// The socket's inode when the record was made: a record whose inode is not the socket's is
    /// of an earlier socket at the same address (its removal at CLOSE was missed).
    pub inode: u64,
    /// When the record was made (`bpf_ktime_get_ns`): a holder that exited after this and before
    /// a transition no longer holds the socket at that transition.
    pub ts_ns: u64,
    pub tgid: u32,
    pub fd: i32,
    pub comm: [u8; 16],
    pub flags: u32,
    pub _pad: u32,
}

impl OwnerRec {
    pub const fn zeroed() -> Self {
        Self {
            cgroup_id: 0,
            inode: 0,
            ts_ns: 0,
            tgid: 0,
            fd: 0,
            comm: [0; 16],
            flags: 0,
            _pad: 0,
        }
    }
}

/// One ring-buffer record. The same layout serves every [`EventKind`]; unused fields are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// `bpf_get_current_pid_tgid()`: tgid in the high half, tid in the low half.
    pub pid_tgid: u64,
    /// Kernel address of the `struct sock` (the tracepoint's `skaddr`, or the socket behind `fd`).
    pub sock: u64,
    /// The socket's inode (0 when unknown, or when it has no file any more: an orphan).
    pub inode: u64,
    /// CallEnter: the raw reference count of the file behind `fd` (see [`flags::REFS_VALID`]).
    pub file_refs: u64,
    /// Transition: `sock::sk_flags` (SOCK_DEAD, SOCK_DONE, ...), see [`flags::SK_FLAGS_VALID`].
    pub sk_flags: u64,
    /// `bpf_get_current_cgroup_id()` of the task that made the call or exited (records made
    /// in process context only; 0 in transitions, which run wherever the packet arrived).
    pub cgroup_id: u64,
    pub kind: u8,
    pub old_state: u8,
    pub new_state: u8,
    pub call: u8,
    /// AF_INET or AF_INET6 for transitions.
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub _pad: u8,
    /// CallEnter: the fd argument (close_range: the first fd; dup2/dup3: the replaced fd).
    pub fd: i32,
    /// CallEnter: `how` for shutdown, the last fd for close_range. CallExit: the return value.
    /// KernelCall: shutdown's `how`.
    pub arg: i64,
    /// IPv4 addresses use the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The current thread's name (`bpf_get_current_comm`); in a transition or a reset, that of
    /// whatever task the packet interrupted.
    pub comm: [u8; 16],
    /// Transition, CallEnter: the socket's ownership record (see [`flags::OWNER_VALID`]).
    pub owner: OwnerRec,
}

/// Both sides read and write these exact layouts (the ring record, and the `OWNERS` value that
/// userspace also seeds): a field added on one side only fails the build.
pub const EVENT_SIZE: usize = 184;
pub const OWNER_REC_SIZE: usize = 56;
const _: () = assert!(size_of::<Event>() == EVENT_SIZE);
const _: () = assert!(size_of::<OwnerRec>() == OWNER_REC_SIZE);
// The record embeds an OwnerRec at its end: no hidden padding before or after it.
const _: () = assert!(core::mem::offset_of!(Event, owner) + OWNER_REC_SIZE == EVENT_SIZE);

impl Event {
    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            pid_tgid: 0,
            sock: 0,
            inode: 0,
            file_refs: 0,
            sk_flags: 0,
            cgroup_id: 0,
            kind: 0,
            old_state: 0,
            new_state: 0,
            call: 0,
            family: 0,
            sport: 0,
            dport: 0,
            flags: 0,
            _pad: 0,
            fd: 0,
            arg: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            comm: [0; 16],
            owner: OwnerRec::zeroed(),
        }
    }
}

/// Byte offsets of the `sock:inet_sock_set_state` fields, read from its tracefs `format` file at
/// load time because they differ between kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateTpLayout {
    pub skaddr: u32,
    pub oldstate: u32,
    pub newstate: u32,
    pub sport: u32,
    pub dport: u32,
    pub family: u32,
    pub protocol: u32,
    /// 1 or 2 bytes, depending on the kernel.
    pub protocol_size: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr_v6: u32,
    pub daddr_v6: u32,
}

/// Offsets of the few fields read from other tracepoints, also from their `format` files.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OtherTpLayout {
    /// `sched:sched_process_fork` `child_pid`.
    pub fork_child_pid: u32,
    /// `tcp:tcp_send_reset` `skaddr`.
    pub send_reset_skaddr: u32,
    /// `tcp:tcp_receive_reset` `skaddr`.
    pub receive_reset_skaddr: u32,
    pub _pad: u32,
}

/// Where a syscall wrapper's `struct pt_regs` (the user registers, its one argument) holds the
/// syscall's first three arguments: the architecture's, written by userspace (its `arch`
/// table), so one eBPF object serves x86-64 and arm64.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallRegs {
    pub args: [u32; 3],
    pub _pad: u32,
}

/// Offsets into kernel structures, read from `/sys/kernel/btf/vmlinux` by userspace so the
/// programs can find the socket behind an fd without CO-RE. `valid == 0` disables every lookup
/// that needs them (the programs then fall back to per-thread correlation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub valid: u32,
    /// 1 when `file.f_ref` (file_ref_t, 6.13+: 0 means one reference) replaces `f_count`.
    pub file_ref_is_zero_based: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub file_f_inode: u32,
    pub file_count: u32,
    pub socket_sk: u32,
    pub socket_type: u32,
    pub sock_family: u32,
    pub sock_socket: u32,
    pub sock_flags: u32,
    /// `offsetof(struct socket_alloc, vfs_inode) - offsetof(struct socket_alloc, socket)`.
    pub socket_to_inode: i32,
    pub inode_ino: u32,
    pub inode_mode: u32,
    /// 1 when the fields below were found: the state hook can then be a BTF tracepoint, which
    /// reads the socket itself (and is only skipped when it interrupts itself).
    pub state_btf: u32,
    pub sock_protocol: u32,
    /// `inet_sock.inet_sport`: local port, network order (the bound port `skc_num` is already
    /// zeroed when a socket reaches CLOSE).
    pub inet_sport: u32,
    /// `skc_dport`: remote port, network order.
    pub sock_dport: u32,
    /// `inet_sock.inet_saddr`, as the classic tracepoint reports it.
    pub inet_saddr: u32,
    pub sock_daddr: u32,
    pub sock_v6_rcv_saddr: u32,
    pub sock_v6_daddr: u32,
    /// `task_struct.signal` and `signal_struct.live` (threads not yet exiting): a `--pid`
    /// target leaves the set when its last thread exits, not when its main thread does. 0: not
    /// found (then the main thread's exit ends it).
    pub task_signal: u32,
    pub signal_live: u32,
    /// 1 when the ends' offsets below (`inet_sport` .. `sock_v6_daddr`) were all found, with
    /// or without the BTF state hook's `sk_protocol` (a close that sends no FIN reads them).
    pub sock_ends: u32,
    /// `sock_common.skc_state` (one byte).
    pub sock_state: u32,
    /// For the socket inventory (`iter/task_file`): `task_struct.tgid`, `task_struct.comm`,
    /// `sock_common.skc_net` (the `struct net *`) and `net.ns.inum` (the namespace's inode).
    /// `inventory` is 1 when all four were found.
    pub inventory: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    pub sock_net: u32,
    pub net_ns_inum: u32,
    /// `file.f_path.dentry` and `dentry.d_name.name`: an anonymous inode's name tells an epoll
    /// fd (`[eventpoll]`), whose fdinfo lists what it watches.
    pub file_dentry: u32,
    pub dentry_name: u32,
}

/// How many `--comm` names the kernel matches.
pub const MAX_COMMS: usize = 4;

/// What the programs forward. Filtering in the kernel keeps uninteresting events out of the ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterConfig {
    /// 1: forward every TCP transition; 0: only those touching the close path.
    pub all_transitions: u32,
    /// 1: only calls and exits of tgids present in the `TRACED_PIDS` map (or matching `comms`).
    pub pid_filter: u32,
    /// Wake userspace once this many bytes wait in the ring (0: on every record).
    pub wakeup_bytes: u32,
    /// How many entries of `comms` are in use.
    pub comm_count: u32,
    /// How many entries of `ports` are in use (0: every port).
    pub port_count: u32,
    /// 1: a close that leaves other references reads the socket's ends (no transition will
    /// name them, and `--port` needs them). 0 where the verifier takes those reads slowly
    /// (5.10: seconds per program; with `-v`, over its million instructions).
    pub close_ends: u32,
    /// Process names (`comm`, NUL-padded) whose calls are followed, with their children.
    pub comms: [[u8; 16]; MAX_COMMS],
    /// `--port`: only transitions of sockets with one of these local or remote ports.
    pub ports: [u16; MAX_PORTS],
}

/// `--port` values the kernel filters on; with more, userspace alone filters.
pub const MAX_PORTS: usize = 8;

/// Loss counters, indexes into the `COUNTERS` array (one for all CPUs, added to atomically).
pub mod counter {
    /// A record could not be reserved in the ring buffer (it was full): the event is lost.
    pub const RING_FULL: u32 = 0;
    /// A `TRACED_PIDS` insert failed.
    pub const PID_INSERT_FAILED: u32 = 1;
    /// A read the programs needed failed: kernel memory (fd -> socket resolution, socket
    /// fields) or a field of a tracepoint's record. The event or detail it served is missing.
    pub const READ_FAILED: u32 = 2;
    /// The map of threads inside a forwarded call was full: that call's exit is not forwarded
    /// (userspace then keeps the call open until the thread makes its next one).
    pub const IN_CALL_FULL: u32 = 3;
    /// The ownership map was full: a socket obtained then has no owner record (userspace then
    /// verifies the owner through /proc).
    pub const OWNERS_FULL: u32 = 4;
    /// An fd received over a unix socket (SCM_RIGHTS) could not be recorded: more fds in one
    /// message than the program reads, or the message could not be read.
    pub const SCM_RIGHTS_UNREAD: u32 = 5;
    /// `RECOVERED + i`: events the first program of `super::GUARDED[i]` missed (the kernel
    /// skipped it: it was already running on that CPU, interrupted by a softirq or preempted)
    /// and the second caught. The first's skips less these are the events lost.
    pub const RECOVERED: u32 = 6;
    pub const COUNT: u32 = RECOVERED + super::GUARDED.len() as u32;
}

/// Map names, shared so a rename cannot split the two sides.
pub const EVENTS_MAP: &str = "EVENTS";
pub const COUNTERS_MAP: &str = "COUNTERS";
pub const TRACED_PIDS_MAP: &str = "TRACED_PIDS";
/// Socket -> [`OwnerRec`]. Keys are `struct sock` addresses, or (entries seeded by userspace from
/// the start-up snapshot) socket inode numbers: kernel addresses and inode numbers never collide.
pub const OWNERS_MAP: &str = "OWNERS";
/// Hooks attached as two programs, (first, second), guard slot = index: the kernel skips a
/// BPF_PROG_TYPE_TRACING program that is already running on the CPU (a softirq's event landing
/// in a task's run, or where programs run preemptibly, as from Linux 7.0, another task's on the
/// same CPU), so a second copy, run after the first, catches what the first was skipped for.
pub const GUARDED: [(&str, &str); 21] = [
    ("inet_sock_set_state_btf", "inet_sock_set_state_btf2"),
    ("tcp_close_fentry", "tcp_close_fentry2"),
    ("tcp_shutdown_fentry", "tcp_shutdown_fentry2"),
    // The syscall hooks on the syscall wrappers (fentry for enters, fexit for exits),
    // named after the classic tracepoint each replaces.
    ("sys_enter_shutdown_btf", "sys_enter_shutdown_btf2"),
    ("sys_exit_shutdown_btf", "sys_exit_shutdown_btf2"),
    ("sys_enter_close_btf", "sys_enter_close_btf2"),
    ("sys_exit_close_btf", "sys_exit_close_btf2"),
    ("sys_enter_close_range_btf", "sys_enter_close_range_btf2"),
    ("sys_exit_close_range_btf", "sys_exit_close_range_btf2"),
    ("sys_enter_dup2_btf", "sys_enter_dup2_btf2"),
    ("sys_exit_dup2_btf", "sys_exit_dup2_btf2"),
    ("sys_enter_dup3_btf", "sys_enter_dup3_btf2"),
    ("sys_exit_dup3_btf", "sys_exit_dup3_btf2"),
    ("sys_exit_accept4_btf", "sys_exit_accept4_btf2"),
    ("sys_exit_accept_btf", "sys_exit_accept_btf2"),
    ("sys_exit_dup_btf", "sys_exit_dup_btf2"),
    ("sys_exit_pidfd_getfd_btf", "sys_exit_pidfd_getfd_btf2"),
    ("sys_enter_connect_btf", "sys_enter_connect_btf2"),
    ("sys_exit_connect_btf", "sys_exit_connect_btf2"),
    ("sys_enter_recvmsg_btf", "sys_enter_recvmsg_btf2"),
    ("sys_exit_recvmsg_btf", "sys_exit_recvmsg_btf2"),
];
pub const GUARD_STATE: u32 = guard_slot("inet_sock_set_state_btf");
pub const GUARD_CLOSE: u32 = guard_slot("tcp_close_fentry");
pub const GUARD_SHUTDOWN: u32 = guard_slot("tcp_shutdown_fentry");

/// Where a diagnostic of the eBPF programs (aya-log, `-v`) comes from: the program that ran, as
/// a number the eBPF side puts first in the message and userspace replaces with the program's
/// name ([`Site::name`]). The programs of [`SITES`] are numbered by their place there; the
/// guarded pairs' follow, two each in [`GUARDED`]'s order (first, second).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Site(pub u8);

/// The programs outside guarded pairs that say where a loss happened (see [`Site`]).
pub const SITES: [&str; 22] = [
    "inet_sock_set_state",
    "sys_enter_shutdown",
    "sys_exit_shutdown",
    "sys_enter_close",
    "sys_exit_close",
    "sys_enter_close_range",
    "sys_exit_close_range",
    "sys_enter_dup2",
    "sys_exit_dup2",
    "sys_enter_dup3",
    "sys_exit_dup3",
    "sys_exit_new_fd",
    "sys_enter_connect",
    "sys_exit_connect",
    "sys_enter_recvmsg",
    "sys_exit_recvmsg",
    "sched_process_exit",
    "sched_process_fork",
    "tcp_receive_reset",
    "tcp_send_reset",
    "tcp_close_kprobe",
    "tcp_shutdown_kprobe",
];

// Every site fits its u8.
const _: () = assert!(SITES.len() + 2 * GUARDED.len() <= 256);

impl Site {
    /// The site of the program named `program` (a build error, in a constant, if it has none).
    pub const fn of(program: &str) -> Self {
        let mut i = 0;
        while i < SITES.len() {
            if str_eq(SITES[i], program) {
                return Self(i as u8);
            }
            i += 1;
        }
        let mut i = 0;
        while i < GUARDED.len() {
            if str_eq(GUARDED[i].0, program) {
                return Self((SITES.len() + 2 * i) as u8);
            }
            if str_eq(GUARDED[i].1, program) {
                return Self((SITES.len() + 2 * i + 1) as u8);
            }
            i += 1;
        }
        panic!("not a program with a diagnostic site")
    }

    /// The name of the program this site is, if it is one.
    pub const fn name(self) -> Option<&'static str> {
        let i = self.0 as usize;
        if i < SITES.len() {
            return Some(SITES[i]);
        }
        let (pair, first) = ((i - SITES.len()) / 2, (i - SITES.len()).is_multiple_of(2));
        if pair >= GUARDED.len() {
            return None;
        }
        Some(if first {
            GUARDED[pair].0
        } else {
            GUARDED[pair].1
        })
    }
}

/// The guard slot of the hook whose first program is `first` (a build error if it has none).
pub const fn guard_slot(first: &str) -> u32 {
    let mut i = 0;
    while i < GUARDED.len() {
        if str_eq(GUARDED[i].0, first) {
            return i as u32;
        }
        i += 1;
    }
    panic!("not a guarded hook's first program")
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Size of `OWNERS` as compiled; userspace sizes it from the host before load.
pub const OWNERS_MAX: u32 = 262_144;

/// Linux TCP states as the tracepoint reports them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;

    /// States of the close path: a transition into or out of one of these is worth reporting.
    pub const fn on_close_path(state: u8) -> bool {
        matches!(
            state,
            FIN_WAIT1 | FIN_WAIT2 | CLOSE_WAIT | LAST_ACK | CLOSING | TIME_WAIT
        )
    }

    /// What the default mode reports: the close path, and connections reset while established.
    /// (Closing a half-closed socket sets FIN_WAIT2 again: not a transition.)
    pub const fn worth_reporting(old: u8, new: u8) -> bool {
        old != new
            && (on_close_path(old) || on_close_path(new) || (old == ESTABLISHED && new == CLOSE))
    }
}

/// A TCP state, decoded once from the kernel's number: userspace matches on this, so the
/// compiler sees every state a match leaves out.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Established = tcp_state::ESTABLISHED,
    SynSent = tcp_state::SYN_SENT,
    SynRecv = tcp_state::SYN_RECV,
    FinWait1 = tcp_state::FIN_WAIT1,
    FinWait2 = tcp_state::FIN_WAIT2,
    TimeWait = tcp_state::TIME_WAIT,
    Close = tcp_state::CLOSE,
    CloseWait = tcp_state::CLOSE_WAIT,
    LastAck = tcp_state::LAST_ACK,
    Listen = tcp_state::LISTEN,
    Closing = tcp_state::CLOSING,
    NewSynRecv = tcp_state::NEW_SYN_RECV,
    /// A number this build does not know (a newer kernel's).
    Unknown = 0,
}

impl TcpState {
    /// Every known state, in the kernel's order.
    pub const ALL: [TcpState; 12] = [
        Self::Established,
        Self::SynSent,
        Self::SynRecv,
        Self::FinWait1,
        Self::FinWait2,
        Self::TimeWait,
        Self::Close,
        Self::CloseWait,
        Self::LastAck,
        Self::Listen,
        Self::Closing,
        Self::NewSynRecv,
    ];

    pub const fn from_u8(v: u8) -> Self {
        match v {
            tcp_state::ESTABLISHED => Self::Established,
            tcp_state::SYN_SENT => Self::SynSent,
            tcp_state::SYN_RECV => Self::SynRecv,
            tcp_state::FIN_WAIT1 => Self::FinWait1,
            tcp_state::FIN_WAIT2 => Self::FinWait2,
            tcp_state::TIME_WAIT => Self::TimeWait,
            tcp_state::CLOSE => Self::Close,
            tcp_state::CLOSE_WAIT => Self::CloseWait,
            tcp_state::LAST_ACK => Self::LastAck,
            tcp_state::LISTEN => Self::Listen,
            tcp_state::CLOSING => Self::Closing,
            tcp_state::NEW_SYN_RECV => Self::NewSynRecv,
            _ => Self::Unknown,
        }
    }

    /// `TCP_FIN_WAIT2` -> `FIN_WAIT2`: the names every output uses.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
            Self::Unknown => "UNKNOWN",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with explicit padding.
    unsafe impl aya::Pod for super::StateTpLayout {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::OtherTpLayout {}
    unsafe impl aya::Pod for super::SyscallRegs {}
    unsafe impl aya::Pod for super::FilterConfig {}
    unsafe impl aya::Pod for super::OwnerRec {}
    unsafe impl aya::Pod for super::SocketFdRec {}
}
