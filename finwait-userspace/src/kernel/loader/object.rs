//! The embedded eBPF object, created with its maps sized and its globals written: for tracing
//! (from the options and this kernel's layouts), or for `snapshot` (every map at its smallest).
use anyhow::{Context, Result, bail};
use aya::{Ebpf, EbpfLoader};
use finwait_common::{
    EVENTS_MAP, FilterConfig, KernelOffsets, MAX_COMMS, MAX_PORTS, OWNERS_MAP, TRACED_PIDS_MAP,
};

use super::{LoadError, Options, layouts::Layouts};
use crate::kernel::arch;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/finwait.bpf.o"));

/// The embedded object, or a clear error when this build has none (build.rs embeds an empty
/// one where the BPF toolchain is missing, so that a clone checks and unit-tests like any Rust
/// project).
pub(super) fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!(
            "this build has no eBPF programs: it was built without the BPF toolchain. \
             Run `cargo xtask build` (it installs the toolchain with `cargo xtask setup`)."
        );
    }
    Ok(OBJECT)
}

/// aya-log-ebpf's ring for the programs' diagnostics (aya-log keeps the name private).
const DIAGNOSTICS_MAP: &str = "AYA_LOGS";

/// Wake userspace once this fraction of the ring is used; the timer drains the rest.
const WAKEUP_FRACTION: u32 = 4;

/// Creates the maps and writes the globals; the programs are loaded as they are attached.
pub(super) fn for_tracing(
    opts: &Options,
    layouts: &Layouts,
    diagnostics: bool,
) -> Result<Ebpf, LoadError> {
    // The programs need no CO-RE relocation (offsets come from userspace): the kernel BTF that
    // `EbpfLoader::new()` parses is dropped before loading, and parsed again afterwards for the
    // BTF tracepoint and fentry, so two copies (about 19 MB each) are never alive at once.
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    // aya-log-ebpf's level, in read-only data: at 0 its every check is a constant false to the
    // verifier, which removes the logging it guards. Nothing writes the ring then: one page.
    let log_level = if diagnostics {
        u8::from(aya_log::Level::Warn)
    } else {
        loader.map_max_entries(DIAGNOSTICS_MAP, page_size());
        0
    };
    loader
        .override_global(aya_log::LEVEL, &log_level, true)
        .override_global("STATE_TP", &layouts.state, true)
        .override_global("OTHER_TP", &layouts.other, true)
        .override_global("SYSCALL_REGS", &arch::HOST.regs, true)
        .override_global("OFFSETS", &layouts.offsets.unwrap_or_default(), true)
        .override_global("FILTER", &filter_config(opts), true)
        .map_max_entries(EVENTS_MAP, opts.ring_bytes)
        .map_max_entries(OWNERS_MAP, opts.owners_max.max(1))
        .load(object().map_err(LoadError::Other)?)
        .context("loading the eBPF programs")
        .map_err(LoadError::classify)
}

/// The object for the socket inventory alone: every map at its smallest.
pub(super) fn for_inventory(offsets: &KernelOffsets) -> Result<Ebpf> {
    let page = page_size();
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    for map in [
        OWNERS_MAP,
        TRACED_PIDS_MAP,
        "IN_CALL",
        "RECVMSG",
        "CONNECTING",
    ] {
        loader.map_max_entries(map, 1);
    }
    loader
        .map_max_entries(EVENTS_MAP, page)
        .map_max_entries(DIAGNOSTICS_MAP, page)
        .override_global(aya_log::LEVEL, &0u8, true)
        .override_global("OFFSETS", offsets, true)
        .load(object()?)
        .context("loading the eBPF object")
}

/// What the programs forward, from the options.
fn filter_config(opts: &Options) -> FilterConfig {
    // More ports than the kernel filter holds: userspace alone filters.
    let ports_in_kernel: &[u16] = if opts.ports.len() <= MAX_PORTS {
        &opts.ports
    } else {
        &[]
    };
    let mut ports = [0u16; MAX_PORTS];
    ports[..ports_in_kernel.len()].copy_from_slice(ports_in_kernel);
    let mut comms = [[0u8; 16]; MAX_COMMS];
    for (slot, name) in comms.iter_mut().zip(&opts.comms) {
        slot[..name.len()].copy_from_slice(name.as_bytes());
    }
    FilterConfig {
        all_transitions: u32::from(opts.all_transitions),
        pid_filter: u32::from(opts.following()),
        wakeup_bytes: opts.ring_bytes / WAKEUP_FRACTION,
        comm_count: opts.comms.len().min(MAX_COMMS) as u32,
        port_count: ports_in_kernel.len() as u32,
        close_ends: u32::from(close_ends()),
        comms,
        ports,
    }
}

/// Does a close that leaves other references read the socket's ends? Not before Linux 6.1:
/// the reads cost 5.10's verifier 2-2.5 s more for each of close, dup2 and dup3 under emulation
/// (with `-v` it gave up: 1,000,001 instructions after 160-208 s); 6.18 and 7.2 take them.
pub(super) fn close_ends() -> bool {
    !crate::kernel::release_before(&crate::kernel::release(), (6, 1))
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}
