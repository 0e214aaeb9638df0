//! What the runner prints: each guest's failing runs with their output as it ends, and the
//! matrix of kernels, modes and test binaries with their times at the end.
use std::fs;

use super::{
    MARK,
    qemu::{Outcome, RunResult},
};

/// The summary: one line per kernel, with each run's result.
pub(super) fn print_matrix(outcomes: &[Outcome]) {
    println!("\nkernel matrix:");
    for o in outcomes {
        println!(
            "  {:<28} {:<4} {:>5.0} s  {}",
            o.label,
            if o.passed() { "ok" } else { "FAIL" },
            o.elapsed.as_secs_f64(),
            o.runs
                .iter()
                .map(|r| format!(
                    "{}/{}:{}{}",
                    r.mode,
                    r.name,
                    if r.passed { "ok" } else { "FAIL" },
                    r.secs.map(|s| format!("({s}s)")).unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}

/// Per kernel: each run's result, and for a failing run (or every run, `always_show`) its whole
/// output from the console.
pub(super) fn report(o: &Outcome, always_show: bool) {
    let log = fs::read_to_string(&o.log).unwrap_or_default();
    for RunResult {
        mode, name, passed, ..
    } in &o.runs
    {
        if *passed && !always_show {
            continue;
        }
        let how = if *passed { "passed" } else { "FAILED" };
        println!("---- {} {mode} {name}: {how}; its output:", o.label);
        let begin = format!("{MARK} begin {mode} {name}");
        let end = format!("{MARK} end {mode} {name}");
        let mut inside = false;
        for line in log.lines() {
            if line.starts_with(&begin) {
                inside = true;
            } else if line.starts_with(&end) {
                inside = false;
            } else if inside {
                println!("    {line}");
            }
        }
    }
    if let Some(f) = &o.failure {
        println!("---- {}: {f}; last console lines:", o.label);
        let lines: Vec<&str> = log.lines().collect();
        for line in &lines[lines.len().saturating_sub(40)..] {
            println!("    {line}");
        }
    }
    println!(
        "xtask: {}: {} in {:.0} s (log {})",
        o.label,
        if o.passed() { "passed" } else { "FAILED" },
        o.elapsed.as_secs_f64(),
        o.log.display()
    );
}
