//! The live tracer: drains the ring buffer, correlates, filters and prints.
use std::{
    collections::HashSet,
    io::{BufWriter, Write},
    os::fd::AsFd,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use finwait_common::{
    COUNTERS_MAP, EVENTS_MAP, OWNERS_MAP, TRACED_PIDS_MAP, counter, tcp_state as st,
};
use serde_json::json;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::oneshot,
};

use crate::{
    correlate::{Correlator, Report},
    event, loader,
    netns::FinTimeouts,
    output::{self, Clock},
    owners::{self, Scanner},
    resolve::Resolver,
    snapshot::{self, Class},
    summary::Summary,
};

/// Drains at least this often even without a wake-up (the kernel side batches wake-ups).
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// Warn about lost or skipped events at most this often.
const LOSS_CHECK_EVERY: Duration = Duration::from_secs(1);

pub struct Config {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub json: bool,
    pub all: bool,
    pub duration: Option<Duration>,
    pub ring_bytes: u32,
    /// Only report sockets with one of these local or remote ports (empty: all).
    pub ports: Vec<u16>,
    /// Only transitions into or out of these states (empty: all).
    pub states: Vec<u8>,
    /// Only this family: Some(false) IPv4, Some(true) IPv6.
    pub ipv6: Option<bool>,
    /// Print only the summary at the end.
    pub summary_only: bool,
    /// Report sockets half-closed or in CLOSE_WAIT for this long, once each.
    pub stuck: Option<Duration>,
    /// Human lines show wall-clock time instead of seconds since start.
    pub wall_clock: bool,
    /// Keep the shown reports and return them (the demo summarises them).
    pub keep_reports: bool,
    /// Start with a snapshot of the sockets already on the close path.
    pub snapshot: bool,
    /// Benchmark floor: programs attached but doing nothing.
    pub noop: bool,
    pub mode: loader::Mode,
    /// Print the counters (JSON, to stderr) this often.
    pub stats_every: Option<Duration>,
    /// Size of the kernel's socket ownership map.
    pub owners_max: u32,
}

/// How the run ended, for callers that drive a workload (the demo).
pub struct Stopper(pub Option<oneshot::Receiver<()>>);

pub struct Outcome {
    pub reports: Vec<Report>,
}

