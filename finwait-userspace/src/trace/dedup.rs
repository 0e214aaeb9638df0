//! The guarded hooks' second reports, dropped where they repeat the first's: the stage between
//! decode and correlate, so the correlator only attributes.
//!
//! A guarded hook has two programs (docs/guarded-hooks.md). The second reports an event only
//! when the first did not finish it on that CPU; rarely that is because a nested event
//! overwrote the first's mark, and then both reported it. The kernel side marks those reports
//! (`maybe_duplicate`); what they may repeat is known here, from the records just before:
//! - a state change: the same (socket, old, new) among the last ones seen. A socket cannot make
//!   the same change twice in a row.
//! - a syscall entry: the call the thread has in progress (same call, fd and socket). After its
//!   exit, a marked entry is a new call whose first program was skipped.
//! - a precise-mode kernel call (tcp_close/tcp_shutdown): the same socket, call and `how` as the
//!   thread's last one not yet followed by a transition of that socket. Those reports carry no
//!   mark: a repeat of them is always harmless to drop.
use std::{collections::VecDeque, num::NonZeroUsize};

use finwait_common::{Call, TcpState};
use foldhash::fast::RandomState as FastHash;
use lru::LruCache;

use super::decode::{CallEnter, Decoded, Record, StateChange};

/// Threads remembered (LRU, as the correlator's).
const MAX_THREADS: usize = 65_536;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Every record decoded.
    pub(crate) records: u64,
    /// Second reports of one event, dropped.
    pub(crate) duplicates_dropped: u64,
    /// The state hook's marked reports that repeated nothing: recoveries the kernel side could
    /// not tell (the first program was skipped while another task was preempted around it).
    pub(crate) state_recovered_here: u64,
}

/// What a thread's next report may repeat.
#[derive(Clone, Copy, Debug, Default)]
struct Thread {
    /// The call in progress: (call, fd (None for a range), socket).
    call: Option<(Call, Option<i32>, Option<u64>)>,
    /// The last kernel call: (socket, call, how).
    kernel_call: Option<(u64, Call, Option<i32>)>,
}

pub(crate) struct Dedup {
    recent: VecDeque<(u64, TcpState, TcpState)>,
    threads: LruCache<u32, Thread, FastHash>,
    stats: Stats,
}

impl Default for Dedup {
    fn default() -> Self {
        Self::new()
    }
}

impl Dedup {
    /// Far more than the state changes that can nest between two programs on one CPU.
    const RECENT: usize = 256;

