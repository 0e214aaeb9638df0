//! Loads the embedded eBPF object with this kernel's layouts and attaches its programs.
//!
//! Every optional feature is probed: a missing tracepoint or BTF turns a feature off with a
//! message, never a crash. Only the state tracepoint and close()/shutdown() are required.
use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{BtfTracePoint, FEntry, FExit, KProbe, TracePoint},
};
use finwait_common::{
    EVENTS_MAP, FilterConfig, GUARD_STATE, GUARDED, KernelOffsets, MAX_COMMS, MAX_PORTS,
    OWNERS_MAP, OtherTpLayout, OwnerRec, StateTpLayout, TRACED_PIDS_MAP, owner_flags,
};

pub(crate) use super::load_error::LoadError;
use super::{btf as kernel_btf, object::object, tracefs::Format};

/// aya-log-ebpf's ring for the programs' diagnostics (aya-log keeps the name private).
const DIAGNOSTICS_MAP: &str = "AYA_LOGS";

/// A tracepoint finwait attaches one of its programs to.
struct Hook {
    program: &'static str,
    category: &'static str,
    tracepoint: &'static str,
    /// Tracing cannot start without it.
    required: bool,
    /// What is lost when an optional hook cannot be attached (said in the degraded notes).
    lost_without: &'static str,
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
const HOOKS: &[Hook] = &[
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

pub(crate) struct Options {
    pub(crate) all_transitions: bool,
    /// Processes to follow (with their descendants); empty with `comms` empty: everything.
    pub(crate) pids: Vec<u32>,
    /// Process names to follow (with their descendants).
    pub(crate) comms: Vec<String>,
    pub(crate) ring_bytes: u32,
    pub(crate) wakeup_bytes: u32,
    /// Attach programs that only return, at the same hooks (the benchmark's floor).
    pub(crate) noop: bool,
    pub(crate) mode: Mode,
    /// `--port`: transitions of other sockets are dropped in the kernel.
    pub(crate) ports: Vec<u16>,
    /// Size of the kernel's ownership map.
    pub(crate) owners_max: u32,
    /// `-v`: the programs log their diagnostics (aya-log); off, the verifier removes that code.
    pub(crate) diagnostics: bool,
}

/// How calls are tied to the sockets they end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// Precise where the kernel allows it, else correlated.
    Auto,
    /// Hook tcp_close/tcp_shutdown (fentry, else kprobes); fail if the kernel refuses both.
    Precise,
    /// Syscall tracepoints only, matched to state changes by socket identity.
    Correlated,
}

/// The kernel functions precise mode hooks: every path that ends a TCP socket goes through them.
const PRECISE_FUNCTIONS: [(&str, &str); 2] = [("tcp_close", "close"), ("tcp_shutdown", "shutdown")];

pub(crate) struct Loaded {
    pub(crate) ebpf: Ebpf,
    /// fd -> socket resolution is on (BTF offsets found).
    pub(crate) offsets: Option<KernelOffsets>,
    /// Human-readable notes about features that are off, and why.
    pub(crate) degraded: Vec<String>,
    pub(crate) attached: usize,
    pub(crate) attach_failed: usize,
    /// How TCP state changes are hooked: "tp_btf" or "tracepoint".
    pub(crate) state_hook: &'static str,
    /// Precise mode: "fentry" or "kprobe" on tcp_close/tcp_shutdown; None: correlated mode.
    pub(crate) call_hook: Option<&'static str>,
    /// How syscalls are hooked: "fentry" (the guarded pairs on the syscall wrappers),
    /// "tracepoint" (the classic syscall tracepoints), or "mixed".
    pub(crate) syscall_hook: &'static str,
    /// Why precise mode is off (auto mode on a kernel that refuses both hooks).
    pub(crate) precise_unavailable: Option<String>,
    /// The programs log their diagnostics (`-v`, and the kernel accepted them).
    pub(crate) diagnostics: bool,
    /// Why the kernel's socket inventory is not loaded (the holders then come from /proc).
    pub(crate) inventory_refused: Option<String>,
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
            loaded.degraded.push(format!(
                "-v: the programs did not load with their kernel diagnostics ({}); tracing \
                 without them",
                refused.brief()
            ));
            Ok(loaded)
        }
        loaded => loaded,
    }
}

