//! The state hook, attached first: the BTF tracepoint where the kernel has what it reads, else
//! the classic one (required).
use anyhow::Result;
use aya::{Ebpf, programs::BtfTracePoint};

use super::{Degraded, LoadError, program, skips_for_itself, tracepoint};
use crate::kernel::loader::{hooks::Programs, kinds::StateHook};

/// The BTF tracepoint where the kernel has what it reads, else the classic one.
pub(in crate::kernel::loader) fn attach_state_hook(
    ebpf: &mut Ebpf,
    programs: &mut Programs,
    btf: Option<&aya::Btf>,
    degraded: &mut Vec<Degraded>,
) -> Result<StateHook, LoadError> {
    if let Some(btf) = btf {
        match attach_btf(ebpf, programs.state_btf(), btf) {
            Ok(()) => {
                programs.seconds = skips_for_itself(ebpf, programs.state_btf());
                // A tracepoint runs its programs in attach order: the second copy goes in
                // second. It is optional; `second_programs_missing` says so if it did not load.
                if let Some(second) = programs.second_program(programs.state_btf()) {
                    let _ = attach_btf(ebpf, second, btf);
                }
                return Ok(StateHook::TpBtf);
            }
            Err(e) => degraded.push(Degraded::nesting(format!(
                "the BTF tracepoint for TCP state changes is unavailable ({}); using the classic \
                 tracepoint, which the kernel skips while another BPF program runs on the same CPU \
                 (counted as kernel_skipped_nested)",
                LoadError::classify(e).brief()
            ))),
        }
    }
    let classic = programs.tracepoint("inet_sock_set_state");
    tracepoint(ebpf, classic, "sock", "inet_sock_set_state")
        .map_err(|e| LoadError::required("sock:inet_sock_set_state", e))?;
    programs.seconds = skips_for_itself(ebpf, classic);
    Ok(StateHook::Tracepoint)
}

fn attach_btf(ebpf: &mut Ebpf, prog: &str, btf: &aya::Btf) -> Result<()> {
    let p: &mut BtfTracePoint = program(ebpf, prog)?.try_into()?;
    p.load("inet_sock_set_state", btf)?;
    p.attach()?;
    Ok(())
}
