//! `cargo xtask vm-test`: the root integration tests on other kernels, in qemu (and
//! `cargo xtask bench --vm`: the overhead benchmark there, where precise mode can run).
//!
//! Each kernel comes from Debian's cloud kernel packages (`apt-get download`, cached in
//! target/vm). The initramfs holds busybox, a small init, the test binaries and `finwait-trace`
//! at their host paths (the tests find the binary through `CARGO_BIN_EXE_*`, an absolute path),
//! the shared libraries they load, `ss` and `setpriv`, and the sock_diag modules. The result is
//! read from the serial console; a watchdog kills a guest that hangs.
use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// How the tests are run in each guest: once per tracer mode (`FINWAIT_TEST_MODE`). `precise`
/// fails rather than falls back, so a pass proves the kernel hooks were used.
pub(crate) const MODES: &[&str] = &["precise", "correlated"];
const MARK: &str = "@@finwait-vm";
/// Modules the snapshot needs (sock_diag for TCP), in load order.
const MODULES: &[&str] = &["inet_diag", "tcp_diag"];
/// Host programs the tests run, copied in with their libraries.
const HOST_TOOLS: &[&str] = &["/usr/bin/ss", "/usr/bin/setpriv"];

pub(crate) struct Options {
    pub kernels: Vec<String>,
    pub timeout: Duration,
    pub payload: Payload,
}

/// What each guest runs.
pub(crate) enum Payload {
    /// Every test binary once per mode in `MODES`, with this name filter.
    Tests { filter: Vec<String> },
    /// `bench FINWAIT_TRACE CHURN ARGS...`; its report is printed whatever the outcome.
    Bench {
        bench: PathBuf,
        churn: PathBuf,
        tracer: PathBuf,
        args: Vec<String>,
    },
}

/// One command the guest runs between markers: `mode` and `name` label it in the report.
struct Run {
    mode: String,
    name: String,
    dir: PathBuf,
    command: String,
}

/// A kernel ready to boot: its image, release and the directory holding its modules.
struct Kernel {
    label: String,
    vmlinuz: PathBuf,
    modules: Option<PathBuf>,
}

struct Outcome {
    label: String,
    elapsed: Duration,
    /// (mode, test binary, passed)
    runs: Vec<(String, String, bool)>,
    failure: Option<String>,
    log: PathBuf,
}

