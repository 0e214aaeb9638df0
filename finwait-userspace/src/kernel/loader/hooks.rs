//! The hook table: which program attaches where, which hooks tracing cannot start without, what
//! is lost without each of the others, and which program stands in for which.
use finwait_common::{GUARD_STATE, GUARDED};

use super::kinds::CallHook;
use crate::kernel::arch;

/// A tracepoint finwait attaches one of its programs to.
pub(super) struct Hook {
    pub(super) program: &'static str,
    pub(super) category: &'static str,
    pub(super) tracepoint: &'static str,
    /// Tracing cannot start without it.
    pub(super) required: bool,
    /// What is lost when an optional hook cannot be attached (said in the degraded notes).
    pub(super) lost_without: &'static str,
}

const fn required(category: &'static str, tracepoint: &'static str) -> Hook {
    Hook {
        program: tracepoint,
        category,
        tracepoint,
        required: true,
        lost_without: "",
    }
}

const fn optional(
    category: &'static str,
    tracepoint: &'static str,
    lost_without: &'static str,
) -> Hook {
    Hook {
        program: tracepoint,
        category,
        tracepoint,
        required: false,
        lost_without,
    }
}

impl Hook {
    /// The syscall a `syscalls` hook follows (`close` for `sys_enter_close`).
    pub(super) fn syscall(&self) -> Option<&'static str> {
        if self.category != "syscalls" {
            return None;
        }
        let name = self.tracepoint;
        name.strip_prefix("sys_enter_")
            .or_else(|| name.strip_prefix("sys_exit_"))
    }
}

/// A syscall that hands its caller an fd to an existing socket (one program for all of them).
const fn new_fd(tracepoint: &'static str, lost_without: &'static str) -> Hook {
    Hook {
        program: "sys_exit_new_fd",
        ..optional("syscalls", tracepoint, lost_without)
    }
}

const CLOSE_RANGE_LOST: &str = "close_range() causes will show as unknown";
const DUP_LOST: &str = "dup2()/dup3() causes will show as unknown";
const EXIT_LOST: &str = "process-exit causes will show as unknown";
const FORK_LOST: &str = "--pid will not follow children forked from now on";
const RESET_LOST: &str = "resets will not be told apart";
const OWNER_LOST: &str = "owners of sockets obtained through it are looked up in /proc instead";

/// Every tracepoint but the state hook (attached first, with its BTF alternative).
pub(super) const HOOKS: &[Hook] = &[
    required("syscalls", "sys_enter_close"),
    required("syscalls", "sys_exit_close"),
    required("syscalls", "sys_enter_shutdown"),
    required("syscalls", "sys_exit_shutdown"),
    optional("syscalls", "sys_enter_close_range", CLOSE_RANGE_LOST),
    optional("syscalls", "sys_exit_close_range", CLOSE_RANGE_LOST),
    optional("syscalls", "sys_enter_dup2", DUP_LOST),
    optional("syscalls", "sys_exit_dup2", DUP_LOST),
    optional("syscalls", "sys_enter_dup3", DUP_LOST),
    optional("syscalls", "sys_exit_dup3", DUP_LOST),
    optional("sched", "sched_process_exit", EXIT_LOST),
    optional("sched", "sched_process_fork", FORK_LOST),
    optional("tcp", "tcp_receive_reset", RESET_LOST),
    optional("tcp", "tcp_send_reset", RESET_LOST),
    // Ownership: where a task obtains an fd to a TCP socket.
    new_fd("sys_exit_accept4", OWNER_LOST),
    new_fd("sys_exit_accept", OWNER_LOST),
    // The note the former name match gave dup() (its name contains "dup"), kept as it was.
    new_fd("sys_exit_dup", DUP_LOST),
    new_fd("sys_exit_pidfd_getfd", OWNER_LOST),
    optional("syscalls", "sys_enter_connect", OWNER_LOST),
    optional("syscalls", "sys_exit_connect", OWNER_LOST),
    optional("syscalls", "sys_enter_recvmsg", OWNER_LOST),
    optional("syscalls", "sys_exit_recvmsg", OWNER_LOST),
];

/// The kernel functions precise mode hooks: every path that ends a TCP socket goes through them.
pub(super) const PRECISE_FUNCTIONS: [(&str, &str); 2] =
    [("tcp_close", "close"), ("tcp_shutdown", "shutdown")];

/// Which programs are attached: finwait's, or under `--bench-noop` programs that only return,
/// at the same hooks (the benchmark's floor: the cost of the hooks alone).
#[derive(Clone, Copy)]
pub(super) struct Programs {
    pub(super) noop: bool,
    /// The guarded hooks' second copies are loaded: only where the kernel skips a program for
    /// itself (its per-program recursion guard, Linux 5.12, set once the first program is in).
    /// Before that nothing is skipped for a second copy to catch, and each copy costs 5.10's
    /// verifier up to seconds.
    pub(super) seconds: bool,
}