pub async fn run(cfg: Config, stop: Stopper, mut on_ready: impl FnMut()) -> Result<Outcome> {
    crate::procs::check_exists(&cfg.pids)?;
    let loaded = loader::load(&loader::Options {
        all_transitions: cfg.all,
        pids: cfg.pids.clone(),
        comms: cfg.comms.clone(),
        ring_bytes: cfg.ring_bytes,
        // Wake userspace once a quarter of the ring is used; the timer drains the rest.
        wakeup_bytes: cfg.ring_bytes / 4,
        noop: cfg.noop,
        mode: cfg.mode,
        ports: cfg.ports.clone(),
        owners_max: cfg.owners_max,
    })?;
    let mut ebpf = loaded.ebpf;
    let fin_timeout_s = crate::netns::own_fin_timeout();
    let clock = Clock::new();
    let refs_zero_based = loaded
        .offsets
        .is_some_and(|o| o.file_ref_is_zero_based == 1);
    let mut correlator = Correlator::new(refs_zero_based);
    let mut resolver = Resolver::new(Scanner::start(owners::scan));
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(64 * 1024, stdout.lock());

    let mode = if loaded.call_hook.is_some() {
        "precise"
    } else {
        "correlated"
    };
    let fd_resolution = loaded.offsets.is_some();
    for note in &loaded.degraded {
        eprintln!("finwait-trace: warning: {note}");
    }
    if let Some(why) = &loaded.precise_unavailable {
        eprintln!(
            "finwait-trace: note: correlated mode, {why}; io_uring closes and other paths without \
             a close()/shutdown() syscall will show as unknown"
        );
    }
    if cfg.json {
        let start = json!({
            "event": "start",
            "mode": mode,
            "state_hook": loaded.state_hook,
            "call_hook": loaded.call_hook,
            "precise_unavailable": loaded.precise_unavailable,
            "fd_resolution": fd_resolution,
            "kernel": kernel_release(),
            "tcp_fin_timeout_s": fin_timeout_s,
            "attached": loaded.attached,
            "attach_failed": loaded.attach_failed,
            "pids": cfg.pids,
            "comms": cfg.comms,
        });
        writeln!(out, "{start}")?;
    } else {
        writeln!(
            out,
            "finwait-trace: tracing TCP close paths (mode: {mode}{}, fd->socket resolution: {}, tcp_fin_timeout {fin_timeout_s} s); Ctrl-C to stop",
            match loaded.call_hook {
                Some(hook) => format!(" via {hook} on tcp_close/tcp_shutdown"),
                None => String::new(),
            },
            if fd_resolution { "on" } else { "off" }
        )?;
    }
    if cfg.snapshot {
        start_snapshot(&cfg, &mut ebpf, &mut correlator, &mut resolver, &mut out);
    }
    out.flush()?;
    on_ready();

    let traced: Option<BpfHashMap<MapData, u32, u8>> =
        if cfg.pids.is_empty() && cfg.comms.is_empty() {
            None
        } else {
            Some(BpfHashMap::try_from(
                ebpf.take_map(TRACED_PIDS_MAP).context("pid map")?,
            )?)
        };
    if let Some(map) = ebpf.take_map(OWNERS_MAP) {
        resolver.set_owner_map(BpfHashMap::try_from(map)?);
    }
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(ebpf.take_map(COUNTERS_MAP).context("counters map")?)?;
    let ring = RingBuf::try_from(ebpf.take_map(EVENTS_MAP).context("events map")?)?;
    // SAFETY: the ring's fd is owned by `ring`, which the AsyncFd owns and drops last.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = tokio::time::sleep(cfg.duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);
    let mut stop_rx = stop.0;
    let mut stats_tick = cfg.stats_every.map(tokio::time::interval);
    let mut gone_check = tokio::time::interval(Duration::from_secs(1));
    let watch_targets = !cfg.pids.is_empty() && cfg.comms.is_empty();
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut view = View {
        cfg: &cfg,
        traced: &traced,
        shown: HashSet::new(),
        kept: Vec::new(),
        fin_timeouts: FinTimeouts::default(),
        summary: Summary::default(),
        style: output::Style::for_stdout(cfg.wall_clock, owners::monotonic_ns()),
        line: output::LineBuf::default(),
    };
    let mut batch = Vec::new();
    let mut ready = Vec::new();
    let mut warned = Warned::default();
    let mut losses_checked = std::time::Instant::now();
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut correlator, &mut resolver, &mut batch, &mut ready);
                guard.clear_ready();
            }
            _ = tick.tick() => drain(ring.get_mut(), &mut correlator, &mut resolver, &mut batch, &mut ready),
            _ = async { stats_tick.as_mut().unwrap().tick().await }, if stats_tick.is_some() => {
                eprintln!("{}", stats_json(&correlator, &resolver, &counters, &ebpf, loaded.attach_failed));
            }
            _ = gone_check.tick(), if watch_targets => {
                // --pid only (a --comm may match a process started later): stop once every
                // followed process and descendant has exited.
                if traced.as_ref().is_some_and(|m| m.keys().next().is_none()) {
                    eprintln!("finwait-trace: every traced process has exited (and no descendant is left); stopping");
                    break;
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
            _ = async { stop_rx.as_mut().unwrap().await }, if stop_rx.is_some() => break,
        }
        resolver.ready(&mut ready);
        view.emit(&mut ready, &mut out, &clock, fin_timeout_s)?;
        if let Some(after) = cfg.stuck {
            for s in view
                .summary
                .take_stuck(owners::monotonic_ns(), after.as_nanos() as u64)
            {
                let line = if cfg.json {
                    output::stuck_json(&s, &clock)
                } else {
                    output::stuck_line(&s)
                };
                writeln!(out, "{line}")?;
            }
            out.flush()?;
        }
        // The loss counters cost a syscall per program: read them once a second, not per wake-up.
        if losses_checked.elapsed() < LOSS_CHECK_EVERY {
            continue;
        }
        losses_checked = std::time::Instant::now();
        warned.warn(&ebpf, &counters);
    }
    warned.warn(&ebpf, &counters);
    drain(
        ring.get_mut(),
        &mut correlator,
        &mut resolver,
        &mut batch,
        &mut ready,
    );
    view.emit(&mut ready, &mut out, &clock, fin_timeout_s)?;
    // Let owner lookups for the last reports finish (bounded inside the resolver).
    while !resolver.is_empty() {
        resolver.ready(&mut ready);
        view.emit(&mut ready, &mut out, &clock, fin_timeout_s)?;
        if !resolver.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let now = crate::owners::monotonic_ns();
    if cfg.json {
        writeln!(out, "{}", view.summary.json(now))?;
    } else {
        for line in view.summary.human(now) {
            writeln!(out, "{line}")?;
        }
    }
    let final_stats = stats_json(
        &correlator,
        &resolver,
        &counters,
        &ebpf,
        loaded.attach_failed,
    );
    if cfg.stats_every.is_some() {
        eprintln!("{final_stats}");
    }
    if cfg.json {
        writeln!(out, "{final_stats}")?;
    } else {
        let stats = correlator.stats();
        writeln!(
            out,
            "finwait-trace: {} records, {} lost (ring full), {} skipped by the kernel, {} sockets evicted, {} hooks failed to attach",
            stats.records,
            sum(&counters, counter::RING_FULL),
            nested_misses(&ebpf),
            stats.sockets_evicted,
            loaded.attach_failed
        )?;
    }
    out.flush()?;
    Ok(Outcome { reports: view.kept })
}

