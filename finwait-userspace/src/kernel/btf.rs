//! Offsets into kernel structures, read from the running kernel's BTF so the eBPF programs can
//! walk task -> files -> fd -> socket -> sock on any kernel, without CO-RE or kprobes.
use std::{cell::RefCell, collections::HashMap};

use anyhow::{Context, Result, bail};
use btf_rs::{Backend, Btf, Type};
use finwait_common::KernelOffsets;

pub(crate) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Reads every offset the programs need. An error means the fd -> socket lookup is unavailable.
pub(crate) fn kernel_offsets() -> Result<KernelOffsets> {
    offsets_from(&Structs::new(&open()?))
}

/// The kernel's BTF, each struct looked up once: a lookup by name scans the whole mmapped BTF,
/// and the offsets ask for the same dozen structs some forty times.
struct Structs<'a> {
    btf: &'a Btf,
    found: RefCell<HashMap<String, Type>>,
}

impl<'a> Structs<'a> {
    fn new(btf: &'a Btf) -> Self {
        Self {
            btf,
            found: RefCell::new(HashMap::new()),
        }
    }

    fn find(&self, name: &str) -> Result<Type> {
        if let Some(t) = self.found.borrow().get(name) {
            return Ok(t.clone());
        }
        let t = find_struct(self.btf, name)?;
        self.found.borrow_mut().insert(name.to_string(), t.clone());
        Ok(t)
    }
}

/// The kernel's BTF, for a handful of lookups.
pub(crate) fn open() -> Result<Btf> {
    // Mmap: a handful of lookups do not need every type parsed into memory. Where sysfs cannot
    // map the file (5.10), a copy in memory can: parsing every type took 4 s per start there
    // under emulation, twice.
    Btf::from_file_with_backend(VMLINUX_BTF, Backend::Mmap)
        .or_else(|_| mapped_copy())
        .or_else(|_| Btf::from_file(VMLINUX_BTF))
        .with_context(|| format!("reading {VMLINUX_BTF}"))
}

