//! A connection whose writes time out: a client that stops reading (pipelining requests it
//! never takes the answers of) loses its connection instead of holding it forever.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// `inner`, whose writes and flushes fail with `TimedOut` once one has waited `limit`.
pub(super) struct WriteDeadline<IO> {
    inner: IO,
    limit: Duration,
    /// Running while a write waits on the client.
    waiting: Option<Pin<Box<Sleep>>>,
    /// Set when a write timed out, for the drop's reason.
    timed_out: Arc<AtomicBool>,
}

impl<IO> WriteDeadline<IO> {
    pub(super) fn new(inner: IO, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            waiting: None,
            timed_out: Arc::default(),
        }
    }

    /// Whether a write of this connection timed out (readable after it is gone).
    pub(super) fn timed_out(&self) -> Arc<AtomicBool> {
        self.timed_out.clone()
    }

    /// After a write or flush: progress clears the deadline; waiting starts it, and past it
    /// is an error.
    fn check<T>(&mut self, cx: &mut Context<'_>, p: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if p.is_ready() {
            self.waiting = None;
            return p;
        }
        let limit = self.limit;
        let sleep = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        ready!(sleep.as_mut().poll(cx));
        self.timed_out.store(true, Ordering::Relaxed);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took no data for too long",
        )))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteDeadline<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, p)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, p)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, p)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A peer that never reads: the writer fails after the limit instead of waiting forever.
    #[tokio::test]
    async fn a_write_nobody_reads_times_out() {
        let (a, _b) = tokio::io::duplex(64);
        let mut w = WriteDeadline::new(a, Duration::from_millis(200));
        let flag = w.timed_out();
        let started = Instant::now();
        let err = w.write_all(&[0; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(flag.load(Ordering::Relaxed));
    }
}
