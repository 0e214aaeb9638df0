//! `finwait-trace`: see the library's module map.
// The binary shares the package's dependencies; the library is where unused ones show.
#![allow(unused_crate_dependencies)]
fn main() -> std::process::ExitCode {
    finwait_userspace::main()
}
