use std::{process::ExitCode, time::Duration};

use finwait_userspace::{
    cli::{Cli, Command},
    demo, snapshot,
    tracer::{self, Config, Stopper},
};

fn main() -> ExitCode {
    let cli = Cli::parse_checked();
    // The demo's workload processes are plain blocking code: no runtime for them.
    if let Some(role) = cli.trace.demo_role {
        return exit_code(demo::role(role, &cli.trace.ports));
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
    let result = runtime.block_on(async {
        if let Some(Command::Snapshot(args)) = cli.command {
            return snapshot::run(&args.pids, args.json, args.detail);
        }
        let t = cli.trace;
        if let Some(what) = &t.generate {
            return finwait_userspace::cli::generate(what, &mut std::io::stdout());
        }
        let ring_bytes = t.ring_buffer_kib * 1024;
        if t.demo {
            return demo::run(t.json, ring_bytes).await;
        }
        let cfg = Config {
            pids: t.pids,
            comms: t.comms,
            json: t.json,
            all: t.all,
            duration: t.duration.map(Duration::from_secs_f64),
            ring_bytes,
            ports: t.ports,
            states: t.states,
            ipv6: (t.ipv4 || t.ipv6).then_some(t.ipv6),
            summary_only: t.summary_only,
            stuck: t.stuck.map(Duration::from_secs_f64),
            wall_clock: t.timestamp,
            keep_reports: false,
            snapshot: !t.no_snapshot,
            noop: t.bench_noop,
            mode: t.mode,
            stats_every: t.stats_every.map(Duration::from_secs_f64),
            owners_max: t.owner_map_entries,
        };
        tracer::run(cfg, Stopper(None), || {}).await.map(|_| ())
    });
    exit_code(result)
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
