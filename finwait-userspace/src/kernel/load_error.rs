//! Why loading or attaching the eBPF programs failed, decided by the kernel's error number
//! (the errno of the `std::io::Error` in the error's chain) and aya's typed errors, never by the
//! wording of a message.
use std::io;

use aya::programs::{KProbeError, ProgramError};

/// What the user is told when the kernel refuses finwait for lack of privileges.
const PRIVILEGES: &str = "finwait-trace needs root, or CAP_BPF and CAP_PERFMON (plus CAP_SYS_ADMIN \
     to mount tracefs).\n  Fix: sudo finwait-trace ...";

/// RLIMIT_MEMLOCK (bytes) when finwait could not raise it on a kernel that charges BPF maps to
/// it (before 5.11): set at start, for the message of a refusal.
static MEMLOCK_LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// Notes that RLIMIT_MEMLOCK stayed at `limit` bytes on a kernel of `release`; only kernels
/// before 5.11 charge BPF maps to it.
pub(crate) fn note_memlock_not_raised(release: &str, limit: u64) {
    if charges_memlock(release) {
        let _ = MEMLOCK_LIMIT.set(limit);
    }
}

/// Whether a kernel release (`5.10.0-28-amd64`) charges BPF maps to RLIMIT_MEMLOCK: before 5.11
/// (from 5.11 they are charged to the memory cgroup).
fn charges_memlock(release: &str) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < (5, 11),
        _ => false,
    }
}

/// The refusal's message: on such a kernel, EPERM from creating a map is also what a too low
/// RLIMIT_MEMLOCK gives.
fn privileges_message(memlock: Option<u64>) -> String {
    match memlock {
        None => PRIVILEGES.to_string(),
        Some(limit) => format!(
            "{PRIVILEGES}\n  On this kernel (before 5.11) EPERM also means that the BPF maps do not \
             fit under RLIMIT_MEMLOCK ({} KiB), which finwait could not raise: grant it \
             CAP_SYS_RESOURCE (deploy/kubernetes/patches/kernel-before-5.11.yaml), or raise the \
             limit (LimitMEMLOCK=infinity, ulimit -l unlimited).",
            limit / 1024
        ),
    }
}

/// Lines kept from the end of a verifier log: the log can run to megabytes, its end says why.
const VERIFIER_TAIL_LINES: usize = 3;

/// The kernel's internal "not supported" (not in libc): some BPF attach paths return it.
const ENOTSUPP: i32 = 524;

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    /// EPERM or EACCES from the kernel outside the verifier: this process lacks privileges (for
    /// an optional hook, the kernel may refuse it to everyone, e.g. fentry under lockdown).
    #[error("{}", privileges_message(MEMLOCK_LIMIT.get().copied()))]
    Privileges { errno: i32 },
    /// The verifier refused a program. It answers EACCES or EINVAL, so its log, not the errno,
    /// says what went wrong.
    #[error("the BPF_PROG_LOAD syscall returned {returned}. verifier: {log_tail}")]
    Verifier {
        errno: i32,
        /// The syscall's error as text (`Permission denied (os error 13)`).
        returned: String,
        /// The log's last lines, joined with ` | `.
        log_tail: String,
    },
    /// The kprobe event source is missing (ENOENT): a kernel without CONFIG_KPROBES.
    #[error("this kernel has no kprobes (CONFIG_KPROBES)")]
    NoKprobes,
    /// ENOTSUPP or EOPNOTSUPP: this kernel lacks the feature.
    #[error("not supported by this kernel")]
    Unsupported { errno: i32 },
    /// A tracepoint finwait cannot run without could not be attached.
    #[error(
        "attaching {tracepoint} failed; finwait needs it (Linux 4.16 or newer with tracepoints)"
    )]
    Required {
        tracepoint: String,
        #[source]
        cause: Box<LoadError>,
    },
    /// `--mode precise` on a kernel that allows neither hook on tcp_close.
    #[error(
        "--mode precise: this kernel allows neither fentry nor kprobes on tcp_close ({why}); \
         use --mode correlated"
    )]
    PreciseUnavailable { why: String },
    /// Anything else, reported as it came (with its context).
    #[error(transparent)]
    Other(anyhow::Error),
}

