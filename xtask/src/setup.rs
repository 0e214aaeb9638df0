//! `cargo xtask setup` (and the first step of every command): the eBPF toolchain, installed
//! when missing: Debian's rustc with a prebuilt `core` for the BPF target, and bpf-linker; and
//! rustup's musl target, for the static release build.
use std::{env, path::Path, process::Command};

use anyhow::{Result, bail};

use crate::{apt_install, build::static_target, is_root, sh};

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
const BPF_RUSTC: &str = "/usr/bin/rustc";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

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

/// Installs both toolchains unless they are there.
pub fn setup() -> Result<()> {
    setup_ebpf()?;
    setup_static()
}

/// The static release build's: rustup's musl target for this machine's architecture (rustup
/// needs no root; the target ships musl's libc, the host's cc links it, and finwait has no C
/// to compile).
fn setup_static() -> Result<()> {
    add_rust_target(&static_target())
}

/// Adds rustup's `target` (its standard library) unless it is there.
pub(crate) fn add_rust_target(target: &str) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    let Ok(installed) = installed else {
        bail!("the static release build needs rustup (to add the {target} target)");
    };
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == target)
    {
        eprintln!("xtask: adding the {target} target (the static release build)...");
        sh(Command::new("rustup").args(["target", "add", target]))?;
    }
    Ok(())
}

/// Installs the eBPF toolchain unless it is there (as root on Debian; elsewhere says how).
fn setup_ebpf() -> Result<()> {
    if bpf_core_installed() && bpf_linker_installed() {
        return Ok(());
    }
    let debian = Path::new("/usr/bin/apt-get").exists();
    if !debian || !is_root() {
        bail!(
            "the eBPF toolchain is missing. On Debian 12 or newer, as root:\n  \
             apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}\n  \
             LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22\n\
             Elsewhere: a Rust nightly with rust-src and `cargo install bpf-linker` (see docs/building.md).",
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

/// Every cargo xtask runs from now on (directly or through `sudo -E`) must build the real eBPF
/// object: finwait-userspace's build.rs then fails rather than embed its empty stub.
pub fn require_ebpf() {
    // SAFETY: called by main before any thread starts.
    unsafe { env::set_var("FINWAIT_REQUIRE_EBPF", "1") };
}
