//! The hook table's hooks: a syscall's as the guarded pair on its syscall wrapper where the
//! kernel allows, else its tracepoint; every other hook as its tracepoint.
use anyhow::{Result, bail};
use aya::{
    Ebpf,
    programs::{FEntry, FExit},
};

use super::{Degraded, LoadError, hook_refusal, program, tracepoint, unload};
use crate::kernel::{
    arch, btf as kernel_btf,
    loader::{
        hooks::{HOOKS, Hook, Programs, Wrapper},
        kinds::SyscallHook,
    },
};

/// What `attach_table` attached.
#[derive(Default)]
pub(in crate::kernel::loader) struct Table {
    pub(in crate::kernel::loader) attached: usize,
    pub(in crate::kernel::loader) failed: usize,
    /// Syscall hooks attached as the wrapper's pair, and as the classic tracepoint.
    wrapped: usize,
    classic_syscalls: usize,
}

impl Table {
    pub(in crate::kernel::loader) fn syscall_hook(&self) -> SyscallHook {
        match (self.wrapped, self.classic_syscalls) {
            (_, 0) => SyscallHook::Fentry,
            (0, _) => SyscallHook::Tracepoint,
            _ => SyscallHook::Mixed,
        }
    }
}

/// Hooks whose wrapper was refused, with the first reason.
#[derive(Default)]
struct Refused {
    names: Vec<&'static str>,
    why: Option<String>,
}

impl Refused {
    /// The note for the degraded list; `all`: the wrappers were refused for every syscall.
    fn note(self, all: bool) -> Option<Degraded> {
        let why = self.why?;
        let which = if all {
            "syscalls are".to_string()
        } else {
            format!("syscalls:{{{}}} are", self.names.join(","))
        };
        Some(Degraded::nesting(format!(
            "{which} hooked by their tracepoints, which the kernel skips while another BPF \
             program holds the CPU (counted in kernel_skipped_nested): the kernel refused {why}"
        )))
    }
}

/// Attaches every hook of the table: a syscall's as the guarded pair on its syscall wrapper
/// where `wrappers` (the kernel's BTF) allows, else the tracepoint. A required one that fails
/// ends the load; an optional one says what is lost.
pub(in crate::kernel::loader) fn attach_table(
    ebpf: &mut Ebpf,
    programs: Programs,
    wrappers: Option<&aya::Btf>,
    degraded: &mut Vec<Degraded>,
) -> Result<Table, LoadError> {
    let mut t = Table::default();
    let mut wrappers = wrappers;
    // To check the wrappers' argument types before the verifier does (it only says EACCES).
    let types = wrappers.and_then(|_| kernel_btf::open().ok());
    let mut refused = Refused::default();
    // A syscall the architecture lacks (arm64 has no dup2) loses nothing.
    let present = HOOKS
        .iter()
        .filter(|h| h.syscall().is_none_or(|s| arch::HOST.has_syscall(s)));
    for hook in present {
        if let (Some(btf), Some(w)) = (wrappers, Wrapper::of(hook)) {
            match w.attach(ebpf, programs.seconds, btf, types.as_ref()) {
                Ok(()) => {
                    t.attached += 1;
                    t.wrapped += 1;
                    continue;
                }
                Err(e) => {
                    // The first refusal is the kernel's answer for all (no trampolines); later
                    // ones are the wrapper's (5.10's BTF types some `regs` as a bare declaration).
                    if t.wrapped == 0 {
                        wrappers = None;
                    }
                    refused.names.push(hook.tracepoint);
                    let why = format!("the {} on {}: {}", w.kind(), w.function, hook_refusal(e));
                    refused.why.get_or_insert(why);
                }
            }
        }
        attach_classic(ebpf, programs, hook, &mut t, degraded)?;
    }
    degraded.extend(refused.note(wrappers.is_none()));
    Ok(t)
}

/// A hook as its classic tracepoint.
fn attach_classic(
    ebpf: &mut Ebpf,
    programs: Programs,
    hook: &Hook,
    t: &mut Table,
    degraded: &mut Vec<Degraded>,
) -> Result<(), LoadError> {
    let (category, name) = (hook.category, hook.tracepoint);
    match tracepoint(ebpf, programs.tracepoint(hook.program), category, name) {
        Ok(()) => {
            t.attached += 1;
            t.classic_syscalls += usize::from(category == "syscalls");
        }
        Err(e) if hook.required => {
            return Err(LoadError::required(&format!("{category}:{name}"), e));
        }
        Err(e) => {
            t.failed += 1;
            degraded.push(Degraded::loss(format!(
                "{category}:{name} not attached ({}); {}",
                LoadError::classify(e).brief(),
                hook.lost_without
            )));
        }
    }
    Ok(())
}

impl Wrapper {
    /// Both programs (the second where `seconds`), the second first: a trampoline runs the
    /// newest program first. The second is optional; `second_programs_missing` says so if it
    /// did not load.
    fn attach(
        &self,
        ebpf: &mut Ebpf,
        seconds: bool,
        btf: &aya::Btf,
        types: Option<&btf_rs::Btf>,
    ) -> Result<()> {
        // An exit reads only the return value; an entry reads `regs`.
        if !self.exit
            && let Some(types) = types
            && !kernel_btf::first_param_is_struct(types, &self.function).unwrap_or(true)
        {
            bail!(
                "the kernel's BTF declares its `regs` without the struct (as 5.10's does for \
                 some syscalls), and the verifier will not let a program read it"
            );
        }
        if seconds {
            let _ = self.attach_one(ebpf, self.second, btf);
        }
        self.attach_one(ebpf, self.first, btf).inspect_err(|_| {
            unload(ebpf, self.first);
            unload(ebpf, self.second);
        })
    }

    /// One of the pair: fexit on the wrapper for an exit, fentry for an entry.
    fn attach_one(&self, ebpf: &mut Ebpf, prog: &str, btf: &aya::Btf) -> Result<()> {
        let func = self.function.as_str();
        if self.exit {
            let p: &mut FExit = program(ebpf, prog)?.try_into()?;
            p.load(func, btf)?;
            p.attach()?;
        } else {
            let p: &mut FEntry = program(ebpf, prog)?.try_into()?;
            p.load(func, btf)?;
            p.attach()?;
        }
        Ok(())
    }
}
