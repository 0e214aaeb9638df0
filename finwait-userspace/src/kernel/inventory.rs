//! The socket inventory from the kernel: the `iter/task_file` program lists every IPv4/IPv6
//! stream socket fd of every task, every network namespace included, in one pass (Linux 5.8+).
//! It stands in for reading every process's fd links in /proc, which costs a second on a host
//! of 100,000 sockets.
use std::io::Read;

use anyhow::{Context, Result, bail};
use aya::{Ebpf, programs::Iter};
use finwait_common::SocketFdRec;

/// The program's name in the object.
pub(crate) const PROGRAM: &str = "socket_fds";

/// Loads the program (it is attached for each read). `btf`: the kernel's, for its attach point.
pub(crate) fn load(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<()> {
    let prog: &mut Iter = ebpf
        .program_mut(PROGRAM)
        .context("the inventory program is not in the object")?
        .try_into()?;
    prog.load("task_file", btf)
        .context("loading the socket inventory (iter/task_file, Linux 5.8+)")
}

/// The kernel's BTF as far as loading the program needs it: the type id of its attach point.
/// aya's `Iter::load` looks up the FUNC `bpf_iter_task_file` by name; parsing the kernel's whole
/// BTF for that costs about 100 ms and 19 MB, so here it stands alone at its id (found in the
/// mmapped BTF), behind placeholders.
pub(crate) fn attach_point_btf() -> Result<aya::Btf> {
    use aya_obj::btf::{BtfType, Func, FuncLinkage, Ptr};
    const NAME: &str = "bpf_iter_task_file";
    let kernel = super::btf::open()?;
    let id = kernel
        .resolve_ids_by_name(NAME)
        .with_context(|| format!("{NAME} is not in the kernel's BTF (Linux 5.8+)"))?
        .into_iter()
        .find(|&id| matches!(kernel.resolve_type_by_id(id), Ok(btf_rs::Type::Func(_))))
        .with_context(|| format!("{NAME} is not a function in the kernel's BTF"))?;
    let mut btf = aya::Btf::new();
    let name = btf.add_string(NAME);
    for _ in 1..id {
        btf.add_type(BtfType::Ptr(Ptr::new(0, 0)));
    }
    let at = btf.add_type(BtfType::Func(Func::new(name, 0, FuncLinkage::Global)));
    if at != id {
        bail!("placeholder BTF: {NAME} landed at {at}, not {id}");
    }
    Ok(btf)
}

/// Runs the loaded program once and hands every record to `each`; the number of records.
pub(crate) fn read(ebpf: &mut Ebpf, mut each: impl FnMut(&SocketFdRec)) -> Result<usize> {
    let prog: &mut Iter = ebpf
        .program_mut(PROGRAM)
        .context("the inventory program is not in the object")?
        .try_into()?;
    let id = prog.attach().context("attaching the socket inventory")?;
    let link = prog.take_link(id)?;
    let mut file = link.into_file().context("opening the socket inventory")?;
    let size = size_of::<SocketFdRec>();
    // Records stream through a small buffer: 100,000 sockets never sit in memory as records.
    let mut buf = vec![0u8; 4096 * size];
    let (mut filled, mut count) = (0, 0);
    loop {
        let n = match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the socket inventory"),
        };
        filled += n;
        let whole = filled / size * size;
        for rec in buf[..whole].chunks_exact(size) {
            // SAFETY: `rec` is `size` bytes, and every bit pattern is a valid SocketFdRec.
            let r: SocketFdRec = unsafe { std::ptr::read_unaligned(rec.as_ptr().cast()) };
            each(&r);
            count += 1;
        }
        buf.copy_within(whole..filled, 0);
        filled -= whole;
    }
    if filled != 0 {
        bail!("the socket inventory ended inside a record ({filled} bytes left)");
    }
    Ok(count)
}

/// A process name from the kernel's 16 bytes (up to the first NUL).
pub(crate) fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use aya_obj::btf::BtfKind;

    use super::*;

    /// The placeholder BTF names the attach point at the kernel's own type id.
    #[test]
    fn the_attach_point_keeps_its_kernel_type_id() {
        let kernel = crate::kernel::btf::open().unwrap();
        let want = kernel.resolve_ids_by_name("bpf_iter_task_file").unwrap();
        let btf = attach_point_btf().unwrap();
        let got = btf
            .id_by_type_name_kind("bpf_iter_task_file", BtfKind::Func)
            .unwrap();
        assert!(want.contains(&got), "{got} not in {want:?}");
        assert_eq!(comm(b"nginx\0\0\0\0\0\0\0\0\0\0\0"), "nginx");
        assert_eq!(comm(b"0123456789abcdef"), "0123456789abcdef");
    }
}
