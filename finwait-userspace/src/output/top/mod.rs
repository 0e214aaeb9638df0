//! `finwait-trace top`: a live, full-screen table of the workloads holding sockets someone must
//! close. A sink like the others: it counts what the pipeline hands it into a [`table`], and
//! publishes the rows once a second for the [`screen`] thread to draw.
mod screen;
mod table;

use std::{
    io,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use self::{
    screen::{Screen, Shared},
    table::Table,
};
use super::{Sink, Start, Stats, metrics::ReadKernel};
use crate::{
    host::clock::monotonic_ns,
    model::{Report, Stuck, Verdict, summary::Summary},
    snapshot::Snapshot,
};

/// What the screen draws, as of the last publish.
#[derive(Clone, Debug, Default)]
pub(crate) struct View {
    /// The mode and kernel, from the start.
    mode: String,
    rows: Vec<table::Row>,
    /// The counters of what was lost or skipped, in words.
    losses: String,
}

pub(crate) struct TopSink {
    table: Table,
    shared: Arc<Mutex<Shared>>,
    /// Sent (dropped) when the screen ends: the trace stops with it. Handed to the screen once
    /// it starts.
    quit: Option<oneshot::Sender<()>>,
    screen: Option<Screen>,
    /// Taking the terminal failed: the trace ends with this error.
    failed: Option<io::Error>,
    /// What the counts are checked against every [`CHECK_EVERY`], and when they were.
    read_kernel: ReadKernel,
    checked_at: Instant,
    /// Sockets released by the checks (their transitions were lost).
    corrections: u64,
}

/// The counts are checked against the kernel's socket table this often: a transition lost on
/// the way must not leave a socket counted forever.
const CHECK_EVERY: Duration = Duration::from_secs(60);

impl TopSink {
    /// The sink, and what ends the trace when the screen is left.
    pub(crate) fn new(read_kernel: ReadKernel) -> (Self, oneshot::Receiver<()>) {
        let (quit, stopped) = oneshot::channel();
        let mut shared = Shared::default();
        shared.view.losses = "counters: first reading within a second".into();
        let sink = Self {
            table: Table::default(),
            shared: Arc::new(Mutex::new(shared)),
            quit: Some(quit),
            screen: None,
            failed: None,
            read_kernel,
            checked_at: Instant::now(),
            corrections: 0,
        };
        (sink, stopped)
    }

    /// The rows as of now, for the screen.
    fn publish(&mut self, stats: Option<&Stats>) {
        let rows = self.table.rows(monotonic_ns());
        let mut s = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        s.view.rows = rows;
        if let Some(stats) = stats {
            s.view.losses = losses(stats, self.corrections);
        }
        s.generation += 1;
    }

    /// Taking the terminal, or drawing on it, failed: the trace ends with the error.
    fn failed(&mut self) -> io::Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let s = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        s.failed
            .clone()
            .map_or(Ok(()), |e| Err(io::Error::other(e)))
    }
}

/// The counters that say what the table may be missing: none is silent.
fn losses(s: &Stats, corrections: u64) -> String {
    let skipped = if s.kernel_skips_counted {
        s.kernel_skipped_nested.to_string()
    } else {
        "not counted by this kernel".into()
    };
    format!(
        "records {}  lost (ring full) {}  skipped (nested) {}  read failed {}  transitions missed {}  owner map full {}  sockets evicted {}  corrected {corrections}",
        s.records,
        s.lost_ring_full,
        skipped,
        s.kernel_read_failed,
        s.transitions_missed,
        s.owner_map_full,
        s.sockets_evicted,
    )
}

impl Sink for TopSink {
    fn start(&mut self, s: &Start) -> io::Result<()> {
        let mut pids = String::new();
        if !s.pids.is_empty() || !s.comms.is_empty() {
            let names = s.pids.iter().map(u32::to_string).chain(s.comms.clone());
            pids = format!("  following {}", names.collect::<Vec<_>>().join(", "));
        }
        let mode = format!(
            "{} mode ({} state hook), kernel {}{pids}",
            s.mode, s.state_hook, s.kernel
        );
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .view
            .mode = mode;
        Ok(())
    }

    fn snapshot(&mut self, snap: &Snapshot, _detail: bool) -> io::Result<()> {
        self.table.seed(snap);
        Ok(())
    }

    fn report(&mut self, r: &Report, verdict: Option<&Verdict>) -> io::Result<()> {
        self.table.report(r, verdict);
        Ok(())
    }

    fn stuck(&mut self, _s: &Stuck) -> io::Result<()> {
        Ok(())
    }

    fn summary(&mut self, _s: &Summary, _now_ns: u64) -> io::Result<()> {
        Ok(())
    }

    fn stats(&mut self, _s: &Stats) -> io::Result<()> {
        self.failed()
    }

    fn health(&mut self, s: &Stats) -> io::Result<()> {
        if self.checked_at.elapsed() >= CHECK_EVERY {
            self.checked_at = Instant::now();
            // A failed read releases nothing: checked next time.
            if let Some(k) = (self.read_kernel)(&self.table.holders()) {
                self.corrections += self.table.check(&k);
            }
        }
        self.publish(Some(s));
        self.failed()
    }

    /// What was stuck at the start is counted: the table goes up.
    fn ready(&mut self) {
        self.publish(None);
        let Some(quit) = self.quit.take() else { return };
        // On failure `quit` is dropped: the trace stops, and says why.
        match Screen::start(self.shared.clone(), quit) {
            Ok(s) => self.screen = Some(s),
            Err(e) => {
                self.failed = Some(io::Error::new(e.kind(), format!("the terminal: {e}")));
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
