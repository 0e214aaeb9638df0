//! The `--metrics` HTTP endpoint: `GET /metrics` answers with the registry in the OpenMetrics
//! text format once the gauges are seeded from the start-up inventory (503 before: an empty
//! gauge would read as "no leak"); `/ready` says the same for a readiness probe, `/healthz`
//! that the process serves at all. It runs on a thread of its own (a tokio runtime of one
//! thread): a scrape never waits behind a burst of events, which the tracer's loop works
//! through without yielding. Nothing else is served. Its own connections are named to the
//! tracer ([`OwnConnections`]), which leaves them out of its findings and nothing else.
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

use crate::model::{Endpoints, EndsKey, ends_key};

/// A scraper that sends no request within this long is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes served at once at most (a scraper that opens many connections cannot pile them up).
const MAX_CONNECTIONS: usize = 64;

const SERVED: &str = "finwait-trace serves GET /metrics, /ready and /healthz\n";
const NOT_READY: &str = "not ready: reading the sockets already stuck, to seed the gauges\n";

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Set once the gauges are seeded: `/metrics` and `/ready` answer from then on.
pub(crate) type Ready = Arc<AtomicBool>;

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

    fn opened(&self, key: EndsKey) {
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

    fn closed(&self, key: EndsKey) {
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
fn key_of(stream: &TcpStream) -> Option<EndsKey> {
    let (l, r) = (stream.local_addr().ok()?, stream.peer_addr().ok()?);
    Some(ends_key(l.ip(), l.port(), r.ip(), r.port()))
}

/// The endpoint's port, bound before the programs load (a taken port fails at once), not yet
/// served: [`Endpoint::serve`] starts its thread once the tracer is sandboxed, so no request is
/// read before (a scraper that connects meanwhile waits in the listen backlog).
pub(crate) struct Endpoint {
    addr: SocketAddr,
    listener: std::net::TcpListener,
    registry: Registry,
    ready: Ready,
    own: OwnConnections,
}

/// Binds `addr` now; its connections will be named in `own` as they come and go.
pub(crate) fn bind(
    addr: SocketAddr,
    registry: Registry,
    ready: Ready,
    own: OwnConnections,
) -> Result<Endpoint> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--metrics {addr}: cannot listen there"))?;
    if addr.port() == 0 {
        // The kernel chose the port: say which, or nobody can scrape it.
        let bound = listener.local_addr()?;
        eprintln!("finwait-trace: --metrics {addr}: serving on {bound}");
    }
    listener.set_nonblocking(true)?;
    Ok(Endpoint {
        addr,
        listener,
        registry,
        ready,
        own,
    })
}

impl Endpoint {
    /// Serves the registry from a thread of its own until the process exits.
    pub(crate) fn serve(self) -> Result<()> {
        let Self {
            addr,
            listener,
            registry,
            ready,
            own,
        } = self;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("finwait-metrics".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => serve(l, Arc::new(registry), ready, own).await,
                        Err(e) => eprintln!("finwait-trace: warning: --metrics {addr}: {e}"),
                    }
                });
            })?;
        Ok(())
    }
}

/// Serves `registry` until the runtime stops.
async fn serve(listener: TcpListener, registry: Arc<Registry>, ready: Ready, own: OwnConnections) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of fds, most likely: wait instead of spinning on the error.
                eprintln!("finwait-trace: warning: --metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: the scraper retries
        };
        let registry = registry.clone();
        let ready = ready.clone();
        let (own, key) = (own.clone(), key_of(&stream));
        if let Some(key) = key {
            own.opened(key);
        }
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = respond(&req, &registry, ready.load(Ordering::Acquire));
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Some(key) = key {
                own.closed(key);
            }
            drop(slot);
        });
    }
}

fn respond(req: &Request<Incoming>, registry: &Registry, ready: bool) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, kind: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = kind.parse() {
            r.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        r
    };
    let text = "text/plain; charset=utf-8";
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/ready" | "/healthz") {
        return reply(StatusCode::NOT_FOUND, text, SERVED.into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, text, SERVED.into());
    }
    if path == "/healthz" {
        return reply(StatusCode::OK, text, "ok\n".into());
    }
    if !ready {
        return reply(StatusCode::SERVICE_UNAVAILABLE, text, NOT_READY.into());
    }
    if path == "/ready" {
        return reply(StatusCode::OK, text, "ready\n".into());
    }
    let mut body = String::with_capacity(16 * 1024);
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => reply(StatusCode::OK, OPENMETRICS, body),
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            text,
            "encoding failed\n".into(),
        ),
    }
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
