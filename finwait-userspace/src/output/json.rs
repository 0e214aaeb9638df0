//! The `--json` sink: each finding as one line of the JSON contract ([`super::wire`]).
use super::{
    Out, Sink, Start, Stats,
    wire::{
        CloseNoFin, Event, SnapshotEvent, SnapshotSummary, StuckEvent, SummaryEvent, Transition,
    },
};
use crate::{
    host::clock::Clock,
    model::{Report, Stuck, Verdict, summary::Summary},
    snapshot::Snapshot,
};

/// The `--json` sink.
pub(crate) struct JsonSink {
    out: Out,
    clock: Clock,
}

impl JsonSink {
    pub(crate) fn new(out: Out) -> Self {
        Self {
            out,
            clock: Clock::new(),
        }
    }

    fn event(&mut self, e: &Event<'_>) -> std::io::Result<()> {
        self.out.json_line(e)
    }
}

impl Sink for JsonSink {
    fn start(&mut self, s: &Start) -> std::io::Result<()> {
        self.event(&Event::Start(s))
    }

    fn snapshot(&mut self, snap: &Snapshot, _detail: bool) -> std::io::Result<()> {
        self.event(&Event::SnapshotSummary(SnapshotSummary::new(snap)))?;
        let entries = &snap.entries;
        for e in entries.iter().filter(|e| !e.is_time_wait()) {
            self.event(&Event::Snapshot(SnapshotEvent::from(e)))?;
        }
        Ok(())
    }

    fn report(&mut self, r: &Report, verdict: Option<&Verdict>) -> std::io::Result<()> {
        let clock = self.clock;
        match r {
            Report::Transition(t) => {
                self.event(&Event::Transition(Transition::new(t, verdict, &clock)))
            }
            Report::CloseNoFin(n) => self.event(&Event::CloseNoFin(CloseNoFin::new(n, &clock))),
        }
    }

    fn stuck(&mut self, s: &Stuck) -> std::io::Result<()> {
        let clock = self.clock;
        self.event(&Event::Stuck(StuckEvent::new(s, &clock)))
    }

    fn summary(&mut self, s: &Summary, now_ns: u64) -> std::io::Result<()> {
        self.event(&Event::Summary(SummaryEvent::new(s, now_ns)))
    }

    fn stats(&mut self, s: &Stats) -> std::io::Result<()> {
        self.event(&Event::Stats(s))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
