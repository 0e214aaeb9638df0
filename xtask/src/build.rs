//! `cargo xtask build`, `run` and `docs`, and the builds the other commands start from: the
//! `finwait-trace` binary and finwait-userspace's examples (the benchmark drivers).
use std::{path::PathBuf, process::Command};

use anyhow::{Result, bail};
use clap::Args;

use crate::{as_root, cargo, sh, workspace};

#[derive(Args)]
pub struct BuildOptions {
    #[arg(long)]
    release: bool,
}

#[derive(Args)]
pub struct RunOptions {
    #[arg(long)]
    release: bool,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// `build`: builds `finwait-trace` and says where it is.
pub fn build(opts: &BuildOptions) -> Result<()> {
    let bin = build_tracer(opts.release)?;
    println!("built {}", bin.display());
    Ok(())
}

/// `run`: builds `finwait-trace` and runs it as root with `args`.
pub fn run_tracer(opts: &RunOptions) -> Result<()> {
    let bin = build_tracer(opts.release)?;
    as_root(&bin, &opts.args)
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

/// Builds `finwait-trace` (debug or release); returns its path.
pub(crate) fn build_tracer(release: bool) -> Result<PathBuf> {
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
