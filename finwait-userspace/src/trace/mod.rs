//! Live tracing: load the programs, say what runs, take the start-up snapshot, then feed the ring
//! buffer through the [`pipeline`] until stopped, and end with the summary and the counters.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use finwait_common::{COUNTERS_MAP, EVENTS_MAP, OWNERS_MAP, TRACED_PIDS_MAP, TcpState};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::oneshot,
};

use crate::{
    host::{clock::monotonic_ns, namespaces, netns, owners, procs},
    kernel::{
        counters::Counters,
        diagnostics::Diagnostics,
        loader::{self, Loaded, OwnerSeeder},
    },
    model::EndsKey,
    output::{self, Start, human::Style},
    sandbox, snapshot,
};

pub(crate) mod correlate;
pub(crate) mod decode;
pub(crate) mod dedup;
pub(crate) mod filter;
pub(crate) mod health;
pub(crate) mod pipeline;
pub(crate) mod resolve;

use correlate::Correlator;
use filter::Filter;
use health::{KernelCounters, Warned};
use pipeline::Pipeline;
use resolve::Resolver;

/// Drains at least this often even without a wake-up (the kernel side batches wake-ups).
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// `--metrics`, `top`: finwait's own counters (and `top`'s table) are brought up to date this
/// often.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// Read the loss counters (a syscall per program) at most this often.
const LOSS_CHECK_EVERY: Duration = Duration::from_secs(1);

/// What to trace and how to show it, built once from the command line.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    /// What the kernel side loads: which processes, ports and transitions, the mode, the sizes.
    pub(crate) load: loader::Options,
    pub(crate) json: bool,
    pub(crate) duration: Option<Duration>,
    /// Only transitions into or out of these states (empty: all).
    pub(crate) states: Vec<TcpState>,
    /// Only reports whose verdict asks a process to act (`--needs-action`).
    pub(crate) needs_action: bool,
    /// Only this family: Some(false) IPv4, Some(true) IPv6.
    pub(crate) ipv6: Option<bool>,
    /// Print only the summary at the end.
    pub(crate) summary_only: bool,
    /// Print nothing on stdout.
    pub(crate) quiet: bool,
    /// Serve metrics here.
    pub(crate) metrics: Option<std::net::SocketAddr>,
    pub(crate) metrics_max_workloads: usize,
    /// `--web-config-file`: TLS and auth for the endpoint.
    pub(crate) web_config: Option<std::path::PathBuf>,
    /// Report sockets half-closed or in CLOSE_WAIT for this long, once each.
    pub(crate) stuck: Option<Duration>,
    /// Human lines show wall-clock time instead of seconds since start.
    pub(crate) wall_clock: bool,
    /// Start with a snapshot of the sockets already on the close path.
    pub(crate) snapshot: bool,
    /// Print the counters (JSON, to stderr) this often.
    pub(crate) stats_every: Option<Duration>,
    /// Sandbox the tracer once its programs are attached (off: `--no-sandbox`).
    pub(crate) sandbox: bool,
    /// The hidden self-test: what a compromise would try, tried on this pid's memory.
    pub(crate) sandbox_self_test: Option<u32>,
    /// `top`: the live table is the output (and quitting it ends the trace).
    pub(crate) top: bool,
}

/// Ends a run early (the demo, once its workload is done).
pub(crate) type Stopper = Option<oneshot::Receiver<()>>;