/// The sockets already stuck, taken after the programs are attached so that nothing falls
/// between the two: printed first, and handed to the correlator so their closes are timed.
fn start_snapshot(
    cfg: &Config,
    ebpf: &mut aya::Ebpf,
    correlator: &mut Correlator,
    resolver: &mut Resolver,
    out: &mut impl Write,
) {
    let mut pids = cfg.pids.clone();
    pids.extend(crate::procs::with_comm(&cfg.comms));
    if pids.is_empty() && (!cfg.pids.is_empty() || !cfg.comms.is_empty()) {
        return; // a --comm that matches no process yet: nothing of theirs is stuck
    }
    let snap = match snapshot::take(&pids) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "finwait-trace: warning: no start-up snapshot ({e:#}); tracing new transitions only"
            );
            return;
        }
    };
    seed_owners(ebpf, &snap);
    for e in &snap.entries {
        match e.class {
            Class::CloseWait | Class::HalfClosed => correlator.seed(e.sock.inode, snap.taken_ns),
            _ => continue,
        }
        if let (Class::CloseWait, Some(o)) = (e.class, e.owners.first()) {
            resolver.remember(e.sock.inode, o.clone());
        }
    }
    let _ = snapshot::print(&snap.entries, cfg.json, false, out);
}

/// The kernel records holders as sockets are obtained; those obtained before it started come
/// from the snapshot's /proc scan: every established TCP socket and every one on the close path.
fn seed_owners(ebpf: &mut aya::Ebpf, snap: &snapshot::Snapshot) {
    use netlink_packet_sock_diag::inet::StateFlags;
    let mut seeder = match loader::OwnerSeeder::new(ebpf) {
        Ok(s) => s,
        Err(e) => return eprintln!("finwait-trace: warning: ownership not seeded ({e:#})"),
    };
    let mut seed = |inode: u64| {
        if let Some(o) = snap.owners.first(inode).filter(|_| inode != 0) {
            seeder.seed(inode, &o);
        }
    };
    snap.entries.iter().for_each(|e| seed(e.sock.inode));
    // Streamed: a host's 100,000 established sockets are never held in memory at once.
    let established = StateFlags::ESTABLISHED | StateFlags::SYN_SENT;
    if let Err(e) = crate::sockdiag::dump_each(established, |s| seed(s.inode)) {
        eprintln!(
            "finwait-trace: warning: established sockets not read ({e:#}); their owners will come from /proc"
        );
    }
    if seeder.full > 0 {
        eprintln!(
            "finwait-trace: warning: the ownership map is full: {} sockets from before the start have no kernel owner (their owners will come from /proc)",
            seeder.full
        );
    }
}

