//! The `--metrics` HTTP endpoint: `GET /metrics` answers with the registry in the OpenMetrics
//! text format once the gauges are seeded from the start-up inventory (503 before: an empty
//! gauge would read as "no leak"); `/ready` says the same for a readiness probe, `/healthz`
//! that the process serves at all. It runs on a thread of its own (a tokio runtime of one
//! thread): a scrape never waits behind a burst of events, which the tracer's loop works
//! through without yielding. Nothing else is served. Its own connections are named to the
//! tracer ([`OwnConnections`]), which leaves them out of its findings and nothing else.
//!
//! No client can starve it (`limits`): each connection has a deadline for its request heads,
//! its writes and its life, and at the cap a newcomer sheds the least active connection.
//! `--web-config-file` adds TLS, client certificates and basic auth (`web_config`).
mod auth;
mod deadline;
mod limits;
mod own;
mod tls;
mod web_config;

use std::{
    convert::Infallible,
    io,
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
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

use deadline::WriteDeadline;
use limits::{Backoff, Dropped, Stats, Table};

use super::metrics::{Exposition, Format};
pub(crate) use own::OwnConnections;
pub(crate) use web_config::WebConfig;

/// A request head (and, with TLS, the handshake) must arrive within this long, the first and
/// each kept-alive one after: a slow or silent client is dropped, an idle keep-alive too.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A response the client takes none of for this long drops the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long (once its current request is answered).
const MAX_LIFETIME: Duration = Duration::from_secs(600);
/// A request's head at most (hyper's read buffer; GETs are small).
const MAX_BUF: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// `/metrics` answers encoded this recently are sent again as they are (the values move on
/// events and every second).
const FRESH: Duration = Duration::from_millis(100);

const SERVED: &str = "finwait-trace serves GET /metrics, /ready and /healthz\n";
const NOT_READY: &str = "not ready: reading the sockets already stuck, to seed the gauges\n";
const UNAUTHORIZED: &str = "unauthorized\n";

/// Set once the gauges are seeded: `/metrics` and `/ready` answer from then on.
pub(crate) type Ready = Arc<AtomicBool>;

/// What every connection shares.
struct Shared {
    exposition: Exposition,
    ready: Ready,
    own: OwnConnections,
    web: WebConfig,
    stats: Stats,
    table: Table,
    /// The last `/metrics` body of each format, and when it was encoded.
    encoded: Mutex<[Option<(Instant, Bytes)>; 2]>,
}

/// The endpoint's port, bound before the programs load (a taken port fails at once), not yet
/// served: [`Endpoint::serve`] starts its thread once the tracer is sandboxed, so no request is
/// read before (a scraper that connects meanwhile waits in the listen backlog).
pub(crate) struct Endpoint {
    addr: SocketAddr,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
}

/// Binds `addr` now, to serve `registry` as `web` says; its connections will be named in `own`
/// as they come and go, and counted in `registry`.
pub(crate) fn bind(
    addr: SocketAddr,
    mut exposition: Exposition,
    ready: Ready,
    own: OwnConnections,
    web: WebConfig,
) -> Result<Endpoint> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--metrics {addr}: cannot listen there"))?;
    if addr.port() == 0 {
        // The kernel chose the port: say which, or nobody can scrape it.
        let bound = listener.local_addr()?;
        eprintln!("finwait-trace: --metrics {addr}: serving on {bound}");
    }
    listener.set_nonblocking(true)?;
    let stats = Stats::default();
    stats.register(&mut exposition);
    let shared = Arc::new(Shared {
        exposition,
        ready,
        own,
        web,
        stats,
        table: Table::default(),
        encoded: Mutex::default(),
    });
    Ok(Endpoint {
        addr,
        listener,
        shared,
    })
}

impl Endpoint {
    /// Serves from a thread of its own until the process exits.
    pub(crate) fn serve(self) -> Result<()> {
        let Self {
            addr,
            listener,
            shared,
        } = self;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("finwait-metrics".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => serve(l, shared).await,
                        Err(e) => eprintln!("finwait-trace: warning: --metrics {addr}: {e}"),
                    }
                });
            })?;
        Ok(())
    }
}

/// Accepts until the runtime stops, each connection on a task of its own.
async fn serve(listener: TcpListener, s: Arc<Shared>) {
    let mut backoff = Backoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed(&s, &mut backoff, &e).await;
                continue;
            }
        };
        if let Some(n) = backoff.accepted(Instant::now()) {
            eprintln!("finwait-trace: --metrics: accepting again, after {n} failed accepts");
        }
        s.stats.accepted();
        let (id, cancel) = s.table.admit(&s.stats);
        tokio::spawn(connection(s.clone(), stream, id, cancel));
        // The newcomer reads its request before the next accept: in a burst of connections
        // (each shedding the oldest that never asked), a scraper that asked at once is no
        // longer one that never asked.
        tokio::task::yield_now().await;
    }
}

