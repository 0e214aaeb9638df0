//! This kernel's layouts, which the programs read as globals: the tracepoints' field offsets
//! from tracefs, and the structure offsets from BTF.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use finwait_common::{KernelOffsets, OtherTpLayout, StateTpLayout};

use super::{Degraded, LoadError};
use crate::kernel::{btf as kernel_btf, tracefs::Format};

/// This kernel's layouts, which the programs read as globals.
pub(super) struct Layouts {
    pub(super) state: StateTpLayout,
    pub(super) other: OtherTpLayout,
    /// None: no usable BTF (fd -> socket resolution is off).
    pub(super) offsets: Option<KernelOffsets>,
}

pub(super) fn layouts(tracefs: &Path, degraded: &mut Vec<Degraded>) -> Result<Layouts, LoadError> {
    let state = state_layout(tracefs).map_err(LoadError::classify)?;
    let other = other_layout(tracefs);
    let offsets = match kernel_btf::kernel_offsets() {
        Ok(o) => Some(o),
        Err(e) => {
            degraded.push(Degraded::loss(format!(
                "fd -> socket resolution is off ({e:#}); calls are matched to transitions per thread, \
                 and close() without FIN cannot be detected"
            )));
            None
        }
    };
    Ok(Layouts {
        state,
        other,
        offsets,
    })
}

/// The tracefs mount. `ensure_mounted` words its failure without the errno, so the kernel is
/// asked once more: a mount point this process may not enter means missing privileges.
pub(super) fn find_tracefs() -> Result<PathBuf, LoadError> {
    crate::kernel::tracefs::ensure_mounted().map_err(|e| {
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

/// Layouts as seen on each kernel the matrix runs: the format files under testdata/tracefs were
/// copied from Debian's 6.1 and 6.12 cloud kernels and this project's 6.18 host.
#[cfg(test)]
mod tests {
    use super::*;

    fn tracefs(kernel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/tracefs")
            .join(kernel)
    }

    const KERNELS: [&str; 3] = ["debian-6.1", "debian-6.12", "host-6.18"];

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
