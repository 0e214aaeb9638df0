//! Per-program kernel counters that aya does not expose: `recursion_misses` counts the times the
//! kernel skipped a program because a BPF program was already running on that CPU (for classic
//! tracepoints, any program: a softirq that interrupts one of ours loses its event). And a map's
//! name from its fd (aya asks by id, which needs CAP_SYS_ADMIN).
use std::os::fd::{AsRawFd, BorrowedFd};

use aya_obj::generated::{bpf_map_info, bpf_prog_info};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The kernel's info on a program, and how much of it this kernel wrote.
fn prog_info(prog: BorrowedFd<'_>) -> Option<(bpf_prog_info, usize)> {
    // SAFETY: bpf_prog_info is plain old data; zero is a valid value.
    obj_info(prog, unsafe { std::mem::zeroed() })
}

/// The name of the map behind `fd` (None: not a map, or unnamed).
pub(crate) fn map_name(fd: BorrowedFd<'_>) -> Option<String> {
    // SAFETY: bpf_map_info is plain old data; zero is a valid value.
    let (info, _) = obj_info::<bpf_map_info>(fd, unsafe { std::mem::zeroed() })?;
    let name: Vec<u8> = info
        .name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    (!name.is_empty()).then(|| String::from_utf8_lossy(&name).into_owned())
}

/// BPF_OBJ_GET_INFO_BY_FD into `info` (one of the kernel's plain `bpf_*_info` structs).
fn obj_info<T>(fd: BorrowedFd<'_>, mut info: T) -> Option<(T, usize)> {
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: (&mut info as *mut T) as u64,
    };
    // SAFETY: attr points to a live, correctly sized buffer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            size_of::<InfoAttr>(),
        )
    };
    (rc == 0).then_some((info, attr.info_len as usize))
}

/// The program's `recursion_misses`, or None where the kernel does not report it.
pub(crate) fn recursion_misses(prog: BorrowedFd<'_>) -> Option<u64> {
    let (info, len) = prog_info(prog)?;
    // Older kernels return a shorter struct: only trust the field if it was written.
    let end = std::mem::offset_of!(bpf_prog_info, recursion_misses) + 8;
    (len >= end).then_some(info.recursion_misses)
}

/// (runs, nanoseconds spent) of the program: counted only while `kernel.bpf_stats_enabled` is
/// on (it costs two clock reads per run, so it is the operator's choice, not finwait's).
pub(crate) fn run_time(prog: BorrowedFd<'_>) -> Option<(u64, u64)> {
    let (info, len) = prog_info(prog)?;
    let end = std::mem::offset_of!(bpf_prog_info, run_cnt) + 8;
    (len >= end && info.run_cnt > 0).then_some((info.run_cnt, info.run_time_ns))
}
