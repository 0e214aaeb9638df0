//! Each guest's initramfs: busybox, an init script that runs the plan between markers, the
//! programs at their host paths with their shared libraries, the fixtures the unit tests read,
//! and the sock_diag modules; written as a newc cpio archive.
use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use super::{MARK, kernels::Kernel, plan::Run};
use crate::{file_name, path_str, sh};

/// Modules the snapshot needs (sock_diag for TCP), in load order.
const MODULES: &[&str] = &["inet_diag", "tcp_diag"];

/// Host programs the tests run, copied in with their libraries.
const HOST_TOOLS: &[&str] = &["/usr/bin/ss", "/usr/bin/setpriv"];

/// A file for the initramfs: its path in the guest, its contents and its permission bits.
type Entry = (String, Vec<u8>, u32);

/// Writes the guest's initramfs to `out`: the programs, their libraries, the modules and init.
pub(super) fn build_initramfs(
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

/// The executables, stripped through `stage`, at their host paths.
fn stripped_exes(stage: &Path, exes: &[PathBuf]) -> Result<Vec<Entry>> {
    let mut files = Vec::new();
    // Debug info is most of a test binary's size: strip it (the guest unpacks into RAM).
    for exe in exes {
        let stripped = stage.join(file_name(exe));
        sh(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(exe))?;
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
