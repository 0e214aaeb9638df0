//! `finwait-trace`: see the library's module map.
fn main() -> std::process::ExitCode {
    finwait_userspace::main()
}