impl LoadError {
    /// Sorts an error from aya, the kernel or the filesystem by what the kernel answered.
    pub(crate) fn classify(e: impl Into<anyhow::Error>) -> Self {
        let e = e.into();
        match e.chain().find_map(|c| c.downcast_ref::<ProgramError>()) {
            // The verifier ran: whatever errno it chose, its log explains.
            Some(ProgramError::LoadError {
                io_error,
                verifier_log,
            }) if !verifier_log.to_string().trim().is_empty() => {
                return Self::Verifier {
                    errno: io_error.raw_os_error().unwrap_or(0),
                    returned: io_error.to_string(),
                    log_tail: log_tail(&verifier_log.to_string()),
                };
            }
            Some(ProgramError::KProbeError(KProbeError::FileError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound =>
            {
                return Self::NoKprobes;
            }
            _ => {}
        }
        match errno(&e) {
            Some(errno @ (libc::EPERM | libc::EACCES)) => Self::Privileges { errno },
            Some(errno @ (ENOTSUPP | libc::EOPNOTSUPP)) => Self::Unsupported { errno },
            _ => Self::Other(e),
        }
    }

    /// A required tracepoint failed: missing privileges say so plainly, anything else is
    /// reported under the tracepoint's name.
    pub(crate) fn required(tracepoint: &str, e: impl Into<anyhow::Error>) -> Self {
        match Self::classify(e) {
            p @ Self::Privileges { .. } => p,
            cause => Self::Required {
                tracepoint: tracepoint.to_string(),
                cause: Box::new(cause),
            },
        }
    }

    /// On one line, for a hook that is reported rather than fatal.
    pub(crate) fn brief(&self) -> String {
        match self {
            Self::Privileges { errno } => format!("refused by the kernel ({})", errno_name(*errno)),
            // Which hook, and why: the kernel's answer is what a reader can act on.
            Self::Required { cause, .. } => format!("{self}: {}", cause.brief()),
            Self::Other(e) => format!("{e:#}"),
            e => e.to_string(),
        }
    }

    /// The kernel's answer, where there was one.
    #[cfg(test)]
    pub(crate) fn errno(&self) -> Option<i32> {
        match self {
            Self::Privileges { errno } | Self::Verifier { errno, .. } => Some(*errno),
            Self::Unsupported { errno } => Some(*errno),
            Self::NoKprobes => Some(libc::ENOENT),
            Self::Required { cause, .. } => cause.errno(),
            Self::PreciseUnavailable { .. } => None,
            Self::Other(e) => errno(e),
        }
    }
}

/// The first OS error number in the chain.
fn errno(e: &anyhow::Error) -> Option<i32> {
    e.chain()
        .find_map(|c| c.downcast_ref::<io::Error>()?.raw_os_error())
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        _ => "an error",
    }
}

fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(VERIFIER_TAIL_LINES)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use aya::{
        EbpfError,
        maps::MapError,
        programs::{KProbeError, ProgramError},
        sys::SyscallError,
    };
    use aya_obj::VerifierLog;

    use super::*;

    #[test]
    fn memlock_is_named_only_where_the_kernel_charges_it() {
        for (release, charges) in [
            ("5.10.0-28-amd64", true),
            ("4.19.0", true),
            ("5.11.0", false),
            ("6.1.0-18-cloud-amd64", false),
            ("6.18.44-fc-v1272", false),
            ("garbage", false),
        ] {
            assert_eq!(charges_memlock(release), charges, "{release}");
        }
        assert_eq!(privileges_message(None), PRIVILEGES);
        let hint = privileges_message(Some(8 << 20));
        assert!(hint.starts_with(PRIVILEGES));
        assert!(hint.contains("RLIMIT_MEMLOCK (8192 KiB)") && hint.contains("CAP_SYS_RESOURCE"));
    }

