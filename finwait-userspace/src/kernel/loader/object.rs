//! The embedded eBPF object, created with its maps sized and its globals written: for tracing
//! (from the options and this kernel's layouts), or for `snapshot` (every map at its smallest).
use anyhow::{Context, Result, bail};
use aya::{Ebpf, EbpfLoader};
use finwait_common::{
    EVENTS_MAP, FilterConfig, KernelOffsets, MAX_COMMS, MAX_PORTS, OWNERS_MAP, TRACED_PIDS_MAP,
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use super::{
    LoadError, Options,
    layouts::Layouts,
    sizing::{Allocation, Sizes},
};
use crate::kernel::arch;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/finwait.bpf.o"));

/// The embedded object, or a clear error when this build has none (build.rs embeds an empty
/// one where the BPF toolchain is missing, so that a clone checks and unit-tests like any Rust
/// project).
pub(super) fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!(
            "this build has no eBPF programs: it was built without the BPF toolchain. \
             Run `cargo xtask build` (it installs the toolchain with `cargo xtask setup`)."
        );
    }
    Ok(OBJECT)
}

/// aya-log-ebpf's ring for the programs' diagnostics (aya-log keeps the name private).
const DIAGNOSTICS_MAP: &str = "AYA_LOGS";

/// Wake userspace once this fraction of the ring is used; the timer drains the rest.
const WAKEUP_FRACTION: u32 = 4;

/// The hash maps, which can allocate their entries as they are written.
const HASH_MAPS: [&str; 5] = [
    OWNERS_MAP,
    TRACED_PIDS_MAP,
    "IN_CALL",
    "RECVMSG",
    "CONNECTING",
];
/// The maps keyed by thread.
const PER_THREAD_MAPS: [&str; 3] = ["IN_CALL", "RECVMSG", "CONNECTING"];

/// Creates the maps and writes the globals; the programs are loaded as they are attached.
pub(super) fn for_tracing(
    opts: &Options,
    sizes: &Sizes,
    layouts: &Layouts,
    diagnostics: bool,
) -> Result<Ebpf, LoadError> {
    let object = object().map_err(LoadError::Other)?;
    // Compiled to allocate by need; preallocated, it is a copy (as large as the object, for the
    // time of the load).
    let preallocated = match sizes.allocation {
        Allocation::ByNeed => None,
        Allocation::Preallocated => Some(
            with_map_flags(object, &HASH_MAPS, 0)
                .context("setting the maps' flags")
                .map_err(LoadError::Other)?,
        ),
    };
    let object = preallocated.as_ref().map_or(object, Aligned::bytes);
    // The programs need no CO-RE relocation (offsets come from userspace): the kernel BTF that
    // `EbpfLoader::new()` parses is dropped before loading, and parsed again afterwards for the
    // BTF tracepoint and fentry, so two copies (about 19 MB each) are never alive at once.
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    // aya-log-ebpf's level, in read-only data: at 0 its every check is a constant false to the
    // verifier, which removes the logging it guards. Nothing writes the ring then: one page.
    let log_level = if diagnostics {
        u8::from(aya_log::Level::Warn)
    } else {
        loader.map_max_entries(DIAGNOSTICS_MAP, page_size());
        0
    };
    for map in PER_THREAD_MAPS {
        loader.map_max_entries(map, sizes.per_thread);
    }
    loader
        .override_global(aya_log::LEVEL, &log_level, true)
        .override_global("STATE_TP", &layouts.state, true)
        .override_global("OTHER_TP", &layouts.other, true)
        .override_global("SYSCALL_REGS", &arch::HOST.regs, true)
        .override_global("OFFSETS", &layouts.offsets.unwrap_or_default(), true)
        .override_global("FILTER", &filter_config(opts, sizes.ring_bytes), true)
        .map_max_entries(EVENTS_MAP, sizes.ring_bytes)
        .map_max_entries(OWNERS_MAP, sizes.owners.max(1))
        .map_max_entries(TRACED_PIDS_MAP, sizes.traced_pids.max(1))
        .load(object)
        .context("loading the eBPF programs")
        .map_err(LoadError::classify)
}

/// The object for the socket inventory alone: every map at its smallest.
pub(super) fn for_inventory(offsets: &KernelOffsets) -> Result<Ebpf> {
    let page = page_size();
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    for map in HASH_MAPS {
        loader.map_max_entries(map, 1);
    }
    loader
        .map_max_entries(EVENTS_MAP, page)
        .map_max_entries(DIAGNOSTICS_MAP, page)
        .override_global(aya_log::LEVEL, &0u8, true)
        .override_global("OFFSETS", offsets, true)
        .load(object()?)
        .context("loading the eBPF object")
}