fn load_with(opts: &Options, diagnostics: bool) -> Result<Loaded, LoadError> {
    raise_memlock();
    let tracefs = find_tracefs()?;
    let mut degraded = Vec::new();
    let layouts = layouts(&tracefs, &mut degraded)?;
    let mut ebpf = load_object(opts, &layouts, diagnostics)?;
    let btf = aya::Btf::from_sys_fs().ok();
    seed_pids(&mut ebpf, opts).map_err(LoadError::classify)?;

    // FINWAIT_FORCE_TRACEPOINT=1 keeps the classic hook (tests compare both; also a diagnosis aid).
    let force_classic = std::env::var_os("FINWAIT_FORCE_TRACEPOINT").is_some_and(|v| v == "1");
    let btf_ok = layouts.offsets.is_some_and(|o| o.state_btf == 1) && !force_classic;
    let programs = Programs { noop: opts.noop };
    let state_btf = btf.as_ref().filter(|_| btf_ok);
    let state_hook = attach_state_hook(&mut ebpf, programs, state_btf, &mut degraded)?;
    let (call_hook, precise_unavailable) =
        attach_call_hooks(&mut ebpf, programs, opts.mode, btf.as_ref())?;
    // FINWAIT_FORCE_SYSCALL_TRACEPOINTS=1 keeps only the syscall hooks classic (the bench
    // compares the two).
    let classic_syscalls = force_classic
        || std::env::var_os("FINWAIT_FORCE_SYSCALL_TRACEPOINTS").is_some_and(|v| v == "1");
    let wrappers = btf.as_ref().filter(|_| !classic_syscalls && !opts.noop);
    let table = attach_table(&mut ebpf, programs, wrappers, &mut degraded)?;
    let inventory_refused = load_inventory(&mut ebpf, layouts.offsets, btf.as_ref()).err();
    drop(btf);
    degraded.extend(second_copies_missing(&ebpf));
    // Loading parsed megabytes of BTF that are free now: give them back to the system.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    Ok(Loaded {
        ebpf,
        offsets: layouts.offsets,
        degraded,
        // The state hook, then the table's.
        attached: 1 + table.attached,
        attach_failed: table.failed,
        state_hook,
        call_hook,
        syscall_hook: table.syscall_hook(),
        precise_unavailable,
        diagnostics,
        inventory_refused,
    })
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
    raise_memlock();
    let offsets = super::btf::kernel_offsets()?;
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
    let mut ebpf = loader
        .map_max_entries(EVENTS_MAP, page)
        .map_max_entries(DIAGNOSTICS_MAP, page)
        .override_global(aya_log::LEVEL, &0u8, true)
        .override_global("OFFSETS", &offsets, true)
        .load(object()?)
        .context("loading the eBPF object")?;
    // The attach point's id alone; the whole BTF if that fails.
    let btf = super::inventory::attach_point_btf()
        .or_else(|_| aya::Btf::from_sys_fs().context("reading the kernel's BTF"))?;
    load_inventory(&mut ebpf, Some(offsets), Some(&btf)).map_err(anyhow::Error::msg)?;
    Ok(ebpf)
}

/// This kernel's layouts, which the programs read as globals.
struct Layouts {
    state: StateTpLayout,
    other: OtherTpLayout,
    /// None: no usable BTF (fd -> socket resolution is off).
    offsets: Option<KernelOffsets>,
}