/// Decodes and correlates every record waiting in the ring; the reports go to the resolver in
/// kernel order (an accept's ownership news must follow the CLOSE_WAIT it names), and what is
/// complete goes on to `ready`.
fn drain(
    ring: &mut RingBuf<MapData>,
    c: &mut Correlator,
    resolver: &mut Resolver,
    batch: &mut Vec<Report>,
    ready: &mut Vec<Report>,
) {
    while let Some(item) = ring.next() {
        match event::decode(&item) {
            Some(event::Record {
                what: event::Decoded::Obtained { sock, owner },
                ts_ns,
                ..
            }) => resolver.obtained(sock, ts_ns, &owner),
            Some(rec) => {
                if rec.what == (event::Decoded::ProcessExit { group_dead: true }) {
                    resolver.exited(rec.task.pid, rec.ts_ns);
                }
                c.handle(rec, batch);
                batch.drain(..).for_each(|r| resolver.push(r, ready));
            }
            None => {}
        }
    }
}

/// Losses already warned about: each warning says what is new.
#[derive(Default)]
struct Warned {
    skipped: u64,
    lost: u64,
}

impl Warned {
    fn warn(&mut self, ebpf: &aya::Ebpf, counters: &PerCpuArray<MapData, u64>) {
        let skipped = nested_misses(ebpf);
        if skipped > self.skipped {
            eprintln!(
                "finwait-trace: warning: {} events skipped by the kernel (a BPF program was already running on that CPU)",
                skipped - self.skipped
            );
            self.skipped = skipped;
        }
        let lost = sum(counters, counter::RING_FULL);
        if lost > self.lost {
            eprintln!(
                "finwait-trace: warning: {} events lost (ring buffer full; raise --ring-buffer-kib)",
                lost - self.lost
            );
            self.lost = lost;
        }
    }
}

/// Every counter, for the `stats` line (at exit, and with `--stats-every`).
fn stats_json(
    correlator: &Correlator,
    resolver: &Resolver,
    counters: &PerCpuArray<MapData, u64>,
    ebpf: &aya::Ebpf,
    attach_failed: usize,
) -> serde_json::Value {
    let stats = correlator.stats();
    json!({
        "event": "stats",
        "records": stats.records,
        "transitions": stats.transitions,
        "calls": stats.calls,
        "kernel_calls": stats.kernel_calls,
        "lost_ring_full": sum(counters, counter::RING_FULL),
        "kernel_skipped_nested": nested_misses(ebpf),
        "kernel_read_failed": sum(counters, counter::READ_FAILED),
        "pid_insert_failed": sum(counters, counter::PID_INSERT_FAILED),
        "in_call_full": sum(counters, counter::IN_CALL_FULL),
        "owner_map_full": sum(counters, counter::OWNERS_FULL),
        "scm_rights_unread": sum(counters, counter::SCM_RIGHTS_UNREAD),
        "sockets_evicted": stats.sockets_evicted,
        "tracked_sockets": correlator.tracked_sockets(),
        "threads_evicted": stats.threads_evicted,
        "attach_failed": attach_failed,
        "owners_from_kernel": resolver.stats.from_kernel,
        "owners_verified": resolver.stats.verified,
        "owner_scans": resolver.scans(),
        "owner_lookups_timed_out": resolver.stats.timed_out,
        "rss_kib": rss_kib(),
        "kernel_run_time": run_time(ebpf),
    })
}

/// Per program: runs and mean nanoseconds per run, where `kernel.bpf_stats_enabled` is on.
fn run_time(ebpf: &aya::Ebpf) -> serde_json::Map<String, serde_json::Value> {
    ebpf.programs()
        .filter_map(|(name, p)| {
            let (runs, ns) = crate::prog_stats::run_time(p.fd().ok()?.as_fd())?;
            Some((
                name.to_string(),
                json!({"runs": runs, "ns_per_run": ns / runs}),
            ))
        })
        .collect()
}

/// Events the kernel dropped because one of our programs (or another) was already running on
/// the CPU, summed over our programs.
fn nested_misses(ebpf: &aya::Ebpf) -> u64 {
    ebpf.programs()
        .filter_map(|(_, p)| p.fd().ok())
        .filter_map(|fd| crate::prog_stats::recursion_misses(fd.as_fd()))
        .sum()
}

