//! `cargo xtask`: set up the BPF toolchain, build, run and test finwait.
use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod debian;
#[cfg(test)]
mod deploy;
mod vm;

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
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build and run `finwait-trace ARGS` as root (through `sudo -E` when needed).
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure tracing overhead on loopback churn against no tracer, tcpstates, bpftrace and a
    /// no-op floor (interleaved rounds; Markdown table, JSON in target/bench/overhead.json).
    Bench {
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
    },
    /// Write the man page and shell completions to target/dist/.
    Docs,
    /// Time `finwait-trace snapshot` on ~100,000 sockets and 2,000 processes beside `ss
    /// -tanpoe` (one new network namespace), then on 20 namespaces of ~5,000 sockets (as root).
    BenchSnapshot,
    /// Build and run every test: the root integration tests on this kernel, then in qemu on
    /// the kernel matrix (`vm-test`): the newest 7.x in Debian unstable and Debian 11's 5.10.
    Test {
        /// Only this machine's kernel (skip the VM matrix).
        #[arg(long)]
        host_only: bool,
        /// Also Debian 12's 6.1 and 6.12 (about 25 more minutes on two cores).
        #[arg(long, conflicts_with = "host_only")]
        all_kernels: bool,
        /// Extra arguments for `cargo test` (after `--`, e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the integration tests inside qemu (software emulation) on other kernels, in both
    /// tracer modes; fails on a test failure, a panic or a hang.
    VmTest {
        /// `6.1`, `6.12` (Debian cloud kernels, downloaded and cached), `5.10` (Debian 11's),
        /// `7.2`/`7` (the newest such in Debian unstable), `sid` (its newest), or a path to a
        /// kernel `.deb`, an extracted package or a vmlinuz. Repeatable; by default the matrix
        /// `cargo xtask test` runs.
        #[arg(long = "kernel", default_values = vm::MATRIX)]
        kernels: Vec<String>,
        /// Give up on a guest after this many seconds.
        #[arg(long, default_value_t = vm::TIMEOUT_S)]
        timeout: u64,
        /// Test name filter passed to every test binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        filter: Vec<String>,
    },
}

/// Debian packages: rustc/cargo 1.96 with LLVM 22 and a prebuilt `core` for bpfel-unknown-none,
/// and LLVM 22 to build bpf-linker against.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
];
/// libbpf-tools' tcpstates, the peer the benchmark compares against.
const TCPSTATES: &str = "/usr/sbin/tcpstates";
const BPF_RUSTC: &str = "/usr/bin/rustc";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

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
    setup()?;
    // Every cargo this runs (directly or through sudo -E) must build the real eBPF object:
    // finwait-userspace's build.rs then fails rather than embed its stub.
    // SAFETY: xtask is single-threaded here.
    unsafe { env::set_var("FINWAIT_REQUIRE_EBPF", "1") };
    match cli.cmd {
        // `setup()` above is the whole command.
        Cmd::Setup => Ok(()),
        Cmd::Build { release } => build(release),
        Cmd::Run { release, args } => run_tracer(release, &args),
        Cmd::Test {
            host_only,
            all_kernels,
            args,
        } => test(host_only, all_kernels, args),
        Cmd::VmTest {
            kernels,
            timeout,
            filter,
        } => vm_test(kernels, timeout, vm::Payload::Tests { filter }),
        Cmd::Bench {
            rounds,
            seconds,
            soak,
            vm,
            busy_host,
            baseline,
        } => bench(rounds, seconds, soak, vm, busy_host, baseline.as_deref()),
        Cmd::Docs => docs(),
        Cmd::BenchSnapshot => bench_snapshot(),
    }
}

/// `build`: builds `finwait-trace` and says where it is.
fn build(release: bool) -> Result<()> {
    let bin = build_tracer(release)?;
    println!("built {}", bin.display());
    Ok(())
}

/// `run`: builds `finwait-trace` and runs it as root with `args`.
fn run_tracer(release: bool, args: &[String]) -> Result<()> {
    let bin = build_tracer(release)?;
    as_root(&bin, args)
}