fn layouts(tracefs: &Path, degraded: &mut Vec<String>) -> Result<Layouts, LoadError> {
    let state = state_layout(tracefs).map_err(LoadError::classify)?;
    let other = other_layout(tracefs);
    let offsets = match kernel_btf::kernel_offsets() {
        Ok(o) => Some(o),
        Err(e) => {
            degraded.push(format!(
                "fd -> socket resolution is off ({e:#}); calls are matched to transitions per thread, \
                 and close() without FIN cannot be detected"
            ));
            None
        }
    };
    Ok(Layouts {
        state,
        other,
        offsets,
    })
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
        pid_filter: u32::from(following(opts)),
        wakeup_bytes: opts.wakeup_bytes,
        comm_count: opts.comms.len().min(MAX_COMMS) as u32,
        port_count: ports_in_kernel.len() as u32,
        comms,
        ports,
    }
}

/// `--pid` or `--comm`: only some processes are followed.
fn following(opts: &Options) -> bool {
    !opts.pids.is_empty() || !opts.comms.is_empty()
}

/// Creates the maps and writes the globals; the programs are loaded as they are attached.
fn load_object(opts: &Options, layouts: &Layouts, diagnostics: bool) -> Result<Ebpf, LoadError> {
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
        .override_global("OFFSETS", &layouts.offsets.unwrap_or_default(), true)
        .override_global("FILTER", &filter_config(opts), true)
        .map_max_entries(EVENTS_MAP, opts.ring_bytes)
        .map_max_entries(OWNERS_MAP, opts.owners_max.max(1))
        .load(object().map_err(LoadError::Other)?)
        .context("loading the eBPF programs")
        .map_err(LoadError::classify)
}

/// Precise mode where asked and allowed: the hook on tcp_close/tcp_shutdown, or why there is none.
fn attach_call_hooks(
    ebpf: &mut Ebpf,
    programs: Programs,
    mode: Mode,
    btf: Option<&aya::Btf>,
) -> Result<(Option<&'static str>, Option<String>), LoadError> {
    if mode == Mode::Correlated {
        return Ok((None, None));
    }
    match attach_precise(ebpf, programs, btf) {
        Ok(hook) => Ok((Some(hook), None)),
        Err(why) if mode == Mode::Precise => Err(LoadError::PreciseUnavailable { why }),
        Err(why) => Ok((None, Some(format!("precise hooks unavailable ({why})")))),
    }
}

/// What `attach_table` attached.
#[derive(Default)]
struct Table {
    attached: usize,
    failed: usize,
    /// Syscall hooks attached as the wrapper's pair, and as the classic tracepoint.
    wrapped: usize,
    classic_syscalls: usize,
}

impl Table {
    fn syscall_hook(&self) -> &'static str {
        match (self.wrapped, self.classic_syscalls) {
            (_, 0) => "fentry",
            (0, _) => "tracepoint",
            _ => "mixed",
        }
    }
}

