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
