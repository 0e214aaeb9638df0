//! The static release binary runs in an old userland: a Debian 11 (bullseye, glibc 2.31) root
//! file system that holds nothing of the build but that binary, where `--demo` names the
//! client and the server as it does on the build machine. A glibc build does not start there.
//!
//! Needs root (chroot, mounts, eBPF) and debootstrap (which `cargo xtask test` installs); the
//! root file system is made once, under target/rootfs/. `cargo xtask test` builds the release
//! binary and names it in `FINWAIT_STATIC_TRACE`; without it the test takes
//! `target/release/finwait-trace` when that is a static build, else skips and says why.
// Test crates share the package's dependencies (the library is where unused ones show).
#![allow(unused_crate_dependencies)]

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

const SUITE: &str = "bullseye";
/// Where the binary goes inside the root file system.
const INSIDE: &str = "usr/local/bin/finwait-trace";

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// What `readelf` says of `bin`'s program headers and dynamic section.
fn readelf(bin: &Path) -> String {
    let out = Command::new("readelf")
        .args(["-ldW"])
        .arg(bin)
        .output()
        .expect("readelf (binutils)");
    assert!(out.status.success(), "readelf {}: {out:?}", bin.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Static: no program interpreter, no shared library needed (a static-pie keeps a dynamic
/// section, for its own relocations, with no NEEDED in it).
fn is_static(bin: &Path) -> bool {
    let elf = readelf(bin);
    !elf.contains("program interpreter") && !elf.contains("(NEEDED)")
}

/// The binary under test, or why there is none.
fn static_tracer() -> Result<PathBuf, String> {
    if let Some(named) = env::var_os("FINWAIT_STATIC_TRACE") {
        let bin = PathBuf::from(named);
        assert!(
            bin.is_file(),
            "FINWAIT_STATIC_TRACE={}: no such file",
            bin.display()
        );
        return Ok(bin);
    }
    let bin = xtask::workspace().join("target/release/finwait-trace");
    if bin.is_file() && is_static(&bin) {
        Ok(bin)
    } else {
        Err(format!(
            "{} is not a static build: run `cargo xtask build --release` (or `cargo xtask \
             test`, which does)",
            bin.display()
        ))
    }
}

/// The bullseye root file system, made by debootstrap the first time (into a scratch
/// directory renamed when complete, so an interrupted run leaves nothing half-made).
fn rootfs() -> PathBuf {
    let dir = xtask::workspace().join("target/rootfs");
    let root = dir.join(SUITE);
    if root.join("etc/debian_version").is_file() {
        return root;
    }
    let debootstrap = Path::new("/usr/sbin/debootstrap");
    assert!(
        debootstrap.exists(),
        "no debootstrap: apt-get install debootstrap (`cargo xtask test` installs it)"
    );
    let scratch = dir.join(format!("{SUITE}.tmp"));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&dir).unwrap();
    eprintln!(
        "making a {SUITE} root file system in {} (once)",
        root.display()
    );
    let status = Command::new(debootstrap)
        .args(["--variant=minbase", SUITE])
        .arg(&scratch)
        .arg(xtask::vm::debian_mirror())
        .status()
        .expect("run debootstrap");
    assert!(status.success(), "debootstrap {SUITE} failed ({status})");
    fs::rename(&scratch, &root).unwrap();
    root
}

/// Runs `/usr/local/bin/finwait-trace ARGS` chrooted into `root`, with the host's /proc, /sys
/// (tracefs, BTF and bpffs are mounted under it) and /dev bound in a mount namespace of its
/// own, so the mounts end with it. Returns its output.
fn run_inside(root: &Path, args: &[&str]) -> std::process::Output {
    let script = r#"root=$1; shift
        for d in proc sys dev; do mount --rbind "/$d" "$root/$d" || exit 125; done
        exec timeout 120 chroot "$root" "$@""#;
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(root)
        .arg(format!("/{INSIDE}"))
        .args(args)
        .output()
        .expect("run unshare")
}

/// The root file system is bullseye's, with its glibc 2.31, and holds the binary alone of
/// what the build made.
fn prepare(root: &Path, bin: &Path) {
    let version = fs::read_to_string(root.join("etc/debian_version")).unwrap();
    assert!(version.starts_with("11."), "not Debian 11: {version}");
    assert!(
        root.join("lib/x86_64-linux-gnu/libc-2.31.so").exists(),
        "no glibc 2.31 in {}",
        root.display()
    );
    let inside = root.join(INSIDE);
    let _ = fs::remove_file(&inside);
    fs::copy(bin, &inside).unwrap();
}

#[test]
fn the_static_binary_traces_the_demo_in_a_debian_11_userland() {
    if !is_root() {
        eprintln!("skipped: running finwait-trace in a chroot needs root (`cargo xtask test`)");
        return;
    }
    let bin = match static_tracer() {
        Ok(bin) => bin,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let elf = readelf(&bin);
    assert!(is_static(&bin), "{} is not static:\n{elf}", bin.display());
    let root = rootfs();
    prepare(&root, &bin);

    let out = run_inside(&root, &["--demo", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let all: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_demo_answers(&all);
}

/// The demo's answers, exactly (as the integration tests' `demo_names_the_client_and_the_server`):
/// the client half-closed one connection with shutdown(SHUT_WR) and orphaned two with close();
/// the server owns the three CLOSE_WAITs and closed one of them after 300 ms.
fn assert_demo_answers(all: &[Value]) {
    let ts: Vec<&Value> = all.iter().filter(|v| v["event"] == "transition").collect();
    let with = |from: &str, to: &str| -> Vec<&Value> {
        ts.iter()
            .copied()
            .filter(|v| v["from"] == from && v["to"] == to)
            .collect()
    };
    let half = with("FIN_WAIT1", "FIN_WAIT2");
    assert_eq!(half.len(), 3, "{ts:#?}");
    let client = &half[0]["cause"]["pid"];
    let (shut, closed): (Vec<&Value>, Vec<&Value>) =
        half.iter().copied().partition(|v| v["orphan"] == false);
    assert_eq!((shut.len(), closed.len()), (1, 2), "{ts:#?}");
    assert_eq!(shut[0]["cause"]["call"], "shutdown", "{ts:#?}");
    assert_eq!(shut[0]["cause"]["how"], "SHUT_WR", "{ts:#?}");
    for v in &half {
        assert_eq!(v["cause"]["comm"], "demo-client", "{v}");
        assert_eq!(&v["cause"]["pid"], client, "{v}");
    }
    for v in closed {
        assert_eq!(v["cause"]["call"], "close", "{v}");
    }
    let close_wait = with("ESTABLISHED", "CLOSE_WAIT");
    assert_eq!(close_wait.len(), 3, "{ts:#?}");
    let server = &close_wait[0]["owner"]["pid"];
    assert_ne!(server, client);
    for v in &close_wait {
        assert_eq!(v["cause"]["call"], "peer_fin", "{v}");
        assert_eq!(v["owner"]["comm"], "demo-server", "{v}");
        assert_eq!(&v["owner"]["pid"], server, "{v}");
    }
    let last_ack = with("CLOSE_WAIT", "LAST_ACK");
    assert_eq!(last_ack.len(), 1, "{ts:#?}");
    assert_eq!(last_ack[0]["cause"]["call"], "close");
    assert_eq!(&last_ack[0]["cause"]["pid"], server);
    assert!(last_ack[0]["close_wait_ms"].as_f64().unwrap() >= 300.0);
}