    pub(crate) fn new() -> Self {
        let threads = NonZeroUsize::new(MAX_THREADS).unwrap_or(NonZeroUsize::MIN);
        Self {
            recent: VecDeque::with_capacity(Self::RECENT),
            threads: LruCache::with_hasher(threads, FastHash::default()),
            stats: Stats::default(),
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether `rec` goes on to the correlator (false: a second report of an event, counted).
    pub(crate) fn keep(&mut self, rec: &Record) -> bool {
        self.stats.records += 1;
        let tid = rec.task.tid;
        let repeat = match &rec.what {
            Decoded::Transition(c) => self.state_change(tid, c),
            Decoded::CallEnter(e) => self.call_enter(tid, e),
            Decoded::CallExit { .. } | Decoded::ProcessExit { .. } => {
                if let Some(t) = self.threads.get_mut(&tid) {
                    t.call = None;
                }
                false
            }
            &Decoded::KernelCall { call, how, sock } => self.kernel_call(tid, (sock, call, how)),
            Decoded::ReceiveReset { .. } | Decoded::SendReset { .. } | Decoded::Obtained { .. } => {
                false
            }
        };
        self.stats.duplicates_dropped += u64::from(repeat);
        !repeat
    }

    fn state_change(&mut self, tid: u32, c: &StateChange) -> bool {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.kernel_call.take_if(|k| k.0 == c.sock);
        }
        let key = (c.sock, c.old, c.new);
        if c.maybe_duplicate && self.recent.contains(&key) {
            return true;
        }
        self.stats.state_recovered_here += u64::from(c.maybe_duplicate);
        if self.recent.len() == Self::RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(key);
        false
    }

    fn call_enter(&mut self, tid: u32, e: &CallEnter) -> bool {
        // close_range sends one record for the range, then one per socket it found.
        let per_fd = e.call == Call::CloseRange && e.sock.is_some();
        let range = e.call == Call::CloseRange && e.sock.is_none();
        let current = self.threads.peek(&tid).and_then(|t| t.call);
        let repeat = current.is_some_and(|(call, fd, sock)| {
            call == e.call && (per_fd || (fd.is_none_or(|fd| fd == e.fd) && sock == e.sock))
        });
        if e.maybe_duplicate && repeat {
            return true;
        }
        if !per_fd {
            self.thread(tid).call = Some((e.call, (!range).then_some(e.fd), e.sock));
        }
        false
    }

    fn kernel_call(&mut self, tid: u32, k: (u64, Call, Option<i32>)) -> bool {
        let t = self.thread(tid);
        if t.kernel_call == Some(k) {
            return true;
        }
        t.kernel_call = Some(k);
        false
    }

    fn thread(&mut self, tid: u32) -> &mut Thread {
        self.threads.get_or_insert_mut(tid, Thread::default)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::model::{Endpoints, Task};

    fn rec(tid: u32, what: Decoded) -> Record {
        Record {
            ts_ns: 1,
            task: Task {
                pid: 7,
                tid,
                comm: "srv".into(),
                thread_comm: None,
                ..Default::default()
            },
            what,
        }
    }
    fn change(sock: u64, old: TcpState, new: TcpState, marked: bool) -> Decoded {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        Decoded::Transition(StateChange {
            sock,
            old,
            new,
            ends: Endpoints {
                local: lo,
                lport: 80,
                remote: lo,
                rport: 5000,
            },
            sk_flags: None,
            inode: 0,
            owner: None,
            maybe_duplicate: marked,
        })
    }
    fn enter(call: Call, fd: i32, sock: u64, marked: bool) -> Decoded {
        Decoded::CallEnter(CallEnter {
            call,
            fd,
            arg: i64::from(fd),
            sock: Some(sock),
            inode: 0,
            file_refs: None,
            owner: None,
            ends: None,
            maybe_duplicate: marked,
        })
    }
    fn kept(d: &mut Dedup, tid: u32, what: Decoded) -> bool {
        d.keep(&rec(tid, what))
    }

    #[test]
    fn a_state_changes_second_report_is_dropped_and_a_recovery_kept() {
        use TcpState::*;
        let mut d = Dedup::new();
        assert!(kept(&mut d, 7, change(1, Established, FinWait1, false)));
        assert!(kept(&mut d, 7, change(2, Established, CloseWait, false)));
        // The second program's copy of the first change, after another socket's.
        assert!(!kept(&mut d, 7, change(1, Established, FinWait1, true)));
        // A marked change never reported before is the only report of it.
        assert!(kept(&mut d, 7, change(3, FinWait1, FinWait2, true)));
        // Unmarked, the same change again is the kernel's, not a copy.
        assert!(kept(&mut d, 7, change(1, Established, FinWait1, false)));
        let s = d.stats();
        assert_eq!((s.records, s.duplicates_dropped), (5, 1));
        assert_eq!(s.state_recovered_here, 1);
    }

    #[test]
    fn a_call_reported_by_both_syscall_programs_counts_once() {
        let mut d = Dedup::new();
        assert!(kept(&mut d, 7, enter(Call::Close, 5, 0xa, false)));
        assert!(!kept(&mut d, 7, enter(Call::Close, 5, 0xa, true)));
        // Another thread's call is its own.
        assert!(kept(&mut d, 8, enter(Call::Close, 5, 0xa, true)));
        let exit = Decoded::CallExit {
            call: Call::Close,
            ret: 0,
        };
        assert!(kept(&mut d, 7, exit));
        // After the return, a marked call is a new one (its first program was skipped).
        assert!(kept(&mut d, 7, enter(Call::Close, 5, 0xa, true)));
        assert_eq!(d.stats().duplicates_dropped, 1);
    }

    #[test]
    fn a_kernel_call_reported_twice_counts_once_until_its_socket_moves() {
        let mut d = Dedup::new();
        let close = |sock| Decoded::KernelCall {
            call: Call::Close,
            how: None,
            sock,
        };
        assert!(kept(&mut d, 7, close(0x10)));
        assert!(!kept(&mut d, 7, close(0x10)));
        // Another socket's is another call.
        assert!(kept(&mut d, 7, close(0x20)));
        let moved = change(0x20, TcpState::Established, TcpState::FinWait1, false);
        assert!(kept(&mut d, 7, moved));
        assert!(kept(&mut d, 7, close(0x20)));
        assert_eq!(d.stats().duplicates_dropped, 1);
    }
}
