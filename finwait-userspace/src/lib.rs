//! finwait-trace: attributes TCP FIN_WAIT2 / CLOSE_WAIT sockets to the process and call
//! responsible, and says whose job the rest of the close is.
//!
//! Module map: the one map of this crate (each module opens with its one job; `docs/design.md`
//! follows one event through them).
//! - `cli`: the flags, defined once (the man page and completions are generated from them).
//! - `model`: the domain, no I/O: tasks, connections, causes, owners, reports, `TcpState`
//!   transitions classified once (`TransitionKind`), durations in words (`Dur`).
//!   - `verdict`: the one place that decides whose job a socket is, with the words for it.
//!   - `summary`: what a session found per process, and the sockets `--stuck` names.
//!   - `ledger`: the sockets someone must close, one entry per socket whichever path saw it
//!     (the start-up inventory or a live transition), checked against the kernel's table; the
//!     summary, the metrics' gauges and `top` each keep one.
//!   - `diagnosis`: why a CLOSE_WAIT is still open (Recv-Q, polling, thread states).
//!   - `container`: container, pod and systemd unit from a cgroup path.
//!   - `escape`: names made safe for a terminal.
//! - `host`: facts from /proc and netlink.
//!   - `procs`: processes by pid, name and workload; `owners`: socket holders from fd links;
//!     `inspect`: what one owner is doing (epoll sets, thread states).
//!   - `sockdiag`: sockets by state (sock_diag); `namespaces`: every network namespace and a way
//!     into each; `netns`: per-namespace sysctls.
//!   - `cgroup`: cgroup ids to paths; `pods`: pod names by UID; `clock`: the event clock.
//! - `kernel`: the eBPF side, from userspace.
//!   - `loader`: load and attach (`hooks`: the hook table; `attach`: the strategies; `object`:
//!     the object and its globals; `layouts`: tracefs and BTF offsets; `maps`: seeding and
//!     memlock; `kinds`: mode and hook kinds), with typed errors in `load_error`.
//!   - `arch`: what differs between x86-64 and arm64 (syscall wrappers, `pt_regs`, numbers);
//!     `tracefs`, `btf`: this kernel's layouts; `inventory`: the `iter/task_file` socket
//!     inventory; `counters`: the programs' counters; `prog_stats`: the kernel's per-program
//!     statistics; `diagnostics`: the programs' own messages (`-v`).
//! - `snapshot`: the sockets on the close path now (`build`: one socket at a time to answers;
//!   `entry`: one socket's answer; `tally`: the counts per process).
//! - `output`: sinks, one per output mode behind one trait: `human` (with `stuck_groups`, the
//!   `--stuck` reports of one check grouped, and `detail_table`, `snapshot --detail`), `json`
//!   (writing `wire`, the JSON contract as types, with names escaped by JSON's own rules:
//!   `SafeJson`), `metrics` (`registry`, `workloads`, `held`: the gauges' ledger, and `exposition`: the format a
//!   scraper asks for; served by
//!   `endpoint`: `limits`, the deadlines, the shedding cap and the accept backoff; `deadline`,
//!   writes that time out; `own`, its connections named to the tracer; `web_config`,
//!   `--web-config-file`, with `tls` and `auth`), `top` (the live table: `table` counts and
//!   sorts, `screen` draws it on the terminal); `health`: the tracer's start and counters every
//!   sink shows.
//! - `trace`: live tracing as a `pipeline`: `decode` -> `dedup` (a guarded hook's second
//!   reports) -> `correlate` (what caused each transition) -> `resolve` (who holds the socket)
//!   -> `filter` -> enrich -> verdict -> summary and sinks; `health` gathers the counters;
//!   `trace` itself loads, announces and runs the loop.
//! - `sandbox`: the tracer's own seccomp allow-list, on once the programs are attached.
//! - `demo`: the built-in loopback workload, traced by the same pipeline.
//!
//! Layers, each using only those above it: model; host, kernel, sandbox; snapshot; output; trace; demo;
//! cli (the flags, and the options built from them).
// The test build also links the integration tests' dev-dependencies.
#![cfg_attr(test, allow(unused_crate_dependencies))]

