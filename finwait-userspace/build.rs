//! Builds `finwait-ebpf` for `bpfel-unknown-none` and hands the object to `include_bytes!`, so
//! `finwait-trace` is a single file.
//!
//! The eBPF build uses Debian's rustc (which ships a prebuilt `core` for the BPF target) and
//! bpf-linker; `cargo xtask setup` installs both. `FINWAIT_EBPF_OBJECT=path` skips the build.
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
    if !Path::new(&rustc).exists() || !cargo.exists() {
        panic!(
            "the eBPF toolchain is missing ({rustc} with a BPF core library, and bpf-linker).\n\
             Run `cargo xtask setup` (or see README.md, 'Building')."
        );
    }
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("ebpf");

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root.join("finwait-ebpf"))
        .args(["build", "--release", "--target", BPF_TARGET, "--target-dir"])
        .arg(&target_dir)
        .env("RUSTC", &rustc)
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
    let status = cmd.status().expect("run cargo for the eBPF crate");
    assert!(status.success(), "building finwait-ebpf failed (see above)");
    let object = target_dir.join(BPF_TARGET).join("release").join("finwait");
    std::fs::copy(&object, &out).expect("copy the eBPF object");
}
