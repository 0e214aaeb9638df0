//! The kernel's event clock (CLOCK_MONOTONIC) and its conversion to wall-clock time.
use std::time::{Duration, SystemTime};

/// Now, on the clock the kernel stamps its records with.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Converts the kernel's monotonic timestamps to wall-clock time.
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    realtime_minus_monotonic_ns: i128,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let mono = i128::from(monotonic_ns());
        let real = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        Self {
            realtime_minus_monotonic_ns: real - mono,
        }
    }

    pub(crate) fn wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (i128::from(mono_ns) + self.realtime_minus_monotonic_ns).max(0) as u128;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }
}