/// Traces until Ctrl-C, SIGTERM, `--duration`, `stop`, or (with `--pid` alone) every followed
/// process has exited. `on_ready` runs once the programs are attached.
pub(crate) async fn run(opts: Options, stop: Stopper, on_ready: impl FnOnce()) -> Result<()> {
    procs::check_exists(&opts.load.pids)?;
    let signals = Signals::catch()?;
    let own = output::endpoint::OwnConnections::default();
    let (sinks, endpoint, quit) = sinks(&opts, &own)?;
    let stop = stop.or(quit);
    let mut loaded = loader::load(&opts.load)?;
    // Only with -v is aya-log's ring read (without it, the programs never write to it).
    let diagnostics = loaded
        .diagnostics
        .then(|| Diagnostics::start(&mut loaded.ebpf))
        .flatten();
    let fin_timeout_s = netns::own_fin_timeout();
    let refs_zero_based = loaded
        .offsets
        .is_some_and(|o| o.file_ref_is_zero_based == 1);
    let mut p = Pipeline::new(
        Correlator::new(refs_zero_based),
        Resolver::new(owners::Scanner::start(owners::scan)),
        filter(&opts, own),
        sinks,
        fin_timeout_s,
    );
    let sandbox = enter_sandbox(&opts);
    if let Some(endpoint) = endpoint {
        endpoint.serve()?;
    }
    announce(&opts, &loaded, fin_timeout_s, &sandbox, &mut p)?;
    if !loaded.skips_counted {
        eprintln!(
            "finwait-trace: note: this kernel does not count the runs of BPF programs it skips \
             (bpf_prog_info.recursion_misses arrives in Linux 5.12): events it drops while another \
             BPF program runs on the same CPU cannot be counted (kernel_skipped_nested stays 0; \
             kernel_skips_counted is false)"
        );
    }
    if opts.snapshot {
        let refused = loaded.inventory_refused.clone();
        start_snapshot(&opts, &mut loaded.ebpf, refused, &mut p)?;
    }
    p.sink.flush()?;
    on_ready();
    let kernel = take_maps(&opts, &mut loaded, &mut p)?;
    let traced = trace(&opts, &loaded.ebpf, kernel, &mut p, (stop, signals)).await;
    if let Some(d) = diagnostics {
        d.finish().await;
    }
    traced
}

/// What the user asked to see, without the `--metrics` endpoint's own connections.
fn filter(o: &Options, own: output::endpoint::OwnConnections) -> Filter {
    let mut f = Filter::new(o);
    if o.metrics.is_some() {
        f.exclude(own);
    }
    f
}

/// Where the findings go: stdout (unless `--quiet`), the `--metrics` endpoint, whose port is
/// taken here, before anything loads, and served once the tracer is sandboxed, and `top`'s
/// table (with what ends the trace when it is left).
fn sinks(
    o: &Options,
    own: &output::endpoint::OwnConnections,
) -> Result<(
    Box<dyn output::Sink>,
    Option<output::endpoint::Endpoint>,
    Stopper,
)> {
    let mut sinks: Vec<Box<dyn output::Sink>> = Vec::new();
    let mut endpoint = None;
    let mut quit = None;
    if o.top {
        let read_kernel = Box::new(namespaces::close_path_of);
        let (sink, stopped) = output::top::TopSink::new(read_kernel);
        sinks.push(Box::new(sink));
        quit = Some(stopped);
    }
    if !o.quiet {
        let style = Style::for_stdout(o.wall_clock, monotonic_ns());
        sinks.push(output::for_stdout(o.json, style, o.summary_only));
    }
    if let Some(addr) = o.metrics {
        // Checked before anything loads: a bad file is a usage error.
        let web = match &o.web_config {
            Some(path) => output::endpoint::WebConfig::read(path)?,
            None => output::endpoint::WebConfig::default(),
        };
        let (sink, exposition) = output::metrics::MetricsSink::new(
            o.metrics_max_workloads,
            Box::new(namespaces::close_path_of),
        );
        endpoint = Some(output::endpoint::bind(
            addr,
            exposition,
            sink.readiness(),
            own.clone(),
            web,
        )?);
        sinks.push(Box::new(sink));
    }
    Ok((Box::new(output::Tee(sinks)), endpoint, quit))
}

/// Attached, and the owner scanner's thread started (the endpoint's comes next, inside): from
/// here on the tracer needs no write, no new program, no new process (docs/sandbox.md).
fn enter_sandbox(o: &Options) -> sandbox::Status {
    let status = if o.sandbox {
        sandbox::enter()
    } else {
        sandbox::Status::Disabled
    };
    if let Some(pid) = o.sandbox_self_test {
        sandbox::self_test(pid);
    }
    status
}

