//! The HTTP server loop the ingress, the admin listener and `hookrelay sink` share: HTTP/1.1
//! and h2c (or h2 over TLS with ALPN), a cap on open connections, a head-size limit, a
//! deadline for the headers (and the TLS handshake), and a graceful drain at shutdown.
//! Handlers never fail: every problem is an answer.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::own_errors::JsonErrors;
use super::response::Body;

/// Request head limit: headers past this get 431, a connection is not a memory sink.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The first pause after a failed accept, and the longest.
const ACCEPT_PAUSE: Duration = Duration::from_millis(10);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// How a listener serves its connections.
#[derive(Clone)]
pub struct Limits {
    /// Connections open at once; the next waits for one to close.
    pub max_connections: usize,
    /// How long a client may take to send its request head (and its TLS handshake).
    pub header_timeout: Duration,
    /// How long connections get to finish their requests at shutdown.
    pub drain: Drain,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The listener's name in log lines.
    pub name: &'static str,
    /// Told the status of each answer hyper gives itself (a request it could not read,
    /// headers too large: [`super::own_errors`]), which no handler sees.
    pub answered_itself: Option<AnsweredItself>,
}

/// See [`Limits::answered_itself`].
pub type AnsweredItself = Arc<dyn Fn(u16) + Send + Sync>;

/// How long connections get to finish at shutdown, read when it comes (the config in force
/// then may ask for longer than the one the listener started with).
#[derive(Clone)]
pub struct Drain(Arc<dyn Fn() -> Duration + Send + Sync>);

impl Drain {
    pub fn fixed(d: Duration) -> Self {
        Drain(Arc::new(move || d))
    }
    pub fn computed(f: impl Fn() -> Duration + Send + Sync + 'static) -> Self {
        Drain(Arc::new(f))
    }
    fn get(&self) -> Duration {
        (self.0)()
    }
}

/// Serves `handler` on `listener` until `shutdown`; then stops accepting (closes the
/// listener if it was given, leaves it open if lent) and lets requests in flight finish
/// (bounded by `limits.drain`).
///
/// A connection with no request in progress (and no answer being written) is closed once it
/// has been so for `limits.header_timeout`: one that never sends a request (not a byte, or half an HTTP/2
/// preface) and an idle HTTP/2 connection alike, so silent clients cannot hold every slot.
/// hyper's own header timeout does the same for an idle HTTP/1.1 keep-alive connection.
pub async fn serve<H, F>(
    listener: impl std::borrow::Borrow<TcpListener>,
    limits: Limits,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(100);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(64);
    let connections = TaskTracker::new();
    let name = limits.name;
    // After a failed accept (out of file descriptors, say), a pause before the next: 10 ms,
    // doubling to 1 s while they keep failing.
    let mut pause = ACCEPT_PAUSE;
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.borrow().accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    static SAID: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
                    if let Some(held_back) = SAID.pass(crate::clock::now_ms()) {
                        warn!(listener = name, error = %e, held_back, "accept failed");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(MAX_ACCEPT_PAUSE);
                    continue;
                }
            },
        };
        pause = ACCEPT_PAUSE;
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new(limits.header_timeout));
        let handler = handler.clone();
        let busy = activity.clone();
        let handled = Arc::new(AtomicUsize::new(0));
        let answered = handled.clone();
        let svc = hyper::service::service_fn(move |req| {
            let started = busy.start();
            let answer = handler(peer, req);
            let answered = answered.clone();
            async move {
                let answer = answer.await;
                answered.fetch_add(1, Ordering::SeqCst);
                drop(started);
                Ok::<_, std::convert::Infallible>(answer)
            }
        });
        let builder = builder.clone();
        let tls = limits.tls.clone();
        let answered_itself = limits.answered_itself.clone();
        let idle = limits.header_timeout;
        let drain = limits.drain.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let stream = match tls {
                None => Either::Left(stream),
                Some(acceptor) => match tokio::time::timeout(idle, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => Either::Right(tls_stream),
                    Ok(Err(e)) => {
                        debug!(listener = name, error = %e, %peer, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(listener = name, %peer, "TLS handshake timed out");
                        return;
                    }
                },
            };
            let io = JsonErrors::new(
                Watched::new(stream, &activity),
                answered_itself.clone(),
                handled,
            );
            let io = TokioIo::new(io);
            let mut conn = std::pin::pin!(builder.serve_connection(io, svc));
            // Until it ends, the relay stops (then it gets `drain` to finish what it has in
            // progress) or it has had no request in progress for `idle` (then it is closed,
            // gracefully if that is quick).
            let stopping = tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(listener = name, error = %e, %peer, "connection ended with an error");
                    }
                    return;
                }
                _ = shutdown.cancelled() => true,
                _ = activity.idle_for(idle) => false,
            };
            conn.as_mut().graceful_shutdown();
            let closed_at = tokio::time::Instant::now();
            // Past the grace, dropping the connection closes the socket. A request that
            // began as an idle connection was being closed (its head arriving then) gets
            // the drain, as one in progress at a stop does: cut off, it could be a reply
            // route's call whose answer the provider waits for.
            let grace = if stopping { drain.get() } else { IDLE_CLOSE_GRACE };
            if tokio::time::timeout(grace, conn.as_mut()).await.is_err()
                && !stopping
                && activity.in_progress()
            {
                // From the close: over before a stop's drain, counted from later, is.
                let _ = tokio::time::timeout_at(closed_at + drain.get(), conn).await;
            }
            drop(permit);
        });
    }
    drop(listener);
    connections.close();
    let drain = limits.drain.get();
    if tokio::time::timeout(drain, connections.wait())
        .await
        .is_err()
    {
        warn!(
            listener = name,
            ?drain,
            "connections still open after the drain period"
        );
    }
}

