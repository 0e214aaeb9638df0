//! Attaching the programs: the three strategies (the state hook, precise mode's call hooks, the
//! table's tracepoints and syscall wrappers) and what they share.
use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{FEntry, FExit, KProbe, TracePoint},
};
use finwait_common::GUARDED;

use super::{Degraded, LoadError};

mod precise;
mod state;
mod table;

pub(super) use precise::attach_call_hooks;
pub(super) use state::attach_state_hook;
pub(super) use table::attach_table;

/// Attaches a program to a classic tracepoint.
fn tracepoint(ebpf: &mut Ebpf, prog: &str, category: &str, name: &str) -> Result<()> {
    let p: &mut TracePoint = program(ebpf, prog)?.try_into()?;
    // One program may serve several tracepoints: load it once.
    if p.fd().is_err() {
        p.load()?;
    }
    p.attach(category, name)?;
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))
}

/// Unloads a program, which detaches it.
fn unload(ebpf: &mut Ebpf, name: &str) {
    let Some(p) = ebpf.program_mut(name) else {
        return;
    };
    // Unloading detaches: no half-attached pair is left behind.
    if let Ok(p) = <&mut FEntry>::try_from(&mut *p) {
        let _ = p.unload();
    } else if let Ok(p) = <&mut FExit>::try_from(&mut *p) {
        let _ = p.unload();
    } else if let Ok(p) = <&mut KProbe>::try_from(p) {
        let _ = p.unload();
    }
}

/// Why the kernel refused a hook, in a few words.
fn hook_refusal(e: anyhow::Error) -> String {
    match LoadError::classify(e) {
        LoadError::Other(e) => e.root_cause().to_string(),
        refusal => refusal.brief(),
    }
}

/// Does this kernel skip a tracing program for itself (its per-program recursion guard, Linux
/// 5.12, which came with `recursion_misses` in the program's info)? `loaded`: any loaded program.
pub(super) fn skips_for_itself(ebpf: &Ebpf, loaded: &str) -> bool {
    ebpf.program(loaded)
        .and_then(|p| p.fd().ok())
        .is_some_and(|fd| {
            crate::kernel::prog_stats::recursion_misses(std::os::fd::AsFd::as_fd(fd)).is_some()
        })
}

/// The guarded hooks whose first program is loaded and second is not: what the kernel skips
/// the first for is lost there (counted).
pub(super) fn second_programs_missing(ebpf: &Ebpf) -> Vec<Degraded> {
    let loaded = |name: &str| ebpf.program(name).is_some_and(|p| p.fd().is_ok());
    GUARDED
        .iter()
        .filter(|(first, second)| loaded(first) && !loaded(second))
        .map(|(first, second)| {
            Degraded::nesting(format!(
                "{second} did not load: an event the kernel skips {first} for (it was already \
                 running on that CPU) is lost, and counted in kernel_skipped_nested"
            ))
        })
        .collect()
}