/// Warnings about what is off, and the start event.
fn announce(
    o: &Options,
    l: &Loaded,
    fin_timeout_s: u64,
    sandbox: &sandbox::Status,
    p: &mut Pipeline,
) -> Result<()> {
    // Warnings for what reduces what the user sees; the expected detail only with -v.
    let verbose = o.load.diagnostics;
    let preemptible = programs_run_preemptibly(&crate::kernel::release());
    for d in &l.degraded {
        if !d.nesting_only || preemptible || verbose {
            eprintln!("finwait-trace: warning: {}", d.note);
        }
    }
    if let (Some(why), true) = (&l.precise_unavailable, verbose) {
        eprintln!("finwait-trace: note: correlated mode: {why}");
    }
    let start = Start {
        mode: l.mode,
        state_hook: l.state_hook,
        call_hook: l.call_hook,
        syscall_hook: l.syscall_hook,
        precise_unavailable: l.precise_unavailable.clone(),
        fd_resolution: l.offsets.is_some(),
        kernel: crate::kernel::release(),
        arch: crate::kernel::arch::HOST.name,
        tcp_fin_timeout_s: fin_timeout_s,
        attached: l.attached,
        attach_failed: l.attach_failed,
        pids: o.load.pids.clone(),
        comms: o.load.comms.clone(),
        inventory: if l.inventory_refused.is_none() {
            "iter/task_file"
        } else {
            "proc"
        },
        sandbox: sandbox.to_string(),
        maps: l.sizes,
    };
    Ok(p.sink.start(&start)?)
}

/// The maps userspace reads while tracing: the pid filter and the ownership map go to their
/// stages; the counters and the ring come back.
fn take_maps(
    o: &Options,
    l: &mut Loaded,
    p: &mut Pipeline,
) -> Result<(KernelCounters, RingBuf<MapData>)> {
    let ebpf = &mut l.ebpf;
    if o.load.following() {
        let map = ebpf.take_map(TRACED_PIDS_MAP).context("pid map")?;
        p.filter.follow(BpfHashMap::try_from(map)?);
    }
    if let Some(map) = ebpf.take_map(OWNERS_MAP) {
        p.resolver.set_owner_map(BpfHashMap::try_from(map)?);
    }
    let counters = ebpf.take_map(COUNTERS_MAP).context("counters map")?;
    let counters = KernelCounters::new(Counters::new(counters)?, l.attach_failed, l.skips_counted);
    let ring = RingBuf::try_from(ebpf.take_map(EVENTS_MAP).context("events map")?)?;
    Ok((counters, ring))
}

/// SIGINT and SIGTERM, caught from the start: one that comes while the programs load or the
/// snapshot is read ends the run as cleanly as one that comes later (not the default death).
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn catch() -> Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }
}

/// The event loop, then the summary and the counters.
async fn trace(
    o: &Options,
    ebpf: &aya::Ebpf,
    (kernel, ring): (KernelCounters, RingBuf<MapData>),
    p: &mut Pipeline,
    (mut stop, signals): (Stopper, Signals),
) -> Result<()> {
    // SAFETY: the ring's fd is owned by `ring`, which the AsyncFd owns and drops last.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;
    let Signals {
        int: mut sigint,
        term: mut sigterm,
    } = signals;
    let deadline = tokio::time::sleep(o.duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);
    let mut stats_tick = o.stats_every.map(tokio::time::interval);
    let mut gone_check = tokio::time::interval(Duration::from_secs(1));
    let mut health_tick = tokio::time::interval(HEALTH_EVERY);
    // --pid only (a --comm may match a process started later).
    let watch_targets = !o.load.pids.is_empty() && o.load.comms.is_empty();
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut warned, mut losses_checked) = (Warned::default(), Instant::now());
    // What moved while the inventory was read wins over its view; then the gauges are seeded
    // and the endpoint may answer.
    drain(ring.get_mut(), p);
    p.emit()?;
    p.sink.ready();
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), p);
                guard.clear_ready();
            }
            _ = tick.tick() => drain(ring.get_mut(), p),
            _ = async { stats_tick.as_mut().unwrap().tick().await }, if stats_tick.is_some() => {
                stats_to_stderr(&kernel.stats(ebpf, p))?;
            }
            _ = health_tick.tick(), if o.metrics.is_some() || o.top => p.sink.health(&kernel.stats(ebpf, p))?,
            _ = gone_check.tick(), if watch_targets => if p.filter.none_left(&procs::alive) {
                eprintln!("finwait-trace: every traced process has exited (and no descendant is left); stopping");
                break;
            },
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
            _ = async { stop.as_mut().unwrap().await }, if stop.is_some() => break,
        }
        p.emit()?;
        if let Some(after) = o.stuck {
            p.stuck(after.as_nanos() as u64)?;
        }
        if losses_checked.elapsed() >= LOSS_CHECK_EVERY {
            losses_checked = Instant::now();
            warned.warn(ebpf, &kernel, p);
        }
    }
    // The kernel's table first, then what the ring still holds: a socket whose last report
    // came before the table was read and that the table shows past it lost transitions.
    let table = close_path_table();
    drain(ring.get_mut(), p);
    p.drain_resolver().await?;
    if let Some((table, taken_ns)) = table {
        p.count_moved_on(&table, taken_ns);
    }
    warned.warn(ebpf, &kernel, p);
    finish(o, ebpf, &kernel, p).await
}

