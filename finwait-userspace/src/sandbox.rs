//! The tracer's own sandbox: once its programs are attached, a seccomp allow-list (every thread,
//! TSYNC) leaves it the system calls it still needs and refuses the rest with EPERM, so that a
//! compromise (through the `--metrics` endpoint, say) cannot write a file, load a BPF program,
//! execute anything or reach into another process. docs/sandbox.md says what stays possible.
//!
//! Landlock is not used: a Landlock domain also denies its process ptrace-mode access to every
//! process outside it, and so the /proc/PID/fd links and /proc/PID/ns/net that name socket
//! owners and reach other namespaces (EACCES, whatever rights the ruleset handles). The
//! no-write guarantee comes from refusing open() with a write flag instead.
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// Whether the sandbox is on, for the start line and event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    On,
    /// `--no-sandbox`.
    Disabled,
    /// The kernel or the architecture refused it: finwait goes on without.
    Unavailable(String),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::On => f.write_str("seccomp"),
            Self::Disabled => f.write_str("off (--no-sandbox)"),
            Self::Unavailable(why) => write!(f, "off ({why})"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("no seccomp filter for this architecture ({0})")]
    Arch(&'static str),
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("the kernel refused the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// Calls allowed whatever their arguments, each group with why finwait needs it after start.
const ALLOWED: &[(&str, &[libc::c_long])] = &[
    (
        "memory: the allocator (mmap and mprotect are below, without PROT_EXEC)",
        &[
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
        ],
    ),
    (
        "threads: the endpoint's, the owner scanner's, the short ones that enter a namespace",
        &[
            libc::SYS_futex,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    ),
    (
        "the tokio runtimes: readiness, wake-ups, timers",
        &[
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_pwait2,
            libc::SYS_eventfd2,
            libc::SYS_ppoll,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_clock_gettime,
            libc::SYS_gettimeofday,
            libc::SYS_getrandom,
        ],
    ),
    (
        "signals: SIGINT and SIGTERM end the run cleanly",
        &[
            libc::SYS_rt_sigaction,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
        ],
    ),
    (
        "reading /proc, /sys and the BPF iterator's fd (open() is below, read-only)",
        &[
            libc::SYS_read,
            libc::SYS_pread64,
            libc::SYS_readv,
            libc::SYS_close,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_getdents64,
            libc::SYS_readlinkat,
            libc::SYS_fcntl,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
            libc::SYS_uname,
            libc::SYS_getuid,
            libc::SYS_geteuid,
            libc::SYS_sysinfo,
            libc::SYS_getrusage,
        ],
    ),
    (
        "output (stdout, stderr, the demo's pipes) and the sockets: the endpoint's connections, \
         sock_diag's netlink",
        &[
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_recvfrom,
            libc::SYS_recvmsg,
            libc::SYS_accept4,
            libc::SYS_shutdown,
            libc::SYS_bind,
            libc::SYS_connect,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
        ],
    ),
    (
        "--demo: its workload processes are reaped at the end",
        &[libc::SYS_wait4, libc::SYS_waitid],
    ),
    (
        "top: the terminal's event source wakes on a pipe, and stderr is held in one while the \
         table is up (new fds, no file)",
        &[libc::SYS_pipe2, libc::SYS_dup, libc::SYS_dup3],
    ),
];

/// The older calls of x86_64 that glibc and Rust's std still use there.
#[cfg(target_arch = "x86_64")]
const ALLOWED_X86_64: &[libc::c_long] = &[
    libc::SYS_dup2,
    libc::SYS_epoll_wait,
    libc::SYS_poll,
    libc::SYS_readlink,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_arch_prctl,
];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_X86_64: &[libc::c_long] = &[];

/// Never allowed, named here so that a test keeps them off the list (the ones a compromise
/// would want first: into another process, a new program in the kernel, a new binary).
#[cfg(test)]
const REFUSED: &[(&str, libc::c_long)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("pidfd_open", libc::SYS_pidfd_open),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("openat2", libc::SYS_openat2),
    ("execve", libc::SYS_execve),
    ("execveat", libc::SYS_execveat),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("mount", libc::SYS_mount),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("memfd_create", libc::SYS_memfd_create),
    ("unlinkat", libc::SYS_unlinkat),
    ("renameat2", libc::SYS_renameat2),
    ("truncate", libc::SYS_truncate),
];

/// bpf() commands still needed: map reads and the updates of finwait's own maps (the pid filter,
/// the ownership map), the inventory iterator (attached for each read), program statistics.
/// Refused among others: BPF_PROG_LOAD, BPF_MAP_CREATE, BPF_BTF_LOAD, BPF_*_GET_FD_BY_ID (no
/// reaching another tool's maps or programs), BPF_OBJ_PIN.
const BPF_COMMANDS: &[u64] = &[
    1,  // BPF_MAP_LOOKUP_ELEM
    2,  // BPF_MAP_UPDATE_ELEM
    3,  // BPF_MAP_DELETE_ELEM
    4,  // BPF_MAP_GET_NEXT_KEY
    15, // BPF_OBJ_GET_INFO_BY_FD
    21, // BPF_MAP_LOOKUP_AND_DELETE_ELEM
    24, // BPF_MAP_LOOKUP_BATCH
    28, // BPF_LINK_CREATE (the inventory's iterator)
    33, // BPF_ITER_CREATE
];

/// ioctl() requests still needed: non-blocking and close-on-exec fds, whether stdout is a
/// terminal, `top` setting its terminal's modes (raw, then restored), aya disabling its perf
/// events as they detach at exit. Refused among others: TIOCSTI (typing into a terminal).
// A request's type differs between C libraries (glibc's unsigned long, musl's int): each is
// taken as the 32 bits the kernel reads (the rules compare those only).
#[allow(clippy::unnecessary_cast)]
const IOCTLS: &[u64] = &[
    libc::FIONBIO as u32 as u64,
    libc::FIOCLEX as u32 as u64,
    libc::TCGETS as u32 as u64,
    libc::TCSETS as u32 as u64,
    libc::TCSETSW as u32 as u64,
    libc::TCSETSF as u32 as u64,
    // glibc 2.42 on: termios2.
    libc::TCGETS2 as u32 as u64,
    libc::TCSETS2 as u32 as u64,
    libc::TCSETSW2 as u32 as u64,
    libc::TCSETSF2 as u32 as u64,
    libc::TIOCGWINSZ as u32 as u64,
    0x2401, // PERF_EVENT_IOC_DISABLE
];

/// prctl() options still needed: thread names.
const PRCTLS: &[u64] = &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64];

/// Applies the sandbox to every thread of the process (and those it starts later).
pub(crate) fn enter() -> Status {
    match install() {
        Ok(()) => Status::On,
        Err(e) => {
            eprintln!("finwait-trace: warning: no sandbox: {e}; tracing goes on without it");
            Status::Unavailable(e.to_string())
        }
    }
}

fn install() -> Result<(), Error> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| Error::Arch(std::env::consts::ARCH))?;
    let allow = SeccompFilter::new(
        rules()?,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )?;
    // glibc tries clone3 first, whose flags a filter cannot read: ENOSYS sends it to clone,
    // which the list allows for threads only. The list allows clone3 so that this filter's
    // ENOSYS is the answer (of two errnos, the later filter's wins).
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    // This one first: the allow-list refuses the prctl(PR_SET_NO_NEW_PRIVS) of the next install.
    for filter in [no_clone3, allow] {
        let program = BpfProgram::try_from(filter)?;
        seccompiler::apply_filter_all_threads(&program)?;
    }
    Ok(())
}

