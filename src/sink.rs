//! `hookrelay sink`: a small local receiver for trying routes.
//!
//! Prints one JSON line per request to stdout (`method`, `path`, `headers`, `body`), answers
//! `--status` after `--delay`, 503 to the first `--fail-first` requests, and `--reply FILE`
//! as the body. Bodies past [`MAX_BODY`] are answered 413 and not printed.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;

use crate::web::server::{self, Drain, Limits};

/// The longest body the sink reads: far past the relay's `max_body_bytes` default (1 MiB),
/// so the bodies the relay forwards always fit.
pub const MAX_BODY: usize = 64 << 20;

pub struct SinkOptions {
    pub listen: SocketAddr,
    pub status: u16,
    pub delay: Option<Duration>,
    pub fail_first: u64,
    pub reply: Option<PathBuf>,
}

struct Sink {
    status: StatusCode,
    delay: Option<Duration>,
    fail_first: u64,
    reply: Bytes,
    seen: AtomicU64,
}

pub async fn run(opts: SinkOptions) -> anyhow::Result<ExitCode> {
    let status = StatusCode::from_u16(opts.status).context("--status is not an HTTP status")?;
    let reply = match &opts.reply {
        Some(p) => {
            Bytes::from(std::fs::read(p).with_context(|| format!("--reply {}", p.display()))?)
        }
        None => Bytes::new(),
    };
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    // Ctrl-C or SIGTERM (how a script or a service manager stops it): a clean stop, 0;
    // caught from before it says it listens.
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    );
    eprintln!("hookrelay sink listening on {}", listener.local_addr()?);
    let sink = Arc::new(Sink {
        status,
        delay: opts.delay,
        fail_first: opts.fail_first,
        reply,
        seen: AtomicU64::new(0),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let limits = Limits {
        max_connections: 1024,
        header_timeout: Duration::from_secs(10),
        drain: Drain::fixed(Duration::from_secs(1)),
        tls: None,
        name: "sink",
        answered_itself: None,
    };
    let serving = tokio::spawn(server::serve(
        listener,
        limits,
        stop.clone(),
        move |_peer, req| {
            let sink = sink.clone();
            async move { sink.answer(req).await }
        },
    ));
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    stop.cancel();
    let _ = serving.await;
    Ok(ExitCode::SUCCESS)
}

impl Sink {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let too_large = || {
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            resp
        };
        if hyper::body::Body::size_hint(&body).lower() > MAX_BODY as u64 {
            return too_large();
        }
        let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Err(_) => Bytes::new(),
        };
        let headers: BTreeMap<String, String> = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let line = json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        });
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        let status = if n < self.fail_first {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            self.status
        };
        let mut resp = Response::new(Full::new(self.reply.clone()));
        *resp.status_mut() = status;
        if !self.reply.is_empty() {
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
        }
        resp
    }
}
