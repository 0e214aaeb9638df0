//! Boots the guests under qemu (software emulation, one per CPU from one queue) and follows
//! each serial console: the runs' end markers, a kernel panic, a hang past the time limit.
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{MARK, kernels::Kernel, matrix::report};

pub(super) struct Outcome {
    pub(super) label: String,
    pub(super) elapsed: Duration,
    pub(super) runs: Vec<RunResult>,
    pub(super) failure: Option<String>,
    pub(super) log: PathBuf,
}

impl Outcome {
    /// Whether the guest finished and every run in it passed.
    pub(super) fn passed(&self) -> bool {
        self.failure.is_none() && self.runs.iter().all(|r| r.passed)
    }
}

/// One test binary's run in one mode, as its end marker told it.
pub(super) struct RunResult {
    pub(super) mode: String,
    pub(super) name: String,
    pub(super) passed: bool,
    /// Wall time in the guest (None from a guest whose marker carried none).
    pub(super) secs: Option<u64>,
}

/// What a guest's console said: the runs that ended, the last failure seen, whether init finished.
#[derive(Default)]
struct Console {
    runs: Vec<RunResult>,
    failure: Option<String>,
    done: bool,
}

impl Console {
    /// Takes in one console line: a kernel panic, or a marker from the init script.
    fn read(&mut self, line: &str) {
        if line.contains("Kernel panic") {
            self.failure = Some(format!("kernel panic: {line}"));
        }
        // The console may put terminal escapes before a marker.
        if let Some(rest) = line.find(MARK).map(|i| &line[i + MARK.len()..]) {
            let words: Vec<&str> = rest.split_whitespace().collect();
            match words.as_slice() {
                ["end", mode, name, rc, rest @ ..] => self.runs.push(RunResult {
                    mode: mode.to_string(),
                    name: name.to_string(),
                    passed: *rc == "0",
                    secs: rest.first().and_then(|s| s.parse().ok()),
                }),
                ["done"] => self.done = true,
                ["module", m, ..] => self.failure = Some(format!("insmod {m} failed")),
                _ => {}
            }
        }
    }
}

/// Boots the guests from one queue, as many at once as there are CPUs: a CPU that finishes a
/// short guest takes the next at once (batches would wait for their longest). Each guest is
/// reported when it ends; the outcomes come back in the guests' order.
pub(super) fn boot_all(
    vm_dir: &Path,
    guests: &[(Kernel, PathBuf)],
    timeout: Duration,
    always_show: bool,
) -> Result<Vec<Outcome>> {
    // Single-threaded TCG keeps one host CPU busy per guest (the time limit is per guest, and
    // each still gets a whole CPU).
    let parallel = thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(Vec::new());
    thread::scope(|scope| {
        for _ in 0..parallel.min(guests.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((kernel, initrd)) = guests.get(i) else {
                        break;
                    };
                    eprintln!("xtask: booting {} under qemu (TCG)...", kernel.label);
                    let outcome = boot(vm_dir, kernel, initrd, timeout);
                    let mut done = done.lock().expect("a boot thread panicked");
                    if let Ok(o) = &outcome {
                        report(o, always_show);
                    }
                    done.push((i, outcome));
                }
            });
        }
    });
    let mut done = done.into_inner().expect("a boot thread panicked");
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, o)| o).collect()
}

/// Boots one guest and follows its console until it powers off, or kills it at `timeout`.
fn boot(vm_dir: &Path, kernel: &Kernel, initrd: &Path, timeout: Duration) -> Result<Outcome> {
    let log_path = vm_dir.join(format!("{}.log", kernel.label));
    let mut log = fs::File::create(&log_path)?;
    let start = Instant::now();
    let mut child = start_qemu(kernel, initrd)?;
    let lines = console_lines(&mut child);
    let mut console = follow_console(&mut child, &lines, &mut log, start, timeout)?;
    let _ = child.wait();
    if console.failure.is_none() && !console.done {
        console.failure = Some("the guest stopped before the tests finished".into());
    }
    Ok(Outcome {
        label: kernel.label.clone(),
        elapsed: start.elapsed(),
        runs: console.runs,
        failure: console.failure,
        log: log_path,
    })
}

/// Starts qemu on the kernel and initramfs, its serial console on stdout.
fn start_qemu(kernel: &Kernel, initrd: &Path) -> Result<Child> {
    Command::new("qemu-system-x86_64")
        // Single-threaded TCG: with one host thread per vCPU, the kernel's int3-based live code
        // patching (attaching fentry, flipping static keys) raced and oopsed in the guest.
        .args([
            "-accel",
            "tcg,thread=single",
            "-cpu",
            "max",
            "-m",
            "2048",
            "-smp",
            "2",
        ])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")
}

/// qemu's stdout and stderr lines on one channel (stderr's marked `qemu: `), read by two threads.
fn console_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {line}"));
        }
    });
    rx
}

/// Logs the console's lines and reads them until qemu exits; kills a guest that outlives `timeout`.
fn follow_console(
    child: &mut Child,
    lines: &mpsc::Receiver<String>,
    log: &mut fs::File,
    start: Instant,
    timeout: Duration,
) -> Result<Console> {
    let mut console = Console::default();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match lines.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                writeln!(log, "{line}")?;
                console.read(&line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                console.failure = Some(format!("no result after {} s (hung)", timeout.as_secs()));
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Ok(console)
}