/// `test`: the root integration tests on this kernel, then (unless `host_only`) in qemu.
fn test(host_only: bool, all_kernels: bool, args: Vec<String>) -> Result<()> {
    host_tests(&args)?;
    if host_only {
        return Ok(());
    }
    let more = if all_kernels { vm::MORE } else { &[] };
    vm_test(
        vm::MATRIX
            .iter()
            .chain(more)
            .map(ToString::to_string)
            .collect(),
        vm::TIMEOUT_S,
        vm::Payload::Tests { filter: args },
    )
}

/// `bench`: builds the release tracer and picks the benchmark the flags ask for.
fn bench(
    rounds: u32,
    seconds: u32,
    soak: Option<f64>,
    vm: Vec<String>,
    busy_host: bool,
    baseline: Option<&Path>,
) -> Result<()> {
    let bin = build_tracer(true)?;
    if busy_host {
        return bench_busy_host(&bin);
    }
    install_peers()?;
    build_examples(&["bench", "churn"])?;
    if !vm.is_empty() {
        return bench_in_vm(bin, rounds, seconds, vm);
    }
    bench_on_host(&bin, rounds, seconds, soak, baseline)
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
    vm_test(kernels, timeout, payload)
}

/// `bench` on this host: the overhead rounds, or a soak, as root.
fn bench_on_host(
    bin: &Path,
    rounds: u32,
    seconds: u32,
    soak: Option<f64>,
    baseline: Option<&Path>,
) -> Result<()> {
    let mut args = vec![
        bin.display().to_string(),
        example("churn").display().to_string(),
        "--rounds".into(),
        rounds.to_string(),
        "--seconds".into(),
        seconds.to_string(),
    ];
    if let Some(m) = soak {
        args.extend(["--soak".into(), m.to_string()]);
    }
    if let Some(b) = baseline {
        // Absolute: the driver runs from the workspace root, maybe under sudo.
        let b = std::fs::canonicalize(b).with_context(|| format!("--baseline {}", b.display()))?;
        args.extend(["--baseline".into(), b.display().to_string()]);
    }
    as_root(&example("bench"), &args)
}

/// `docs`: writes the man page and shell completions the release binary generates.
fn docs() -> Result<()> {
    let bin = build_tracer(true)?;
    let dist = workspace().join("target/dist");
    std::fs::create_dir_all(&dist)?;
    for (what, file) in [
        ("man", "finwait-trace.1"),
        ("bash", "finwait-trace.bash"),
        ("zsh", "_finwait-trace"),
        ("fish", "finwait-trace.fish"),
    ] {
        let out = Command::new(&bin).args(["--generate", what]).output()?;
        if !out.status.success() {
            bail!("finwait-trace --generate {what} failed");
        }
        std::fs::write(dist.join(file), out.stdout)?;
        println!("wrote {}", dist.join(file).display());
    }
    Ok(())
}

/// `bench-snapshot`: runs the snapshot load driver as root against the release binary.
fn bench_snapshot() -> Result<()> {
    let bin = build_tracer(true)?;
    build_examples(&["snapshot_load"])?;
    as_root(&example("snapshot_load"), &[bin.display().to_string()])
}

/// A release build of one of finwait-userspace's examples (see `build_examples`).
fn example(name: &str) -> PathBuf {
    workspace().join("target/release/examples").join(name)
}

