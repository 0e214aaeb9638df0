//! Loads the embedded eBPF object with this kernel's layouts and attaches its programs: the
//! steps in order, and what came of them.
//!
//! Every optional feature is probed: a missing tracepoint or BTF turns a feature off with a
//! message, never a crash. Only the state tracepoint and close()/shutdown() are required.
use anyhow::{Context, Result};
use aya::Ebpf;
use finwait_common::KernelOffsets;

pub(crate) use super::load_error::LoadError;

mod attach;
mod hooks;
mod kinds;
mod layouts;
mod maps;
mod object;
mod sizing;

pub(crate) use kinds::{CallHook, Mode, StateHook, SyscallHook};
pub(crate) use maps::OwnerSeeder;
pub(crate) use sizing::Sizes;

/// What to load: which processes, ports and transitions the programs forward, how calls are
/// tied to sockets, and the sizes of the kernel's maps.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    /// `--all`: every transition, not only the close path's.
    pub(crate) all_transitions: bool,
    /// Processes to follow (with their descendants); empty with `comms` empty: everything.
    pub(crate) pids: Vec<u32>,
    /// Process names to follow (with their descendants).
    pub(crate) comms: Vec<String>,
    /// `--port`: only sockets with one of these local or remote ports (empty: all); the kernel
    /// drops the others' transitions.
    pub(crate) ports: Vec<u16>,
    /// Size of the ring buffer the events come through (None: from the host's CPUs).
    pub(crate) ring_bytes: Option<u32>,
    /// Attach programs that only return, at the same hooks (the benchmark's floor).
    pub(crate) noop: bool,
    pub(crate) mode: Mode,
    /// Size of the kernel's ownership map (None: from the host's sockets).
    pub(crate) owners_max: Option<u32>,
    /// Preallocate the hash maps even where the kernel can allocate their entries by need (a
    /// test compares the two).
    pub(crate) prealloc: bool,
    /// `-v`: the programs log their diagnostics (aya-log); off, the verifier removes that code.
    pub(crate) diagnostics: bool,
}

impl Options {
    /// `--pid` or `--comm`: only some processes are followed.
    pub(crate) fn following(&self) -> bool {
        !self.pids.is_empty() || !self.comms.is_empty()
    }
}

/// Something the load could not do the way it prefers, and what that costs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Degraded {
    pub(crate) note: String,
    /// It costs only the events the kernel skips a program for while another BPF program is
    /// running on the same CPU: material where programs run preemptibly (Linux 7.x), where
    /// that happens under load; elsewhere (a program nested by an interrupt) rare, and a
    /// detail for `-v`. Skips are counted either way.
    pub(crate) nesting_only: bool,
}

impl Degraded {
    /// A note that says what the user will not see.
    pub(crate) fn loss(note: String) -> Self {
        Self {
            note,
            nesting_only: false,
        }
    }

    /// A note about skips under nesting (see `nesting_only`).
    pub(crate) fn nesting(note: String) -> Self {
        Self {
            note,
            nesting_only: true,
        }
    }
}

pub(crate) struct Loaded {
    pub(crate) ebpf: Ebpf,
    /// fd -> socket resolution is on (BTF offsets found).
    pub(crate) offsets: Option<KernelOffsets>,
    /// What is off, and what it costs.
    pub(crate) degraded: Vec<Degraded>,
    pub(crate) attached: usize,
    pub(crate) attach_failed: usize,
    /// The kernel skips a program for itself and counts it (`recursion_misses`, Linux 5.12),
    /// probed once on the state hook: where it does not, `kernel_skipped_nested` means nothing
    /// and no second copy is loaded.
    pub(crate) skips_counted: bool,
    /// The mode that runs: `Precise` or `Correlated` (`Auto` has been decided).
    pub(crate) mode: Mode,
    /// How TCP state changes are hooked.
    pub(crate) state_hook: StateHook,
    /// Precise mode's hook on tcp_close/tcp_shutdown; None in correlated mode.
    pub(crate) call_hook: Option<CallHook>,
    /// How syscalls are hooked: the guarded pairs on the syscall wrappers, the classic syscall
    /// tracepoints, or some of each.
    pub(crate) syscall_hook: SyscallHook,
    /// Why precise mode is off (auto mode on a kernel that refuses both hooks).
    pub(crate) precise_unavailable: Option<String>,
    /// The programs log their diagnostics (`-v`, and the kernel accepted them).
    pub(crate) diagnostics: bool,
    /// Why the kernel's socket inventory is not loaded (the holders then come from /proc).
    pub(crate) inventory_refused: Option<String>,
    /// The maps' sizes, and how their entries are allocated.
    pub(crate) sizes: Sizes,
}