/// Attaches every hook of the table: a syscall's as the guarded pair on its syscall wrapper
/// where `wrappers` (the kernel's BTF) allows, else the tracepoint. A required one that fails
/// ends the load; an optional one says what is lost.
fn attach_table(
    ebpf: &mut Ebpf,
    programs: Programs,
    wrappers: Option<&aya::Btf>,
    degraded: &mut Vec<String>,
) -> Result<Table, LoadError> {
    let mut t = Table::default();
    let mut wrappers = wrappers;
    // To check the wrappers' argument types before the verifier does (it only says EACCES).
    let types = wrappers.and_then(|_| kernel_btf::open().ok());
    // Hooks whose wrapper was refused, with the first reason.
    let mut refused: (Vec<&str>, Option<String>) = (Vec::new(), None);
    for hook in HOOKS {
        let (category, name) = (hook.category, hook.tracepoint);
        if let (Some(btf), Some(w)) = (wrappers, Wrapper::of(hook)) {
            match w.attach(ebpf, btf, types.as_ref()) {
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
                    refused.0.push(name);
                    let why = format!("the {} on {}: {}", w.kind(), w.function, hook_refusal(e));
                    refused.1.get_or_insert(why);
                }
            }
        }
        match attach(ebpf, programs.tracepoint(hook.program), category, name) {
            Ok(()) => {
                t.attached += 1;
                t.classic_syscalls += usize::from(category == "syscalls");
            }
            Err(e) if hook.required => {
                return Err(LoadError::required(&format!("{category}:{name}"), e));
            }
            Err(e) => {
                t.failed += 1;
                degraded.push(format!(
                    "{category}:{name} not attached ({}); {}",
                    LoadError::classify(e).brief(),
                    hook.lost_without
                ));
            }
        }
    }
    if let (names, Some(why)) = refused {
        let which = if wrappers.is_none() {
            "syscalls are".to_string()
        } else {
            format!("syscalls:{{{}}} are", names.join(","))
        };
        degraded.push(format!(
            "{which} hooked by their tracepoints, which the kernel skips while another BPF \
             program holds the CPU (counted in kernel_skipped_nested): the kernel refused {why}"
        ));
    }
    Ok(t)
}

/// The guarded pair that stands in for a syscall tracepoint: fentry (for sys_enter_*) or fexit
/// (sys_exit_*) on the syscall's x86-64 wrapper, which receives the user registers. Skipped only
/// for itself (the second program catches that), where a classic tracepoint is skipped while
/// any BPF program holds the CPU: from Linux 7.0 that includes a preempted one.
struct Wrapper {
    first: &'static str,
    second: &'static str,
    function: String,
    exit: bool,
}

impl Wrapper {
    /// The pair for a syscall hook (`GUARDED` names it after the tracepoint), on x86-64.
    fn of(hook: &Hook) -> Option<Self> {
        if !cfg!(target_arch = "x86_64") || hook.category != "syscalls" {
            return None;
        }
        let name = hook.tracepoint;
        let (exit, syscall) = match name.strip_prefix("sys_enter_") {
            Some(s) => (false, s),
            None => (true, name.strip_prefix("sys_exit_")?),
        };
        let (first, second) = *GUARDED
            .iter()
            .find(|(first, _)| first.strip_suffix("_btf") == Some(name))?;
        Some(Self {
            first,
            second,
            function: format!("__x64_sys_{syscall}"),
            exit,
        })
    }

    fn kind(&self) -> &'static str {
        if self.exit { "fexit" } else { "fentry" }
    }

    /// Both programs, the second first: a trampoline runs the newest program first. The second
    /// is optional; `second_copies_missing` says so if it did not load.
    fn attach(&self, ebpf: &mut Ebpf, btf: &aya::Btf, types: Option<&btf_rs::Btf>) -> Result<()> {
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
        let one = |ebpf: &mut Ebpf, prog: &str| -> Result<()> {
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
        };
        let _ = one(ebpf, self.second);
        one(ebpf, self.first).inspect_err(|_| {
            unload(ebpf, self.first);
            unload(ebpf, self.second);
        })
    }
}

