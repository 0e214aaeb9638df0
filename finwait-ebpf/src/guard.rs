//! Guarded pairs: a hook attached as two programs, the second catching the events the kernel
//! skipped the first for. Every pair comes from `guarded!`; `finwait_common::GUARDED` lists them
//! (first, second), the pair's slot being its index there.
//!
//! Why: the kernel skips a BPF_PROG_TYPE_TRACING program (BTF tracepoint, fentry, fexit) that is
//! already running on the CPU. A softirq's event lands in a task's run of the program, or, where
//! programs run preemptibly (Linux 7.0 on: x86 keeps only the full and lazy preemption models),
//! another task on the same CPU reaches the program while a preempted one is inside it. A copy
//! of the program attached to run after it (a tracepoint runs its programs in attach order, a
//! trampoline the newest first) is another program: the kernel runs it then, and it reports
//! what the first was skipped for.
//!
//! How the two tell apart what the first did: per CPU and pair, a [`Guard`]. The first
//! ([`first_run`]) counts itself in `running` for the length of its body, then writes the event
//! it finished into `last_a`/`last_b` (its [`Mark`]: `last_b` is never 0, so a cleared mark
//! matches nothing). The second ([`second_run`]) compares, and its outcome is a [`Second`]:
//! - the mark is this event's: [`Second::AlreadyDone`], the first finished it on this CPU. The
//!   mark is cleared, so that the same event again (a thread's next call at this hook has the
//!   same mark) is not taken for done if the first is skipped for it.
//! - the first is running on this CPU (`running` > 0): [`Second::Recovered`]. The kernel skips
//!   the first only while it runs on the CPU, so the second's report is one the first missed:
//!   counted (`counter::RECOVERED + slot`).
//! - else [`Second::MaybeDuplicate`]: the first was not running, and its mark names another
//!   event. Mostly a nested event overwrote the mark after the first finished this one (this
//!   task was preempted or interrupted between the two programs): the report may repeat the
//!   one sent. A transition carries `flags::MAYBE_DUPLICATE` then, by which userspace drops it
//!   if the same change of the same socket came just before (a socket cannot make one change
//!   twice in a row); so does a call's entry (below). A kernel call (precise mode) carries
//!   nothing: a duplicate is harmless, userspace keeps the thread's last one.
//!
//! A syscall pair ([`Mark::call`]: the event is the current thread's call at the hook) also
//! counts a `MaybeDuplicate` as recovered. There the kernel may have skipped the first while it
//! was not running: another task was preempted in the trampoline just before or after its body
//! (7.x preempts there), a window `running` cannot cover. The other case, a duplicate, is
//! harmless for a thread's syscall: an exit finds its call gone, a marked entry repeating the
//! call in progress is dropped by userspace. So the recovered count can exceed the skips by
//! those rare duplicates, never miss a recovery the way counting only `running` did (a loss
//! reported that was not one).
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::map, maps::PerCpuArray};
use finwait_common::{GUARDED, counter, flags};

use crate::event::count;

/// Per CPU and guarded pair, between its two programs.
#[repr(C)]
struct Guard {
    /// Runs of the first under way on this CPU (only the first writes it, and the kernel never
    /// runs it nested on one CPU: 0 or 1).
    running: u64,
    /// The event the first finished last on this CPU (`last_b` 0: none, or cleared).
    last_a: u64,
    last_b: u64,
}

#[map]
static GUARDS: PerCpuArray<Guard> = PerCpuArray::with_max_entries(GUARDED.len() as u32, 0);

/// An event as a pair's guard tells it from others.
#[derive(Clone, Copy)]
pub(crate) struct Mark {
    a: u64,
    /// Never 0 (a cleared mark matches nothing).
    b: u64,
    /// A syscall pair's: its `MaybeDuplicate` is counted as recovered too.
    call: bool,
}

impl Mark {
    /// An event of a kernel hook: its socket `a` and what happened `b` (never 0).
    #[inline(always)]
    pub(crate) const fn event(a: u64, b: u64) -> Self {
        Self { a, b, call: false }
    }

    /// The current thread's syscall at the pair of `slot`.
    #[inline(always)]
    pub(crate) fn call(slot: u32) -> Self {
        Self {
            a: bpf_get_current_pid_tgid(),
            b: slot as u64 + 1,
            call: true,
        }
    }
}

/// What the second program makes of an event (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Second {
    /// The first finished this event on this CPU: nothing to report.
    AlreadyDone,
    /// The first was skipped while it ran on this CPU: a report it missed, counted.
    Recovered,
    /// The first was not running: a report that may repeat one it sent (`MAYBE_DUPLICATE`).
    MaybeDuplicate,
}