/// Loads and attaches; with `-v`, a kernel that refuses the programs with their diagnostics in
/// gets them without, and a warning: `-v` never stops tracing.
pub(crate) fn load(opts: &Options) -> Result<Loaded, LoadError> {
    if !opts.diagnostics {
        return load_with(opts, false);
    }
    match load_with(opts, true) {
        Err(refused) => {
            let mut loaded = load_with(opts, false)?;
            loaded.degraded.push(Degraded::loss(format!(
                "-v: the programs did not load with their kernel diagnostics ({}); tracing \
                 without them",
                refused.brief()
            )));
            Ok(loaded)
        }
        loaded => loaded,
    }
}

fn load_with(opts: &Options, diagnostics: bool) -> Result<Loaded, LoadError> {
    maps::raise_memlock();
    let tracefs = layouts::find_tracefs()?;
    let mut degraded = Vec::new();
    let layouts = layouts::layouts(&tracefs, &mut degraded)?;
    let by_need = !opts.prealloc && sizing::by_need_allowed(&crate::kernel::release());
    let sizes = sizing::sizes(opts, &sizing::Host::read(), by_need);
    let mut ebpf = object::for_tracing(opts, &sizes, &layouts, diagnostics)?;
    let btf = aya::Btf::from_sys_fs().ok();
    maps::seed_pids(&mut ebpf, opts).map_err(LoadError::classify)?;

    // FINWAIT_FORCE_TRACEPOINT=1 keeps the classic hook (tests compare both; also a diagnosis aid).
    let force_classic = env_is_1("FINWAIT_FORCE_TRACEPOINT");
    let btf_ok = layouts.offsets.is_some_and(|o| o.state_btf == 1) && !force_classic;
    let mut programs = hooks::Programs {
        noop: opts.noop,
        seconds: true,
    };
    let state_btf = btf.as_ref().filter(|_| btf_ok);
    let state_hook = attach::attach_state_hook(&mut ebpf, &mut programs, state_btf, &mut degraded)?;
    let calls = attach::attach_call_hooks(&mut ebpf, programs, opts.mode, btf.as_ref())?;
    // FINWAIT_FORCE_SYSCALL_TRACEPOINTS=1 keeps only the syscall hooks classic (the bench
    // compares the two).
    let classic_syscalls = force_classic || env_is_1("FINWAIT_FORCE_SYSCALL_TRACEPOINTS");
    let wrappers = btf.as_ref().filter(|_| !classic_syscalls && !opts.noop);
    let table = attach::attach_table(&mut ebpf, programs, wrappers, &mut degraded)?;
    let inventory_refused = load_inventory(&mut ebpf, layouts.offsets, btf.as_ref()).err();
    drop(btf);
    if programs.seconds {
        degraded.extend(attach::second_programs_missing(&ebpf));
    }
    if !opts.ports.is_empty() && !object::close_ends() {
        degraded.push(Degraded::loss(
            "before Linux 6.1 the kernel side does not read the ends of a close that sends no \
             FIN: one whose ends finwait has not seen is not matched against --port"
                .into(),
        ));
    }
    // Loading parsed megabytes of BTF that are free now: give them back to the system. glibc's
    // malloc keeps them until asked; musl's (the static release build's) returns them itself.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
    Ok(Loaded {
        ebpf,
        offsets: layouts.offsets,
        degraded,
        // The state hook, then the table's.
        attached: 1 + table.attached,
        attach_failed: table.failed,
        skips_counted: programs.seconds,
        mode: calls.mode,
        state_hook,
        call_hook: calls.hook,
        syscall_hook: table.syscall_hook(),
        precise_unavailable: calls.precise_unavailable,
        diagnostics,
        inventory_refused,
        sizes,
    })
}

fn env_is_1(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

/// Loads the socket inventory program; Err: why it cannot run here.
fn load_inventory(
    ebpf: &mut Ebpf,
    offsets: Option<KernelOffsets>,
    btf: Option<&aya::Btf>,
) -> Result<(), String> {
    if offsets.is_none_or(|o| o.inventory == 0) {
        return Err("this kernel's BTF lacks a field it reads".into());
    }
    let btf = btf.ok_or("no kernel BTF")?;
    super::inventory::load(ebpf, btf).map_err(|e| format!("{e:#}"))
}

/// The object with only the socket inventory loaded (for `snapshot`): every map at its
/// smallest, nothing attached.
pub(crate) fn load_inventory_only() -> Result<Ebpf> {
    maps::raise_memlock();
    let offsets = super::btf::kernel_offsets()?;
    let mut ebpf = object::for_inventory(&offsets)?;
    // The attach point's id alone; the whole BTF if that fails.
    let btf = super::inventory::attach_point_btf()
        .or_else(|_| aya::Btf::from_sys_fs().context("reading the kernel's BTF"))?;
    load_inventory(&mut ebpf, Some(offsets), Some(&btf)).map_err(anyhow::Error::msg)?;
    Ok(ebpf)
}
