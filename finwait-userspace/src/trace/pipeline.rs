//! The tracer's stages, in order: decode -> dedup -> correlate -> resolve owners -> filter ->
//! enrich -> summary and sink. Each report passes once; nothing here blocks on /proc (owners that need a
//! full scan wait in the resolver, in order).
use std::{
    collections::HashMap,
    io,
    time::{Duration, Instant},
};

use finwait_common::TcpState;

use super::{
    correlate::Correlator,
    decode::{self, Decoded, Record},
    dedup::Dedup,
    filter::Filter,
    resolve::Resolver,
};
use crate::{
    host::{
        cgroup::Cgroups,
        clock::monotonic_ns,
        inspect::{self, EpollSets},
        names::Names,
        namespaces::Diags,
        netns::FinTimeouts,
    },
    model::{
        Owner, Report, Stuck, Task,
        diagnosis::{OwnerState, Threads},
        summary::Summary,
    },
    output::Sink,
};

pub(crate) struct Pipeline {
    pub(crate) dedup: Dedup,
    pub(crate) correlator: Correlator,
    pub(crate) resolver: Resolver,
    pub(crate) filter: Filter,
    fin_timeouts: FinTimeouts,
    pub(crate) cgroups: Cgroups,
    /// Processes by their own name, not a thread's.
    names: Names,
    /// `tcp_fin_timeout` of the tracer's own namespace (where a socket's cannot be read).
    own_fin_timeout_s: u64,
    pub(crate) summary: Summary,
    pub(crate) sink: Box<dyn Sink>,
    inspector: Inspector,
    /// Reports of the record being correlated.
    batch: Vec<Report>,
    /// Reports whose owners are known, in kernel order.
    ready: Vec<Report>,
    /// Transitions of reported sockets that never arrived (see `Filter::pass` and
    /// `count_moved_on`).
    pub(crate) transitions_missed: u64,
}

impl Pipeline {
    pub(crate) fn new(
        correlator: Correlator,
        resolver: Resolver,
        filter: Filter,
        sink: Box<dyn Sink>,
        own_fin_timeout_s: u64,
    ) -> Self {
        Self {
            dedup: Dedup::new(),
            correlator,
            resolver,
            filter,
            fin_timeouts: FinTimeouts::default(),
            cgroups: Cgroups::new(),
            names: Names::default(),
            own_fin_timeout_s,
            summary: Summary::default(),
            sink,
            inspector: Inspector::default(),
            batch: Vec::new(),
            ready: Vec::new(),
            transitions_missed: 0,
        }
    }

    /// Decodes and correlates one ring-buffer record; its reports go to the resolver in kernel
    /// order (an accept's ownership news must follow the CLOSE_WAIT it names).
    pub(crate) fn ingest(&mut self, bytes: &[u8]) {
        let Some(rec) = decode::decode(bytes) else {
            return;
        };
        if !self.dedup.keep(&rec) {
            return;
        }
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
        // One clock read for the batch: caches of names, namespaces and timeouts age by it.
        let now = Instant::now();
        if !self.ready.is_empty() {
            self.cgroups.now(now);
        }
        // Taken and put back: the buffer keeps its capacity from wake-up to wake-up, and each
        // report is worked on in place (a report is a few hundred bytes: no moves).
        let mut ready = std::mem::take(&mut self.ready);
        let written = ready.iter_mut().try_for_each(|r| {
            let (wanted, missed) = self.filter.pass(r);
            self.transitions_missed += missed;
            if !wanted {
                return Ok(());
            }
            if let Report::Transition(t) = r {
                self.enrich(t, now);
            }
            self.identify(r, now);
            // Whose job it is: decided once, here, for the summary and the sink.
            let verdict = match r {
                Report::Transition(t) => t.verdict(),
                Report::CloseNoFin(_) => None,
            };
            self.summary.add(r, verdict.as_ref());
            if !self.filter.shows_verdict(verdict.as_ref()) {
                return Ok(());
            }
            self.sink.report(r, verdict.as_ref())
        });
        ready.clear();
        self.ready = ready;
        written?;
        // New processes in the summary: their command lines, while they still run.
        for pid in self.summary.take_new() {
            self.summary
                .set_cmdline(pid, crate::host::procs::cmdline(pid));
        }
        self.sink.flush()
    }

    /// Every process the report names: by its own name (not a thread's) and its container,
    /// from the cgroup the kernel recorded.
    fn identify(&mut self, r: &mut Report, now: Instant) {
        let (cg, names) = (&mut self.cgroups, &mut self.names);
        let task = |t: &mut Task, cg: &mut Cgroups, names: &mut Names| {
            let process = names.of_task(t.pid, t.tid, &t.comm, now);
            if process != t.comm {
                t.thread_comm = Some(std::mem::replace(&mut t.comm, process));
            }
            t.container = cg.of(t.cgroup_id, t.pid);
        };
        // The kernel recorded the name of the thread that obtained the socket: the process's
        // own (`exact`) when that was its main thread, kept then (it may have renamed itself
        // since); another thread's is replaced by the process's.
        let owner = |o: &mut Owner, exact: bool, cg: &mut Cgroups, names: &mut Names| {
            if !exact && let Some(process) = names.of_process(o.pid, now) {
                o.comm = process;
            }
            o.container = cg.of(o.cgroup_id.unwrap_or(0), o.pid);
        };
        match r {
            Report::Transition(t) => {
                if let Some(t) = t.cause.as_mut().and_then(|c| c.task.as_mut()) {
                    task(t, cg, names);
                }
                let recorded = t.recorded_owner.as_ref();
                if let Some(o) = &mut t.owner {
                    let exact =
                        recorded.is_some_and(|k| k.main_thread && (k.pid, k.fd) == (o.pid, o.fd));
                    owner(o, exact, cg, names);
                }
                // The socket's namespace: its holder's, else the caller's (a softirq's task is
                // whoever the packet interrupted: not asked).
                // A thread may have joined another namespace than its process's.
                let holder = t.owner.as_ref().map(|o| (o.pid, o.pid));
                let caller = t.cause.as_ref().and_then(|c| c.task.as_ref());
                let caller = caller.map(|t| (t.pid, t.tid));
                t.netns = holder
                    .or(caller)
                    .and_then(|(pid, tid)| names.netns(pid, tid, now));
            }
            Report::CloseNoFin(n) => {
                task(&mut n.task, cg, names);
                n.holders
                    .iter_mut()
                    .for_each(|o| owner(o, false, cg, names));
                n.netns = names.netns(n.task.pid, n.task.tid, now);
            }
        }
    }

