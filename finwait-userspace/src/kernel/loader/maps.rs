//! The maps seeded before tracing starts (the followed processes, the owners of sockets that
//! already exist), and the memory-lock limit older kernels charge the maps to.
use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use finwait_common::{OWNERS_MAP, OwnerRec, TRACED_PIDS_MAP, owner_flags};

use super::Options;

/// `--pid`, `--comm`: the processes named and every descendant that exists now; later ones
/// are added at fork.
pub(super) fn seed_pids(ebpf: &mut Ebpf, opts: &Options) -> Result<()> {
    if !opts.following() {
        return Ok(());
    }
    let mut pids = opts.pids.clone();
    pids.extend(crate::host::procs::with_comm(&opts.comms));
    let mut map: BpfHashMap<&mut MapData, u32, u8> = BpfHashMap::try_from(
        ebpf.map_mut(TRACED_PIDS_MAP)
            .context("TRACED_PIDS map missing")?,
    )?;
    for pid in crate::host::procs::with_descendants(&pids) {
        map.insert(pid, 1, 0).context("seeding the pid filter")?;
    }
    Ok(())
}

/// Seeds the kernel's ownership map with holders found in /proc (sockets that existed before
/// finwait started), keyed by inode.
pub(crate) struct OwnerSeeder<'a> {
    map: BpfHashMap<&'a mut MapData, u64, OwnerRec>,
    /// Sockets that did not fit (the map was full).
    pub(crate) full: u64,
}

impl<'a> OwnerSeeder<'a> {
    pub(crate) fn new(ebpf: &'a mut Ebpf) -> Result<Self> {
        let map = BpfHashMap::try_from(ebpf.map_mut(OWNERS_MAP).context("OWNERS map missing")?)?;
        Ok(Self { map, full: 0 })
    }

    /// `followed`: the holder is one of the processes `--pid`/`--comm` follow.
    pub(crate) fn seed(&mut self, inode: u64, o: &crate::model::Owner, followed: bool) {
        let mut comm = [0u8; 16];
        let n = o.comm.len().min(15);
        comm[..n].copy_from_slice(&o.comm.as_bytes()[..n]);
        let rec = OwnerRec {
            inode,
            ts_ns: crate::host::clock::monotonic_ns(),
            tgid: o.pid,
            fd: o.fd,
            comm,
            flags: if followed { owner_flags::FOLLOWED } else { 0 },
            ..OwnerRec::zeroed()
        };
        self.full += u64::from(self.map.insert(inode, rec, 0).is_err());
    }
}

pub(super) fn raise_memlock() {
    // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones ignore it. Failure
    // (no CAP_SYS_RESOURCE) is harmless on those; on the others, a refusal to create a map
    // then names the limit (`load_error`).
    let r = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to a rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) } == 0 {
        return;
    }
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to a rlimit.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut now) } == 0;
    let release = crate::kernel::release();
    if read && now.rlim_cur != libc::RLIM_INFINITY {
        crate::kernel::load_error::note_memlock_not_raised(&release, now.rlim_cur);
    }
}