/// The BTF copied into an anonymous memory file, mapped from there.
fn mapped_copy() -> Result<Btf> {
    use std::{io::Write, os::fd::FromRawFd};
    let bytes = std::fs::read(VMLINUX_BTF)?;
    // SAFETY: a plain syscall with a static name.
    let fd = unsafe { libc::memfd_create(c"finwait-btf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a new fd that nothing else owns.
    let mut copy = unsafe { std::fs::File::from_raw_fd(fd) };
    copy.write_all(&bytes)?;
    Ok(Btf::from_file_with_backend(
        format!("/proc/self/fd/{fd}"),
        Backend::Mmap,
    )?)
}

fn offsets_from(btf: &Structs<'_>) -> Result<KernelOffsets> {
    let off = |s: &str, path: &str| member_offset(btf, s, path);
    // 6.13 replaced `atomic_long_t f_count` with `file_ref_t f_ref`, which counts from zero.
    let (file_count, zero_based) = match off("file", "f_ref") {
        Ok(o) => (o, 1),
        Err(_) => (off("file", "f_count")?, 0),
    };
    let socket_in_alloc = i64::from(off("socket_alloc", "socket")?);
    let inode_in_alloc = i64::from(off("socket_alloc", "vfs_inode")?);
    Ok(KernelOffsets {
        valid: 1,
        file_ref_is_zero_based: zero_based,
        task_files: off("task_struct", "files")?,
        files_fdt: off("files_struct", "fdt")?,
        fdtable_max_fds: off("fdtable", "max_fds")?,
        fdtable_fd: off("fdtable", "fd")?,
        file_private_data: off("file", "private_data")?,
        file_f_inode: off("file", "f_inode")?,
        file_count,
        socket_sk: off("socket", "sk")?,
        socket_type: off("socket", "type")?,
        sock_family: off("sock", "__sk_common.skc_family")?,
        sock_socket: off("sock", "sk_socket")?,
        // Newer kernels keep the flags in sock_common (`#define sk_flags __sk_common.skc_flags`).
        sock_flags: off("sock", "__sk_common.skc_flags").or_else(|_| off("sock", "sk_flags"))?,
        socket_to_inode: (inode_in_alloc - socket_in_alloc) as i32,
        inode_ino: off("inode", "i_ino")?,
        inode_mode: off("inode", "i_mode")?,
        task_signal: off("task_struct", "signal").unwrap_or(0),
        signal_live: off("signal_struct", "live").unwrap_or(0),
        sock_state: off("sock", "__sk_common.skc_state")?,
        ..with_inventory(
            state_btf_offsets(btf)
                .or_else(|_| ends_offsets(btf))
                .unwrap_or_default(),
            inventory_offsets(btf).unwrap_or_default(),
        )
    })
}

/// `base` with the inventory's fields of `inv`.
fn with_inventory(base: KernelOffsets, inv: KernelOffsets) -> KernelOffsets {
    KernelOffsets {
        // It keeps TCP sockets only: it needs `sk_protocol`, which the state hook's fields have.
        inventory: inv.inventory & base.state_btf,
        task_tgid: inv.task_tgid,
        task_comm: inv.task_comm,
        sock_net: inv.sock_net,
        net_ns_inum: inv.net_ns_inum,
        file_dentry: inv.file_dentry,
        dentry_name: inv.dentry_name,
        ..base
    }
}

/// What the socket inventory reads besides the fd walk's fields; missing: no inventory (the
/// holders then come from /proc).
fn inventory_offsets(btf: &Structs<'_>) -> Result<KernelOffsets> {
    Ok(KernelOffsets {
        inventory: 1,
        task_tgid: member_offset(btf, "task_struct", "tgid")?,
        task_comm: member_offset(btf, "task_struct", "comm")?,
        // possible_net_t holds the one pointer (a kernel without network namespaces has none).
        sock_net: member_offset(btf, "sock", "__sk_common.skc_net.net")?,
        net_ns_inum: member_offset(btf, "net", "ns.inum")?,
        // Optional: without them, epoll fds come from /proc.
        file_dentry: member_offset(btf, "file", "f_path.dentry").unwrap_or(0),
        dentry_name: member_offset(btf, "dentry", "d_name.name").unwrap_or(0),
        ..Default::default()
    })
}

/// What the BTF state hook reads from `struct sock`; any missing field (or a bitfield, on old
/// kernels) keeps the classic tracepoint.
fn state_btf_offsets(btf: &Structs<'_>) -> Result<KernelOffsets> {
    Ok(KernelOffsets {
        state_btf: 1,
        sock_protocol: member_offset(btf, "sock", "sk_protocol")?,
        ..ends_offsets(btf)?
    })
}

/// A socket's ends (family, ports, addresses): the BTF state hook's, and a close's that leaves
/// other references (no transition will name them).
fn ends_offsets(btf: &Structs<'_>) -> Result<KernelOffsets> {
    let off = |path: &str| member_offset(btf, "sock", path);
    Ok(KernelOffsets {
        sock_ends: 1,
        // struct inet_sock starts with struct sock: its offsets apply to the same pointer.
        inet_sport: member_offset(btf, "inet_sock", "inet_sport")?,
        sock_dport: off("__sk_common.skc_dport")?,
        inet_saddr: member_offset(btf, "inet_sock", "inet_saddr")?,
        sock_daddr: off("__sk_common.skc_daddr")?,
        sock_v6_rcv_saddr: off("__sk_common.skc_v6_rcv_saddr")?,
        sock_v6_daddr: off("__sk_common.skc_v6_daddr")?,
        ..Default::default()
    })
}

/// Byte offset of `path` (dot-separated members) inside `struct name`. Members of anonymous
/// structs and unions are found as if they were direct members, as in C.
fn member_offset(structs: &Structs<'_>, name: &str, path: &str) -> Result<u32> {
    let btf = structs.btf;
    let mut ty = structs.find(name)?;
    let mut total_bits = 0u32;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let (bits, member_ty, bitfield) = find_member(btf, &ty, part)
            .with_context(|| format!("struct {name} has no member `{path}` on this kernel"))?;
        total_bits += bits;
        if bitfield {
            bail!("{name}.{path} is a bitfield on this kernel");
        }
        if parts.peek().is_some() {
            ty = strip(btf, member_ty).context("resolving a member type")?;
        }
    }
    if !total_bits.is_multiple_of(8) {
        bail!("{name}.{path} is a bitfield");
    }
    Ok(total_bits / 8)
}

fn find_struct(btf: &Btf, name: &str) -> Result<Type> {
    btf.resolve_types_by_name(name)
        .with_context(|| format!("struct {name} is not in the kernel's BTF"))?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
        .with_context(|| format!("struct {name} is not in the kernel's BTF"))
}

/// Follows typedefs and qualifiers down to the struct or union.
fn strip(btf: &Btf, mut ty: Type) -> Result<Type, btf_rs::Error> {
    for _ in 0..16 {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t)?,
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                btf.resolve_chained_type(t)?
            }
            _ => return Ok(ty),
        };
    }
    Err(btf_rs::Error::OpNotSupp("type chain too long".into()))
}