/// Precise mode: fentry on tcp_close and tcp_shutdown, else kprobes; both functions or neither.
/// Returns the hook kind, or why neither works (e.g. no CONFIG_KPROBES, fentry refused).
fn attach_precise(
    ebpf: &mut Ebpf,
    programs: Programs,
    btf: Option<&aya::Btf>,
) -> Result<&'static str, String> {
    let mut why = Vec::new();
    // FINWAIT_FORCE_KPROBE=1 skips fentry (tests run both hooks where the kernel has both).
    let force_kprobe = std::env::var_os("FINWAIT_FORCE_KPROBE").is_some_and(|v| v == "1");
    match btf.filter(|_| !force_kprobe) {
        Some(btf) => match attach_pair(ebpf, programs, "fentry", |ebpf, prog, func| {
            let fentry = |ebpf: &mut Ebpf, prog: &str| -> Result<()> {
                let p: &mut FEntry = program(ebpf, prog)?.try_into()?;
                p.load(func, btf)?;
                p.attach()?;
                Ok(())
            };
            // A trampoline runs the newest program first: the second copy goes in first. It
            // is optional; `second_copies_missing` says so if it did not load.
            if let Some(second) = programs.second_copy(prog) {
                let _ = fentry(ebpf, second);
            }
            fentry(ebpf, prog)
        }) {
            Ok(()) => return Ok("fentry"),
            Err(e) => why.push(format!("fentry: {}", hook_refusal(e))),
        },
        None if force_kprobe => why.push("fentry: skipped (FINWAIT_FORCE_KPROBE=1)".into()),
        None => why.push("fentry: no kernel BTF".into()),
    }
    match attach_pair(ebpf, programs, "kprobe", |ebpf, prog, func| {
        let p: &mut KProbe = program(ebpf, prog)?.try_into()?;
        p.load()?;
        p.attach(func, 0)?;
        Ok(())
    }) {
        Ok(()) => Ok("kprobe"),
        Err(e) => {
            why.push(format!("kprobe: {}", hook_refusal(e)));
            Err(why.join("; "))
        }
    }
}

/// Why the kernel refused a precise hook, in a few words.
fn hook_refusal(e: anyhow::Error) -> String {
    match LoadError::classify(e) {
        LoadError::Other(e) => e.root_cause().to_string(),
        refusal => refusal.brief(),
    }
}

/// Attaches the hook for both functions, or unloads what it attached and fails.
/// `attach_one(ebpf, program, function)`.
fn attach_pair(
    ebpf: &mut Ebpf,
    programs: Programs,
    kind: &str,
    attach_one: impl Fn(&mut Ebpf, &str, &str) -> Result<()>,
) -> Result<()> {
    for (i, (func, call)) in PRECISE_FUNCTIONS.iter().enumerate() {
        if let Err(e) = attach_one(ebpf, &programs.call_hook(call, kind), func) {
            for (_, done) in &PRECISE_FUNCTIONS[..=i] {
                let first = programs.call_hook(done, kind);
                let second = programs.second_copy(&first);
                for name in std::iter::once(first.as_str()).chain(second) {
                    unload(ebpf, name);
                }
            }
            return Err(e.context(*func));
        }
    }
    Ok(())
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

/// The guarded hooks whose first program is loaded and second is not: what the kernel skips
/// the first for is lost there (counted).
fn second_copies_missing(ebpf: &Ebpf) -> Vec<String> {
    let loaded = |name: &str| ebpf.program(name).is_some_and(|p| p.fd().is_ok());
    GUARDED
        .iter()
        .filter(|(first, second)| loaded(first) && !loaded(second))
        .map(|(first, second)| {
            format!(
                "{second} did not load: an event the kernel skips {first} for (it was already \
                 running on that CPU) is lost, and counted in kernel_skipped_nested"
            )
        })
        .collect()
}

/// The BTF tracepoint where the kernel has what it reads, else the classic one.
fn attach_state_hook(
    ebpf: &mut Ebpf,
    programs: Programs,
    btf: Option<&aya::Btf>,
    degraded: &mut Vec<String>,
) -> Result<&'static str, LoadError> {
    if let Some(btf) = btf {
        match attach_btf(ebpf, programs.state_btf(), btf) {
            Ok(()) => {
                // A tracepoint runs its programs in attach order: the second copy goes in
                // second. It is optional; `second_copies_missing` says so if it did not load.
                if let Some(second) = programs.second_copy(programs.state_btf()) {
                    let _ = attach_btf(ebpf, second, btf);
                }
                return Ok("tp_btf");
            }
            Err(e) => degraded.push(format!(
                "the BTF tracepoint for TCP state changes is unavailable ({}); using the classic \
                 tracepoint, which the kernel skips while another BPF program runs on the same CPU \
                 (counted as kernel_skipped_nested)",
                LoadError::classify(e).brief()
            )),
        }
    }
    let classic = programs.tracepoint("inet_sock_set_state");
    attach(ebpf, classic, "sock", "inet_sock_set_state")
        .map_err(|e| LoadError::required("sock:inet_sock_set_state", e))?;
    Ok("tracepoint")
}

