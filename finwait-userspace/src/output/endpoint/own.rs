//! The endpoint's own connections, named to the tracer by their TCP ends (under TLS too: the
//! ends are the TCP connection's), which leaves them out of its findings and nothing else.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::TcpStream;

use crate::model::{Endpoints, EndsKey, ends_key};

/// A closed connection's later transitions (FIN_WAIT2, TIME_WAIT, the peer's LAST_ACK) still
/// come: its ends are known this long after the close.
const KEEP_CLOSED: Duration = Duration::from_secs(600);
/// Connections remembered at most (a scrape a second for `KEEP_CLOSED` is 600).
const MAX_REMEMBERED: usize = 65_536;

/// The endpoint's own connections, by their full ends, while open and [`KEEP_CLOSED`] after:
/// the tracer leaves out the transitions of exactly these (both ends: the scraper's socket on
/// this host is the same connection). An application on the same port, on another address or
/// in another namespace, has other ends: it is traced.
#[derive(Clone, Default)]
pub(crate) struct OwnConnections(Arc<Mutex<HashMap<EndsKey, Option<Instant>>>>);

impl OwnConnections {
    /// One of `e`'s two sides is a connection of the endpoint's.
    pub(crate) fn contains(&self, e: &Endpoints) -> bool {
        let Ok(own) = self.0.lock() else {
            return false;
        };
        if own.is_empty() {
            return false;
        }
        own.contains_key(&e.key())
            || own.contains_key(&ends_key(e.remote, e.rport, e.local, e.lport))
    }

    pub(super) fn opened(&self, key: EndsKey) {
        if let Ok(mut own) = self.0.lock() {
            if own.len() >= MAX_REMEMBERED {
                let now = Instant::now();
                own.retain(|_, closed| closed.is_none_or(|t| now - t < KEEP_CLOSED));
            }
            if own.len() < MAX_REMEMBERED {
                own.insert(key, None);
            }
        }
    }

    pub(super) fn closed(&self, key: EndsKey) {
        if let Ok(mut own) = self.0.lock() {
            let now = Instant::now();
            own.retain(|_, closed| closed.is_none_or(|t| now - t < KEEP_CLOSED));
            if let Some(closed) = own.get_mut(&key) {
                *closed = Some(now);
            }
        }
    }
}

/// A connection's ends as the tracer names them (v4-mapped addresses as IPv4).
pub(super) fn key_of(stream: &TcpStream) -> Option<EndsKey> {
    let (l, r) = (stream.local_addr().ok()?, stream.peer_addr().ok()?);
    Some(ends_key(l.ip(), l.port(), r.ip(), r.port()))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn ends(local: &str, lport: u16, remote: &str, rport: u16) -> Endpoints {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        Endpoints {
            local: ip(local),
            lport,
            remote: ip(remote),
            rport,
        }
    }

    /// Its own connection, either side and however the address is written, and nothing else
    /// on its port.
    #[test]
    fn own_connections_are_known_by_their_full_ends() {
        let own = OwnConnections::default();
        let mapped = |s: &str| s.parse::<IpAddr>().unwrap();
        own.opened(ends_key(
            mapped("::ffff:127.0.0.2"),
            9977,
            mapped("127.0.0.1"),
            40000,
        ));
        assert!(own.contains(&ends("127.0.0.2", 9977, "127.0.0.1", 40000)));
        assert!(own.contains(&ends("127.0.0.1", 40000, "127.0.0.2", 9977)));
        assert!(!own.contains(&ends("127.0.0.1", 9977, "127.0.0.1", 40000)));
        assert!(!own.contains(&ends("127.0.0.2", 9977, "127.0.0.1", 40001)));
        // Closed, its last transitions still come: still known.
        own.closed(ends_key(
            mapped("::ffff:127.0.0.2"),
            9977,
            mapped("127.0.0.1"),
            40000,
        ));
        assert!(own.contains(&ends("127.0.0.2", 9977, "127.0.0.1", 40000)));
    }
}
