//! The sockets someone must close, each counted once in a gauge: held by kernel address (seen
//! live) or by inode (seeded from the start-up inventory), released on their transition, and
//! checked every minute against the kernel's table (read by the trace layer, handed in here).
use std::{collections::HashSet, time::Duration};

use finwait_common::TcpState;
use prometheus_client::metrics::gauge::Gauge;

use super::{MetricsSink, registry::Workload};
use crate::{host::namespaces::CloseTable, model::Endpoints};

/// Which of the two gauges a held socket counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    HalfClosed,
    CloseWait,
}

/// One socket someone must close, and the series it counts in.
pub(super) struct Held {
    pub(super) kind: Kind,
    pub(super) workload: Workload,
    /// To find it in the kernel's socket table when the gauges are checked.
    pub(super) key: Key,
    /// The process it counts under: only sockets of processes in finwait's own network
    /// namespace are checked (sock_diag sees that one).
    pub(super) pid: u32,
}

pub(super) type Key = crate::model::EndsKey;

/// The gauges are checked against the kernel's socket table this often: a transition lost on
/// the way (counted) must not leave a socket counted forever.
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(60);

/// Reads a [`CloseTable`] for these holders' pids; None when the read failed (nothing is
/// released then).
pub(crate) type ReadKernel = Box<dyn FnMut(&HashSet<u32>) -> Option<CloseTable> + Send>;

impl MetricsSink {
    /// A socket someone must close, counted under `w` (a series label from [`Self::counted`]).
    pub(super) fn hold(&mut self, sock: u64, kind: Kind, w: Workload, ends: &Endpoints, pid: u32) {
        self.gauge(kind, &w).inc();
        self.workloads.held(&w, 1);
        let held = Held {
            kind,
            workload: w,
            key: ends.key(),
            pid,
        };
        if let Some(old) = self.held.insert(sock, held) {
            self.release_held(&old);
        }
    }

    /// Every socket counted that the kernel no longer has in its state (for a half-closed one:
    /// held by a process, with an inode) is released and counted as a correction.
    pub(super) fn check_against_kernel(&mut self) {
        let pids: HashSet<u32> = self
            .held
            .values()
            .chain(self.seeded.values())
            .map(|h| h.pid)
            .collect();
        let Some(k) = (self.read_kernel)(&pids) else {
            return; // checked next time; nothing is released on a failed read
        };
        // A holder's namespace that was not read (or a holder gone) is not checked.
        self.release_gone(|h| {
            let Some(ns) = k
                .ns_of
                .get(&h.pid)
                .copied()
                .flatten()
                .filter(|ns| k.read.contains(ns))
            else {
                return false;
            };
            match (h.kind, k.sockets.get(&(ns, h.key))) {
                (Kind::CloseWait, Some((state, _))) => *state != TcpState::CloseWait,
                (Kind::HalfClosed, Some((state, inode))) => {
                    *state != TcpState::FinWait2 || *inode == 0
                }
                (_, None) => true,
            }
        });
    }

    pub(super) fn release_gone(&mut self, mut gone: impl FnMut(&Held) -> bool) {
        let mut stale = Vec::new();
        for table in [&mut self.held, &mut self.seeded] {
            table.retain(|_, h| {
                let keep = !gone(h);
                if !keep {
                    stale.push((h.kind, h.workload.clone()));
                }
                keep
            });
        }
        for (kind, workload) in stale {
            self.health.gauge_corrections.inc();
            self.gauge(kind, &workload).dec();
            self.workloads.held(&workload, -1);
        }
    }

    pub(super) fn release(&mut self, sock: u64, inode: u64) {
        let found = self
            .held
            .remove(&sock)
            .or_else(|| (inode != 0).then(|| self.seeded.remove(&inode)).flatten());
        if let Some(h) = found {
            self.release_held(&h);
        }
    }

    pub(super) fn release_held(&mut self, h: &Held) {
        self.gauge(h.kind, &h.workload).dec();
        self.workloads.held(&h.workload, -1);
    }

    pub(super) fn gauge(&self, kind: Kind, w: &Workload) -> Gauge {
        match kind {
            Kind::HalfClosed => self.families.half_closed.get_or_create_owned(w),
            Kind::CloseWait => self.families.close_wait.get_or_create_owned(w),
        }
    }
}