impl Programs {
    pub(super) fn tracepoint(self, program: &'static str) -> &'static str {
        if self.noop {
            "noop_tracepoint"
        } else {
            program
        }
    }

    pub(super) fn state_btf(self) -> &'static str {
        if self.noop {
            "noop_state_btf"
        } else {
            GUARDED[GUARD_STATE as usize].0
        }
    }

    /// A guarded hook's second program, which catches what the kernel skipped `first` for.
    pub(super) fn second_program(self, first: &str) -> Option<&'static str> {
        GUARDED
            .iter()
            .find(|(f, _)| *f == first && !self.noop && self.seconds)
            .map(|(_, second)| *second)
    }

    /// `call` is close or shutdown.
    pub(super) fn call_hook(self, call: &str, kind: CallHook) -> String {
        let noop = if self.noop { "noop_" } else { "" };
        format!("{noop}tcp_{call}_{kind}")
    }
}

/// The guarded pair that stands in for a syscall tracepoint: fentry (for sys_enter_*) or fexit
/// (sys_exit_*) on the syscall's wrapper (`arch`), which receives the user registers. Skipped only
/// for itself (the second program catches that), where a classic tracepoint is skipped while
/// any BPF program holds the CPU: from Linux 7.0 that includes a preempted one.
pub(super) struct Wrapper {
    pub(super) first: &'static str,
    pub(super) second: &'static str,
    pub(super) function: String,
    pub(super) exit: bool,
}

impl Wrapper {
    /// The pair for a syscall hook (`GUARDED` names it after the tracepoint).
    pub(super) fn of(hook: &Hook) -> Option<Self> {
        let syscall = hook.syscall()?;
        let name = hook.tracepoint;
        let (first, second) = *GUARDED
            .iter()
            .find(|(first, _)| first.strip_suffix("_btf") == Some(name))?;
        Some(Self {
            first,
            second,
            function: format!("{}{syscall}", arch::HOST.wrapper_prefix),
            exit: name.starts_with("sys_exit_"),
        })
    }

    pub(super) fn kind(&self) -> &'static str {
        if self.exit { "fexit" } else { "fentry" }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::loader::object::object;

    /// Every program the loader may ask for, finwait's and the no-op set, is in the object.
    #[test]
    #[cfg_attr(
        finwait_no_ebpf,
        ignore = "built without the BPF toolchain: no eBPF object"
    )]
    fn the_object_has_every_program_the_loader_names() {
        let object = aya_obj::Object::parse(object().unwrap()).unwrap();
        for noop in [false, true] {
            let p = Programs {
                noop,
                seconds: true,
            };
            let mut names: Vec<String> = HOOKS
                .iter()
                .map(|h| p.tracepoint(h.program).to_string())
                .collect();
            names.push(p.tracepoint("inet_sock_set_state").into());
            names.push(p.state_btf().into());
            for (_, call) in PRECISE_FUNCTIONS {
                names.extend(CallHook::ALL.iter().map(|&kind| p.call_hook(call, kind)));
            }
            names.extend(
                names
                    .iter()
                    .filter_map(|n| p.second_program(n).map(String::from))
                    .collect::<Vec<_>>(),
            );
            for name in names {
                assert!(object.programs.contains_key(&name), "{name} (noop: {noop})");
            }
        }
    }

    #[test]
    #[cfg_attr(
        finwait_no_ebpf,
        ignore = "built without the BPF toolchain: no eBPF object"
    )]
    fn every_syscall_hook_has_its_wrapper_pair_in_the_object() {
        let object = aya_obj::Object::parse(object().unwrap()).unwrap();
        for h in HOOKS.iter().filter(|h| h.category == "syscalls") {
            let w =
                Wrapper::of(h).unwrap_or_else(|| panic!("{} has no wrapper pair", h.tracepoint));
            assert_eq!(
                w.exit,
                h.tracepoint.starts_with("sys_exit_"),
                "{}",
                h.tracepoint
            );
            assert!(
                w.function.starts_with(arch::HOST.wrapper_prefix),
                "{}",
                w.function
            );
            for name in [w.first, w.second] {
                assert!(object.programs.contains_key(name), "{name}");
            }
        }
        assert_eq!(
            Wrapper::of(&HOOKS[0]).map(|w| w.function),
            Some(format!("{}close", arch::HOST.wrapper_prefix))
        );
    }

    #[test]
    fn every_optional_hook_says_what_is_lost() {
        for h in HOOKS {
            assert_eq!(h.required, h.lost_without.is_empty(), "{}", h.tracepoint);
        }
    }
}
