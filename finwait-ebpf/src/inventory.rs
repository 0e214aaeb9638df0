//! The socket inventory: an `iter/task_file` program that writes one record per TCP socket fd
//! (and epoll fd) of every task (holder, fd, inode, state, network namespace), every network
//! namespace included, in one pass. Userspace joins it with sock_diag by inode: the holders of
//! the sockets already on the close path, without reading a hundred thousand links in /proc.
use aya_ebpf::{
    bindings::seq_file,
    helpers::{bpf_probe_read_kernel, bpf_seq_write},
};
use finwait_common::{FD_EPOLL, KernelOffsets, SocketFdRec};

use crate::{
    OFFSETS,
    fd::{IPPROTO_TCP, S_IFMT, stream_sock},
    read::{config, probe},
};

/// `struct bpf_iter_meta`: the seq_file the records go to.
#[repr(C)]
struct IterMeta {
    seq: *mut seq_file,
}

/// `struct bpf_iter__task_file`, the program's context.
#[repr(C)]
struct TaskFileCtx {
    meta: *const IterMeta,
    task: u64,
    fd: u32,
    file: u64,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
fn socket_fds(ctx: *const TaskFileCtx) -> i32 {
    // SAFETY: the context the kernel passes an iter/task_file program; `meta` is never null,
    // and its `seq` must stay the typed pointer bpf_seq_write wants (a direct load).
    let seq = unsafe { core::ptr::read_volatile(&(*core::ptr::read_volatile(&(*ctx).meta)).seq) };
    // The task and file as plain addresses (read through the helper, they are scalars the
    // offsets can be added to); either is null on the last call, when the walk ends.
    // SAFETY: the helper checks the addresses.
    let read = unsafe {
        (
            bpf_probe_read_kernel(&(*ctx).task),
            bpf_probe_read_kernel(&(*ctx).file),
            bpf_probe_read_kernel(&(*ctx).fd),
        )
    };
    let (Ok(task), Ok(file), Ok(fd)) = read else {
        return 0;
    };
    if task == 0 || file == 0 {
        return 0;
    }
    if let Ok(Some(rec)) = record(task, file, fd) {
        // SAFETY: a record on this stack, written whole into the iterator's seq_file; a full
        // buffer makes the kernel call again for this fd.
        unsafe {
            bpf_seq_write(
                seq,
                (&raw const rec).cast(),
                size_of::<SocketFdRec>() as u32,
            );
        }
    }
    0
}

/// Whether `file` is an epoll instance (its dentry's name).
#[inline(always)]
fn is_epoll(file: u64, o: &KernelOffsets) -> Result<bool, u64> {
    if o.file_dentry == 0 {
        return Ok(false);
    }
    let dentry = probe::<u64>(file, o.file_dentry as u64)?;
    let name = probe::<u64>(dentry, o.dentry_name as u64)?;
    Ok(probe::<[u8; 12]>(name, 0)? == *b"[eventpoll]\0")
}

/// The record for `task`'s `fd`, if it is a TCP socket (or an epoll fd); Err: a read failed (the
/// socket is then not listed, and userspace falls back to /proc for what it misses).
#[inline(always)]
fn record(task: u64, file: u64, fd: u32) -> Result<Option<SocketFdRec>, u64> {
    let o = config(&OFFSETS);
    if o.valid == 0 || o.inventory == 0 {
        return Ok(None);
    }
    let f_inode = probe::<u64>(file, o.file_f_inode as u64)?;
    let mode = probe::<u16>(f_inode, o.inode_mode as u64)?;
    // An anonymous inode has no file type; the epoll ones are named `[eventpoll]`.
    if mode & S_IFMT == 0 && is_epoll(file, &o)? {
        return Ok(Some(SocketFdRec {
            tgid: probe::<u32>(task, o.task_tgid as u64)?,
            fd,
            state: FD_EPOLL,
            ..SocketFdRec::default()
        }));
    }
    let Some((sk, _)) = stream_sock(file, mode, &o)? else {
        return Ok(None);
    };
    // TCP only (userspace loads the inventory only where the protocol's offset is known).
    if probe::<u16>(sk, o.sock_protocol as u64)? != IPPROTO_TCP {
        return Ok(None);
    }
    let net = probe::<u64>(sk, o.sock_net as u64)?;
    Ok(Some(SocketFdRec {
        inode: probe::<u64>(f_inode, o.inode_ino as u64)?,
        netns: probe::<u32>(net, o.net_ns_inum as u64)?,
        tgid: probe::<u32>(task, o.task_tgid as u64)?,
        fd,
        state: probe::<u8>(sk, o.sock_state as u64)?,
        _pad: [0; 3],
        comm: probe::<[u8; 16]>(task, o.task_comm as u64)?,
    }))
}