/// The states of the sockets on the close path in every network namespace, by ends, and when
/// the read began; None if sock_diag could not be read (nothing is counted then).
fn close_path_table() -> Option<(HashMap<EndsKey, TcpState>, u64)> {
    use netlink_packet_sock_diag::inet::StateFlags;
    let states = StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSING
        | StateFlags::TIME_WAIT
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK;
    let taken_ns = monotonic_ns();
    let mut seen = Vec::new();
    namespaces::dump_everywhere(&states, |s| seen.push((s.netns, s.key(), s.state))).ok()?;
    Some((by_ends(seen), taken_ns))
}

/// The sockets' states by ends. Live reports name a socket by its ends only, and ends repeat
/// across namespaces (every pod has its own 127.0.0.1): ends found in two namespaces say
/// nothing about either socket and are left out, so that no loss is counted on a stranger.
fn by_ends(sockets: Vec<(u64, EndsKey, TcpState)>) -> HashMap<EndsKey, TcpState> {
    let mut table: HashMap<EndsKey, (u64, Option<TcpState>)> =
        HashMap::with_capacity(sockets.len());
    for (netns, ends, state) in sockets {
        table
            .entry(ends)
            .and_modify(|(ns, known)| {
                if *ns != netns {
                    *known = None;
                }
            })
            .or_insert((netns, Some(state)));
    }
    table
        .into_iter()
        .filter_map(|(ends, (_, state))| Some((ends, state?)))
        .collect()
}

/// The last reports, the summary and the counters.
async fn finish(o: &Options, ebpf: &aya::Ebpf, k: &KernelCounters, p: &mut Pipeline) -> Result<()> {
    p.drain_resolver().await?;
    p.read_open_close_waits();
    p.sink.summary(&p.summary, monotonic_ns())?;
    let stats = k.stats(ebpf, p);
    if o.stats_every.is_some() {
        stats_to_stderr(&stats)?;
    }
    p.sink.stats(&stats)?;
    p.sink.flush()?;
    Ok(())
}

/// `--stats-every`: the stats event, as a JSON line on stderr.
fn stats_to_stderr(stats: &output::Stats) -> Result<()> {
    let line = serde_json::to_string(&output::wire::Event::Stats(stats))?;
    eprintln!("{line}");
    Ok(())
}

fn drain(ring: &mut RingBuf<MapData>, p: &mut Pipeline) {
    while let Some(item) = ring.next() {
        p.ingest(&item);
    }
}

/// The sockets already stuck, taken after the programs are attached so that nothing falls
/// between the two: printed first, and handed to the correlator so their closes are timed.
fn start_snapshot(
    o: &Options,
    ebpf: &mut aya::Ebpf,
    inventory_refused: Option<String>,
    p: &mut Pipeline,
) -> Result<()> {
    let mut pids = o.load.pids.clone();
    pids.extend(procs::with_comm(&o.load.comms));
    if pids.is_empty() && o.load.following() {
        return Ok(()); // a --comm that matches no process yet: nothing of theirs is stuck
    }
    let kernel = match inventory_refused {
        None => Ok(&mut *ebpf),
        Some(why) => Err(why),
    };
    let snap = match snapshot::take(&pids, kernel, snapshot::Narrow::default(), true) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "finwait-trace: warning: no start-up snapshot ({e:#}); tracing new transitions only"
            );
            return Ok(());
        }
    };
    snap.warn_unseen();
    let followed: std::collections::HashSet<u32> = if o.load.following() {
        procs::with_descendants(&pids).into_iter().collect()
    } else {
        Default::default()
    };
    seed_owners(ebpf, &snap, &followed);
    for e in &snap.entries {
        use crate::model::Verdict;
        let half_closed = match &e.verdict {
            Verdict::OwnerMustClose(_) => false,
            Verdict::ApplicationMustClose(_) if e.sock.state == TcpState::FinWait2 => true,
            _ => continue,
        };
        p.correlator.seed(e.sock.inode, snap.taken_ns);
        let Some(owner) = e.owners.first() else {
            continue;
        };
        if !half_closed {
            p.resolver.remember(e.sock.inode, owner.clone());
        }
        // Stuck before the start: in --stuck and the summary, timed from the inventory.
        let ends = e.ends();
        if p.filter.inventory_wanted(&ends, e.sock.state) {
            p.summary
                .seed(e.sock.inode, snap.taken_ns, owner, half_closed, ends);
        }
    }
    Ok(p.sink.snapshot(&snap, false)?)
}

