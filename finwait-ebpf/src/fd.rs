//! From a file descriptor of the current task to its TCP socket: task -> files -> fdtable ->
//! file -> socket -> sock, with offsets from BTF (`OFFSETS`).
use aya_ebpf::helpers::bpf_get_current_task;
use finwait_common::{Event, KernelOffsets, Site, counter, flags};

use crate::{
    OFFSETS, diag,
    event::count,
    read::{checked, config, probe},
};

pub(crate) const IPPROTO_TCP: u16 = 6;
pub(crate) const AF_INET: u16 = 2;
pub(crate) const AF_INET6: u16 = 10;
const SOCK_STREAM: u16 = 1;
pub(crate) const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// The stream socket behind a file descriptor of the current task.
#[derive(Clone, Copy)]
pub(crate) struct FdSock {
    pub(crate) sk: u64,
    pub(crate) inode: u64,
    /// Raw reference count of the file; `u64::MAX` when it could not be read.
    pub(crate) refs: u64,
}

/// The stream socket behind `fd`, if it is one.
#[inline(always)]
pub(crate) fn sock_of_fd(site: Site, fd: i64) -> Option<FdSock> {
    let (found, failed) = walk_fd(fd);
    if let Some(offset) = failed {
        diag::fd_read_failed(site, fd, offset);
    }
    found
}

/// Walks from `fd` to its socket. A failed read is counted here and its offset returned, to be
/// said once per walk (a diagnostic per read would be verified once per read per fd of
/// close_range()'s scan).
#[inline(always)]
pub(crate) fn walk_fd(fd: i64) -> (Option<FdSock>, Option<u64>) {
    let (sk, socket, file) = match fd_chain(fd) {
        Ok(Some(found)) => found,
        Ok(None) => return (None, None),
        Err(offset) => {
            count(counter::READ_FAILED);
            return (None, Some(offset));
        }
    };
    let o = config(&OFFSETS);
    let inode = socket_ino(socket, &o);
    let refs = probe::<u64>(file, o.file_count as u64);
    let mut failed = None;
    for r in [&inode, &refs] {
        if let Err(offset) = r {
            count(counter::READ_FAILED);
            failed = Some(*offset);
        }
    }
    let s = FdSock {
        sk,
        inode: inode.unwrap_or(0),
        refs: refs.unwrap_or(u64::MAX),
    };
    (Some(s), failed)
}

/// The fd's (sock, socket, file), if it is an IPv4 or IPv6 stream socket; Err: the offset of the
/// read that failed.
#[inline(always)]
fn fd_chain(fd: i64) -> Result<Option<(u64, u64, u64)>, u64> {
    let o = config(&OFFSETS);
    if o.valid == 0 || fd < 0 {
        return Ok(None);
    }
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    let files = probe::<u64>(task, o.task_files as u64)?;
    let fdt = probe::<u64>(files, o.files_fdt as u64)?;
    let max_fds = probe::<u32>(fdt, o.fdtable_max_fds as u64)?;
    if fd as u64 >= max_fds as u64 {
        return Ok(None);
    }
    let fd_array = probe::<u64>(fdt, o.fdtable_fd as u64)?;
    let file = probe::<u64>(fd_array, fd as u64 * 8)?;
    if file == 0 {
        return Ok(None);
    }
    let f_inode = probe::<u64>(file, o.file_f_inode as u64)?;
    let mode = probe::<u16>(f_inode, o.inode_mode as u64)?;
    Ok(stream_sock(file, mode, &o)?.map(|(sk, socket)| (sk, socket, file)))
}

/// The (sock, socket) behind `file`, whose inode's mode is `mode`, if it is an IPv4 or IPv6
/// stream socket; Err: the offset of the read that failed.
#[inline(always)]
pub(crate) fn stream_sock(
    file: u64,
    mode: u16,
    o: &KernelOffsets,
) -> Result<Option<(u64, u64)>, u64> {
    if mode & S_IFMT != S_IFSOCK {
        return Ok(None);
    }
    let socket = probe::<u64>(file, o.file_private_data as u64)?;
    if socket == 0 || probe::<u16>(socket, o.socket_type as u64)? != SOCK_STREAM {
        return Ok(None);
    }
    let sk = probe::<u64>(socket, o.socket_sk as u64)?;
    // A socket without its sock (being torn down): nothing to read through.
    if sk == 0 {
        return Ok(None);
    }
    let family = probe::<u16>(sk, o.sock_family as u64)?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(None);
    }
    Ok(Some((sk, socket)))
}

/// The socket `s` into a call's record.
#[inline(always)]
pub(crate) fn set_sock(e: &mut Event, s: FdSock) {
    e.sock = s.sk;
    e.inode = s.inode;
    e.flags |= flags::SOCK_RESOLVED;
    if s.refs != u64::MAX {
        e.file_refs = s.refs;
        e.flags |= flags::REFS_VALID;
    }
}

/// The inode number of `socket` (a `struct socket`); 0 if unreadable (counted and said).
#[inline(always)]
pub(crate) fn inode_of_socket(site: Site, socket: u64, o: &KernelOffsets) -> u64 {
    checked(site, socket_ino(socket, o)).unwrap_or(0)
}

#[inline(always)]
fn socket_ino(socket: u64, o: &KernelOffsets) -> Result<u64, u64> {
    // A `struct socket` lives inside `struct socket_alloc`, next to its inode.
    let inode = socket.wrapping_add(o.socket_to_inode as i64 as u64);
    probe::<u64>(inode, o.inode_ino as u64)
}
