//! `cargo xtask vm-test`: the root integration tests on other kernels, in qemu (and
//! `cargo xtask bench --vm`: the overhead benchmark there, where precise mode can run).
//!
//! Each kernel comes from Debian's cloud kernel packages (`apt-get download`, cached in
//! target/vm). The initramfs holds busybox, a small init, the test binaries and `finwait-trace`
//! at their host paths (the tests are told the binary's in `FINWAIT_TRACE`, an absolute path),
//! the shared libraries they load, `ss` and `setpriv`, and the sock_diag modules. The result is
//! read from the serial console; a watchdog kills a guest that hangs.
use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

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
    runs: Vec<RunResult>,
    failure: Option<String>,
    log: PathBuf,
}

impl Outcome {
    /// Whether the guest finished and every run in it passed.
    fn passed(&self) -> bool {
        self.failure.is_none() && self.runs.iter().all(|r| r.passed)
    }
}

/// A file for the initramfs: its path in the guest, its contents and its permission bits.
type Entry = (String, Vec<u8>, u32);

/// Boots every kernel with the payload; fails unless every guest ran it all and passed.
pub(crate) fn vm_test(root: &Path, opts: &Options) -> Result<()> {
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

/// What a payload needs in the guest: the executables to copy in, and the runs to make.
fn plan(payload: &Payload) -> Result<(Vec<PathBuf>, Vec<Run>)> {
    match payload {
        Payload::Tests { filter } => plan_tests(filter),
        Payload::Bench {
            bench,
            churn,
            tracer,
            args,
        } => Ok(plan_bench(bench, churn, tracer, args)),
    }
}

/// The test binaries (built here) and the tracer they run; each binary runs once per mode.
fn plan_tests(filter: &[String]) -> Result<(Vec<PathBuf>, Vec<Run>)> {
    let (tests, tracer) = build_tests()?;
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
    let tcpstates = PathBuf::from(crate::TCPSTATES);
    if tcpstates.exists() {
        exes.push(tcpstates);
    }
    (exes, vec![run])
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

/// Boots the guests from one queue, as many at once as there are CPUs: a CPU that finishes a
/// short guest takes the next at once (batches would wait for their longest). Each guest is
/// reported when it ends; the outcomes come back in the guests' order.
fn boot_all(
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

/// The summary: one line per kernel, with each run's result.
fn print_matrix(outcomes: &[Outcome]) {
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

/// A test binary, and its package's directory (where cargo would run it).
struct Test {
    exe: PathBuf,
    package: PathBuf,
}

/// Builds the test binaries; returns them with the `finwait-trace` binary they run.
fn build_tests() -> Result<(Vec<Test>, PathBuf)> {
    // Not xtask's own tests: they check this machine's tooling and deploy/ (with promtool and
    // systemd-analyze), none of which the guest has, and no kernel matters to them.
    let out = crate::cargo()
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
    let tracer = crate::build_tracer(false)?;
    if tests.is_empty() || !tracer.exists() {
        bail!(
            "no test binaries or no {} after the build",
            tracer.display()
        );
    }
    Ok((tests, tracer))
}

/// A Debian cloud kernel by name (`6.1`, `6.12`, `5.10`, `7.2`, `sid`: see `debian`); anything
/// else is a path to a `.deb`, an unpacked package directory, or a bare `vmlinuz` (no modules).
fn fetch_kernel(vm_dir: &Path, spec: &str) -> Result<Kernel> {
    let path = match crate::debian::fetch(vm_dir, spec)? {
        Some(path) => path,
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
    unpacked_kernel(&dir)
}

/// The kernel in an unpacked package: boot/vmlinuz-RELEASE with lib/modules/RELEASE, or (the
/// split packages of Linux 7.x) usr/lib/modules/RELEASE/vmlinuz beside its modules.
fn unpacked_kernel(dir: &Path) -> Result<Kernel> {
    let in_boot = fs::read_dir(dir.join("boot"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| file_name(p).starts_with("vmlinuz-"));
    if let Some(vmlinuz) = in_boot {
        let release = file_name(&vmlinuz)
            .trim_start_matches("vmlinuz-")
            .to_string();
        let modules = dir.join("lib/modules").join(&release);
        return Ok(Kernel {
            label: release,
            modules: modules.is_dir().then_some(modules),
            vmlinuz,
        });
    }
    let beside_modules = fs::read_dir(dir.join("usr/lib/modules"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|m| m.join("vmlinuz").is_file());
    let modules = beside_modules.with_context(|| {
        format!(
            "{}: no boot/vmlinuz-* nor usr/lib/modules/*/vmlinuz",
            dir.display()
        )
    })?;
    Ok(Kernel {
        label: file_name(&modules),
        vmlinuz: modules.join("vmlinuz"),
        modules: Some(modules),
    })
}

pub(crate) fn file_name(p: &Path) -> String {
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
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         ip link set lo up\n\
         export FINWAIT_TEST_NO_PROMETHEUS=1 FINWAIT_TEST_GUEST=1\n",
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
        // Each run's time goes in its end marker: where a guest's minutes go is the first
        // question when the matrix grows.
        s += &format!(
            "mkdir -p {dir}; cd {dir}\n\
             echo '{MARK} begin {mode} {name}'\n\
             t0=$(date +%s)\n\
             {command} 2>&1\n\
             echo \"{MARK} end {mode} {name} $? $(( $(date +%s) - t0 ))\"\n",
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

/// Writes the guest's initramfs to `out`: the programs, their libraries, the modules and init.
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
    let mut files = stripped_exes(&stage, exes)?;
    for tool in HOST_TOOLS {
        files.push((tool.to_string(), fs::read(tool)?, 0o755));
    }
    // Fixtures the unit tests read (through CARGO_MANIFEST_DIR, an absolute path).
    for f in files_under(&root.join("finwait-userspace/testdata"))? {
        files.push((path_str(&f), fs::read(&f)?, 0o644));
    }
    let elfs: Vec<PathBuf> = HOST_TOOLS
        .iter()
        .map(PathBuf::from)
        .chain(exes.iter().cloned())
        .collect();
    for lib in shared_libraries(&elfs)? {
        let data = fs::read(&lib)?;
        files.push((path_str(&lib), data, 0o755));
    }
    files.push(("bin/busybox".into(), fs::read("/bin/busybox")?, 0o755));
    let (modules, loaded) = diag_modules(kernel)?;
    files.extend(modules);
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
    write_cpio(out, &dirs_for(&files), &files)?;
    let _ = fs::remove_dir_all(&stage);
    Ok(())
}

/// The executables, stripped through `stage`, at their host paths.
fn stripped_exes(stage: &Path, exes: &[PathBuf]) -> Result<Vec<Entry>> {
    let mut files = Vec::new();
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
    }
    Ok(files)
}

/// The sock_diag modules the kernel's package has, and their names for init to load.
fn diag_modules(kernel: &Kernel) -> Result<(Vec<Entry>, Vec<String>)> {
    let mut files = Vec::new();
    let mut loaded = Vec::new();
    if let Some(dir) = &kernel.modules {
        for m in MODULES {
            if let Some(data) = module(dir, m)? {
                files.push((format!("lib/modules/{m}.ko"), data, 0o644));
                loaded.push(m.to_string());
            }
        }
    }
    Ok((files, loaded))
}

/// Every directory the files need, with the mount points and init's usual ones.
fn dirs_for(files: &[Entry]) -> BTreeSet<String> {
    let mut dirs = BTreeSet::new();
    for d in ["proc", "sys", "dev", "tmp", "root", "sbin", "usr/sbin"] {
        dirs.insert(d.to_string());
    }
    for (name, _, _) in files {
        let mut p = Path::new(name.trim_start_matches('/'));
        while let Some(parent) = p.parent() {
            if parent.as_os_str().is_empty() {
                break;
            }
            dirs.insert(parent.to_string_lossy().into_owned());
            p = parent;
        }
    }
    dirs
}

/// Writes the directories, then the files, as a newc cpio archive.
fn write_cpio(out: &Path, dirs: &BTreeSet<String>, files: &[Entry]) -> Result<()> {
    let mut w = std::io::BufWriter::new(fs::File::create(out)?);
    let mut ino = 1;
    for d in dirs {
        // /tmp as on a host: world-writable, sticky (the unprivileged tests may write there).
        let mode = if d == "tmp" { 0o41777 } else { 0o40755 };
        let b = cpio::NewcBuilder::new(d).ino(ino).mode(mode).nlink(2);
        w = b.write(w, 0).finish()?;
        ino += 1;
    }
    for (name, data, mode) in files {
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

/// One test binary's run in one mode, as its end marker told it.
struct RunResult {
    mode: String,
    name: String,
    passed: bool,
    /// Wall time in the guest (None from a guest whose marker carried none).
    secs: Option<u64>,
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

/// Per kernel: each run's result, and for a failing run (or every run, `always_show`) its whole
/// output from the console.
fn report(o: &Outcome, always_show: bool) {
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