impl Second {
    /// The flags of the second's report (`Event::flags`), or None: no report.
    #[inline(always)]
    pub(crate) fn report_flags(self) -> Option<u8> {
        match self {
            Second::AlreadyDone => None,
            Second::Recovered => Some(0),
            Second::MaybeDuplicate => Some(flags::MAYBE_DUPLICATE),
        }
    }
}

/// The first program of the pair of `slot`: `run` counted in `running`, then `mark` written as
/// the event it finished.
#[inline(always)]
pub(crate) fn first_run(slot: u32, mark: Mark, run: impl FnOnce()) {
    let guard = GUARDS.get_ptr_mut(slot);
    if let Some(g) = guard {
        // SAFETY: this CPU's slot; only this program writes `running`, and the kernel never
        // runs it nested on one CPU.
        unsafe { (*g).running += 1 };
    }
    run();
    if let Some(g) = guard {
        // SAFETY: as above.
        unsafe {
            (*g).running -= 1;
            (*g).last_a = mark.a;
            (*g).last_b = mark.b;
        }
    }
}

/// The second program of the pair of `slot`, for the event `mark`: what it makes of it, the
/// recovery counted.
#[inline(always)]
pub(crate) fn second_run(slot: u32, mark: Mark) -> Second {
    // A slot is a constant index below the map's size: the lookup does not fail.
    let Some(g) = GUARDS.get_ptr_mut(slot) else {
        return Second::AlreadyDone;
    };
    // SAFETY: this CPU's slot (see `first_run`).
    let running = unsafe {
        if (*g).last_a == mark.a && (*g).last_b == mark.b {
            (*g).last_b = 0;
            return Second::AlreadyDone;
        }
        (*g).running > 0
    };
    if running || mark.call {
        count(counter::RECOVERED + slot);
    }
    if running {
        Second::Recovered
    } else {
        Second::MaybeDuplicate
    }
}

/// A guarded pair: the first and the second program of a hook from one body.
///
/// ```ignore
/// guarded! {
///     /// Docs and the hook's attribute: both programs get them.
///     #[fentry(function = "tcp_close")]
///     fn tcp_close_fentry, tcp_close_fentry2(ctx: FEntryContext) {
///         let sk: u64 = ctx.arg(0);
///     }
///     mark event(sk, 1);
///     run |site, _flags| kernel_call(site, Call::Close, sk, 0);
/// }
/// ```
///
/// The block's statements run in both programs, before the guard; `mark` is the event
/// (`event(a, b)`: [`Mark::event`], `call`: [`Mark::call`]); `run` is the body, given the
/// running program's `Site` and its report's flags (0 in the first). The slot is the first's
/// in `GUARDED` (a build error if it is not there), each program's site its own name's.
macro_rules! guarded {
    (@mark $slot:ident call) => {
        $crate::guard::Mark::call($slot)
    };
    (@mark $slot:ident event($a:expr, $b:expr)) => {
        $crate::guard::Mark::event($a, $b)
    };
    (
        $(#[$attr:meta])*
        fn $first:ident, $second:ident($ctx:ident: $ctx_ty:ty) { $($setup:tt)* }
        mark $kind:ident $(($a:expr, $b:expr))?;
        run |$site:ident, $flags:pat_param| $body:expr $(;)?
    ) => {
        $(#[$attr])*
        fn $first($ctx: $ctx_ty) -> i32 {
            const SLOT: u32 = ::finwait_common::guard_slot(stringify!($first));
            const SITE: ::finwait_common::Site = ::finwait_common::Site::of(stringify!($first));
            $($setup)*
            let mark = guarded!(@mark SLOT $kind $(($a, $b))?);
            $crate::guard::first_run(SLOT, mark, || {
                let ($site, $flags) = (SITE, 0u8);
                $body;
            });
            0
        }

        $(#[$attr])*
        fn $second($ctx: $ctx_ty) -> i32 {
            const SLOT: u32 = ::finwait_common::guard_slot(stringify!($first));
            const SITE: ::finwait_common::Site = ::finwait_common::Site::of(stringify!($second));
            $($setup)*
            let mark = guarded!(@mark SLOT $kind $(($a, $b))?);
            if let Some($flags) = $crate::guard::second_run(SLOT, mark).report_flags() {
                let $site = SITE;
                $body;
            }
            0
        }
    };
}