/// The kernel records holders as sockets are obtained; those obtained before it started come
/// from the snapshot's /proc scan: every established TCP socket and every one on the close path.
/// Those of `followed` processes stay followed after their holder exits, as the kernel's own.
fn seed_owners(
    ebpf: &mut aya::Ebpf,
    snap: &snapshot::Snapshot,
    followed: &std::collections::HashSet<u32>,
) {
    use netlink_packet_sock_diag::inet::StateFlags;
    let mut seeder = match OwnerSeeder::new(ebpf) {
        Ok(s) => s,
        Err(e) => return eprintln!("finwait-trace: warning: ownership not seeded ({e:#})"),
    };
    let mut seed = |inode: u64| {
        if let Some(o) = snap.owners.first(inode).filter(|_| inode != 0) {
            seeder.seed(inode, &o, followed.contains(&o.pid));
        }
    };
    if snap.holders == snapshot::Holders::Kernel {
        // The kernel's inventory listed every TCP socket fd, in every namespace: no dump.
        snap.owners.inodes().for_each(&mut seed);
        return warn_full(seeder.full);
    }
    snap.entries.iter().for_each(|e| seed(e.sock.inode));
    // Streamed: a host's 100,000 established sockets are never held in memory at once.
    let established = StateFlags::ESTABLISHED | StateFlags::SYN_SENT;
    // Every namespace: a pod's sockets obtained before the start are as much its own.
    if let Err(e) = namespaces::dump_everywhere(&established, |s| seed(s.inode)) {
        eprintln!(
            "finwait-trace: warning: established sockets not read ({e:#}); their owners will come from /proc"
        );
    }
    warn_full(seeder.full);
}

fn warn_full(full: u64) {
    if full > 0 {
        eprintln!(
            "finwait-trace: warning: the ownership map is full: {full} sockets from before the start have no kernel owner (their owners will come from /proc)"
        );
    }
}

/// Linux 7.0 on (x86 keeps only the full and lazy preemption models) preempts BPF programs:
/// a program preempted on a CPU makes the kernel skip the others of its kind there, under load
/// often, where before only an interrupt nesting in one did.
fn programs_run_preemptibly(release: &str) -> bool {
    !crate::kernel::release_before(release, (7, 0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn which_kernels_preempt_bpf_programs() {
        let p = super::programs_run_preemptibly;
        assert!(p("7.2.13+deb14-cloud-amd64"));
        assert!(p("10.0.0"));
        assert!(!p("6.18.0-finwait"));
        assert!(!p("5.10.0-32-cloud-amd64"));
        assert!(!p(""));
    }

    #[test]
    fn ends_in_two_namespaces_say_nothing() {
        use std::net::{IpAddr, Ipv4Addr};

        use finwait_common::TcpState::{CloseWait, FinWait2, LastAck};
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let a = crate::model::ends_key(lo, 80, lo, 5000);
        let b = crate::model::ends_key(lo, 80, lo, 5001);
        let table = super::by_ends(vec![
            (1, a, CloseWait),
            (2, a, LastAck),
            (1, b, FinWait2),
            (1, b, FinWait2),
        ]);
        assert_eq!(table.get(&a), None);
        assert_eq!(table.get(&b), Some(&FinWait2));
        assert_eq!(table.len(), 1);
    }
}
