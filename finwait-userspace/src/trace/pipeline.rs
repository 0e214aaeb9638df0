//! The tracer's stages, in order: decode -> correlate -> resolve owners -> filter -> enrich ->
//! summary and sink. Each report passes once; nothing here blocks on /proc (owners that need a
//! full scan wait in the resolver, in order).
use std::io;

use finwait_common::tcp_state as st;

use super::{
    correlate::Correlator,
    decode::{self, Decoded, Record},
    filter::Filter,
    resolve::Resolver,
};
use crate::{
    host::{clock::monotonic_ns, netns::FinTimeouts},
    model::{Report, summary::Summary},
    output::Sink,
};

pub(crate) struct Pipeline {
    pub(crate) correlator: Correlator,
    pub(crate) resolver: Resolver,
    pub(crate) filter: Filter,
    fin_timeouts: FinTimeouts,
    /// `tcp_fin_timeout` of the tracer's own namespace (where a socket's cannot be read).
    own_fin_timeout_s: u64,
    pub(crate) summary: Summary,
    pub(crate) sink: Box<dyn Sink>,
    summary_only: bool,
    /// Reports of the record being correlated.
    batch: Vec<Report>,
    /// Reports whose owners are known, in kernel order.
    ready: Vec<Report>,
}

impl Pipeline {
    pub(crate) fn new(
        correlator: Correlator,
        resolver: Resolver,
        filter: Filter,
        sink: Box<dyn Sink>,
        own_fin_timeout_s: u64,
        summary_only: bool,
    ) -> Self {
        Self {
            correlator,
            resolver,
            filter,
            fin_timeouts: FinTimeouts::default(),
            own_fin_timeout_s,
            summary: Summary::default(),
            sink,
            summary_only,
            batch: Vec::new(),
            ready: Vec::new(),
        }
    }

    /// Decodes and correlates one ring-buffer record; its reports go to the resolver in kernel
    /// order (an accept's ownership news must follow the CLOSE_WAIT it names).
    pub(crate) fn ingest(&mut self, bytes: &[u8]) {
        let Some(rec) = decode::decode(bytes) else {
            return;
        };
        match rec {
            Record {
                what: Decoded::Obtained { sock, owner },
                ts_ns,
                ..
            } => self.resolver.obtained(sock, ts_ns, &owner),
            rec => {
                if rec.what == (Decoded::ProcessExit { group_dead: true }) {
                    self.resolver.exited(rec.task.pid, rec.ts_ns);
                }
                self.correlator.handle(rec, &mut self.batch);
                for r in self.batch.drain(..) {
                    self.resolver.push(r, &mut self.ready);
                }
            }
        }
    }

    /// Every report whose owner is known: filtered, enriched, counted and written.
    pub(crate) fn emit(&mut self) -> io::Result<()> {
        self.resolver.ready(&mut self.ready);
        // Taken and put back: the buffer keeps its capacity from wake-up to wake-up.
        let mut ready = std::mem::take(&mut self.ready);
        let written = ready.drain(..).try_for_each(|mut r| {
            if !self.filter.wanted(&r) {
                return Ok(());
            }
            if let Report::Transition(t) = &mut r {
                self.enrich(t);
            }
            self.summary.add(&r);
            if self.summary_only {
                return Ok(());
            }
            self.sink.report(&r)
        });
        self.ready = ready;
        written?;
        self.sink.flush()
    }

    /// The tcp_fin_timeout of the socket's network namespace, read in the namespace of the task
    /// that closed it (a timer cause has none: the FIN's sender's). Only for FIN_WAIT2 reports
    /// that are shown: it may cost a /proc lookup.
    fn enrich(&mut self, t: &mut crate::model::TransitionReport) {
        t.fin_timeout_s = self.own_fin_timeout_s;
        if t.new != st::FIN_WAIT2 && t.old != st::FIN_WAIT2 {
            return;
        }
        let by = t
            .cause
            .as_ref()
            .and_then(|c| c.task.as_ref())
            .or(t.fin_by.as_ref());
        if let Some(s) = by.and_then(|task| self.fin_timeouts.for_thread(task.tid)) {
            t.fin_timeout_s = s;
        }
    }

    /// `--stuck`: sockets half-closed or in CLOSE_WAIT for `threshold_ns`, once each.
    pub(crate) fn stuck(&mut self, threshold_ns: u64) -> io::Result<()> {
        for s in self.summary.take_stuck(monotonic_ns(), threshold_ns) {
            self.sink.stuck(&s)?;
        }
        self.sink.flush()
    }

    /// Waits (bounded inside the resolver) for the owners of the last reports, then writes them.
    pub(crate) async fn drain_resolver(&mut self) -> io::Result<()> {
        self.emit()?;
        while !self.resolver.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            self.emit()?;
        }
        Ok(())
    }
}
