//! `cargo xtask build`, `run` and `docs`, and the builds the other commands start from: the
//! `finwait-trace` binary and finwait-userspace's examples (the benchmark drivers).
use std::{io, path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{as_root, cargo, setup::add_rust_target, sh, workspace};

#[derive(Args)]
pub struct BuildOptions {
    #[arg(long)]
    release: bool,
    /// Cross-build the static release binary for another architecture's musl target (see
    /// `STATIC_TARGETS`), into target/TARGET/release/.
    #[arg(long, requires = "release", value_parser = STATIC_TARGETS.map(|t| t.triple))]
    target: Option<String>,
}

/// A static (musl) target a release is built for, and how to link it from any machine.
pub(crate) struct StaticTarget {
    pub(crate) triple: &'static str,
    /// Its `std::env::consts::ARCH`.
    arch: &'static str,
}

/// The architectures finwait ships for (its `kernel::arch` table has their syscall interface).
/// Linked by rust-lld with the musl the target ships; the one C and assembly finwait builds is
/// ring's (rustls' crypto, for the endpoint's TLS), compiled for another architecture by
/// Debian's cross gcc with that architecture's C headers (nothing of its libc is linked).
pub(crate) const STATIC_TARGETS: [StaticTarget; 2] = [
    StaticTarget {
        triple: "x86_64-unknown-linux-musl",
        arch: "x86_64",
    },
    StaticTarget {
        triple: "aarch64-unknown-linux-musl",
        arch: "aarch64",
    },
];

#[derive(Args)]
pub struct RunOptions {
    #[arg(long)]
    release: bool,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// `build`: builds `finwait-trace` (for `--target`, if given) and says where it is.
pub fn build(opts: &BuildOptions) -> Result<()> {
    let bin = build_for(opts.target.as_deref(), opts.release)?;
    println!("built {}", bin.display());
    Ok(())
}

/// `finwait-trace` for `target` (a static release), else this machine's; returns its path.
pub(crate) fn build_for(target: Option<&str>, release: bool) -> Result<PathBuf> {
    Ok(match target {
        Some(target) if target != static_target() => build_static(target)?,
        _ => build_tracer(release)?,
    })
}

/// `run`: builds `finwait-trace` and runs it as root with `args`.
pub fn run_tracer(opts: &RunOptions) -> Result<()> {
    let bin = build_tracer(opts.release)?;
    as_root(&bin, &opts.args)
}

/// The README's first command, `cargo xtask run -- --demo`, as a new user runs it.
pub(crate) fn demo() -> Result<()> {
    run_tracer(&RunOptions {
        release: false,
        args: vec!["--demo".into()],
    })
}

/// `docs`: writes the man page and shell completions the release binary generates.
pub fn docs() -> Result<()> {
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

/// The target a release is built for: this machine's architecture, linked statically against
/// musl, so that the binary runs on any distribution's userland (a glibc build needs a glibc
/// at least as new as the build machine's: Debian 11, RHEL 8 or Amazon Linux 2 have older).
pub(crate) fn static_target() -> String {
    format!("{}-unknown-linux-musl", std::env::consts::ARCH)
}

/// Builds `finwait-trace`; returns its path. Debug builds (what the tests run) link glibc
/// dynamically, as any cargo build; a release is the static build for `static_target()`,
/// copied to `target/release/finwait-trace`, where README and deploy/ point.
pub(crate) fn build_tracer(release: bool) -> Result<PathBuf> {
    if !release {
        sh(&mut cargo_build(None))?;
        return Ok(workspace().join("target/debug/finwait-trace"));
    }
    let built = build_static(&static_target())?;
    let dest = workspace().join("target/release/finwait-trace");
    std::fs::create_dir_all(workspace().join("target/release"))?;
    // A plain `cargo build --release` left a hard link to its own output here: unlink it
    // rather than write through it into cargo's build.
    match std::fs::remove_file(&dest) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", dest.display()));
        }
        _ => {}
    }
    std::fs::copy(&built, &dest)
        .with_context(|| format!("copying {} to {}", built.display(), dest.display()))?;
    Ok(dest)
}

/// The static release build for `target` (one of `STATIC_TARGETS`); returns its path.
fn build_static(target: &str) -> Result<PathBuf> {
    add_rust_target(target)?;
    let mut cmd = cargo_build(Some(target));
    cmd.arg("--release");
    if STATIC_TARGETS
        .iter()
        .any(|t| t.triple == target && t.arch != std::env::consts::ARCH)
    {
        // rustc finds rust-lld in its sysroot; the target's own musl makes it self-contained.
        let var = format!(
            "CARGO_TARGET_{}_LINKER",
            target.to_uppercase().replace('-', "_")
        );
        cmd.env(var, "rust-lld");
        let arch = target.split('-').next().unwrap_or(target);
        let gcc = cross_gcc(arch)?;
        let under = target.replace('-', "_");
        cmd.env(format!("CC_{under}"), &gcc);
        cmd.env(format!("AR_{under}"), gcc.replace("-gcc", "-ar"));
    } else {
        // This machine's own musl target: cc-rs looks for `x86_64-linux-musl-gcc`, which a
        // fresh Debian does not have (musl-tools does), and gives up. ring's C is freestanding,
        // so the host's gcc compiles it as it is; a caller's own choice is kept.
        let under = target.replace('-', "_");
        for (tool, host) in [("CC", "cc"), ("AR", "ar")] {
            let var = format!("{tool}_{under}");
            if std::env::var_os(&var).is_none() {
                cmd.env(var, host);
            }
        }
    }
    sh(&mut cmd)?;
    Ok(workspace()
        .join("target")
        .join(target)
        .join("release/finwait-trace"))
}

/// Debian's cross gcc for `arch` (`aarch64-linux-gnu-gcc`) and that architecture's C headers,
/// installed if missing: ring's C includes `<stdint.h>`, which a hosted gcc takes from the
/// target's libc headers (without them it finds the host's, which ask for glibc's own).
fn cross_gcc(arch: &str) -> Result<String> {
    let gcc = format!("{arch}-linux-gnu-gcc");
    let headers = format!("/usr/{arch}-linux-gnu/include/stdint.h");
    let debian_arch = match arch {
        "aarch64" => "arm64",
        other => other,
    };
    let wanted = [
        (format!("/usr/bin/{gcc}"), format!("gcc-{arch}-linux-gnu")),
        (headers, format!("libc6-dev-{debian_arch}-cross")),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(file, _)| !std::path::Path::new(file).exists())
        .map(|(_, package)| package.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(gcc);
    }
    if !crate::is_root() || !std::path::Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "building for {arch} compiles ring's C with {gcc}: apt-get install {}",
            missing.join(" ")
        );
    }
    eprintln!(
        "xtask: installing {} (ring's C for {arch})...",
        missing.join(", ")
    );
    crate::apt_install(&missing)?;
    Ok(gcc)
}

/// `cargo build` of the `finwait-trace` binary, for `target` if given.
fn cargo_build(target: Option<&str>) -> Command {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "finwait-userspace",
        "--bin",
        "finwait-trace",
    ]);
    if let Some(t) = target {
        cmd.args(["--target", t]);
    }
    cmd
}

/// Release builds of finwait-userspace's examples (the benchmark drivers).
pub(crate) fn build_examples(names: &[&str]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--package", "finwait-userspace"]);
    for name in names {
        cmd.args(["--example", name]);
    }
    sh(&mut cmd)
}

/// A release build of one of finwait-userspace's examples (see `build_examples`).
pub(crate) fn example(name: &str) -> PathBuf {
    workspace().join("target/release/examples").join(name)
}
