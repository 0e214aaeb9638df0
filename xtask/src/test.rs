//! `cargo xtask test`: the unit tests and the root integration tests on this kernel (as root),
//! with the static release binary in a Debian 11 chroot (xtask's `tests/old_userland.rs`),
//! then (unless `--host-only`) the integration tests in qemu on the kernel matrix (`vm`).
use std::{env, path::Path, process::Command};

use anyhow::{Result, bail};
use clap::Args;

use crate::{apt_install, as_root, build::build_tracer, cargo, cargo_path, is_root, sh, vm};

#[derive(Args)]
pub struct Options {
    /// Only this machine's kernel (skip the VM matrix).
    #[arg(long)]
    host_only: bool,
    /// Also Debian 12's 6.1 and 6.12 (about 25 more minutes on two cores).
    #[arg(long, conflicts_with = "host_only")]
    all_kernels: bool,
    /// Extra arguments for `cargo test` (after `--`, e.g. a test name filter).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// `test`: the root integration tests on this kernel, then (unless `host_only`) in qemu.
pub fn test(opts: Options) -> Result<()> {
    host_tests(&opts.args)?;
    if opts.host_only {
        return Ok(());
    }
    let more = if opts.all_kernels { vm::MORE } else { &[] };
    vm::vm_test(
        vm::MATRIX
            .iter()
            .chain(more)
            .map(ToString::to_string)
            .collect(),
        vm::TIMEOUT_S,
        vm::Payload::Tests {
            filter: opts.args,
            only: Vec::new(),
        },
    )
}

/// Runs the workspace's tests on this kernel, as root, with `extra` after `--`.
fn host_tests(extra: &[String]) -> Result<()> {
    install_test_packages()?;
    // The integration tests (their own crate) run this binary: build it, and name it.
    let tracer = build_tracer(false)?;
    // SAFETY: xtask is single-threaded here.
    unsafe { env::set_var("FINWAIT_TRACE", &tracer) };
    // The README's first command, before anything else: if the demo cannot trace here,
    // nothing after it can (integration-tests/tests/readme.rs knows it is run here).
    crate::build::demo()?;
    // The release binary, which xtask's old-userland test runs in a Debian 11 chroot.
    let release = build_tracer(true)?;
    // SAFETY: xtask is single-threaded here.
    unsafe { env::set_var("FINWAIT_STATIC_TRACE", &release) };
    // The README's arm64 install command (a cross-build: about five minutes on two cores).
    crate::build::build_for(Some("aarch64-unknown-linux-musl"), true)?;
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
    // Installed above: a container test that finds no podman here fails instead of skipping
    // (only the VMs' tests skip it).
    // SAFETY: xtask is single-threaded here.
    unsafe { env::set_var("FINWAIT_REQUIRE_PODMAN", "1") };
    as_root(Path::new(&cargo_path()), &args)
}

/// What the host's tests run beside finwait: a real Prometheus server (and promtool for
/// `deploy/`), a real container runtime (podman with runc), a real terminal (tmux) for `top`,
/// and debootstrap (the old-userland test's Debian 11). The deploy/ checks also set file
/// capabilities (setcap), compile the AppArmor profile without loading it (apparmor_parser),
/// and apply the seccomp profile as a runtime would (python3 with libseccomp, which runc
/// brings). Installing must not start the packaged services.
fn install_test_packages() -> Result<()> {
    let wanted = [
        ("/usr/bin/prometheus", "prometheus"),
        ("/usr/bin/podman", "podman"),
        ("/usr/sbin/runc", "runc"),
        ("/usr/sbin/setcap", "libcap2-bin"),
        ("/usr/sbin/apparmor_parser", "apparmor"),
        ("/usr/bin/python3", "python3"),
        ("/usr/bin/tmux", "tmux"),
        // The old-userland test's Debian 11 root file system.
        ("/usr/sbin/debootstrap", "debootstrap"),
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
            "the tests need a Prometheus server, a container runtime, tmux, debootstrap and the \
             deploy checks' tools: apt-get install {}",
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
