//! `cargo xtask vm-test`: the root integration tests on other kernels, in qemu (and
//! `cargo xtask bench --vm`: the overhead benchmark there, where precise mode can run).
//!
//! Each kernel comes from Debian's cloud kernel packages (`apt-get download`, cached in
//! target/vm). The initramfs holds busybox, a small init, the test binaries and `finwait-trace`
//! at their host paths (the tests are told the binary's in `FINWAIT_TRACE`, an absolute path),
//! the shared libraries they load, `ss` and `setpriv`, and the sock_diag modules. The result is
//! read from the serial console; a watchdog kills a guest that hangs.
//!
//! The steps, one module each: `debian` names Debian's kernels and `kernels` fetches them,
//! `plan` says what every guest runs, `initramfs` packs it, `qemu` boots the guests and reads
//! their consoles, `matrix` reports.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Result, bail};
use clap::Args;

use crate::{is_root, sh, workspace};

mod debian;
mod initramfs;
mod kernels;
mod matrix;
mod plan;
mod qemu;

pub use debian::debian_mirror;
use initramfs::build_initramfs;
use kernels::{Kernel, fetch_kernel};
use matrix::print_matrix;
use plan::{Run, plan};
use qemu::boot_all;

/// How the tests are run in each guest: once per tracer mode (`FINWAIT_TEST_MODE`). `precise`
/// fails rather than falls back, so a pass proves the kernel hooks were used.
pub(crate) const MODES: &[&str] = &["precise", "correlated"];
/// The kernels `cargo xtask test` boots: the newest Debian ships (unstable's 7.x, found by
/// name) and the oldest users run (Debian 11's 5.10, Amazon Linux 2's generation). The longest
/// first: guests share the CPUs from one queue.
pub(crate) const MATRIX: &[&str] = &["7", "5.10"];
/// Debian 12's two, with `cargo xtask test --all-kernels`: four guests on two cores do not fit
/// well inside CI's 90 minutes.
pub(crate) const MORE: &[&str] = &["6.1", "6.12"];
/// A guest that has not finished by then hangs: about twice the slowest guest's time (7.2,
/// 1,834 s with the other CPU busy).
pub(crate) const TIMEOUT_S: u64 = 3600;
const MARK: &str = "@@finwait-vm";

#[derive(Args)]
pub struct VmTestOptions {
    /// `6.1`, `6.12` (Debian cloud kernels, downloaded and cached), `5.10` (Debian 11's),
    /// `7.2`/`7` (the newest such in Debian unstable), `sid` (its newest), or a path to a
    /// kernel `.deb`, an extracted package or a vmlinuz. Repeatable; by default the matrix
    /// `cargo xtask test` runs.
    #[arg(long = "kernel", default_values = MATRIX)]
    kernels: Vec<String>,
    /// Give up on a guest after this many seconds.
    #[arg(long, default_value_t = TIMEOUT_S)]
    timeout: u64,
    /// Only these test binaries (`ownership,scenarios`); by default every one.
    #[arg(long, value_delimiter = ',', value_name = "BINARIES")]
    only: Vec<String>,
    /// Test name filter passed to every test binary.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    filter: Vec<String>,
}

/// `vm-test`: the integration tests on the kernels asked for.
pub fn vm_test_command(opts: VmTestOptions) -> Result<()> {
    vm_test(
        opts.kernels,
        opts.timeout,
        Payload::Tests {
            filter: opts.filter,
            only: opts.only,
        },
    )
}

/// Runs `payload` in a guest on each of `kernels` (as root), each given `timeout` seconds.
pub(crate) fn vm_test(kernels: Vec<String>, timeout: u64, payload: Payload) -> Result<()> {
    if !is_root() {
        bail!("vm-test installs packages and builds an initramfs: run it as root");
    }
    run(
        &workspace(),
        &Options {
            kernels,
            timeout: Duration::from_secs(timeout),
            payload,
        },
    )
}

struct Options {
    kernels: Vec<String>,
    timeout: Duration,
    payload: Payload,
}

/// What each guest runs.
pub(crate) enum Payload {
    /// Every test binary (or `only` these) once per mode in `MODES`, with this name filter.
    Tests {
        filter: Vec<String>,
        only: Vec<String>,
    },
    /// `bench FINWAIT_TRACE CHURN ARGS...`; its report is printed whatever the outcome.
    Bench {
        bench: PathBuf,
        churn: PathBuf,
        tracer: PathBuf,
        args: Vec<String>,
    },
}

/// Boots every kernel with the payload; fails unless every guest ran it all and passed.
fn run(root: &Path, opts: &Options) -> Result<()> {
    install_host_packages()?;
    let (exes, runs) = plan(&opts.payload)?;
    // A benchmark's report is the point of it: show it even when it passed.
    let always_show = matches!(opts.payload, Payload::Bench { .. });
    let vm_dir = root.join("target/vm");
    fs::create_dir_all(&vm_dir)?;
    let guests = prepare_guests(root, &vm_dir, &opts.kernels, &exes, &runs)?;
    let outcomes = boot_all(&vm_dir, &guests, opts.timeout, always_show)?;
    print_matrix(&outcomes);
    if outcomes.iter().any(|o| !o.passed()) {
        bail!("the VM tests failed (logs in {})", vm_dir.display());
    }
    Ok(())
}

/// Fetches each kernel and builds its initramfs: the guests to boot, in order.
fn prepare_guests(
    root: &Path,
    vm_dir: &Path,
    kernels: &[String],
    exes: &[PathBuf],
    runs: &[Run],
) -> Result<Vec<(Kernel, PathBuf)>> {
    let mut guests = Vec::new();
    for spec in kernels {
        let kernel = fetch_kernel(vm_dir, spec)?;
        let initrd = vm_dir.join(format!("initramfs-{}.cpio", kernel.label));
        build_initramfs(root, &initrd, &kernel, exes, runs)?;
        guests.push((kernel, initrd));
    }
    Ok(guests)
}

fn install_host_packages() -> Result<()> {
    let have = |p: &str| Path::new(p).exists();
    if have("/usr/bin/qemu-system-x86_64") && have("/bin/busybox") {
        return Ok(());
    }
    eprintln!("xtask: installing qemu-system-x86 and busybox-static...");
    let apt = |args: &[&str]| {
        sh(Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    apt(&["update", "-q"])?;
    apt(&[
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "qemu-system-x86",
        "busybox-static",
    ])
}
