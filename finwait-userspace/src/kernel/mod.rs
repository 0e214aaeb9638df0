//! The kernel side, from userspace: the architecture's syscall interface, this kernel's layouts (tracefs formats, BTF), loading and
//! attaching the embedded eBPF programs, their counters, the kernel's per-program statistics, and
//! the programs' own diagnostics (`-v`), and the kernel's socket inventory.
pub(crate) mod arch;
pub(crate) mod btf;
pub(crate) mod counters;
pub(crate) mod diagnostics;
pub(crate) mod inventory;
pub(crate) mod load_error;
pub(crate) mod loader;
pub(crate) mod prog_stats;
pub(crate) mod tracefs;
