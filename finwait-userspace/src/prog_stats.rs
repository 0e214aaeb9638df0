//! Per-program kernel counters that aya does not expose: `recursion_misses` counts the times the
//! kernel skipped a program because a BPF program was already running on that CPU (for classic
//! tracepoints, any program: a softirq that interrupts one of ours loses its event).
use std::os::fd::{AsRawFd, BorrowedFd};

use aya_obj::generated::bpf_prog_info;

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The program's `recursion_misses`, or None where the kernel does not report it.
pub fn recursion_misses(prog: BorrowedFd<'_>) -> Option<u64> {
    // SAFETY: bpf_prog_info is plain old data; zero is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: size_of::<bpf_prog_info>() as u32,
        info: (&mut info as *mut bpf_prog_info) as u64,
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
    // Older kernels return a shorter struct: only trust the field if it was written.
    let end = std::mem::offset_of!(bpf_prog_info, recursion_misses) + 8;
    (rc == 0 && attr.info_len as usize >= end).then_some(info.recursion_misses)
}
