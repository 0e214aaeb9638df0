//! The eBPF object build.rs embedded: empty when it was built without the BPF toolchain.
use anyhow::{Result, bail};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/finwait.bpf.o"));

/// The embedded object, or a clear error when this build has none (a stub from build.rs).
pub(crate) fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!(
            "this build has no eBPF programs: it was built without the BPF toolchain. \
             Run `cargo xtask build` (it installs the toolchain with `cargo xtask setup`)."
        );
    }
    Ok(OBJECT)
}
