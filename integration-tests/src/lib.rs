//! finwait's root integration tests live in `tests/`: each loads the real eBPF programs through
//! the `finwait-trace` binary and makes real connections. Run them with `cargo xtask test` (this
//! kernel, then the VM matrix) or `cargo xtask vm-test`; see `tests/common` for how they find
//! the binary.
// Its unit-test build links the tests' dev-dependencies, and has no tests of its own.
#![cfg_attr(test, allow(unused_crate_dependencies))]