    fn os(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    /// As `main` prints it: the whole chain on one line.
    fn shown(e: LoadError) -> String {
        format!("{:#}", anyhow::Error::from(e))
    }

    fn prog_load(errno: i32, log: &str) -> ProgramError {
        ProgramError::LoadError {
            io_error: os(errno),
            verifier_log: VerifierLog::new(log.to_string()),
        }
    }

    const LOG: &str = "func#0 @0\n0: R1=ctx() R10=fp0\n0: (61) r2 = *(u32 *)(r1 +0)\n\
        1: (79) r3 = *(u64 *)(r2 +8)\nR2 invalid mem access 'scalar'\n\
        processed 2 insns (limit 1000000) max_states_per_insn 0 total_states 0\n";

    #[test]
    fn eperm_and_eacces_mean_missing_privileges() {
        for errno in [libc::EPERM, libc::EACCES] {
            let e = anyhow::Error::new(os(errno)).context("reading a format file");
            let err = LoadError::classify(e);
            assert!(
                matches!(err, LoadError::Privileges { errno: n } if n == errno),
                "{err:?}"
            );
            let text = shown(err);
            assert!(
                text.contains("CAP_BPF") && text.contains("CAP_PERFMON"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_refused_map_is_found_inside_aya_errors() {
        let e = EbpfError::MapError(MapError::CreateError {
            name: "EVENTS".into(),
            io_error: os(libc::EPERM),
        });
        let e = anyhow::Error::new(e).context("loading the eBPF programs");
        assert!(matches!(
            LoadError::classify(e),
            LoadError::Privileges { errno: libc::EPERM }
        ));
    }

    /// A user with the capabilities whose program the verifier refuses (with EACCES) sees the
    /// verifier's reason, not "needs root".
    #[test]
    fn a_verifier_refusal_shows_the_end_of_its_log() {
        let err = LoadError::classify(prog_load(libc::EACCES, LOG));
        assert!(
            matches!(
                err,
                LoadError::Verifier {
                    errno: libc::EACCES,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = shown(err);
        assert!(!text.contains("root"), "{text}");
        assert_eq!(
            text,
            "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). verifier: \
             1: (79) r3 = *(u64 *)(r2 +8) | R2 invalid mem access 'scalar' | \
             processed 2 insns (limit 1000000) max_states_per_insn 0 total_states 0"
        );
    }

    #[test]
    fn a_required_hook_names_itself_and_the_verifier() {
        let err = LoadError::required("syscalls:sys_enter_close", prog_load(libc::EINVAL, LOG));
        let text = shown(err);
        assert!(
            text.starts_with(
                "attaching syscalls:sys_enter_close failed; finwait needs it (Linux 4.16 or newer \
                 with tracepoints): the BPF_PROG_LOAD syscall returned Invalid argument"
            ),
            "{text}"
        );
        assert!(text.ends_with("total_states 0"), "{text}");
        // On one line too (-v's warning when the diagnostics build is refused): with the reason.
        let err = LoadError::required("syscalls:sys_enter_close", prog_load(libc::E2BIG, LOG));
        let brief = err.brief();
        assert!(
            brief.starts_with("attaching syscalls:sys_enter_close failed"),
            "{brief}"
        );
        assert!(brief.ends_with("total_states 0"), "{brief}");
        // Missing privileges are said plainly, not under the hook's name.
        let err = LoadError::required("syscalls:sys_enter_close", prog_load(libc::EPERM, ""));
        assert!(matches!(err, LoadError::Privileges { errno: libc::EPERM }));
    }

    #[test]
    fn a_refusal_without_a_log_is_keyed_on_its_errno() {
        let err = LoadError::classify(
            anyhow::Error::new(prog_load(libc::EPERM, "")).context("tcp_close"),
        );
        assert_eq!(err.brief(), "refused by the kernel (EPERM)");
        for errno in [ENOTSUPP, libc::EOPNOTSUPP] {
            let e = ProgramError::SyscallError(SyscallError {
                call: "bpf_link_create",
                io_error: os(errno),
            });
            let err = LoadError::classify(e);
            assert!(matches!(err, LoadError::Unsupported { .. }), "{err:?}");
            assert_eq!(err.brief(), "not supported by this kernel");
        }
    }

    #[test]
    fn a_missing_kprobe_event_source_means_no_kprobes() {
        let e = ProgramError::KProbeError(KProbeError::FileError {
            filename: "/sys/bus/event_source/devices/kprobe/type".into(),
            io_error: os(libc::ENOENT),
        });
        let err = LoadError::classify(anyhow::Error::new(e).context("tcp_close"));
        assert!(matches!(err, LoadError::NoKprobes), "{err:?}");
        assert_eq!(err.errno(), Some(libc::ENOENT));
    }

    /// Other errors read exactly as before classification, context and all.
    #[test]
    fn other_errors_keep_their_text() {
        let make = || {
            anyhow::Error::new(os(libc::ENOENT))
                .context("tracepoint sock:inet_sock_set_state is missing")
                .context(
                    "finwait needs the sock:inet_sock_set_state tracepoint (Linux 4.16 or newer)",
                )
        };
        let err = LoadError::classify(make());
        assert!(matches!(err, LoadError::Other(_)), "{err:?}");
        assert_eq!(err.errno(), Some(libc::ENOENT));
        assert_eq!(err.brief(), format!("{:#}", make()));
        assert_eq!(shown(err), format!("{:#}", make()));
    }
}