mod cli;
mod demo;
mod host;
mod kernel;
mod model;
mod output;
mod sandbox;
mod snapshot;
mod trace;

use std::process::ExitCode;

use cli::{Cli, Command};

/// The binary's entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse_checked();
    // The demo's workload processes are plain blocking code: no runtime for them.
    if let Some(role) = cli.trace.demo_role {
        return exit_code(demo::role(role, &cli.trace.select.ports));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("finwait-trace: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    exit_code(runtime.block_on(dispatch(cli)))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Snapshot(args)) => return snapshot_command(&args),
        Some(Command::Man) => return cli::man(),
        Some(Command::Top(args)) => return top_command(&args).await,
        None => {}
    }
    let t = cli.trace;
    if let Some(what) = &t.generate {
        return cli::generate(what, &mut std::io::stdout());
    }
    let mut opts = trace::Options::from(&t);
    follow_workloads(&t.workloads, &mut opts)?;
    if t.demo {
        return demo::run(opts).await;
    }
    trace::run(opts, None, || {}).await
}

/// Containers, pods and namespaces are followed as processes: those there now, and their
/// descendants.
fn follow_workloads(w: &cli::WorkloadArgs, opts: &mut trace::Options) -> anyhow::Result<()> {
    if w.is_empty() {
        return Ok(());
    }
    let (pids, missing) = host::procs::in_workloads(&host::procs::Workloads {
        containers: &w.containers,
        pods: &w.pods,
        netns: &w.netns,
    })?;
    if !missing.is_empty() {
        anyhow::bail!("no process runs in {}", missing.join(", "));
    }
    opts.load.pids.extend(pids);
    Ok(())
}

/// `finwait-trace top`: a trace whose output is the live table.
async fn top_command(a: &cli::TopArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        anyhow::bail!(
            "top draws a table on a terminal, and stdout is not one (a trace's --json or \
             --metrics suit a pipe or a file)"
        );
    }
    let mut opts = trace::Options::from(a);
    follow_workloads(&a.workloads, &mut opts)?;
    trace::run(opts, None, || {}).await
}

/// `finwait-trace snapshot`.
fn snapshot_command(a: &cli::SnapshotArgs) -> anyhow::Result<()> {
    let sel = &a.select;
    host::procs::check_exists(&sel.pids)?;
    let mut pids = sel.pids.clone();
    let by_name = host::procs::with_comm(&sel.comms);
    if !sel.comms.is_empty() && by_name.is_empty() && pids.is_empty() {
        eprintln!("finwait-trace: no process named {}", sel.comms.join(" or "));
        pids.push(u32::MAX); // no process has it: nothing is kept
    }
    pids.extend(by_name);
    let w = &a.workloads;
    let mut narrow = snapshot::Narrow {
        ports: sel.ports.clone(),
        states: sel.states.clone(),
        needs_action: sel.needs_action,
        netns: w.netns.clone(),
        containers: w.containers.clone(),
        pods: w.pods.clone(),
        container_netns: Default::default(),
    };
    if !w.containers.is_empty() || !w.pods.is_empty() {
        // An orphan of a container is in the namespace of its processes.
        let (pids, _) = host::procs::in_workloads(&host::procs::Workloads {
            containers: &w.containers,
            pods: &w.pods,
            netns: &[],
        })?;
        let netns = pids.into_iter().filter_map(host::namespaces::of_pid);
        narrow.container_netns = netns.collect();
    }
    // The kernel's socket inventory names the holders in one pass; /proc where it cannot.
    let mut kernel = kernel::loader::load_inventory_only().map_err(|e| format!("{e:#}"));
    let every_socket = a.json || a.detail;
    let kernel = kernel.as_mut().map_err(|e| e.clone());
    if !a.no_sandbox {
        // The iterator is loaded: from here on the snapshot only reads.
        sandbox::enter();
    }
    let snap = snapshot::take(&pids, kernel, narrow, every_socket)?;
    snap.warn_unseen();
    let mut sink = output::for_stdout(a.json, output::human::Style::default(), false);
    sink.snapshot(&snap, a.detail)?;
    sink.flush()?;
    snap.complete()
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("finwait-trace: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
