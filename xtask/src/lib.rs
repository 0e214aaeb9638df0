//! `cargo xtask`'s tasks, shaped like aya's xtask: `main.rs` reads the command line and calls
//! one of these modules; what they share is here.
//!
//! - `setup`: the eBPF toolchain (Debian packages, bpf-linker), installed when missing.
//! - `build`: `build`, `run` and `docs`; the tracer and example builds the others use.
//! - `test`: `test`, the unit and root integration tests on this kernel, then `vm`.
//! - `bench`: `bench` (overhead, soak, busy host, in a VM) and `bench-snapshot`.
//! - `vm`: `vm-test`, the tests (or the benchmark) in qemu on other kernels: `vm::debian`
//!   names the kernels, `vm::kernels` fetches them, `vm::plan` says what each guest runs,
//!   `vm::initramfs` packs it, `vm::qemu` boots it and reads its console, `vm::matrix` reports.
//!
//! The deploy/ checks are xtask's integration tests (`tests/deploy.rs`, `cargo test -p xtask`).
// The unit-test build also links the deploy checks' dev-dependency.
#![cfg_attr(test, allow(unused_crate_dependencies))]
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

pub mod bench;
pub mod build;
pub mod setup;
pub mod test;
pub mod vm;

/// The workspace's root directory (xtask's parent).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub(crate) fn is_root() -> bool {
    // `id -u` keeps xtask free of libc; it runs once.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// `apt-get install` of Debian packages, without recommends or questions. Another install
/// under way (a second xtask, the system's own updates) is waited for, not failed on.
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(["-o", "DPkg::Lock::Timeout=600"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The cargo that runs xtask, in the workspace's root.
pub(crate) fn cargo() -> Command {
    let mut c = Command::new(cargo_path());
    c.current_dir(workspace());
    c
}

/// The cargo that runs xtask (`$CARGO`), else `cargo` from PATH.
pub(crate) fn cargo_path() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs `program args` as root: directly when we are root, else through `sudo -E`.
pub(crate) fn as_root(program: &Path, args: &[String]) -> Result<()> {
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

pub(crate) fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

pub(crate) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(crate) fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