fn vm_test(kernels: Vec<String>, timeout: u64, payload: vm::Payload) -> Result<()> {
    if !is_root() {
        bail!("vm-test installs packages and builds an initramfs: run it as root");
    }
    vm::vm_test(
        &workspace(),
        &vm::Options {
            kernels,
            timeout: std::time::Duration::from_secs(timeout),
            payload,
        },
    )
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn is_root() -> bool {
    // `id -u` keeps xtask free of libc; it runs once.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn bpf_core_installed() -> bool {
    let Ok(out) = Command::new(BPF_RUSTC)
        .args(["--print", "sysroot"])
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib/bpfel-unknown-none/lib")
        .is_dir()
}

fn bpf_linker_installed() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn setup() -> Result<()> {
    if bpf_core_installed() && bpf_linker_installed() {
        return Ok(());
    }
    let debian = Path::new("/usr/bin/apt-get").exists();
    if !debian || !is_root() {
        bail!(
            "the eBPF toolchain is missing. On Debian 12 or newer, as root:\n  \
             apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}\n  \
             LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22\n\
             Elsewhere: a Rust nightly with rust-src and `cargo install bpf-linker` (see README.md, 'Building').",
            APT_PACKAGES.join(" ")
        );
    }
    if !bpf_core_installed() {
        eprintln!("xtask: installing the BPF Rust toolchain (Debian packages)...");
        sh(Command::new("apt-get").args(["update", "-q"]))?;
        apt_install(APT_PACKAGES)?;
    }
    if !bpf_linker_installed() {
        eprintln!("xtask: building bpf-linker against LLVM 22 (about 90 s)...");
        sh(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX))?;
    }
    if !bpf_core_installed() || !bpf_linker_installed() {
        bail!("setup finished but the toolchain is still incomplete (is ~/.cargo/bin on PATH?)");
    }
    Ok(())
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

/// `apt-get install` of Debian packages, without recommends or questions.
fn apt_install(packages: &[&str]) -> Result<()> {
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The metrics tests scrape finwait with a real Prometheus server (Debian's `prometheus`, also
/// the deploy/ checks' `promtool`). Installing must not start the packaged service.
/// What the host's tests run beside finwait: a real Prometheus server (and promtool for
/// `deploy/`), and a real container runtime (podman with runc).
fn install_test_packages() -> Result<()> {
    let wanted = [
        ("/usr/bin/prometheus", "prometheus"),
        ("/usr/bin/podman", "podman"),
        ("/usr/sbin/runc", "runc"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| !Path::new(bin).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "the tests need a Prometheus server and a container runtime: apt-get install {}",
            missing.join(" ")
        );
    }
    eprintln!(
        "xtask: installing {} (for the tests)...",
        missing.join(", ")
    );
    // Installing a server package may try to start it: not here.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let install = || apt_install(&missing);
    let done = install().or_else(|_| {
        sh(Command::new("apt-get").args(["update", "-q"]))?;
        install()
    });
    if ours {
        std::fs::remove_file(policy)?;
    }
    done
}

/// Release builds of finwait-userspace's examples (the benchmark drivers).
fn build_examples(names: &[&str]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--package", "finwait-userspace"]);
    for name in names {
        cmd.args(["--example", name]);
    }
    sh(&mut cmd)
}

/// Builds `finwait-trace` (debug or release); returns its path.
fn build_tracer(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "finwait-userspace",
        "--bin",
        "finwait-trace",
    ]);
    if release {
        cmd.arg("--release");
    }
    sh(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    Ok(workspace()
        .join("target")
        .join(profile)
        .join("finwait-trace"))
}

/// Runs the workspace's tests on this kernel, as root, with `extra` after `--`.
fn host_tests(extra: &[String]) -> Result<()> {
    install_test_packages()?;
    // The integration tests (their own crate) run this binary: build it, and name it.
    let tracer = build_tracer(false)?;
    // SAFETY: xtask is single-threaded here.
    unsafe { env::set_var("FINWAIT_TRACE", &tracer) };
    // Build first as the invoking user, so a sudo run only executes.
    sh(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "finwait-ebpf",
        "--no-run",
    ]))?;
    let mut args: Vec<String> = ["test", "--workspace", "--exclude", "finwait-ebpf"]
        .map(String::from)
        .to_vec();
    if !extra.is_empty() {
        args.push("--".into());
        args.extend(extra.iter().cloned());
    }
    let cargo_bin = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Installed above: a container test that finds no podman here fails instead of skipping
    // (only the VMs' tests skip it).
    // SAFETY: xtask is single-threaded here.
    unsafe { env::set_var("FINWAIT_REQUIRE_PODMAN", "1") };
    as_root(Path::new(&cargo_bin), &args)
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace());
    c
}

/// Runs `program args` as root: directly when we are root, else through `sudo -E`.
fn as_root(program: &Path, args: &[String]) -> Result<()> {
    let mut cmd = if is_root() {
        Command::new(program)
    } else {
        eprintln!("xtask: not root; using sudo -E (tracing needs root or CAP_BPF + CAP_PERFMON)");
        let mut c = Command::new("sudo");
        c.arg("-E").arg(program);
        c
    };
    cmd.args(args).current_dir(workspace());
    sh(&mut cmd)
}

fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
