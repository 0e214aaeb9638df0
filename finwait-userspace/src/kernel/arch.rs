//! What differs between the architectures finwait is built for, as data, in one place: the
//! syscall wrappers' names, where their `pt_regs` hold the arguments, and syscall numbers.
use finwait_common::SyscallRegs;

/// One architecture's share of the kernel interface.
pub(crate) struct Arch {
    /// As `uname -m` says it (and the start line).
    pub(crate) name: &'static str,
    /// The syscall wrappers' prefix: `SYSCALL_DEFINE` makes `{prefix}close` and the like, each
    /// taking the user registers (`const struct pt_regs *`) as its one argument.
    pub(crate) wrapper_prefix: &'static str,
    /// Offsets in `struct pt_regs` of the syscall's first arguments (the eBPF programs read
    /// three at a wrapper's fentry).
    pub(crate) regs: SyscallRegs,
    /// Syscalls finwait hooks that this architecture does not have (no tracepoint, no wrapper):
    /// nothing is lost without them, so they are neither attached nor said to be missing.
    pub(crate) absent: &'static [&'static str],
    /// Numbers (as in /proc/PID/syscall) of the syscalls a server's threads block in.
    pub(crate) blocking: &'static [(i64, &'static str)],
}

/// x86-64: the arguments in di, si, dx (then r10, r8, r9), its own syscall table.
// Each build uses one table; the tests check both.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const X86_64: Arch = Arch {
    name: "x86_64",
    wrapper_prefix: "__x64_sys_",
    regs: SyscallRegs {
        args: [112, 104, 96],
        _pad: 0,
    },
    absent: &[],
    blocking: &[
        (0, "read"),
        (7, "poll"),
        (23, "select"),
        (35, "nanosleep"),
        (43, "accept"),
        (45, "recvfrom"),
        (47, "recvmsg"),
        (61, "wait4"),
        (202, "futex"),
        (230, "clock_nanosleep"),
        (232, "epoll_wait"),
        (270, "pselect6"),
        (271, "ppoll"),
        (281, "epoll_pwait"),
        (288, "accept4"),
        (426, "io_uring_enter"),
        (441, "epoll_pwait2"),
    ],
};

/// arm64: `struct pt_regs` opens with `regs[31]`, the arguments in x0..x5; the generic syscall
/// table (asm-generic/unistd.h), which has no dup2, poll, select or epoll_wait.
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
pub(crate) const AARCH64: Arch = Arch {
    name: "aarch64",
    wrapper_prefix: "__arm64_sys_",
    regs: SyscallRegs {
        args: [0, 8, 16],
        _pad: 0,
    },
    absent: &["dup2"],
    blocking: &[
        (22, "epoll_pwait"),
        (63, "read"),
        (72, "pselect6"),
        (73, "ppoll"),
        (98, "futex"),
        (101, "nanosleep"),
        (115, "clock_nanosleep"),
        (202, "accept"),
        (207, "recvfrom"),
        (212, "recvmsg"),
        (242, "accept4"),
        (260, "wait4"),
        (426, "io_uring_enter"),
        (441, "epoll_pwait2"),
    ],
};

/// The architecture this binary runs on.
#[cfg(target_arch = "x86_64")]
pub(crate) const HOST: &Arch = &X86_64;
#[cfg(target_arch = "aarch64")]
pub(crate) const HOST: &Arch = &AARCH64;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("finwait knows the syscall interface of x86-64 and arm64 only (kernel/arch.rs)");

impl Arch {
    /// The name of syscall `nr`, or `syscall NR` for one not in the table.
    pub(crate) fn syscall_name(&self, nr: i64) -> String {
        self.blocking
            .iter()
            .find(|(n, _)| *n == nr)
            .map_or_else(|| format!("syscall {nr}"), |(_, name)| (*name).to_string())
    }

    /// Whether this architecture has syscall `name` (one finwait hooks).
    pub(crate) fn has_syscall(&self, name: &str) -> bool {
        !self.absent.contains(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_what_the_binary_was_built_for() {
        assert_eq!(HOST.name, std::env::consts::ARCH);
    }

    #[test]
    fn each_reads_its_own_registers_and_numbers() {
        assert_eq!(X86_64.regs.args, [112, 104, 96]);
        assert_eq!(AARCH64.regs.args, [0, 8, 16]);
        assert_eq!(X86_64.syscall_name(232), "epoll_wait");
        assert_eq!(AARCH64.syscall_name(22), "epoll_pwait");
        assert_eq!(AARCH64.syscall_name(232), "syscall 232");
    }

    #[test]
    fn every_table_is_sorted_and_unique() {
        for arch in [&X86_64, &AARCH64] {
            assert!(
                arch.blocking.windows(2).all(|w| w[0].0 < w[1].0),
                "{}",
                arch.name
            );
        }
    }
}