fn attach_btf(ebpf: &mut Ebpf, prog: &str, btf: &aya::Btf) -> Result<()> {
    let p: &mut BtfTracePoint = program(ebpf, prog)?.try_into()?;
    p.load("inet_sock_set_state", btf)?;
    p.attach()?;
    Ok(())
}

/// The tracefs mount. `ensure_mounted` words its failure without the errno, so the kernel is
/// asked once more: a mount point this process may not enter means missing privileges.
fn find_tracefs() -> Result<std::path::PathBuf, LoadError> {
    super::tracefs::ensure_mounted().map_err(|e| {
        let refused = [
            "/sys/kernel/tracing/events",
            "/sys/kernel/debug/tracing/events",
        ]
        .iter()
        .find_map(|p| match std::fs::metadata(p) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => Some(e),
            _ => None,
        });
        LoadError::classify(refused.map_or(e, anyhow::Error::new))
    })
}

fn attach(ebpf: &mut Ebpf, prog: &str, category: &str, name: &str) -> Result<()> {
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

/// Which programs are attached: finwait's, or under `--bench-noop` programs that only return,
/// at the same hooks (the benchmark's floor: the cost of the hooks alone).
#[derive(Clone, Copy)]
struct Programs {
    noop: bool,
}

impl Programs {
    fn tracepoint(self, program: &'static str) -> &'static str {
        if self.noop {
            "noop_tracepoint"
        } else {
            program
        }
    }

    fn state_btf(self) -> &'static str {
        if self.noop {
            "noop_state_btf"
        } else {
            GUARDED[GUARD_STATE as usize].0
        }
    }

    /// A guarded hook's second program, which catches what the kernel skipped `first` for.
    fn second_copy(self, first: &str) -> Option<&'static str> {
        GUARDED
            .iter()
            .find(|(f, _)| *f == first && !self.noop)
            .map(|(_, second)| *second)
    }

    /// `call` is close or shutdown, `kind` fentry or kprobe.
    fn call_hook(self, call: &str, kind: &str) -> String {
        let noop = if self.noop { "noop_" } else { "" };
        format!("{noop}tcp_{call}_{kind}")
    }
}

fn state_layout(tracefs: &Path) -> Result<StateTpLayout> {
    let f = Format::read(tracefs, "sock", "inet_sock_set_state")
        .context("finwait needs the sock:inet_sock_set_state tracepoint (Linux 4.16 or newer)")?;
    let off = |n: &str| f.field(n).map(|x| x.offset);
    let protocol = f.field("protocol")?;
    if !matches!(protocol.size, 1 | 2) {
        bail!(
            "unexpected size {} of inet_sock_set_state.protocol",
            protocol.size
        );
    }
    Ok(StateTpLayout {
        skaddr: off("skaddr")?,
        oldstate: off("oldstate")?,
        newstate: off("newstate")?,
        sport: off("sport")?,
        dport: off("dport")?,
        family: off("family")?,
        protocol: protocol.offset,
        protocol_size: protocol.size,
        saddr: off("saddr")?,
        daddr: off("daddr")?,
        saddr_v6: off("saddr_v6")?,
        daddr_v6: off("daddr_v6")?,
    })
}