/// Out of fds or memory: counted, said once an episode, retried after a growing pause; out of
/// fds, the least active connection makes room (a new scraper gets in at the limit too).
async fn accept_failed(s: &Shared, backoff: &mut Backoff, e: &io::Error) {
    s.stats.accept_failed();
    let retry = backoff.failed(Instant::now());
    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) && s.table.shed_for_fd() {
        s.stats.dropped(Dropped::FdLimit);
    }
    if retry.say {
        eprintln!(
            "finwait-trace: warning: --metrics: accept failed: {e} (retrying with backoff; \
             said once, counted in finwait_metrics_accept_errors_total)"
        );
    }
    tokio::time::sleep(retry.after).await;
}

/// One connection, until it ends, times out, or is shed (`cancel`).
async fn connection(s: Arc<Shared>, stream: TcpStream, id: u64, cancel: oneshot::Receiver<()>) {
    let key = own::key_of(&stream);
    if let Some(key) = key {
        s.own.opened(key);
    }
    let io = WriteDeadline::new(stream, WRITE_TIMEOUT);
    let write_timed_out = io.timed_out();
    let dropped = tokio::select! {
        d = serve_io(&s, id, io) => d,
        _ = cancel => None, // counted by what shed it
    };
    let dropped = if write_timed_out.load(Ordering::Relaxed) {
        Some(Dropped::WriteTimeout)
    } else {
        dropped
    };
    if let Some(why) = dropped {
        s.stats.dropped(why);
    }
    s.table.remove(id);
    if let Some(key) = key {
        s.own.closed(key);
    }
}

/// Serves a connection, after its TLS handshake if there is TLS; why the endpoint dropped it,
/// if it did.
async fn serve_io(s: &Arc<Shared>, id: u64, io: WriteDeadline<TcpStream>) -> Option<Dropped> {
    let Some(tls) = &s.web.tls else {
        return http(s, id, io).await;
    };
    let handshake = tokio_rustls::TlsAcceptor::from(tls.clone()).accept(io);
    match tokio::time::timeout(HEADER_TIMEOUT, handshake).await {
        Err(_) => Some(Dropped::HeaderTimeout),
        Ok(Err(_)) => Some(Dropped::Tls),
        Ok(Ok(stream)) => http(s, id, stream).await,
    }
}

/// HTTP/1.1 on `io`: small requests, answered in order, none read ahead of its answer.
async fn http<IO>(s: &Arc<Shared>, id: u64, io: IO) -> Option<Dropped>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = s.clone();
    let svc = service_fn(move |req| {
        let s = shared.clone();
        async move {
            s.table.requested(id);
            // One request, then the other connections' turn: pipelined requests wait theirs.
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(s.answer(req).await)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .max_headers(MAX_HEADERS)
        .pipeline_flush(false)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let old = tokio::time::sleep(MAX_LIFETIME);
    tokio::pin!(old);
    let mut aged = false;
    let ended = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            () = &mut old, if !aged => {
                // The answer under way is finished (its write has a deadline), then it closes.
                aged = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    match ended {
        Err(e) if e.is_timeout() => Some(Dropped::HeaderTimeout),
        _ if aged => Some(Dropped::Lifetime),
        _ => None,
    }
}

impl Shared {
    /// The registry encoded, at most once per [`FRESH`]: however many requests come at once
    /// (pipelined by a client that never reads, say), the endpoint encodes a few a second.
    fn encoded(&self, format: Format) -> Option<Bytes> {
        let mut last = self.encoded.lock().ok()?;
        let slot = &mut last[usize::from(format == Format::Text004)];
        if let Some((at, body)) = &*slot
            && at.elapsed() < FRESH
        {
            return Some(body.clone());
        }
        let body = Bytes::from(self.exposition.encode(format)?);
        *slot = Some((Instant::now(), body.clone()));
        Some(body)
    }

    /// A request's answer: 401 without the right credentials (every path, as exporter-toolkit
    /// does), the configured headers on every answer.
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let mut r = match &self.web.users {
            Some(u) if !u.allow(req.headers().get(header::AUTHORIZATION)).await => {
                self.stats.unauthorized();
                let mut r = reply(StatusCode::UNAUTHORIZED, TEXT, UNAUTHORIZED);
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Basic"),
                );
                r
            }
            _ => {
                let ready = self.ready.load(Ordering::Acquire);
                respond(&req, |f| self.encoded(f), ready)
            }
        };
        for (name, value) in &self.web.headers {
            r.headers_mut().insert(name.clone(), value.clone());
        }
        r
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

fn reply(status: StatusCode, kind: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = kind.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// `metrics` encodes the registry in a format (only `/metrics` calls it): the one `Accept`
/// asks for.
fn respond(
    req: &Request<Incoming>,
    metrics: impl FnOnce(Format) -> Option<Bytes>,
    ready: bool,
) -> Response<Full<Bytes>> {
    let text = TEXT;
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/ready" | "/healthz") {
        return reply(StatusCode::NOT_FOUND, text, SERVED);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, text, SERVED);
    }
    if path == "/healthz" {
        return reply(StatusCode::OK, text, "ok\n");
    }
    if !ready {
        return reply(StatusCode::SERVICE_UNAVAILABLE, text, NOT_READY);
    }
    if path == "/ready" {
        return reply(StatusCode::OK, text, "ready\n");
    }
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    match metrics(format) {
        Some(body) => reply(StatusCode::OK, format.content_type(), body),
        None => reply(StatusCode::INTERNAL_SERVER_ERROR, text, "encoding failed\n"),
    }
}
