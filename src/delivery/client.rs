//! The outbound HTTP client and the one call every delivery attempt makes: [`send_once`].
//!
//! hyper-util's pooled client over hyper-rustls (ring provider, webpki roots, ALPN h2 and
//! http/1.1; plain `http://` URLs too). A request carries the stored body byte-for-byte, the
//! received Content-Type, the contract's headers (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature` when the destination signs, `x-hookrelay-source`,
//! `x-hookrelay-attempt`) and the destination's own `headers`. Redirects are not followed.
//! The answer's body is read (so the connection can be reused, and so a reply route can
//! forward it) up to [`MAX_ANSWER_BYTES`]. The engine and the reply route share this code
//! path; the engine adds rate, concurrency and retry around it.

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Destination;
use crate::signature;
use crate::store::StoredEvent;

/// The most of an answer's body that is kept; the rest is dropped (`Answer::truncated`).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");
const X_SOURCE: HeaderName = HeaderName::from_static("x-hookrelay-source");
const X_ATTEMPT: HeaderName = HeaderName::from_static("x-hookrelay-attempt");

/// The pooled outbound client. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpClient")
    }
}

impl HttpClient {
    /// Builds the client with an explicit ring provider (no process-wide default needed).
    pub fn new() -> Result<Self, rustls::Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(HttpClient { inner })
    }
}

/// A destination's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The answer's Content-Type, if it had a readable one.
    pub content_type: Option<String>,
    pub headers: HeaderMap,
    /// At most [`MAX_ANSWER_BYTES`].
    pub body: Bytes,
    /// The body was longer than [`MAX_ANSWER_BYTES`]; `body` holds its start.
    pub truncated: bool,
}

/// Why an attempt got no answer. All of these are retried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Request(String),
}

/// One attempt's result: an answer (any status), or no answer.
pub type AttemptResult = Result<Answer, SendError>;

/// The request for one attempt. `timestamp` is unix seconds.
pub fn build_request(
    dest: &Destination,
    event: &StoredEvent,
    attempt: u32,
    timestamp: u64,
) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(event.body.clone()));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = dest.url.clone();
    let h = req.headers_mut();
    // The destination's headers first: the protocol's own below replace any of the same name.
    for (k, v) in &dest.headers {
        h.append(k.clone(), v.clone());
    }
    h.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("hookrelay/", env!("CARGO_PKG_VERSION"))),
    );
    match event
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        Some(ct) => {
            h.insert(CONTENT_TYPE, ct);
        }
        None => {
            h.remove(CONTENT_TYPE);
        }
    }
    let ts = timestamp.to_string();
    // Ids come from the body; one that cannot be a header value is sent without it.
    if let Ok(v) = HeaderValue::from_str(&event.id) {
        h.insert(WEBHOOK_ID, v);
    }
    h.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
    if let Some(secret) = &dest.sign {
        let sig = signature::sign(secret.expose(), &event.id, &ts, &event.body);
        if let Ok(mut v) = HeaderValue::from_str(&sig) {
            v.set_sensitive(true);
            h.insert(WEBHOOK_SIGNATURE, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&event.source) {
        h.insert(X_SOURCE, v);
    }
    h.insert(X_ATTEMPT, HeaderValue::from(attempt));
    req
}

/// The error and its causes, joined (hyper's own message alone says little).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sends `event` to `dest` once, as attempt number `attempt` (1-based), and reads the
/// answer; all within `timeout`. No rate limit, concurrency limit or retry here: the engine
/// adds those; a reply route calls this directly.
pub async fn send_once(
    client: &HttpClient,
    dest: &Destination,
    event: &StoredEvent,
    attempt: u32,
    timeout: Duration,
) -> AttemptResult {
    let req = build_request(dest, event, attempt, unix_now());
    let call = async {
        let resp = client.inner.request(req).await.map_err(|e| {
            let text = match e.source() {
                Some(s) => chain(s),
                None => e.to_string(),
            };
            if e.is_connect() {
                SendError::Connect(text)
            } else {
                SendError::Request(text)
            }
        })?;
        let (parts, mut body) = resp.into_parts();
        let mut buf = BytesMut::new();
        let mut truncated = false;
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| SendError::Request(format!("reading the answer: {}", chain(&e))))?;
            if let Ok(data) = frame.into_data() {
                let room = MAX_ANSWER_BYTES - buf.len();
                if data.len() > room {
                    buf.extend_from_slice(&data[..room]);
                    truncated = true;
                    break; // dropping the rest closes the connection
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Answer {
            status: parts.status.as_u16(),
            content_type: parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            headers: parts.headers,
            body: buf.freeze(),
            truncated,
        })
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(SendError::Timeout(timeout)),
    }
}