/// How long an idle connection being closed gets to say goodbye (an HTTP/2 GOAWAY).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A connection's byte stream, whose writes count as activity for a while after a request
/// ended: an answer still being written (a large page to a slow reader) keeps its
/// connection open, but HTTP/2's own writes (a PING's or a SETTINGS' acknowledgement) do
/// not keep a connection that sends no request open for ever.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    fn new(inner: S, activity: &Arc<Activity>) -> Self {
        Watched {
            inner,
            activity: activity.clone(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection's requests in progress, and since when it has had none.
struct Activity {
    opened: Instant,
    busy: AtomicUsize,
    /// Milliseconds from `opened` to the last activity (a request's end, an answer's write).
    last_ms: AtomicU64,
    /// Milliseconds from `opened` to the last request's end (0: none yet).
    answered_ms: AtomicU64,
    /// How long after a request's end writes still count as activity: the idle timeout.
    writes_count_for: Duration,
}

/// A request in progress; its end is the connection's latest activity.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.0.now_ms();
        self.0.answered_ms.store(now, Ordering::Relaxed);
        self.0.last_ms.store(now, Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Activity {
    fn new(writes_count_for: Duration) -> Self {
        Activity {
            opened: Instant::now(),
            busy: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            answered_ms: AtomicU64::new(0),
            writes_count_for,
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// Bytes went out now: activity while a request is in progress or within
    /// `writes_count_for` of the last one's end (its answer still being written).
    fn wrote(&self) {
        let now = self.now_ms();
        let since = now.saturating_sub(self.answered_ms.load(Ordering::Relaxed));
        if self.busy.load(Ordering::SeqCst) > 0 || since <= self.writes_count_for.as_millis() as u64
        {
            self.last_ms.store(now, Ordering::Relaxed);
        }
    }

    fn start(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Whether a request is in progress.
    fn in_progress(&self) -> bool {
        self.busy.load(Ordering::SeqCst) > 0
    }

    /// When the connection will have been idle for `idle`, if it is idle now.
    fn idle_until(&self, idle: Duration) -> Option<Instant> {
        (self.busy.load(Ordering::SeqCst) == 0).then(|| {
            self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
        })
    }

    /// Returns once the connection has had no request in progress for `idle`. Wakes at most
    /// once per `idle` while requests keep coming.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let until = self
                .idle_until(idle)
                .unwrap_or_else(|| Instant::now() + idle);
            tokio::time::sleep_until(until.into()).await;
            if self.idle_until(idle).is_some_and(|t| t <= Instant::now()) {
                return;
            }
        }
    }
}