/// The whole allow-list: the plain calls, then those allowed for some arguments only.
fn rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let plain = ALLOWED.iter().flat_map(|(_, calls)| calls.iter());
    for &call in plain.chain(ALLOWED_X86_64) {
        rules.insert(call, vec![]);
    }
    let no_write = libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC;
    // open() and openat() to read only: no file written, created or truncated anywhere.
    rules.insert(libc::SYS_openat, vec![masked(2, no_write as u64, 0)?]);
    #[cfg(target_arch = "x86_64")]
    rules.insert(libc::SYS_open, vec![masked(1, no_write as u64, 0)?]);
    // No new executable memory: a compromise cannot map its own code.
    let exec = libc::PROT_EXEC as u64;
    rules.insert(libc::SYS_mmap, vec![masked(2, exec, 0)?]);
    rules.insert(libc::SYS_mprotect, vec![masked(2, exec, 0)?]);
    // New threads only, never a new process (clone3: refused by the other filter).
    rules.insert(libc::SYS_clone3, vec![]);
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![masked(0, thread, thread)?]);
    // Into other network namespaces only (their sockets and sysctls).
    rules.insert(libc::SYS_setns, vec![equal(1, libc::CLONE_NEWNET as u64)?]);
    // sock_diag's netlink sockets only.
    rules.insert(libc::SYS_socket, vec![equal(0, libc::AF_NETLINK as u64)?]);
    // `top`: the terminal's signal delivery is a local pair of sockets.
    rules.insert(libc::SYS_socketpair, vec![equal(0, libc::AF_UNIX as u64)?]);
    // Its own limits only (pid 0).
    rules.insert(libc::SYS_prlimit64, vec![equal(0, 0)?]);
    // Signals to itself only (an abort's SIGABRT).
    let own = u64::from(std::process::id());
    rules.insert(libc::SYS_tgkill, vec![equal(0, own)?]);
    rules.insert(libc::SYS_kill, vec![equal(0, own)?]);
    rules.insert(libc::SYS_bpf, any_of(0, BPF_COMMANDS)?);
    rules.insert(libc::SYS_ioctl, any_of(1, IOCTLS)?);
    rules.insert(libc::SYS_prctl, any_of(0, PRCTLS)?);
    Ok(rules)
}

