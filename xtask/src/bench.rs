//! `cargo xtask bench` (tracing overhead against its peers, a soak, the busy host, or the same
//! inside qemu) and `cargo xtask bench-snapshot`: each builds the release tracer and runs a
//! driver from finwait-userspace's examples as root.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{
    apt_install, as_root,
    build::{build_examples, build_tracer, example},
    is_root, vm,
};

/// libbpf-tools' tcpstates, the peer the benchmark compares against.
pub(crate) const TCPSTATES: &str = "/usr/sbin/tcpstates";

#[derive(Args)]
pub struct Options {
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Instead: churn for this many minutes under finwait, sampling its RSS and socket table.
    #[arg(long, value_name = "MINUTES", conflicts_with = "vm")]
    soak: Option<f64>,
    /// Run it inside qemu on this kernel instead (as `vm-test --kernel`): where precise
    /// mode can run, it is measured beside correlated. Repeatable.
    #[arg(long, value_name = "KERNEL")]
    vm: Vec<String>,
    /// Instead: the busy-host benchmark (2,000 idle processes holding 100,000 socket fds in
    /// a network namespace it creates, a CLOSE_WAIT-leaking and a closing back-end under
    /// churn): owners named, lookups timed out, finwait's CPU per connection and peak RSS,
    /// beside the same run on an empty host.
    #[arg(long, conflicts_with_all = ["vm", "soak"])]
    busy_host: bool,
    /// Also measure this finwait-trace binary (an earlier build), side by side in the same
    /// rounds: a change's before and after.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["vm", "soak", "busy_host"])]
    baseline: Option<PathBuf>,
}

/// `bench`: builds the release tracer and picks the benchmark the flags ask for.
pub fn bench(opts: Options) -> Result<()> {
    let bin = build_tracer(true)?;
    if opts.busy_host {
        return bench_busy_host(&bin);
    }
    install_peers()?;
    build_examples(&["bench", "churn"])?;
    if !opts.vm.is_empty() {
        return bench_in_vm(bin, opts.rounds, opts.seconds, opts.vm);
    }
    bench_on_host(&bin, &opts)
}

/// `bench --busy-host`: runs the busy-host driver as root against `bin`.
fn bench_busy_host(bin: &Path) -> Result<()> {
    build_examples(&["busy_host"])?;
    as_root(&example("busy_host"), &[bin.display().to_string()])
}

/// `bench --vm`: the overhead benchmark inside qemu on each of `kernels`.
fn bench_in_vm(bin: PathBuf, rounds: u32, seconds: u32, kernels: Vec<String>) -> Result<()> {
    let args = [
        "--rounds",
        &rounds.to_string(),
        "--seconds",
        &seconds.to_string(),
        "--peer-wait",
        "15",
        "--json",
        "/tmp/overhead.json",
    ]
    .map(String::from)
    .to_vec();
    let payload = vm::Payload::Bench {
        bench: example("bench"),
        churn: example("churn"),
        tracer: bin,
        args,
    };
    // Each round runs every mode: allow for slow emulated start-ups.
    let timeout = 600 + u64::from(rounds) * 8 * (u64::from(seconds) + 30);
    vm::vm_test(kernels, timeout, payload)
}

/// `bench` on this host: the overhead rounds, or a soak, as root.
fn bench_on_host(bin: &Path, opts: &Options) -> Result<()> {
    let mut args = vec![
        bin.display().to_string(),
        example("churn").display().to_string(),
        "--rounds".into(),
        opts.rounds.to_string(),
        "--seconds".into(),
        opts.seconds.to_string(),
    ];
    if let Some(m) = opts.soak {
        args.extend(["--soak".into(), m.to_string()]);
    }
    if let Some(b) = &opts.baseline {
        // Absolute: the driver runs from the workspace root, maybe under sudo.
        let b = std::fs::canonicalize(b).with_context(|| format!("--baseline {}", b.display()))?;
        args.extend(["--baseline".into(), b.display().to_string()]);
    }
    as_root(&example("bench"), &args)
}

/// `bench-snapshot`: runs the snapshot load driver as root against the release binary.
pub fn bench_snapshot() -> Result<()> {
    let bin = build_tracer(true)?;
    build_examples(&["snapshot_load"])?;
    as_root(&example("snapshot_load"), &[bin.display().to_string()])
}

/// The peers the benchmark compares against (Debian packages).
fn install_peers() -> Result<()> {
    let have = |p: &str| Path::new(p).exists();
    if have(TCPSTATES) && (have("/usr/bin/bpftrace") || have("/usr/sbin/bpftrace")) {
        return Ok(());
    }
    if !is_root() || !Path::new("/usr/bin/apt-get").exists() {
        bail!("the benchmark needs tcpstates and bpftrace: apt-get install libbpf-tools bpftrace");
    }
    apt_install(&["libbpf-tools", "bpftrace"])
}