/// (bit offset, type, is a bitfield) of member `want`, searching anonymous members recursively.
fn find_member(btf: &Btf, ty: &Type, want: &str) -> Option<(u32, Type, bool)> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return None,
    };
    for m in members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == want {
            let bitfield = m.bitfield_size().is_some_and(|n| n > 0);
            return Some((m.bit_offset(), btf.resolve_chained_type(m).ok()?, bitfield));
        }
        if name.is_empty() {
            let Ok(inner) = btf.resolve_chained_type(m).and_then(|t| strip(btf, t)) else {
                continue;
            };
            if let Some((bits, t, bf)) = find_member(btf, &inner, want) {
                return Some((m.bit_offset() + bits, t, bf));
            }
        }
    }
    None
}

/// Whether the kernel function's first parameter points to a defined struct, which is what a
/// verifier allows an fentry program to read it as. Linux 5.10's BTF types some syscall
/// wrappers' `regs` as the bare declaration `struct pt_regs;` (from `kernel/sys_ni.c`'s stubs);
/// its verifier then refuses the program's first instruction.
pub(crate) fn first_param_is_struct(btf: &Btf, func: &str) -> Result<bool> {
    let Some(Type::Func(f)) = btf.resolve_types_by_name(func)?.into_iter().next() else {
        bail!("{func} is not a function in the kernel's BTF");
    };
    let Type::FuncProto(proto) = btf.resolve_chained_type(&f)? else {
        bail!("{func} has no prototype in the kernel's BTF");
    };
    let Some(param) = proto.parameters.first() else {
        return Ok(false);
    };
    let mut t = btf.resolve_chained_type(param)?;
    if let Type::Ptr(p) = &t {
        t = btf.resolve_chained_type(p)?;
    }
    // Qualifiers (const, volatile, typedefs) down to the type itself.
    while let Type::Const(_) | Type::Volatile(_) | Type::Typedef(_) | Type::Restrict(_) = &t {
        t = match btf.resolve_chained_type(t.as_btf_type().context("a qualifier")?) {
            Ok(next) => next,
            Err(_) => break,
        };
    }
    Ok(matches!(t, Type::Struct(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy in memory (5.10's fallback) answers as the file itself does.
    #[test]
    fn the_copy_in_memory_gives_the_same_offsets() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("no {VMLINUX_BTF}; skipped");
            return;
        }
        let copy = offsets_from(&Structs::new(&mapped_copy().unwrap())).unwrap();
        let file = offsets_from(&Structs::new(&Btf::from_file(VMLINUX_BTF).unwrap())).unwrap();
        assert_eq!(format!("{copy:?}"), format!("{file:?}"));
    }

    /// Needs the running kernel's BTF; every kernel this tool supports has it.
    #[test]
    fn offsets_of_the_running_kernel_are_plausible() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("no {VMLINUX_BTF}; skipped");
            return;
        }
        let o = kernel_offsets().unwrap();
        assert_eq!(o.valid, 1);
        assert!(o.task_files > 0 && o.sock_flags > 0 && o.inode_ino > 0);
        // struct socket sits at the start of socket_alloc, the inode after it.
        assert!(o.socket_to_inode > 0);
        assert_eq!(
            o.state_btf, 1,
            "6.x kernels have every field the BTF state hook reads"
        );
        assert_eq!(o.inventory, 1, "and every field the socket inventory reads");
        assert!(o.task_comm > o.task_tgid && o.net_ns_inum > 0);
        assert_eq!(o.sock_ends, 1);
        assert!(o.file_dentry > 0 && o.dentry_name > 0);
    }

    /// Runs on every kernel of the matrix: close's wrapper has the typed `regs` everywhere
    /// (5.10 included); do_exit's first parameter is a `long`; tcp_shutdown's a `struct sock *`.
    #[test]
    fn a_wrappers_regs_is_told_from_a_bare_declaration() {
        let btf = open().unwrap();
        let close = format!("{}close", crate::kernel::arch::HOST.wrapper_prefix);
        assert!(first_param_is_struct(&btf, &close).unwrap());
        assert!(first_param_is_struct(&btf, "tcp_shutdown").unwrap());
        assert!(!first_param_is_struct(&btf, "do_exit").unwrap());
        assert!(first_param_is_struct(&btf, "no_such_function_here").is_err());
    }
}
