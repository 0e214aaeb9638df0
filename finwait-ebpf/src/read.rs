//! Reads: the globals userspace wrote, a tracepoint record's fields, kernel memory. Every read
//! the programs rely on either succeeds or is counted (`kernel_read_failed`) and said (`-v`).
use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::TracePointContext};
use finwait_common::{Site, counter};

use crate::{diag, event::count};

/// A global as userspace wrote it.
#[inline(always)]
pub(crate) fn config<T>(global: &T) -> T {
    // SAFETY: the globals are plain data; a volatile read stops the compiler from folding the
    // defaults in, so the values userspace wrote are used.
    unsafe { core::ptr::read_volatile(global) }
}

/// A field of the tracepoint's record; its failure counted and said.
#[inline(always)]
pub(crate) fn field<T>(ctx: &TracePointContext, site: Site, offset: u32) -> Option<T> {
    // SAFETY: offsets come from this kernel's format file; the helper checks the address.
    match unsafe { ctx.read_at::<T>(offset as usize) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(counter::READ_FAILED);
            diag::field_failed(site, offset);
            None
        }
    }
}

/// Kernel memory at `base + offset`; its failure counted and said.
#[inline(always)]
pub(crate) fn read<T>(site: Site, base: u64, offset: u64) -> Option<T> {
    checked(site, probe(base, offset))
}

/// A read's value; its failure counted and said.
#[inline(always)]
pub(crate) fn checked<T>(site: Site, read: Result<T, u64>) -> Option<T> {
    match read {
        Ok(v) => Some(v),
        Err(offset) => {
            count(counter::READ_FAILED);
            diag::read_failed(site, offset);
            None
        }
    }
}

/// A read of kernel memory, not counted: Err holds the offset, for the caller to count and say.
#[inline(always)]
pub(crate) fn probe<T>(base: u64, offset: u64) -> Result<T, u64> {
    // SAFETY: bpf_probe_read_kernel checks the address; a fault is reported, not taken.
    unsafe { bpf_probe_read_kernel((base + offset) as *const T) }.map_err(|_| offset)
}
