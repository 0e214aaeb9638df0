//! The cap on workloads with series (`--metrics-max-workloads`): beyond it, idle workloads
//! lose their series and new ones fold into `comm="other"`, so a host of many short-lived
//! process names cannot grow the endpoint's output without bound.
use std::collections::HashMap;

use super::registry::{Health, Workload};

/// The workloads that have series, at most `max`; beyond it the least recently seen one that
/// holds nothing loses its series, and where every one holds sockets the newcomer is folded into
/// `comm="other"`.
pub(super) struct Workloads {
    pub(super) max: usize,
    /// Workload -> (sockets it holds now, last use).
    pub(super) live: HashMap<Workload, (u64, u64)>,
    pub(super) clock: u64,
}

impl Workloads {
    /// The series `w` counts in; `evict` removes a workload's series.
    pub(super) fn label(
        &mut self,
        w: Workload,
        h: &Health,
        evict: impl FnOnce(&Workload),
    ) -> Workload {
        self.clock += 1;
        if let Some(slot) = self.live.get_mut(&w) {
            slot.1 = self.clock;
            return w;
        }
        if self.live.len() >= self.max {
            let idle = self
                .live
                .iter()
                .filter(|(_, (held, _))| *held == 0)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(w, _)| w.clone());
            let Some(idle) = idle else {
                h.workloads_folded.inc();
                return Workload::named("other");
            };
            self.live.remove(&idle);
            evict(&idle);
            h.workloads_evicted.inc();
        }
        self.live.insert(w.clone(), (0, self.clock));
        w
    }

    pub(super) fn held(&mut self, w: &Workload, delta: i64) {
        if let Some(slot) = self.live.get_mut(w) {
            slot.0 = slot.0.saturating_add_signed(delta);
        }
    }
}