fn other_layout(tracefs: &Path) -> OtherTpLayout {
    // A missing tracepoint makes its attach fail too, which is reported there.
    let field = |cat: &str, tp: &str, name: &str, default: u32| {
        Format::read(tracefs, cat, tp)
            .and_then(|f| f.field(name))
            .map_or(default, |f| f.offset)
    };
    OtherTpLayout {
        fork_child_pid: field("sched", "sched_process_fork", "child_pid", 20),
        send_reset_skaddr: field("tcp", "tcp_send_reset", "skaddr", 16),
        receive_reset_skaddr: field("tcp", "tcp_receive_reset", "skaddr", 8),
        _pad: 0,
    }
}

/// `--pid`, `--comm`: the processes named and every descendant that exists now; later ones
/// are added at fork.
fn seed_pids(ebpf: &mut Ebpf, opts: &Options) -> Result<()> {
    if !following(opts) {
        return Ok(());
    }
    let mut pids = opts.pids.clone();
    pids.extend(crate::host::procs::with_comm(&opts.comms));
    let mut map: BpfHashMap<&mut MapData, u32, u8> = BpfHashMap::try_from(
        ebpf.map_mut(TRACED_PIDS_MAP)
            .context("TRACED_PIDS map missing")?,
    )?;
    for pid in crate::host::procs::with_descendants(&pids) {
        map.insert(pid, 1, 0).context("seeding the pid filter")?;
    }
    Ok(())
}

/// Seeds the kernel's ownership map with holders found in /proc (sockets that existed before
/// finwait started), keyed by inode.
pub(crate) struct OwnerSeeder<'a> {
    map: BpfHashMap<&'a mut MapData, u64, OwnerRec>,
    /// Sockets that did not fit (the map was full).
    pub(crate) full: u64,
}

impl<'a> OwnerSeeder<'a> {
    pub(crate) fn new(ebpf: &'a mut Ebpf) -> Result<Self> {
        let map = BpfHashMap::try_from(ebpf.map_mut(OWNERS_MAP).context("OWNERS map missing")?)?;
        Ok(Self { map, full: 0 })
    }

    /// `followed`: the holder is one of the processes `--pid`/`--comm` follow.
    pub(crate) fn seed(&mut self, inode: u64, o: &crate::model::Owner, followed: bool) {
        let mut comm = [0u8; 16];
        let n = o.comm.len().min(15);
        comm[..n].copy_from_slice(&o.comm.as_bytes()[..n]);
        let rec = OwnerRec {
            inode,
            ts_ns: crate::host::clock::monotonic_ns(),
            tgid: o.pid,
            fd: o.fd,
            comm,
            flags: owner_flags::SEEDED | if followed { owner_flags::FOLLOWED } else { 0 },
            ..OwnerRec::zeroed()
        };
        self.full += u64::from(self.map.insert(inode, rec, 0).is_err());
    }
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

fn raise_memlock() {
    // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones ignore it. Failure
    // (no CAP_SYS_RESOURCE) is harmless on those.
    let r = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to a rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) };
}

/// Layouts as seen on each kernel the matrix runs: the format files under testdata/tracefs were
/// copied from Debian's 6.1 and 6.12 cloud kernels and this project's 6.18 host.
#[cfg(test)]
mod tests {
    use super::*;

    fn tracefs(kernel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/tracefs")
            .join(kernel)
    }

    const KERNELS: [&str; 3] = ["debian-6.1", "debian-6.12", "host-6.18"];

