//! The HTTP server loop the ingress, the admin listener and `hookrelay sink` share: HTTP/1.1
//! and h2c (or h2 over TLS with ALPN), a cap on open connections, a head-size limit, a
//! deadline for the headers (and the TLS handshake), and a graceful drain at shutdown.
//! Handlers never fail: every problem is an answer.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::own_errors::JsonErrors;
use super::response::Body;

/// Request head limit: headers past this get 431, a connection is not a memory sink.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// How a listener serves its connections.
#[derive(Clone)]
pub struct Limits {
    /// Connections open at once; the next waits for one to close.
    pub max_connections: usize,
    /// How long a client may take to send its request head (and its TLS handshake).
    pub header_timeout: Duration,
    /// How long connections get to finish their requests at shutdown.
    pub drain: Duration,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The listener's name in log lines.
    pub name: &'static str,
}

/// Serves `handler` on `listener` until `shutdown`; then stops accepting and lets requests
/// in flight finish (bounded by `limits.drain`).
pub async fn serve<H, F>(
    listener: TcpListener,
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
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let name = limits.name;
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let svc = hyper::service::service_fn(move |req| {
            let answer = handler(peer, req);
            async move { Ok::<_, std::convert::Infallible>(answer.await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = limits.tls.clone();
        let handshake_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let io = TokioIo::new(JsonErrors::new(stream));
                    watcher
                        .watch(builder.serve_connection(io, svc).into_owned())
                        .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let io = TokioIo::new(JsonErrors::new(tls_stream));
                            watcher
                                .watch(builder.serve_connection(io, svc).into_owned())
                                .await
                        }
                        Ok(Err(e)) => {
                            debug!(listener = name, error = %e, %peer, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            debug!(listener = name, %peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                debug!(listener = name, error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(listener = name, drain = ?limits.drain, "connections still open after the drain period");
    }
}
