//! What keeps the endpoint from being starved: the table of live connections, whose cap sheds
//! the least active one for a newcomer (a new scraper always gets in), the accept-error backoff,
//! and the counters that say what was dropped and why.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::sync::oneshot;

use crate::output::metrics::Exposition;

/// Connections served at once at most: the cap on the endpoint's fds and memory.
pub(super) const MAX_CONNECTIONS: usize = 64;

/// Why a connection was dropped by the endpoint rather than closed by its client.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(super) enum Dropped {
    /// Made room for a newer connection at the cap.
    Shed,
    /// Made room for a connection at the process's open-files limit.
    FdLimit,
    /// No complete request head (or TLS handshake) in time, the first or a kept-alive one.
    HeaderTimeout,
    /// A response not taken by the client in time.
    WriteTimeout,
    /// Open longer than any scrape needs.
    Lifetime,
    /// The TLS handshake failed.
    Tls,
}

impl Dropped {
    fn label(self) -> &'static str {
        match self {
            Self::Shed => "shed",
            Self::FdLimit => "fd_limit",
            Self::HeaderTimeout => "header_timeout",
            Self::WriteTimeout => "write_timeout",
            Self::Lifetime => "lifetime",
            Self::Tls => "tls_handshake",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// The endpoint's own counters, in the registry it serves.
#[derive(Clone, Default)]
pub(super) struct Stats {
    accepted: Counter,
    accept_errors: Counter,
    dropped: Family<Reason, Counter>,
    unauthorized: Counter,
}

impl Stats {
    pub(super) fn register(&self, r: &mut Exposition) {
        r.register(
            "metrics_connections",
            "Connections the --metrics endpoint accepted",
            self.accepted.clone(),
        );
        r.register(
            "metrics_accept_errors",
            "Connections the --metrics endpoint failed to accept (out of fds or memory: retried with backoff)",
            self.accept_errors.clone(),
        );
        r.register(
            "metrics_connections_dropped",
            "Connections the --metrics endpoint dropped, by reason (shed at the cap or the open-files limit, or timed out)",
            self.dropped.clone(),
        );
        r.register(
            "metrics_unauthorized",
            "Requests refused with 401 (--web-config-file basic_auth_users)",
            self.unauthorized.clone(),
        );
        // Every reason shows from the start, at 0.
        for d in [
            Dropped::Shed,
            Dropped::FdLimit,
            Dropped::HeaderTimeout,
            Dropped::WriteTimeout,
            Dropped::Lifetime,
            Dropped::Tls,
        ] {
            drop(self.dropped.get_or_create(&Reason { reason: d.label() }));
        }
    }

    pub(super) fn accepted(&self) {
        self.accepted.inc();
    }

    pub(super) fn accept_failed(&self) {
        self.accept_errors.inc();
    }

    pub(super) fn dropped(&self, why: Dropped) {
        self.dropped
            .get_or_create(&Reason {
                reason: why.label(),
            })
            .inc();
    }

    pub(super) fn unauthorized(&self) {
        self.unauthorized.inc();
    }
}

/// When a live connection started and last did something.
#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    start: Instant,
    last_request: Option<Instant>,
}

impl Slot {
    /// Which to shed first: those that never sent a whole request (idle, slow or handshaking:
    /// the oldest first), then the one whose last request is the oldest (a kept-alive scraper
    /// asks again within its interval; a client that never reads stopped asking). A connection
    /// that has asked is kept over a newcomer that has not: under a flood of connections, a
    /// scraper that got in stays in (a newcomer reads its request as soon as it is accepted).
    fn shed_order(&self) -> (bool, Instant, Instant) {
        match self.last_request {
            None => (false, self.start, self.start),
            Some(t) => (true, t, self.start),
        }
    }
}

/// The connection to shed for a newcomer, if any.
fn victim<'a, K: Copy + 'a>(slots: impl Iterator<Item = (K, &'a Slot)>) -> Option<K> {
    slots.min_by_key(|(_, s)| s.shed_order()).map(|(k, _)| k)
}

struct Live {
    slot: Slot,
    /// Dropped (with the entry) to cancel the connection.
    _cancel: oneshot::Sender<()>,
}

/// The live connections, each with the handle that drops it.
#[derive(Clone, Default)]
pub(super) struct Table(Arc<Mutex<TableInner>>);

#[derive(Default)]
struct TableInner {
    next: u64,
    live: HashMap<u64, Live>,
}

impl Table {
    /// A new connection's entry, shedding the least active one if the table is full (counted
    /// in `stats`); its id, and the receiver that fires when it is to be dropped.
    pub(super) fn admit(&self, stats: &Stats) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let Ok(mut t) = self.0.lock() else {
            return (u64::MAX, rx);
        };
        if t.live.len() >= MAX_CONNECTIONS && shed_one(&mut t) {
            stats.dropped(Dropped::Shed);
        }
        t.next += 1;
        let id = t.next;
        let slot = Slot {
            start: Instant::now(),
            last_request: None,
        };
        t.live.insert(id, Live { slot, _cancel: tx });
        (id, rx)
    }

    /// Sheds the least active connection (out of fds: its fd is the newcomer's); whether there
    /// was one.
    pub(super) fn shed_for_fd(&self) -> bool {
        self.0.lock().is_ok_and(|mut t| shed_one(&mut t))
    }

    /// Connection `id` received a whole request.
    pub(super) fn requested(&self, id: u64) {
        if let Ok(mut t) = self.0.lock()
            && let Some(l) = t.live.get_mut(&id)
        {
            l.slot.last_request = Some(Instant::now());
        }
    }

    /// Connection `id` ended.
    pub(super) fn remove(&self, id: u64) {
        if let Ok(mut t) = self.0.lock() {
            t.live.remove(&id);
        }
    }
}

fn shed_one(t: &mut TableInner) -> bool {
    let id = victim(t.live.iter().map(|(id, l)| (*id, &l.slot)));
    id.and_then(|id| t.live.remove(&id)).is_some()
}

/// Accept errors (out of fds or memory) retried after 10 ms, doubling to 1 s, and said once
/// per episode: an episode ends once accepts have worked for [`Backoff::QUIET`].
#[derive(Debug, Default)]
pub(super) struct Backoff {
    delay: Option<Duration>,
    /// The episode: when its last error was, and how many it had.
    episode: Option<(Instant, u64)>,
}

/// What to do after an accept error.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Retry {
    pub(super) after: Duration,
    /// The episode's first error: say it.
    pub(super) say: bool,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);
    const QUIET: Duration = Duration::from_secs(10);

    pub(super) fn failed(&mut self, now: Instant) -> Retry {
        let after = self.delay.map_or(Self::FIRST, |d| (d * 2).min(Self::MAX));
        self.delay = Some(after);
        let say = self.episode.is_none();
        let errors = self.episode.map_or(0, |(_, n)| n) + 1;
        self.episode = Some((now, errors));
        Retry { after, say }
    }

    /// An accept worked; at an episode's end, how many errors it had (to say so).
    pub(super) fn accepted(&mut self, now: Instant) -> Option<u64> {
        self.delay = None;
        let (last, errors) = self.episode?;
        if now.duration_since(last) < Self::QUIET {
            return None;
        }
        self.episode = None;
        Some(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_the_idle_first_then_the_one_that_stopped_asking() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let slot = |start, last: Option<u64>| Slot {
            start: at(start),
            last_request: last.map(at),
        };
        // A scraper kept alive since 0 that asked at 20, a client that asked at 5 and stopped,
        // two that never asked (connected at 10 and 15).
        let slots = [
            ("scraper", slot(0, Some(20))),
            ("stalled", slot(1, Some(5))),
            ("idle-new", slot(15, None)),
            ("idle-old", slot(10, None)),
        ];
        let pick = |s: &[(&'static str, Slot)]| victim(s.iter().map(|(k, s)| (*k, s)));
        assert_eq!(pick(&slots), Some("idle-old"));
        assert_eq!(pick(&slots[..3]), Some("idle-new"));
        assert_eq!(pick(&slots[..2]), Some("stalled"));
        assert_eq!(pick(&slots[..1]), Some("scraper"));
        assert_eq!(pick(&[]), None);
    }

    #[test]
    fn a_full_table_admits_the_newcomer_and_counts_the_shed() {
        let (table, stats) = (Table::default(), Stats::default());
        let mut first = None;
        for i in 0..MAX_CONNECTIONS {
            let (id, rx) = table.admit(&stats);
            if i == 0 {
                first = Some(rx);
            } else {
                table.requested(id);
            }
        }
        let mut first = first.unwrap();
        assert!(
            first
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        // Full: the one that never asked goes.
        let (_, mut newest) = table.admit(&stats);
        assert_eq!(first.try_recv(), Err(oneshot::error::TryRecvError::Closed));
        assert!(
            newest
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        assert_eq!(table.0.lock().unwrap().live.len(), MAX_CONNECTIONS);
        let shed = stats
            .dropped
            .get_or_create(&Reason { reason: "shed" })
            .get();
        assert_eq!(shed, 1);
    }

    #[test]
    fn backoff_doubles_to_a_second_and_says_each_episode_once() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        let first = b.failed(t0);
        assert_eq!(
            first,
            Retry {
                after: Duration::from_millis(10),
                say: true
            }
        );
        let delays: Vec<_> = (0..10).map(|_| b.failed(t0)).collect();
        assert!(delays.iter().all(|r| !r.say));
        assert_eq!(delays[0].after, Duration::from_millis(20));
        assert_eq!(delays[9].after, Duration::from_secs(1));
        // Accepts between errors: the delay starts over, the episode goes on.
        assert_eq!(b.accepted(t0 + Duration::from_secs(1)), None);
        let again = b.failed(t0 + Duration::from_secs(2));
        assert_eq!(
            again,
            Retry {
                after: Duration::from_millis(10),
                say: false
            }
        );
        // Quiet for long enough: the episode ends, with its count, and the next is said.
        assert_eq!(b.accepted(t0 + Duration::from_secs(13)), Some(12));
        assert!(b.failed(t0 + Duration::from_secs(14)).say);
    }
}
