//! `-v`: the eBPF programs' own diagnostics (aya-log records), printed to stderr as they arrive.
use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::oneshot,
    task::JoinHandle,
};

/// Prints each record as `finwait-trace: kernel: LEVEL MESSAGE`.
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = record.level().as_str().to_ascii_lowercase();
        eprintln!("finwait-trace: kernel: {level} {}", record.args());
    }

    fn flush(&self) {}
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
