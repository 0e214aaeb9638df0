//! Precise mode: fentry on tcp_close and tcp_shutdown, else kprobes, both functions or neither;
//! and so the mode that runs.
use anyhow::Result;
use aya::{
    Ebpf,
    programs::{FEntry, KProbe},
};

use super::{LoadError, hook_refusal, program, unload};
use crate::kernel::loader::{
    hooks::{PRECISE_FUNCTIONS, Programs},
    kinds::{CallHook, Mode},
};

/// What `--mode` came to on this kernel.
pub(in crate::kernel::loader) struct CallHooks {
    /// The mode that runs: `Precise` or `Correlated`.
    pub(in crate::kernel::loader) mode: Mode,
    /// Precise mode's hook on tcp_close/tcp_shutdown.
    pub(in crate::kernel::loader) hook: Option<CallHook>,
    /// Why precise mode is off (auto mode on a kernel that refuses both hooks).
    pub(in crate::kernel::loader) precise_unavailable: Option<String>,
}

/// Precise mode where asked and allowed: the hook on tcp_close/tcp_shutdown, or why there is none.
pub(in crate::kernel::loader) fn attach_call_hooks(
    ebpf: &mut Ebpf,
    programs: Programs,
    mode: Mode,
    btf: Option<&aya::Btf>,
) -> Result<CallHooks, LoadError> {
    let correlated = |precise_unavailable| CallHooks {
        mode: Mode::Correlated,
        hook: None,
        precise_unavailable,
    };
    if mode == Mode::Correlated {
        return Ok(correlated(None));
    }
    match attach_precise(ebpf, programs, btf) {
        Ok(hook) => Ok(CallHooks {
            mode: Mode::Precise,
            hook: Some(hook),
            precise_unavailable: None,
        }),
        Err(why) if mode == Mode::Precise => Err(LoadError::PreciseUnavailable { why }),
        Err(why) => Ok(correlated(Some(format!(
            "precise hooks unavailable ({why})"
        )))),
    }
}

/// Fentry, else kprobes. Returns the hook kind, or why neither works (e.g. no CONFIG_KPROBES,
/// fentry refused).
fn attach_precise(
    ebpf: &mut Ebpf,
    programs: Programs,
    btf: Option<&aya::Btf>,
) -> Result<CallHook, String> {
    let mut why = Vec::new();
    // FINWAIT_FORCE_KPROBE=1 skips fentry (tests run both hooks where the kernel has both).
    let force_kprobe = std::env::var_os("FINWAIT_FORCE_KPROBE").is_some_and(|v| v == "1");
    match btf.filter(|_| !force_kprobe) {
        Some(btf) => match attach_pair(ebpf, programs, CallHook::Fentry, |ebpf, prog, func| {
            attach_fentry(ebpf, programs, prog, func, btf)
        }) {
            Ok(()) => return Ok(CallHook::Fentry),
            Err(e) => why.push(format!("fentry: {}", hook_refusal(e))),
        },
        None if force_kprobe => why.push("fentry: skipped (FINWAIT_FORCE_KPROBE=1)".into()),
        None => why.push("fentry: no kernel BTF".into()),
    }
    match attach_pair(ebpf, programs, CallHook::Kprobe, |ebpf, prog, func| {
        let p: &mut KProbe = program(ebpf, prog)?.try_into()?;
        p.load()?;
        p.attach(func, 0)?;
        Ok(())
    }) {
        Ok(()) => Ok(CallHook::Kprobe),
        Err(e) => {
            why.push(format!("kprobe: {}", hook_refusal(e)));
            Err(why.join("; "))
        }
    }
}

/// A call hook's program and its second copy as fentry on `func`.
fn attach_fentry(
    ebpf: &mut Ebpf,
    programs: Programs,
    prog: &str,
    func: &str,
    btf: &aya::Btf,
) -> Result<()> {
    let fentry = |ebpf: &mut Ebpf, prog: &str| -> Result<()> {
        let p: &mut FEntry = program(ebpf, prog)?.try_into()?;
        p.load(func, btf)?;
        p.attach()?;
        Ok(())
    };
    // A trampoline runs the newest program first: the second copy goes in first. It is
    // optional; `second_programs_missing` says so if it did not load.
    if let Some(second) = programs.second_program(prog) {
        let _ = fentry(ebpf, second);
    }
    fentry(ebpf, prog)
}

/// Attaches the hook for both functions, or unloads what it attached and fails.
/// `attach_one(ebpf, program, function)`.
fn attach_pair(
    ebpf: &mut Ebpf,
    programs: Programs,
    kind: CallHook,
    attach_one: impl Fn(&mut Ebpf, &str, &str) -> Result<()>,
) -> Result<()> {
    for (i, (func, call)) in PRECISE_FUNCTIONS.iter().enumerate() {
        if let Err(e) = attach_one(ebpf, &programs.call_hook(call, kind), func) {
            for (_, done) in &PRECISE_FUNCTIONS[..=i] {
                let first = programs.call_hook(done, kind);
                let second = programs.second_program(&first);
                for name in std::iter::once(first.as_str()).chain(second) {
                    unload(ebpf, name);
                }
            }
            return Err(e.context(*func));
        }
    }
    Ok(())
}
