//! A syscall hook's programs: the classic sys_enter/sys_exit tracepoint program, and the guarded
//! pair on the syscall wrapper, `__x64_sys_*` or `__arm64_sys_*` (fentry for an enter, fexit for
//! an exit), that userspace prefers where the kernel has it. A classic tracepoint is skipped while any BPF program holds
//! the CPU's `bpf_prog_active`, which from Linux 7.0 includes a preempted one; the pair is
//! skipped only for itself, and its second program catches that (see `guard`).
//!
//! The bodies read the call's arguments and return value through [`SyscallArgs`], whichever
//! program runs them.
use aya_ebpf::programs::TracePointContext;
use finwait_common::Site;

use crate::{
    SYSCALL_REGS,
    read::{config, field, read},
};

/// Where a syscall's arguments and return value come from: a classic sys_enter/sys_exit
/// tracepoint's record, or the `struct pt_regs` that the syscall wrapper (`__x64_sys_*`,
/// `__arm64_sys_*`) receives, at its fentry/fexit.
pub(crate) trait SyscallArgs {
    fn arg(&self, site: Site, n: u32) -> Option<i64>;
    /// The return value (exits only); -1 if unreadable.
    fn ret(&self, site: Site) -> i64;
}

impl SyscallArgs for TracePointContext {
    /// 8-byte slots from offset 16 on every kernel.
    #[inline(always)]
    fn arg(&self, site: Site, n: u32) -> Option<i64> {
        field::<i64>(self, site, 16 + 8 * n)
    }

    /// At offset 16 of every sys_exit record.
    #[inline(always)]
    fn ret(&self, site: Site) -> i64 {
        field::<i64>(self, site, 16).unwrap_or(-1)
    }
}

/// At a syscall wrapper's fentry: the user registers it gets (`struct pt_regs *`).
pub(crate) struct Regs(pub(crate) u64);

impl SyscallArgs for Regs {
    #[inline(always)]
    fn arg(&self, site: Site, n: u32) -> Option<i64> {
        // Where the architecture's registers are in `struct pt_regs` (userspace's `arch`).
        let offset = *config(&SYSCALL_REGS).args.get(n as usize)?;
        read::<i64>(site, self.0, u64::from(offset))
    }

    /// An entry has none.
    #[inline(always)]
    fn ret(&self, _site: Site) -> i64 {
        -1
    }
}

/// At a syscall wrapper's fexit: what it returned (exits read no argument).
pub(crate) struct Returned(pub(crate) i64);

impl SyscallArgs for Returned {
    #[inline(always)]
    fn arg(&self, _site: Site, _n: u32) -> Option<i64> {
        None
    }

    #[inline(always)]
    fn ret(&self, _site: Site) -> i64 {
        self.0
    }
}

/// A syscall's guarded pair on its wrapper `$func`, the programs named `$first` and `$second`.
/// `$func` (x86-64's) only names the section: userspace loads the pair for the running
/// architecture's wrapper (its `arch` table), and writes where that one's registers are.
/// `enter`: `$body(args, site, flags)` at the fentry, for the thread's call; `exit`:
/// `$body(args, site)` at the fexit (a repeated exit finds its thread's call gone, so it needs
/// no flag).
macro_rules! syscall_pair {
    (enter $first:ident, $second:ident, $func:literal => $body:expr) => {
        guarded! {
            #[::aya_ebpf::macros::fentry(function = $func)]
            fn $first, $second(ctx: ::aya_ebpf::programs::FEntryContext) {
                let regs = $crate::syscall::Regs(ctx.arg(0));
            }
            mark call;
            run |site, flags| ($body)(&regs, site, flags);
        }
    };
    (exit $first:ident, $second:ident, $func:literal => $body:expr) => {
        guarded! {
            #[::aya_ebpf::macros::fexit(function = $func)]
            fn $first, $second(ctx: ::aya_ebpf::programs::FExitContext) {
                // Only the return value (after the wrapper's one argument): an exit needs no
                // argument, and 5.10's BTF types some wrappers' `regs` as a bare declaration,
                // which its verifier refuses to read.
                let ret = $crate::syscall::Returned(ctx.arg(1));
            }
            mark call;
            run |site, _| ($body)(&ret, site);
        }
    };
}

/// Each syscall hook three times: the classic tracepoint program `$tp` (flags 0 for an enter),
/// and the guarded pair (`syscall_pair!`).
macro_rules! syscall_hooks {
    ($($kind:ident $tp:ident, $first:ident, $second:ident, $func:literal => $body:expr;)*) => {$(
        syscall_hooks!(@tp $kind $tp $body);
        syscall_pair!($kind $first, $second, $func => $body);
    )*};
    (@tp enter $tp:ident $body:expr) => {
        #[::aya_ebpf::macros::tracepoint]
        fn $tp(ctx: ::aya_ebpf::programs::TracePointContext) -> u32 {
            const SITE: ::finwait_common::Site = ::finwait_common::Site::of(stringify!($tp));
            ($body)(&ctx, SITE, 0);
            0
        }
    };
    (@tp exit $tp:ident $body:expr) => {
        #[::aya_ebpf::macros::tracepoint]
        fn $tp(ctx: ::aya_ebpf::programs::TracePointContext) -> u32 {
            const SITE: ::finwait_common::Site = ::finwait_common::Site::of(stringify!($tp));
            ($body)(&ctx, SITE);
            0
        }
    };
}
