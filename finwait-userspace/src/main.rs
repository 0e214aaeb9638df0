use std::{process::ExitCode, time::Duration};

use clap::Parser;
use finwait_userspace::{
    cli::Cli,
    demo,
    tracer::{self, Config, Stopper},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let ring_bytes = cli.ring_buffer_kib * 1024;
    let result = runtime.block_on(async {
        if cli.demo {
            return demo::run(cli.json, ring_bytes).await;
        }
        let cfg = Config {
            pids: cli.pids,
            comms: cli.comms,
            json: cli.json,
            all: cli.all,
            duration: cli.duration.map(Duration::from_secs_f64),
            ring_bytes,
            ports: Vec::new(),
            keep_reports: false,
        };
        tracer::run(cfg, Stopper(None), || {}).await.map(|_| ())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("finwait-trace: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