pub(crate) fn vm_test(root: &Path, opts: &Options) -> Result<()> {
    install_host_packages()?;
    let (exes, runs) = match &opts.payload {
        Payload::Tests { filter } => {
            let (tests, tracer) = build_tests(root)?;
            let runs = test_runs(&tests, filter);
            (tests.into_iter().chain([tracer]).collect::<Vec<_>>(), runs)
        }
        Payload::Bench {
            bench,
            churn,
            tracer,
            args,
        } => {
            let command = [bench, tracer, churn].map(|p| path_str(p)).join(" ") + &shell_args(args);
            let run = Run {
                mode: "bench".into(),
                name: "overhead".into(),
                dir: PathBuf::from("/root"),
                command,
            };
            let mut exes = vec![bench.clone(), churn.clone(), tracer.clone()];
            // The one peer that runs in the guest without a toolchain of its own.
            let tcpstates = PathBuf::from(crate::TCPSTATES);
            if tcpstates.exists() {
                exes.push(tcpstates);
            }
            (exes, vec![run])
        }
    };
    let always_show = matches!(opts.payload, Payload::Bench { .. });
    let vm_dir = root.join("target/vm");
    fs::create_dir_all(&vm_dir)?;
    let mut guests = Vec::new();
    for spec in &opts.kernels {
        let kernel = fetch_kernel(&vm_dir, spec)?;
        let initrd = vm_dir.join(format!("initramfs-{}.cpio", kernel.label));
        build_initramfs(root, &initrd, &kernel, &exes, &runs)?;
        guests.push((kernel, initrd));
    }
    // Single-threaded TCG keeps one host CPU busy per guest: boot as many at once as there
    // are CPUs (the time limit is per guest, and each still gets a whole CPU).
    let parallel = thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut outcomes = Vec::new();
    for batch in guests.chunks(parallel) {
        let results: Vec<Result<Outcome>> = thread::scope(|scope| {
            let running: Vec<_> = batch
                .iter()
                .map(|(kernel, initrd)| {
                    eprintln!("xtask: booting {} under qemu (TCG)...", kernel.label);
                    scope.spawn(|| boot(&vm_dir, kernel, initrd, opts.timeout))
                })
                .collect();
            running
                .into_iter()
                .map(|t| t.join().expect("boot thread panicked"))
                .collect()
        });
        for outcome in results {
            let outcome = outcome?;
            report(&outcome, always_show);
            outcomes.push(outcome);
        }
    }
    println!("\nkernel matrix:");
    let mut failed = false;
    for o in &outcomes {
        let ok = o.failure.is_none() && o.runs.iter().all(|r| r.2);
        failed |= !ok;
        println!(
            "  {:<28} {:<4} {:>5.0} s  {}",
            o.label,
            if ok { "ok" } else { "FAIL" },
            o.elapsed.as_secs_f64(),
            o.runs
                .iter()
                .map(|(m, t, p)| format!("{m}/{t}:{}", if *p { "ok" } else { "FAIL" }))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if failed {
        bail!("the VM tests failed (logs in {})", vm_dir.display());
    }
    Ok(())
}

fn install_host_packages() -> Result<()> {
    let have = |p: &str| Path::new(p).exists();
    if have("/usr/bin/qemu-system-x86_64") && have("/bin/busybox") {
        return Ok(());
    }
    eprintln!("xtask: installing qemu-system-x86 and busybox-static...");
    let apt = |args: &[&str]| {
        crate::sh(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
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

/// Builds the test binaries; returns them with the `finwait-trace` binary they run.
fn build_tests(root: &Path) -> Result<(Vec<PathBuf>, PathBuf)> {
    let out = crate::cargo()
        .args([
            "test",
            "--workspace",
            "--exclude",
            "finwait-ebpf",
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
        {
            tests.push(PathBuf::from(exe));
        }
    }
    let tracer = root.join("target/debug/finwait-trace");
    if tests.is_empty() || !tracer.exists() {
        bail!(
            "no test binaries or no {} after the build",
            tracer.display()
        );
    }
    Ok((tests, tracer))
}

/// `6.1` and `6.12` name Debian's cloud kernels; anything else is a path to a `.deb`, an
/// extracted package directory, or a bare `vmlinuz` (no modules).
fn fetch_kernel(vm_dir: &Path, spec: &str) -> Result<Kernel> {
    let meta = match spec {
        "6.1" => Some("linux-image-cloud-amd64"),
        "6.12" => Some("linux-image-6.12-cloud-amd64"),
        _ => None,
    };
    let path = match meta {
        Some(meta) => download(vm_dir, meta)?,
        None => PathBuf::from(spec),
    };
    if path.is_file() && path.extension().is_none_or(|e| e != "deb") {
        return Ok(Kernel {
            label: file_name(&path),
            vmlinuz: path,
            modules: None,
        });
    }
    let dir = if path.is_dir() {
        path
    } else {
        let dir = vm_dir
            .join("kernels")
            .join(file_name(&path).replace(".deb", ""));
        if !dir.join("boot").is_dir() {
            fs::create_dir_all(&dir)?;
            crate::sh(Command::new("dpkg").arg("-x").arg(&path).arg(&dir))?;
        }
        dir
    };
    let vmlinuz = fs::read_dir(dir.join("boot"))
        .with_context(|| format!("{}: no boot/ directory", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| file_name(p).starts_with("vmlinuz-"))
        .with_context(|| format!("{}: no boot/vmlinuz-*", dir.display()))?;
    let release = file_name(&vmlinuz)
        .trim_start_matches("vmlinuz-")
        .to_string();
    let modules = dir.join("lib/modules").join(&release);
    Ok(Kernel {
        label: release,
        vmlinuz,
        modules: modules.is_dir().then_some(modules),
    })
}

/// The package a Debian meta-package points to, downloaded once into target/vm/kernels.
fn download(vm_dir: &Path, meta: &str) -> Result<PathBuf> {
    let cache = vm_dir.join("kernels");
    fs::create_dir_all(&cache)?;
    let depends = |meta: &str| -> Option<String> {
        let out = Command::new("apt-cache")
            .args(["depends", meta])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: ").map(str::to_string))
    };
    let pkg = match depends(meta) {
        Some(p) => p,
        None => {
            crate::sh(Command::new("apt-get").args(["update", "-q"]))?;
            depends(meta).with_context(|| format!("apt-cache depends {meta}: no kernel package"))?
        }
    };
    let cached = |cache: &Path| {
        fs::read_dir(cache)
            .ok()?
            .filter_map(std::result::Result::ok)
            .find_map(|e| {
                let name = file_name(&e.path());
                (name.starts_with(&format!("{pkg}_")) && name.ends_with(".deb")).then(|| e.path())
            })
    };
    if let Some(deb) = cached(&cache) {
        return Ok(deb);
    }
    eprintln!("xtask: downloading {pkg}...");
    crate::sh(
        Command::new("apt-get")
            // apt's _apt sandbox user cannot write into target/: download as ourselves.
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", &pkg])
            .current_dir(&cache),
    )?;
    cached(&cache).with_context(|| format!("apt-get download {pkg} left no .deb"))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Each argument single-quoted for the guest's shell, with a space before it.
fn shell_args(args: &[String]) -> String {
    args.iter()
        .map(|a| format!(" '{}'", a.replace('\'', "'\\''")))
        .collect()
}

/// Every test binary once per mode, from its package directory (as cargo runs it).
fn test_runs(tests: &[PathBuf], filter: &[String]) -> Vec<Run> {
    let filter = shell_args(filter);
    let mut runs = Vec::new();
    for mode in MODES {
        for t in tests {
            let dir = t
                .parent()
                .and_then(Path::parent)
                .and_then(Path::parent)
                .and_then(Path::parent)
                .map(|ws| ws.join("finwait-userspace"))
                .unwrap_or_else(|| PathBuf::from("/"));
            runs.push(Run {
                mode: mode.to_string(),
                name: test_name(t),
                dir,
                command: format!("FINWAIT_TEST_MODE={mode} {}{filter}", t.display()),
            });
        }
    }
    runs
}

/// The guest's init: mounts, modules, then every run between markers.
fn init_script(runs: &[Run], modules: &[String]) -> String {
    // No tmpfs over /tmp: the root is already in RAM, and a checkout under /tmp would vanish.
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         ip link set lo up\n",
    );
    for m in modules {
        s += &format!("insmod /lib/modules/{m}.ko || echo '{MARK} module {m} failed'\n");
    }
    s += &format!("echo \"{MARK} kernel $(uname -r)\"\n");
    for Run {
        mode,
        name,
        dir,
        command,
    } in runs
    {
        s += &format!(
            "mkdir -p {dir}; cd {dir}\n\
             echo '{MARK} begin {mode} {name}'\n\
             {command} 2>&1\n\
             echo \"{MARK} end {mode} {name} $?\"\n",
            dir = dir.display(),
        );
    }
    s += &format!("echo '{MARK} done'\npoweroff -f\n");
    s
}

/// `scenarios-0123abcd` -> `scenarios`.
fn test_name(exe: &Path) -> String {
    let name = file_name(exe);
    match name.rsplit_once('-') {
        Some((base, _hash)) => base.to_string(),
        None => name,
    }
}

fn build_initramfs(
    root: &Path,
    out: &Path,
    kernel: &Kernel,
    exes: &[PathBuf],
    runs: &[Run],
) -> Result<()> {
    let stage = out.with_extension("d");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&stage)?;
    let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
    let mut elfs: Vec<PathBuf> = HOST_TOOLS.iter().map(PathBuf::from).collect();
    // Debug info is most of a test binary's size: strip it (the guest unpacks into RAM).
    for exe in exes {
        let stripped = stage.join(file_name(exe));
        crate::sh(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&stripped)
                .arg(exe),
        )?;
        files.push((path_str(exe), fs::read(&stripped)?, 0o755));
        elfs.push(exe.clone());
    }
    for tool in HOST_TOOLS {
        files.push((tool.to_string(), fs::read(tool)?, 0o755));
    }
    // Fixtures the unit tests read (through CARGO_MANIFEST_DIR, an absolute path).
    for f in files_under(&root.join("finwait-userspace/testdata"))? {
        files.push((path_str(&f), fs::read(&f)?, 0o644));
    }
    for lib in shared_libraries(&elfs)? {
        let data = fs::read(&lib)?;
        files.push((path_str(&lib), data, 0o755));
    }
    files.push(("bin/busybox".into(), fs::read("/bin/busybox")?, 0o755));
    let mut loaded = Vec::new();
    if let Some(dir) = &kernel.modules {
        for m in MODULES {
            if let Some(data) = module(dir, m)? {
                files.push((format!("lib/modules/{m}.ko"), data, 0o644));
                loaded.push(m.to_string());
            }
        }
    }
    files.push((
        "init".into(),
        init_script(runs, &loaded).into_bytes(),
        0o755,
    ));
    files.push((
        "etc/passwd".into(),
        b"root:x:0:0::/root:/bin/sh\n".to_vec(),
        0o644,
    ));

    let mut dirs = BTreeSet::new();
    for d in ["proc", "sys", "dev", "tmp", "root", "sbin", "usr/sbin"] {
        dirs.insert(d.to_string());
    }
    for (name, _, _) in &files {
        let mut p = Path::new(name.trim_start_matches('/'));
        while let Some(parent) = p.parent() {
            if parent.as_os_str().is_empty() {
                break;
            }
            dirs.insert(parent.to_string_lossy().into_owned());
            p = parent;
        }
    }
    let mut w = std::io::BufWriter::new(fs::File::create(out)?);
    let mut ino = 1;
    for d in &dirs {
        // /tmp as on a host: world-writable, sticky (the unprivileged tests may write there).
        let mode = if d == "tmp" { 0o41777 } else { 0o40755 };
        let b = cpio::NewcBuilder::new(d).ino(ino).mode(mode).nlink(2);
        w = b.write(w, 0).finish()?;
        ino += 1;
    }
    for (name, data, mode) in &files {
        let b = cpio::NewcBuilder::new(name.trim_start_matches('/'))
            .ino(ino)
            .mode(0o100000 | mode)
            .nlink(1);
        let mut fw = b.write(w, data.len() as u32);
        fw.write_all(data)?;
        w = fw.finish()?;
        ino += 1;
    }
    cpio::newc::trailer(w)?.flush()?;
    let _ = fs::remove_dir_all(&stage);
    Ok(())
}

fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if dir.is_dir() {
        for e in fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_dir() {
                out.extend(files_under(&p)?);
            } else {
                out.push(p);
            }
        }
    }
    Ok(out)
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The shared libraries (and the dynamic loader) the programs need, from `ldd`.
fn shared_libraries(elfs: &[PathBuf]) -> Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    for elf in elfs {
        let out = Command::new("ldd").arg(elf).output()?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.insert(PathBuf::from(p));
            }
        }
    }
    Ok(libs)
}

/// A module's object, decompressed when the package ships it as `.ko.xz`/`.ko.zst`.
fn module(dir: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let base = dir.join("kernel/net/ipv4").join(name);
    let plain = base.with_extension("ko");
    if plain.exists() {
        return Ok(Some(fs::read(plain)?));
    }
    for (ext, tool) in [("ko.xz", "xz"), ("ko.zst", "zstd")] {
        let p = base.with_extension(ext);
        if p.exists() {
            let out = Command::new(tool).arg("-dc").arg(&p).output()?;
            if !out.status.success() {
                bail!("{tool} -dc {}: failed", p.display());
            }
            return Ok(Some(out.stdout));
        }
    }
    Ok(None)
}

fn boot(vm_dir: &Path, kernel: &Kernel, initrd: &Path, timeout: Duration) -> Result<Outcome> {
    let log_path = vm_dir.join(format!("{}.log", kernel.label));
    let mut log = fs::File::create(&log_path)?;
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
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
        .context("starting qemu-system-x86_64")?;
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
    let mut runs = Vec::new();
    let mut failure = None;
    let mut done = false;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                writeln!(log, "{line}")?;
                if line.contains("Kernel panic") {
                    failure = Some(format!("kernel panic: {line}"));
                }
                // The console may put terminal escapes before a marker.
                if let Some(rest) = line.find(MARK).map(|i| &line[i + MARK.len()..]) {
                    let words: Vec<&str> = rest.split_whitespace().collect();
                    match words.as_slice() {
                        ["end", mode, name, rc] => {
                            runs.push((mode.to_string(), name.to_string(), *rc == "0"));
                        }
                        ["done"] => done = true,
                        ["module", m, ..] => failure = Some(format!("insmod {m} failed")),
                        _ => {}
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                failure = Some(format!("no result after {} s (hung)", timeout.as_secs()));
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    if failure.is_none() && !done {
        failure = Some("the guest stopped before the tests finished".into());
    }
    Ok(Outcome {
        label: kernel.label.clone(),
        elapsed: start.elapsed(),
        runs,
        failure,
        log: log_path,
    })
}

/// Per kernel: each run's result, and for a failing run (or every run, `always_show`) its whole
/// output from the console.
fn report(o: &Outcome, always_show: bool) {
    let log = fs::read_to_string(&o.log).unwrap_or_default();
    for (mode, name, passed) in &o.runs {
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
        if o.failure.is_none() && o.runs.iter().all(|r| r.2) {
            "passed"
        } else {
            "FAILED"
        },
        o.elapsed.as_secs_f64(),
        o.log.display()
    );
}
