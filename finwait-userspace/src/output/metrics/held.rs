//! The gauges follow the [`Ledger`]: each socket someone must close counts once, in its
//! workload's series, from the start-up inventory or its live transition until its closing
//! one, and the ledger is checked every minute against the kernel's table (read by the trace
//! layer, handed in here).
use std::{collections::HashSet, time::Duration};

use prometheus_client::metrics::gauge::Gauge;

use super::{MetricsSink, registry::Workload};
use crate::{
    host::namespaces::CloseTable,
    model::{
        TransitionReport,
        ledger::{Entry, Kind},
    },
};

/// One socket someone must close, and the series it counts in.
pub(super) type Held = Entry<Workload>;

/// The gauges are checked against the kernel's socket table this often: a transition lost on
/// the way (counted) must not leave a socket counted forever.
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(60);

/// Reads a [`CloseTable`] for these holders' pids; None when the read failed (nothing is
/// released then).
pub(crate) type ReadKernel = Box<dyn FnMut(&HashSet<u32>) -> Option<CloseTable> + Send>;

impl MetricsSink {
    /// A socket `t` names someone must close, counted under `w` (a series label from
    /// [`Self::counted`]) for `pid`.
    pub(super) fn hold(&mut self, t: &TransitionReport, kind: Kind, w: Workload, pid: u32) {
        self.gauge(kind, &w).inc();
        self.workloads.held(&w, 1);
        let held = Held {
            kind,
            pid,
            key: t.ends.key(),
            since_ns: t.ts_ns,
            at_least: false,
            data: w,
        };
        if let Some(old) = self.held.hold(t.sock, held) {
            self.release_held(&old);
        }
    }

    /// Every socket counted that the kernel no longer has in its state is released and counted
    /// as a correction.
    pub(super) fn check_against_kernel(&mut self) {
        let pids = self.held.holders();
        let Some(k) = (self.read_kernel)(&pids) else {
            return; // checked next time; nothing is released on a failed read
        };
        let stale = self.held.release_gone(&k, |_| true);
        self.corrected(&stale);
    }

    /// The check's release, given what is gone (the tests' kernel).
    #[cfg(test)]
    pub(super) fn release_gone(&mut self, gone: impl FnMut(&Held) -> bool) {
        let stale = self.held.release_where(gone);
        self.corrected(&stale);
    }

    fn corrected(&mut self, stale: &[Held]) {
        for h in stale {
            self.health.gauge_corrections.inc();
            self.release_held(h);
        }
    }

    pub(super) fn release_held(&mut self, h: &Held) {
        self.gauge(h.kind, &h.data).dec();
        self.workloads.held(&h.data, -1);
    }

    pub(super) fn gauge(&self, kind: Kind, w: &Workload) -> Gauge {
        match kind {
            Kind::HalfClosed => self.families.half_closed.get_or_create_owned(w),
            Kind::CloseWait => self.families.close_wait.get_or_create_owned(w),
        }
    }
}
