//! The eBPF side's counters (`COUNTERS`), read through a shared mapping of the map.
//!
//! A map lookup syscall marks its CPU as running BPF for its duration, and the kernel skips every
//! classic tracepoint program that CPU runs meanwhile. From Linux 7.0 (full or lazy preemption
//! only) the task doing the lookup can be preempted inside it, and the mark then covers whatever
//! runs on that CPU until it resumes: a tracer that polled its counters once a second lost
//! syscall events to itself. Reading the mapped array makes no syscall. (Every kernel finwait
//! loads on maps arrays: the ring buffer it needs came in 5.8, mappable arrays in 5.5.)
use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData};
use finwait_common::counter;

pub(crate) struct Counters {
    // Owns the map's fd, which the mapping needs while it lives.
    _map: MapData,
    values: NonNull<AtomicU64>,
}

// SAFETY: the mapping is shared kernel memory read atomically; nothing in it is tied to a thread.
unsafe impl Send for Counters {}

/// The mapping's length: the array's `counter::COUNT` values.
const LEN: usize = counter::COUNT as usize * size_of::<u64>();

impl Counters {
    pub(crate) fn new(map: Map) -> Result<Self> {
        let Map::Array(data) = map else {
            anyhow::bail!("the counters map is not an array");
        };
        // SAFETY: a fresh shared read-only mapping of the map's value area; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the counters map");
        }
        Ok(Self {
            _map: data,
            values: NonNull::new(ptr.cast()).context("mmap returned null")?,
        })
    }

    /// Counter `index` (a `finwait_common::counter` constant), summed over CPUs by the kernel's
    /// atomic adds.
    pub(crate) fn get(&self, index: u32) -> u64 {
        if index >= counter::COUNT {
            return 0;
        }
        // SAFETY: in bounds of the mapping, which lives as long as self; the programs only add
        // to it atomically.
        unsafe { self.values.add(index as usize).as_ref() }.load(Ordering::Relaxed)
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.values.as_ptr().cast(), LEN) };
    }
}