    /// Every program the loader may ask for, finwait's and the no-op set, is in the object.
    #[test]
    #[cfg_attr(
        finwait_no_ebpf,
        ignore = "built without the BPF toolchain: no eBPF object"
    )]
    fn the_object_has_every_program_the_loader_names() {
        let object = aya_obj::Object::parse(object().unwrap()).unwrap();
        for noop in [false, true] {
            let p = Programs { noop };
            let mut names: Vec<String> = HOOKS
                .iter()
                .map(|h| p.tracepoint(h.program).to_string())
                .collect();
            names.push(p.tracepoint("inet_sock_set_state").into());
            names.push(p.state_btf().into());
            for (_, call) in PRECISE_FUNCTIONS {
                names.extend(["fentry", "kprobe"].map(|kind| p.call_hook(call, kind)));
            }
            names.extend(
                names
                    .iter()
                    .filter_map(|n| p.second_copy(n).map(String::from))
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
            assert!(w.function.starts_with("__x64_sys_"), "{}", w.function);
            for name in [w.first, w.second] {
                assert!(object.programs.contains_key(name), "{name}");
            }
        }
        assert_eq!(
            Wrapper::of(&HOOKS[0]).map(|w| w.function),
            Some("__x64_sys_close".to_string())
        );
    }

    #[test]
    fn every_optional_hook_says_what_is_lost() {
        for h in HOOKS {
            assert_eq!(h.required, h.lost_without.is_empty(), "{}", h.tracepoint);
        }
    }

    #[test]
    fn state_layout_is_the_same_on_6_1_6_12_and_6_18() {
        for k in KERNELS {
            let l = state_layout(&tracefs(k)).unwrap();
            assert_eq!(
                (l.skaddr, l.oldstate, l.newstate, l.sport, l.dport, l.family),
                (8, 16, 20, 24, 26, 28),
                "{k}"
            );
            assert_eq!((l.protocol, l.protocol_size), (30, 2), "{k}");
            assert_eq!(
                (l.saddr, l.daddr, l.saddr_v6, l.daddr_v6),
                (32, 36, 40, 56),
                "{k}"
            );
        }
    }

    #[test]
    fn one_byte_protocol_is_accepted() {
        // Older kernels declare `__u8 protocol` (the classic hook then reads one byte).
        let dir = std::env::temp_dir().join(format!("finwait-u8-{}", std::process::id()));
        let tp = dir.join("events/sock/inet_sock_set_state");
        std::fs::create_dir_all(&tp).unwrap();
        let text = std::fs::read_to_string(
            tracefs("debian-6.1").join("events/sock/inet_sock_set_state/format"),
        )
        .unwrap()
        .replace(
            "__u16 protocol;\toffset:30;\tsize:2;",
            "__u8 protocol;\toffset:30;\tsize:1;",
        );
        std::fs::write(tp.join("format"), text).unwrap();
        let l = state_layout(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((l.protocol, l.protocol_size), (30, 1));
    }

    #[test]
    fn fork_child_pid_moved_in_6_18() {
        // sched_process_fork's comms became __data_loc strings, moving child_pid from 44 to 20.
        let seen: Vec<u32> = KERNELS
            .iter()
            .map(|k| other_layout(&tracefs(k)).fork_child_pid)
            .collect();
        assert_eq!(seen, [44, 44, 20]);
        for k in KERNELS {
            let o = other_layout(&tracefs(k));
            assert_eq!(
                (o.send_reset_skaddr, o.receive_reset_skaddr),
                (16, 8),
                "{k}"
            );
        }
    }

    /// The syscall programs read their arguments as 8-byte slots from offset 16: true everywhere.
    #[test]
    fn syscall_arguments_are_8_byte_slots_from_16() {
        for k in KERNELS {
            for (tp, args) in [
                ("sys_enter_close", &["fd"][..]),
                ("sys_enter_shutdown", &["fd", "how"]),
                ("sys_enter_close_range", &["fd", "max_fd", "flags"]),
                ("sys_enter_dup2", &["oldfd", "newfd"]),
                ("sys_enter_dup3", &["oldfd", "newfd", "flags"]),
                ("sys_exit_close", &["ret"]),
            ] {
                let f = Format::read(&tracefs(k), "syscalls", tp).unwrap();
                for (i, a) in args.iter().enumerate() {
                    let field = f.field(a).unwrap();
                    assert_eq!(
                        (field.offset, field.size),
                        (16 + 8 * i as u32, 8),
                        "{k} {tp} {a}"
                    );
                }
            }
        }
    }
}
