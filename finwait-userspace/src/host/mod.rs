//! Facts about this host, read from /proc and netlink: processes, who holds which socket,
//! sockets by state (sock_diag), per-namespace sysctls, and the kernel's clock.
pub(crate) mod cgroup;
pub(crate) mod clock;
pub(crate) mod inspect;
pub(crate) mod names;
pub(crate) mod namespaces;
pub(crate) mod netns;
pub(crate) mod owners;
pub(crate) mod pods;
pub(crate) mod procs;
pub(crate) mod sockdiag;
