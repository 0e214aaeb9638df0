//! `cargo xtask`: set up the BPF toolchain, build, run and test finwait. This file only reads
//! the command line and hands each command to its module in the library (`lib.rs` has the map).
// The library uses the package's other dependencies.
#![allow(unused_crate_dependencies)]
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::{bench, build, setup, test, vm};

#[derive(Parser)]
#[command(about = "finwait's build tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building the eBPF side needs (Debian packages and bpf-linker).
    Setup,
    /// Build the eBPF object and the `finwait-trace` binary that embeds it.
    Build(build::BuildOptions),
    /// Build and run `finwait-trace ARGS` as root (through `sudo -E` when needed).
    Run(build::RunOptions),
    /// Measure tracing overhead on loopback churn against no tracer, tcpstates, bpftrace and a
    /// no-op floor (interleaved rounds; Markdown table, JSON in target/bench/overhead.json).
    Bench(bench::Options),
    /// Write the man page and shell completions to target/dist/.
    Docs,
    /// Time `finwait-trace snapshot` on ~100,000 sockets and 2,000 processes beside `ss
    /// -tanpoe` (one new network namespace), then on 20 namespaces of ~5,000 sockets (as root).
    BenchSnapshot,
    /// Build and run every test: the root integration tests on this kernel, then in qemu on
    /// the kernel matrix (`vm-test`): the newest 7.x in Debian unstable and Debian 11's 5.10.
    Test(test::Options),
    /// Run the integration tests inside qemu (software emulation) on other kernels, in both
    /// tracer modes; fails on a test failure, a panic or a hang.
    VmTest(vm::VmTestOptions),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Makes sure the toolchain is there, then hands the command to its function.
fn run(cli: Cli) -> Result<()> {
    setup::setup()?;
    setup::require_ebpf();
    match cli.cmd {
        // `setup()` above is the whole command.
        Cmd::Setup => Ok(()),
        Cmd::Build(opts) => build::build(&opts),
        Cmd::Run(opts) => build::run_tracer(&opts),
        Cmd::Bench(opts) => bench::bench(opts),
        Cmd::Docs => build::docs(),
        Cmd::BenchSnapshot => bench::bench_snapshot(),
        Cmd::Test(opts) => test::test(opts),
        Cmd::VmTest(opts) => vm::vm_test_command(opts),
    }
}