/// Argument `arg`, masked with `mask`, equals `value`.
fn masked(arg: u8, mask: u64, value: u64) -> Result<SeccompRule, Error> {
    let c = SeccompCondition::new(arg, Len::Qword, Op::MaskedEq(mask), value)?;
    Ok(SeccompRule::new(vec![c])?)
}

/// Argument `arg` (its low 32 bits: ints and commands) equals `value`.
fn equal(arg: u8, value: u64) -> Result<SeccompRule, Error> {
    let c = SeccompCondition::new(arg, Len::Dword, Op::Eq, value)?;
    Ok(SeccompRule::new(vec![c])?)
}

fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, Error> {
    values.iter().map(|&v| equal(arg, v)).collect()
}

/// The hidden `--sandbox-self-test-write-proc-mem PID`: what a compromise would try first,
/// tried now; each outcome on stderr as one JSON line (errno 0: it worked), for the tests.
pub(crate) fn self_test(pid: u32) {
    use std::{fs::OpenOptions, process::Command};
    let mem = format!("/proc/{pid}/mem");
    let tmp = format!("/tmp/finwait-sandbox-self-test-{}", std::process::id());
    let tries = [
        (
            "open_proc_mem_rw",
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&mem)
                .map(drop),
        ),
        (
            "create_file",
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map(drop),
        ),
        ("bpf_map_create", bpf_map_create()),
        (
            "spawn_process",
            Command::new("/proc/self/exe")
                .arg("--version")
                .stdout(std::process::Stdio::null())
                .status()
                .map(drop),
        ),
    ];
    for (what, outcome) in tries {
        let errno = match outcome {
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(-1),
        };
        eprintln!(
            "{}",
            serde_json::json!({ "sandbox_self_test": what, "errno": errno })
        );
    }
    let _ = std::fs::remove_file(&tmp); // only there without the sandbox
}

/// A one-entry array map, closed at once: refused with the rest of BPF_MAP_CREATE.
fn bpf_map_create() -> std::io::Result<()> {
    // map_type, key_size, value_size, max_entries: the head of union bpf_attr.
    let attr: [u32; 16] = [2, 4, 4, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    // SAFETY: attr outlives the call and is as large as the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), size_of_val(&attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the fd was just returned to us.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_refused_is_allowed() {
        let rules = rules().unwrap();
        for (name, call) in REFUSED {
            assert!(!rules.contains_key(call), "{name} is on the allow-list");
        }
        for cmd in [0, 5, 6, 13, 14, 18] {
            // MAP_CREATE, PROG_LOAD, OBJ_PIN, PROG/MAP_GET_FD_BY_ID, BTF_LOAD
            assert!(!BPF_COMMANDS.contains(&cmd), "bpf command {cmd} is allowed");
        }
        assert!(!IOCTLS.contains(&libc::TIOCSTI));
    }

    #[test]
    fn the_filters_compile_for_this_architecture() {
        let arch = TargetArch::try_from(std::env::consts::ARCH).unwrap();
        let f = SeccompFilter::new(
            rules().unwrap(),
            SeccompAction::Errno(1),
            SeccompAction::Allow,
            arch,
        )
        .unwrap();
        assert!(!BpfProgram::try_from(f).unwrap().is_empty());
    }
}
