//! What each guest runs: the test binaries (built here, once per tracer mode, each from its
//! package's directory) with the `finwait-trace` they run, or the benchmark's one run.
use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Result, bail};

use super::{MODES, Payload};
use crate::{bench::TCPSTATES, build::build_tracer, cargo, file_name, path_str};

/// One command the guest runs between markers: `mode` and `name` label it in the report.
pub(super) struct Run {
    pub(super) mode: String,
    pub(super) name: String,
    pub(super) dir: PathBuf,
    pub(super) command: String,
}

/// A test binary, and its package's directory (where cargo would run it).
struct Test {
    exe: PathBuf,
    package: PathBuf,
}

/// What a payload needs in the guest: the executables to copy in, and the runs to make.
pub(super) fn plan(payload: &Payload) -> Result<(Vec<PathBuf>, Vec<Run>)> {
    match payload {
        Payload::Tests { filter, only } => plan_tests(filter, only),
        Payload::Bench {
            bench,
            churn,
            tracer,
            args,
        } => Ok(plan_bench(bench, churn, tracer, args)),
    }
}

/// The test binaries (built here) and the tracer they run; each binary runs once per mode.
fn plan_tests(filter: &[String], only: &[String]) -> Result<(Vec<PathBuf>, Vec<Run>)> {
    let (mut tests, tracer) = build_tests()?;
    if !only.is_empty() {
        tests.retain(|t| only.contains(&test_name(&t.exe)));
        if tests.is_empty() {
            bail!("--only {}: no such test binary", only.join(","));
        }
    }
    let runs = test_runs(&tests, &tracer, filter);
    let exes = tests.into_iter().map(|t| t.exe).chain([tracer]).collect();
    Ok((exes, runs))
}

/// The benchmark's programs, and its one run: `bench TRACER CHURN ARGS...`.
fn plan_bench(
    bench: &Path,
    churn: &Path,
    tracer: &Path,
    args: &[String],
) -> (Vec<PathBuf>, Vec<Run>) {
    let command = [bench, tracer, churn].map(path_str).join(" ") + &shell_args(args);
    let run = Run {
        mode: "bench".into(),
        name: "overhead".into(),
        dir: PathBuf::from("/root"),
        command,
    };
    let mut exes = vec![
        bench.to_path_buf(),
        churn.to_path_buf(),
        tracer.to_path_buf(),
    ];
    // The one peer that runs in the guest without a toolchain of its own.
    let tcpstates = PathBuf::from(TCPSTATES);
    if tcpstates.exists() {
        exes.push(tcpstates);
    }
    (exes, vec![run])
}

/// Builds the test binaries; returns them with the `finwait-trace` binary they run.
fn build_tests() -> Result<(Vec<Test>, PathBuf)> {
    // Not xtask's own tests: they check this machine's tooling and deploy/ (with promtool and
    // systemd-analyze), none of which the guest has, and no kernel matters to them.
    let out = cargo()
        .args([
            "test",
            "--workspace",
            "--exclude",
            "finwait-ebpf",
            "--exclude",
            "xtask",
            "--no-run",
        ])
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let mut tests = Vec::new();
    for line in out.stdout.split(|&b| b == b'\n') {
        let Ok(msg) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && let Some(exe) = msg["executable"].as_str()
            && let Some(manifest) = msg["manifest_path"].as_str()
        {
            let package = Path::new(manifest).parent().unwrap_or(Path::new("/"));
            tests.push(Test {
                exe: PathBuf::from(exe),
                package: package.to_path_buf(),
            });
        }
    }
    // The integration tests' crate does not build it: they find it beside their target dir.
    let tracer = build_tracer(false)?;
    if tests.is_empty() || !tracer.exists() {
        bail!(
            "no test binaries or no {} after the build",
            tracer.display()
        );
    }
    Ok((tests, tracer))
}

/// Every test binary once per mode, from its package directory (as cargo runs it), told where
/// `tracer` is.
fn test_runs(tests: &[Test], tracer: &Path, filter: &[String]) -> Vec<Run> {
    let filter = shell_args(filter);
    let tracer = shell_args(&[path_str(tracer)]);
    let mut runs = Vec::new();
    for mode in MODES {
        for t in tests {
            runs.push(Run {
                mode: mode.to_string(),
                name: test_name(&t.exe),
                dir: t.package.clone(),
                command: format!(
                    "FINWAIT_TEST_MODE={mode} FINWAIT_TRACE={tracer} {}{filter}",
                    t.exe.display(),
                    tracer = tracer.trim_start(),
                ),
            });
        }
    }
    runs
}

/// `scenarios-0123abcd` -> `scenarios`.
fn test_name(exe: &Path) -> String {
    let name = file_name(exe);
    match name.rsplit_once('-') {
        Some((base, _hash)) => base.to_string(),
        None => name,
    }
}

/// Each argument single-quoted for the guest's shell, with a space before it.
fn shell_args(args: &[String]) -> String {
    args.iter()
        .map(|a| format!(" '{}'", a.replace('\'', "'\\''")))
        .collect()
}
