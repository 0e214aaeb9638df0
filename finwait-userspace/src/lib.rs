//! finwait-trace: attributes TCP FIN_WAIT2 / CLOSE_WAIT sockets to the process and call
//! responsible. Modules, each with one job:
//! - `tracefs`, `kernel_btf`: this kernel's layouts, read at run time.
//! - `loader`: loads and attaches the embedded eBPF programs.
//! - `event`: decodes ring-buffer records.
//! - `correlate`: the attribution state machine (pure, unit-tested).
//! - `resolve`: who holds a socket (the kernel's ownership record first, /proc only where it
//!   cannot know); `owners`, `procs`: /proc lookups (socket holders, process trees).
//! - `output`, `escape`: JSON and human rendering.
//! - `tracer`: the live loop; `demo`: the built-in workload; `cli`: options.
pub mod cli;
pub mod correlate;
pub mod demo;
pub mod escape;
pub mod event;
pub mod kernel_btf;
pub mod load_error;
pub mod loader;
pub mod netns;
pub mod output;
pub mod owners;
pub mod procs;
pub mod prog_stats;
pub mod resolve;
pub mod snapshot;
pub mod sockdiag;
pub mod summary;
pub mod tracefs;
pub mod tracer;
