//! The eBPF side's counters (`COUNTERS`), read through a shared mapping of the map.
//!
//! A map lookup syscall marks its CPU as running BPF for its duration, and the kernel skips every
//! classic tracepoint program that CPU runs meanwhile. From Linux 7.0 (full or lazy preemption
//! only) the task doing the lookup can be preempted inside it, and the mark then covers whatever
//! runs on that CPU until it resumes: a tracer that polled its counters once a second lost
//! syscall events to itself. Reading the mapped array makes no syscall. Where the kernel cannot
//! map the array (before 5.5), the counters are looked up as before.
use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData};
use finwait_common::counter;

pub(crate) enum Counters {
    Mapped {
        // Owns the map's fd, which the mapping needs while it lives.
        _map: MapData,
        values: NonNull<AtomicU64>,
        len: usize,
    },
    Looked(Array<MapData, u64>),
}

// SAFETY: the mapping is shared kernel memory read atomically; nothing in it is tied to a thread.
unsafe impl Send for Counters {}

impl Counters {
    pub(crate) fn new(map: Map) -> Result<Self> {
        let Map::Array(data) = map else {
            anyhow::bail!("the counters map is not an array");
        };
        let len = counter::COUNT as usize * size_of::<u64>();
        // SAFETY: a fresh shared read-only mapping of the map's value area; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let array = Array::try_from(Map::Array(data)).context("the counters map")?;
            return Ok(Self::Looked(array));
        }
        Ok(Self::Mapped {
            _map: data,
            values: NonNull::new(ptr.cast()).context("mmap returned null")?,
            len,
        })
    }

    /// Counter `index` (a `finwait_common::counter` constant), summed over CPUs by the kernel's
    /// atomic adds.
    pub(crate) fn get(&self, index: u32) -> u64 {
        match self {
            Self::Mapped { values, .. } if index < counter::COUNT => {
                // SAFETY: in bounds of the mapping, which lives as long as self; the programs
                // only add to it atomically.
                unsafe { values.add(index as usize).as_ref() }.load(Ordering::Relaxed)
            }
            Self::Mapped { .. } => 0,
            Self::Looked(array) => array.get(&index, 0).unwrap_or(0),
        }
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        if let Self::Mapped { values, len, .. } = self {
            // SAFETY: the mapping made in `new`, unmapped once.
            unsafe { libc::munmap(values.as_ptr().cast(), *len) };
        }
    }
}
