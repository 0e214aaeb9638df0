//! `-v`: the eBPF programs' own diagnostics (aya-log records), printed to stderr as they arrive.
use std::borrow::Cow;

use aya::Ebpf;
use aya_log::EbpfLogger;
use finwait_common::Site;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::oneshot,
    task::JoinHandle,
};

/// Prints each record as `finwait-trace: kernel: LEVEL MESSAGE`, the program named.
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = record.level().as_str().to_ascii_lowercase();
        let message = record.args().to_string();
        eprintln!("finwait-trace: kernel: {level} {}", named(&message));
    }

    fn flush(&self) {}
}

/// The message with its program named: the eBPF side puts the program's [`Site`] number first
/// (`12: read failed at offset 8`, see finwait-ebpf's `diag`).
fn named(message: &str) -> Cow<'_, str> {
    let name = message
        .split_once(": ")
        .and_then(|(site, rest)| Some((Site(site.parse().ok()?).name()?, rest)));
    match name {
        Some((name, rest)) => Cow::Owned(format!("{name}: {rest}")),
        None => Cow::Borrowed(message),
    }
}

/// Forwards the records while tracing.
pub(crate) struct Diagnostics {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Diagnostics {
    /// Starts forwarding. Where aya-log's ring cannot be read, says so: tracing goes on.
    pub(crate) fn start(ebpf: &mut Ebpf) -> Option<Self> {
        let logger = EbpfLogger::init_with_logger(ebpf, Stderr)
            .map_err(|e| e.to_string())
            .and_then(|l| {
                // SAFETY: the ring's fd is owned by the logger, which the AsyncFd owns.
                unsafe { AsyncFd::register_with_interest(l, Interest::READABLE) }
                    .map_err(|e| std::io::Error::from(e).to_string())
            });
        match logger {
            Ok(logger) => {
                let (stop, stopped) = oneshot::channel();
                let task = tokio::spawn(forward(logger, stopped));
                Some(Self { stop, task })
            }
            Err(e) => {
                eprintln!(
                    "finwait-trace: warning: -v: the kernel diagnostics cannot be read ({e}); \
                     tracing without them"
                );
                None
            }
        }
    }

    /// Prints what the ring still holds, and stops.
    pub(crate) async fn finish(self) {
        // A send to a task that already ended fails: nothing is left to print then.
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

async fn forward(mut logger: AsyncFd<EbpfLogger<Stderr>>, mut stop: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            guard = logger.readable_mut() => {
                let Ok(mut guard) = guard else { break };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = &mut stop => break,
        }
    }
    logger.get_mut().flush();
}

#[cfg(test)]
mod tests {
    use finwait_common::{GUARDED, SITES, Site};

    use super::named;

    #[test]
    fn a_site_number_becomes_its_program() {
        let site = Site::of("sys_exit_recvmsg_btf").0;
        assert_eq!(
            named(&format!(
                "{site}: fds received by thread 7 not all recorded"
            )),
            "sys_exit_recvmsg_btf: fds received by thread 7 not all recorded"
        );
        assert_eq!(
            named("0: read failed at offset 8"),
            "inet_sock_set_state: read failed at offset 8"
        );
        // Anything else as it came.
        for other in ["250: x", "x: y", "no site", "-1: x"] {
            assert_eq!(named(other), other);
        }
    }

    #[test]
    fn every_program_with_a_site_has_its_own() {
        let programs = SITES
            .iter()
            .chain(GUARDED.iter().flat_map(|(first, second)| [first, second]));
        let mut n = 0;
        for p in programs {
            assert_eq!(Site::of(p).name(), Some(*p));
            n += 1;
        }
        assert!(n <= usize::from(u8::MAX));
        assert_eq!(Site(n as u8).name(), None);
    }
}
