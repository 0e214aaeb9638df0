//! Builds `finwait-ebpf` for `bpfel-unknown-none` and hands the object to `include_bytes!`, so
//! `finwait-trace` is a single file.
//!
//! The eBPF build uses Debian's rustc (which ships a prebuilt `core` for the BPF target) and
//! bpf-linker; `cargo xtask setup` installs both. `FINWAIT_EBPF_OBJECT=path` skips the build.
//!
//! Without that toolchain (a fresh clone on any machine), an empty object is embedded instead,
//! with a warning, so `cargo check`, `cargo clippy` and the unit tests work as in any Rust
//! project; such a `finwait-trace` says at once that it cannot trace. `cargo xtask` sets
//! `FINWAIT_REQUIRE_EBPF=1`: then a missing toolchain is an error, never a silent stub.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const BPF_TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("finwait.bpf.o");
    println!("cargo::rerun-if-env-changed=FINWAIT_EBPF_OBJECT");
    println!("cargo::rerun-if-env-changed=FINWAIT_BPF_RUSTC");
    // Set by build.rs when it embeds the empty object: the unit tests that read the object skip.
    println!("cargo::rustc-check-cfg=cfg(finwait_no_ebpf)");

    if let Some(prebuilt) = env::var_os("FINWAIT_EBPF_OBJECT") {
        std::fs::copy(&prebuilt, &out).expect("copy FINWAIT_EBPF_OBJECT");
        return;
    }
    for dir in [
        "finwait-ebpf/src",
        "finwait-ebpf/Cargo.toml",
        "finwait-common/src",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(dir).display());
    }

    let rustc = env::var("FINWAIT_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    let cargo = Path::new(&rustc).with_file_name("cargo");
    if let Some(missing) = missing_toolchain(&rustc, &cargo) {
        stub(&out, &rustc, &missing);
        return;
    }
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("ebpf");
    let status = ebpf_build(&cargo, &rustc, &root, &target_dir)
        .status()
        .expect("run cargo for the eBPF crate");
    assert!(status.success(), "building finwait-ebpf failed (see above)");
    let object = target_dir.join(BPF_TARGET).join("release").join("finwait");
    strip_debug(&object, &out);
}

/// Copies the object without its DWARF (three quarters of it): the loader reads BTF, which
/// stays, and a smaller object is less to parse and to copy at load (the preallocated maps'
/// patch). With no objcopy at hand, the object as it is, with a warning.
fn strip_debug(object: &Path, out: &Path) {
    let sysroot_objcopy = env::var("RUSTC").ok().and_then(|rustc| {
        let o = Command::new(rustc)
            .args(["--print", "sysroot"])
            .output()
            .ok()?;
        let sysroot = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let host = env::var("HOST").ok()?;
        Some(
            Path::new(&sysroot)
                .join("lib/rustlib")
                .join(host)
                .join("bin/rust-objcopy"),
        )
    });
    // bpf-linker's LLVM (`cargo xtask setup`), else the one rustc ships.
    let candidates = [
        Some(PathBuf::from("/usr/lib/llvm-22/bin/llvm-objcopy")),
        sysroot_objcopy,
    ];
    for objcopy in candidates.into_iter().flatten().filter(|p| p.exists()) {
        let stripped = Command::new(&objcopy)
            .arg("--strip-debug")
            .arg(object)
            .arg(out)
            .status();
        if stripped.is_ok_and(|s| s.success()) {
            return;
        }
    }
    println!("cargo::warning=no llvm-objcopy: the eBPF object is embedded with its debug info");
    std::fs::copy(object, out).expect("copy the eBPF object");
}

/// What of the eBPF toolchain is missing, if anything: `rustc` and its `cargo`, the BPF
/// target's `core` in rustc's sysroot, bpf-linker on PATH.
fn missing_toolchain(rustc: &str, cargo: &Path) -> Option<String> {
    if !Path::new(rustc).exists() || !cargo.exists() {
        return Some(format!("no {rustc} with its cargo"));
    }
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let core = Path::new(&sysroot)
        .join("lib/rustlib")
        .join(BPF_TARGET)
        .join("lib");
    if !core.is_dir() {
        return Some(format!("no {} (a BPF core library)", core.display()));
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| o.status.success()) {
        return Some("no bpf-linker on PATH".into());
    }
    None
}

/// Embeds an empty object with a warning, or (under `cargo xtask`, `FINWAIT_REQUIRE_EBPF`)
/// fails the build: a binary that cannot trace is never shipped silently.
fn stub(out: &Path, rustc: &str, missing: &str) {
    // Only a stub build waits on it: `cargo xtask build` after `cargo xtask setup` reruns this.
    println!("cargo::rerun-if-env-changed=FINWAIT_REQUIRE_EBPF");
    if env::var_os("FINWAIT_REQUIRE_EBPF").is_some_and(|v| !v.is_empty() && v != "0") {
        panic!(
            "the eBPF toolchain is missing ({missing}; it needs {rustc} with a BPF core \
             library, and bpf-linker).\nRun `cargo xtask setup` (or see README.md, 'Building')."
        );
    }
    println!(
        "cargo::warning=the eBPF toolchain is missing ({missing}): this finwait-trace has no \
         eBPF programs and cannot trace. Run `cargo xtask setup`, then `cargo xtask build`."
    );
    println!("cargo::rustc-cfg=finwait_no_ebpf");
    std::fs::write(out, []).expect("write the empty eBPF object");
}

/// `cargo build` of finwait-ebpf for the BPF target with Debian's `rustc`.
fn ebpf_build(cargo: &Path, rustc: &str, root: &Path, target_dir: &Path) -> Command {
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root.join("finwait-ebpf"))
        .args(["build", "--release", "--target", BPF_TARGET, "--target-dir"])
        .arg(target_dir)
        .env("RUSTC", rustc)
        // aya-ebpf needs #![feature(asm_experimental_arch)] on a stable compiler.
        .env("RUSTC_BOOTSTRAP", "1")
        // BTF in the object: better verifier messages and BTF-defined maps.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    // Whatever the outer cargo (or clippy) set must not leak into the BPF build.
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "CARGO_BUILD_RUSTC",
        "RUSTUP_TOOLCHAIN",
        "CARGO_ENCODED_RUSTDOCFLAGS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}