/// What the programs forward, from the options.
fn filter_config(opts: &Options, ring_bytes: u32) -> FilterConfig {
    // More ports than the kernel filter holds: userspace alone filters.
    let ports_in_kernel: &[u16] = if opts.ports.len() <= MAX_PORTS {
        &opts.ports
    } else {
        &[]
    };
    let mut ports = [0u16; MAX_PORTS];
    ports[..ports_in_kernel.len()].copy_from_slice(ports_in_kernel);
    let mut comms = [[0u8; 16]; MAX_COMMS];
    for (slot, name) in comms.iter_mut().zip(&opts.comms) {
        slot[..name.len()].copy_from_slice(name.as_bytes());
    }
    FilterConfig {
        all_transitions: u32::from(opts.all_transitions),
        pid_filter: u32::from(opts.following()),
        wakeup_bytes: ring_bytes / WAKEUP_FRACTION,
        comm_count: opts.comms.len().min(MAX_COMMS) as u32,
        port_count: ports_in_kernel.len() as u32,
        close_ends: u32::from(close_ends()),
        comms,
        ports,
    }
}

/// Does a close that leaves other references read the socket's ends? Not before Linux 6.1:
/// the reads cost 5.10's verifier 2-2.5 s more for each of close, dup2 and dup3 under emulation
/// (with `-v` it gave up: 1,000,001 instructions after 160-208 s); 6.18 and 7.2 take them.
pub(super) fn close_ends() -> bool {
    !crate::kernel::release_before(&crate::kernel::release(), (6, 1))
}

/// The kernel's flag for a hash map whose entries are allocated as they are written.
#[cfg(test)]
const BPF_F_NO_PREALLOC: u32 = aya_obj::generated::BPF_F_NO_PREALLOC;

/// An object's bytes, 8-byte aligned as parsing an ELF file requires.
pub(super) struct Aligned {
    words: Vec<u64>,
    len: usize,
}

impl Aligned {
    fn copy(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_ne_bytes(b);
        }
        Self {
            words,
            len: bytes.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes of `words`' initialized memory; u8 has no alignment.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }

    fn set_u32(&mut self, at: usize, v: u32) {
        // SAFETY: as in `bytes`, and `words` is uniquely borrowed; callers stay within `len`.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len)
        };
        bytes[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
}

/// A copy of `elf` with the flags of these maps (legacy `bpf_map_def`s in the `maps` section,
/// as aya-ebpf writes them: type, key size, value size, max entries, flags) set to `flags`.
fn with_map_flags(elf: &[u8], maps: &[&str], flags: u32) -> Result<Aligned> {
    const FLAGS_AT: u64 = 16;
    let mut out = Aligned::copy(elf);
    let mut patches = Vec::new();
    {
        let file = object::File::parse(out.bytes()).context("parsing the eBPF object")?;
        for name in maps {
            let sym = file
                .symbol_by_name(name)
                .with_context(|| format!("map {name} not in the eBPF object"))?;
            let section = sym
                .section_index()
                .and_then(|i| file.section_by_index(i).ok())
                .with_context(|| format!("map {name} has no section"))?;
            let (start, size) = section
                .file_range()
                .with_context(|| format!("map {name}'s section has no data"))?;
            let at = sym.address() + FLAGS_AT;
            if section.name() != Ok("maps") || at + 4 > size || sym.size() < FLAGS_AT + 4 {
                bail!("map {name} is not a bpf_map_def in the maps section");
            }
            patches.push(usize::try_from(start + at)?);
        }
    }
    for at in patches {
        out.set_u32(at, flags);
    }
    Ok(out)
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_maps_are_set_preallocated_and_nothing_else_changes() {
        let Ok(elf) = object() else {
            // A build without the BPF toolchain embeds no object (build.rs says so).
            return;
        };
        let patched = with_map_flags(elf, &HASH_MAPS, 0).unwrap();
        let before = aya_obj::Object::parse(elf).unwrap();
        let after = aya_obj::Object::parse(patched.bytes()).unwrap();
        assert_eq!(before.maps.len(), after.maps.len());
        for (name, map) in &after.maps {
            let old = &before.maps[name];
            let want = if HASH_MAPS.contains(&name.as_str()) {
                0
            } else {
                old.map_flags()
            };
            assert_eq!(map.map_flags(), want, "{name}");
            assert_eq!(map.max_entries(), old.max_entries(), "{name}");
            assert_eq!(map.map_type(), old.map_type(), "{name}");
        }
        for name in HASH_MAPS {
            assert_eq!(
                before.maps[name].map_flags(),
                BPF_F_NO_PREALLOC,
                "{name}: compiled to allocate by need"
            );
        }
        assert!(with_map_flags(elf, &["NO_SUCH_MAP"], 1).is_err());
        assert!(with_map_flags(b"not an elf", &HASH_MAPS, 1).is_err());
    }
}