    /// The tcp_fin_timeout of the socket's network namespace, read in the namespace of the task
    /// that closed it (a timer cause has none: the FIN's sender's). Only for reports that are
    /// shown: the namespace may cost a /proc lookup.
    fn enrich(&mut self, t: &mut crate::model::TransitionReport, now: Instant) {
        t.fin_timeout_s = self.own_fin_timeout_s;
        if t.touches_fin_wait2()
            && let Some(s) = self.fin_timeout_of(t, now)
        {
            t.fin_timeout_s = s;
        }
    }

    fn fin_timeout_of(&mut self, t: &crate::model::TransitionReport, now: Instant) -> Option<u64> {
        let by = t
            .cause
            .as_ref()
            .and_then(|c| c.task.as_ref())
            .or(t.fin_by.as_ref());
        self.fin_timeouts.for_thread(by?.tid, now)
    }

    /// `--stuck`: sockets half-closed or in CLOSE_WAIT for `threshold_ns`, once each, with what
    /// their owner is doing about them.
    pub(crate) fn stuck(&mut self, threshold_ns: u64) -> io::Result<()> {
        for mut s in self.summary.take_stuck(monotonic_ns(), threshold_ns) {
            s.owner_state = self.inspector.owner_state(&s);
            s.netns = self.names.netns(s.holder.pid, s.holder.pid, Instant::now());
            self.sink.stuck(&s)?;
        }
        self.sink.flush()
    }

    /// Why the CLOSE_WAIT sockets still open are: each one's Recv-Q, asked of the kernel.
    pub(crate) fn read_open_close_waits(&mut self) {
        let diags = &mut self.inspector.diags;
        self.summary.read_close_waits(MAX_READ_AT_END, |pid, e| {
            let s = diags.find(pid, e.local, e.lport, e.remote, e.rport)?;
            (s.state == TcpState::CloseWait).then_some(s.recv_queue)
        });
    }

    /// Sockets shown whose last transition here came before `taken_ns` and that the kernel's
    /// table (read then: state by ends) has in a later state on the close path: the
    /// transitions in between never arrived (they may have been a socket's last ones, which no
    /// later transition shows).
    pub(crate) fn count_moved_on(
        &mut self,
        table: &HashMap<crate::model::EndsKey, TcpState>,
        taken_ns: u64,
    ) {
        let filter = &self.filter;
        let moved = self
            .correlator
            .last_states(taken_ns)
            .filter(|(sock, ends, believed)| {
                filter.transition_shown(*sock)
                    && table
                        .get(&ends.key())
                        .is_some_and(|k| super::correlate::moved_on(*believed, *k))
            })
            .count();
        self.transitions_missed += moved as u64;
    }

    /// Waits (bounded inside the resolver) for the owners of the last reports, then writes them.
    pub(crate) async fn drain_resolver(&mut self) -> io::Result<()> {
        self.emit()?;
        while !self.resolver.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            self.emit()?;
        }
        Ok(())
    }
}

/// Reads what the owner of a stuck socket is doing: the socket's Recv-Q (sock_diag, that one
/// socket), the owner's epoll sets and threads, each owner at most once per [`REINSPECT_AFTER`].
#[derive(Default)]
struct Inspector {
    owners: HashMap<u32, (Instant, Option<EpollSets>, Option<Threads>)>,
    /// The socket is asked about in its holder's network namespace.
    diags: Diags,
}

/// CLOSE_WAIT sockets read at the end at most (one sock_diag query each).
const MAX_READ_AT_END: usize = 20_000;

const REINSPECT_AFTER: Duration = Duration::from_secs(1);
/// Owners remembered at most (a burst of stuck sockets of many processes).
const MAX_OWNERS: usize = 1024;

impl Inspector {
    fn owner_state(&mut self, s: &Stuck) -> Option<OwnerState> {
        let e = &s.ends;
        let sock = self
            .diags
            .find(s.holder.pid, e.local, e.lport, e.remote, e.rport)?;
        let mut state = OwnerState::new(sock.state, sock.recv_queue);
        let pid = s.holder.pid;
        let fresh = self
            .owners
            .get(&pid)
            .is_some_and(|(at, _, _)| at.elapsed() < REINSPECT_AFTER);
        if !fresh {
            if self.owners.len() >= MAX_OWNERS {
                self.owners.clear();
            }
            let read = (Instant::now(), EpollSets::of(pid), inspect::threads(pid));
            self.owners.insert(pid, read);
        }
        let (_, sets, threads) = &self.owners[&pid];
        state.polled = sets
            .as_ref()
            .zip(s.holder.fd)
            .map(|(sets, fd)| sets.polled(fd));
        state.threads.clone_from(threads);
        Some(state)
    }
}