fn sum(counters: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    counters.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

/// What the user asked to see.
struct View<'a> {
    cfg: &'a Config,
    traced: &'a Option<BpfHashMap<MapData, u32, u8>>,
    /// Sockets already shown: their later transitions are shown too.
    shown: HashSet<u64>,
    /// Reports kept for the caller (the demo's summary).
    kept: Vec<Report>,
    fin_timeouts: FinTimeouts,
    summary: Summary,
    style: output::Style,
    line: output::LineBuf,
}

impl View<'_> {
    fn is_traced(&self, pid: u32) -> bool {
        match self.traced {
            None => true,
            Some(map) => map.get(&pid, 0).is_ok(),
        }
    }

    fn wanted(&mut self, r: &Report) -> bool {
        let (sock, ports) = match r {
            Report::Transition(t) => (t.sock, Some((t.ends.lport, t.ends.rport))),
            Report::CloseNoFin(n) => (n.sock, n.ends.as_ref().map(|e| (e.lport, e.rport))),
        };
        if let Report::Transition(t) = r {
            let states = &self.cfg.states;
            if !states.is_empty()
                && ![t.old, t.new, t.effective_new()]
                    .iter()
                    .any(|s| states.contains(s))
            {
                return false;
            }
            if self.cfg.ipv6.is_some_and(|v6| t.ends.is_ipv6() != v6) {
                return false;
            }
        }
        if !self.cfg.ports.is_empty() {
            match ports {
                Some((l, r)) if self.cfg.ports.contains(&l) || self.cfg.ports.contains(&r) => {}
                _ => return false,
            }
        }
        // Without --pid/--comm everything passes: no per-socket bookkeeping on this path.
        if self.traced.is_none() {
            return true;
        }
        // A socket is followed once a followed process made a call on it or holds it; an owner
        // matching --comm counts even if it made no call yet.
        let followed = self.shown.contains(&sock)
            || match r {
                Report::Transition(t) => {
                    t.cause
                        .iter()
                        .filter_map(|c| c.task.as_ref())
                        .any(|task| self.is_traced(task.pid))
                        || t.owner.as_ref().is_some_and(|o| {
                            self.cfg.comms.iter().any(|c| **c == *o.comm) || self.is_traced(o.pid)
                        })
                }
                Report::CloseNoFin(n) => self.is_traced(n.task.pid),
            };
        if followed {
            self.shown.insert(sock);
        }
        followed
    }

    fn emit(
        &mut self,
        batch: &mut Vec<Report>,
        out: &mut impl Write,
        clock: &Clock,
        fin_timeout_s: u64,
    ) -> Result<()> {
        for mut r in batch.drain(..) {
            let wanted = self.wanted(&r);
            if let Report::Transition(t) = &mut r
                && wanted
                && (t.new == st::FIN_WAIT2 || t.old == st::FIN_WAIT2)
            {
                // The namespace of the task that closed it (a timer cause has none: use the FIN's sender).
                let by = t
                    .cause
                    .as_ref()
                    .and_then(|c| c.task.as_ref())
                    .or(t.fin_by.as_ref());
                let tid = by.map(|t| t.tid);
                t.fin_timeout_s = tid.and_then(|tid| self.fin_timeouts.for_thread(tid));
            }
            if let Report::Transition(t) = &r
                && t.new == st::CLOSE
            {
                self.shown.remove(&t.sock);
            }
            if !wanted {
                continue;
            }
            self.summary.add(&r);
            if self.cfg.summary_only {
                continue;
            }
            if self.cfg.json {
                writeln!(out, "{}", output::json_line(&r, clock, fin_timeout_s))?;
            } else {
                output::write_human(&mut self.line, &r, clock, fin_timeout_s, &self.style);
                out.write_all(self.line.line.as_bytes())?;
                out.write_all(b"\n")?;
            }
            if self.cfg.keep_reports {
                self.kept.push(r);
            }
        }
        out.flush()?;
        Ok(())
    }
}

fn rss_kib() -> u64 {
    procfs::process::Process::myself()
        .and_then(|p| p.status())
        .ok()
        .and_then(|s| s.vmrss)
        .unwrap_or(0)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
