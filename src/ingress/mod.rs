//! The public ingress: accepts provider callbacks and answers only once they are durable.
//!
//! Checks run in the contract's order — path → IP allowlist → method → auth → size → JSON —
//! and every failure is the contract's JSON error. An accepted event is routed, given its
//! id, deduplicated and written with one pending delivery per destination by
//! [`Store::accept`](crate::store::Store::accept) before the 200 goes out. The ingress never
//! calls a destination, except the one synchronous call of a reply route.

mod auth;
pub mod body_memory;
pub mod client_ip;
mod descent;

mod oauth;
mod reply;
pub use reply::InProgress as ReplyCalls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{debug, info_span, warn, Instrument, Span};

use crate::clock::now_ms;
use crate::config::Live;
use crate::config::{Config, Source, TOKEN_PATH};
use crate::event_id::event_id;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::routing::route;
use crate::store::Store;
use crate::store::{Admission, NewEvent, StoreError, StoredEvent, StoredReply};
use crate::telemetry::Throttle;
use crate::web::client::HttpClient;
use crate::web::response::{json_response, ApiError, Body};
use crate::web::server::{self, Drain, Limits};

/// The longest the ingress waits for the store to commit an event before answering 503
/// (the event may still be committed: the provider's retry is then a duplicate).
pub(crate) const ACCEPT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Serialize)]
struct Accepted<'a> {
    accepted: bool,
    id: &'a str,
    duplicate: bool,
    deliveries: usize,
}

/// What the ingress is handed: the config in force, the store, metrics, the outbound client
/// (reply routes), and the health flag it keeps up to date.
#[derive(Clone)]
pub struct Deps {
    pub live: Arc<Live>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub client: HttpClient,
    pub health: Arc<Health>,
    /// Live figures per destination: a reply route's call counts in them like an attempt.
    pub statuses: Arc<crate::destinations::Statuses>,
    pub bodies: Arc<body_memory::BodyMemory>,
    /// Reply calls out on this instance (a duplicate waits for the first one's answer).
    pub replies: Arc<reply::InProgress>,
    /// Where a reply route's call runs, so that the shutdown waits for it.
    pub background: tokio_util::task::TaskTracker,
}

impl Deps {
    fn config(&self) -> Arc<Config> {
        self.live.get()
    }
}

/// Serves the ingress on `listener` until `shutdown`; then stops accepting and lets
/// requests in flight finish ([`drain`]).
pub async fn serve(listener: TcpListener, app: Deps, shutdown: CancellationToken) {
    let live = app.live.clone();
    let drain = Drain::computed(move || drain(&live.get()));
    let mut limits = limits(&app.config(), drain);
    limits.tls = crate::tls::live_acceptor(app.live.clone());
    // Requests hyper answers itself (unreadable, headers too large) are counted too: a
    // flood of them is otherwise nowhere to be seen.
    let metrics = app.metrics.clone();
    limits.answered_itself = Some(Arc::new(move |status| metrics.ingress(NO_SOURCE, status)));
    server::serve(listener, limits, shutdown, move |peer, req| {
        let app = app.clone();
        async move { handle(&app, peer, req).await }
    })
    .await
}

/// How long requests in flight get at shutdown: three read timeouts (a body still coming);
/// at least a body's read, the duplicate check's and the commit's waits and a second; and
/// as long as a reply route's call may take, from the request's arrival, and the margin to
/// answer with what it held (the provider waits for the next call action).
pub fn drain(config: &Config) -> Duration {
    let longest_reply = config
        .routes
        .iter()
        .filter_map(|r| r.reply.as_ref().map(|p| p.timeout))
        .max()
        .unwrap_or_default();
    let longest_accept = config.server.read_timeout + ACCEPT_TIMEOUT * 2 + Duration::from_secs(1);
    (config.server.read_timeout * 3)
        .max(longest_accept)
        .max(longest_reply + Duration::from_millis(reply::HOLD_MARGIN_MS))
}

/// How the ingress listener serves connections (TLS when configured), `drain` at the end.
pub fn limits(config: &Config, drain: Drain) -> Limits {
    Limits {
        max_connections: config.server.max_connections,
        header_timeout: config.server.read_timeout,
        drain,
        tls: config
            .server
            .tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.server_config.clone())),
        name: "ingress",
        answered_itself: None,
    }
}

/// The `source` label of requests no source takes (no source name has parentheses).
const NO_SOURCE: &str = "(none)";
/// The `source` label of token requests.
const TOKEN_LABEL: &str = "(token)";

/// One request: never fails, every problem is an answer.
pub async fn handle(app: &Deps, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let config = app.config();
    // The rarer paths' futures are boxed: every request's future is as large as its largest
    // path, and it is copied a few times on its way into the connection's task.
    if req.uri().path() == TOKEN_PATH && config.issues_tokens() {
        let resp = Box::pin(oauth::token_endpoint(&config, &app.bodies, peer, req)).await;
        // Counted apart from the sources (a client that fails here never posts): a wrong
        // client secret on the provider's side shows as 401s under `(token)`.
        app.metrics.ingress(TOKEN_LABEL, resp.status().as_u16());
        return resp;
    }
    let found = config.source_for_path(req.uri().path()).cloned();
    let source = found.as_ref().map_or(NO_SOURCE, |s| s.name.as_str());
    let span = info_span!("ingress", source, event_id = Empty, status = Empty);
    let resp = match accept(app, &config, found.clone(), peer, req)
        .instrument(span.clone())
        .await
    {
        Ok(r) => r,
        Err(e) => {
            span.in_scope(|| debug!(kind = e.kind, message = %e.message, "refused"));
            e.into_response()
        }
    };
    let status = resp.status().as_u16();
    span.record("status", status);
    span.in_scope(|| debug!("answered"));
    app.metrics.ingress(source, status);
    resp
}

/// The contract's checks in order (path → IP allowlist → method → auth → size → JSON), then
/// routing, the durable accept, and the answer.
async fn accept(
    app: &Deps,
    config: &Arc<Config>,
    source: Option<Arc<Source>>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    // A reply route's `timeout` counts from here: the provider waits for the whole of it.
    let arrived = tokio::time::Instant::now();
    let source = source.ok_or_else(|| ApiError::not_found(req.uri().path()))?;
    check_address(config, &source, peer, &req)?;
    check_method(&req)?;
    let body_check = auth::check_headers(config, &source, req.headers(), now_ms() / 1000)?;
    let announced = check_announced_size(config, &req)?;
    let mut room = app.bodies.reserve(announced)?;
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = read_body(
        req.into_body(),
        config.server.max_body_bytes,
        config.server.read_timeout,
        Some(&mut room),
    )
    .await?;
    // A signed message's `webhook-id` is its id where the source names none in its body
    // (an empty one is none: the body's hash then, as for any event without an id).
    let mut signed_id = None;
    if let Some(check) = body_check {
        check.verify(&source, &body)?;
        signed_id = Some(check.into_id()).filter(|id| source.event_id.is_empty() && !id.is_empty());
    }
    let wrapped = parse_event(&source, &body)?;
    let ev = routed(
        app,
        config,
        &source,
        &wrapped,
        body,
        content_type,
        signed_id,
    )?;
    // The parsed tree can be many times the body's size, and no budget counts it: it is
    // not kept through the waits below (the store's commit, a reply route's call).
    drop(wrapped);
    if let Some(dest) = &ev.full {
        // Shed without a write, unless it may be a retry of an event already kept: the
        // store answers that one as the duplicate it is, full queue or not.
        // Bounded: under overload, shedding must not hold the request (its connection and
        // body room) for long.
        let kept = tokio::time::timeout(ACCEPT_TIMEOUT, app.store.kept(&source.name, &ev.id))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "no answer within {ACCEPT_TIMEOUT:?}"
                )))
            })
            .unwrap_or_else(|e| {
                static SAID: Throttle = Throttle::new();
                if let Some(held_back) = SAID.pass(now_ms()) {
                    warn!(error = %e, held_back, "looking for a kept event failed; shedding the request");
                }
                false
            });
        if !kept {
            return Err(queue_full(dest, config));
        }
    }
    let id = ev.id.clone();
    let reply = ev.reply;
    let deliveries = ev.new.destinations.len();
    let (seq, duplicate, kept) = admit(app, config, &source, ev.new).await?;
    if deliveries == 0 && !duplicate {
        // Counted once accepted: not a refused one, nor a resend.
        app.metrics
            .unrouted
            .get_or_create(&crate::metrics::SourceLabel {
                source: source.name.clone(),
            })
            .inc();
    }
    if let Some(route) = reply.filter(|ri| config.routes[*ri].reply.is_some()) {
        if let Some(kept) = &kept {
            return Ok(reply::stored(kept));
        }
        let event = StoredEvent {
            seq,
            id,
            source: source.name.clone(),
            received_ms: ev.received_ms,
            content_type: ev.content_type,
            body: ev.body,
        };
        return Ok(Box::pin(reply::call(app, config, route, &event, !duplicate, arrived)).await);
    }
    let deliveries = if duplicate { 0 } else { deliveries };
    debug!(duplicate, deliveries, "accepted");
    let out = serde_json::to_vec(&Accepted {
        accepted: true,
        id: &id,
        duplicate,
        deliveries,
    })
    .expect("answer serializes");
    Ok(json_response(StatusCode::OK, out))
}

/// The client address (the peer, or X-Forwarded-For behind a trusted proxy) is allowed.
fn check_address(
    config: &Config,
    source: &Source,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Result<(), ApiError> {
    let ip = client_ip::client_ip(peer.ip(), req.headers(), &config.server.trusted_proxies);
    if client_ip::allowed(ip, &source.allow_ips) {
        Ok(())
    } else {
        Err(ApiError::forbidden())
    }
}

fn check_method(req: &Request<Incoming>) -> Result<(), ApiError> {
    if req.method() == Method::POST {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed())
    }
}

/// A `content-length` over the limit is refused before the body is read.
/// The body's announced length, refused (413) past `max_body_bytes`.
fn check_announced_size(config: &Config, req: &Request<Incoming>) -> Result<Option<u64>, ApiError> {
    let limit = config.server.max_body_bytes;
    match announced_length(req) {
        Some(n) if n > limit => Err(ApiError::too_large(limit)),
        n => Ok(n),
    }
}

/// The body's length as its `Content-Length` announces it, if it does.
fn announced_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// An event routed and ready for the store.
struct Routed {
    id: String,
    /// A destination whose queue looks full (`max_queue`).
    full: Option<String>,
    new: NewEvent,
    /// The first matching route with a `reply`.
    reply: Option<usize>,
    received_ms: u64,
    content_type: Option<String>,
    body: Bytes,
}

/// The event's id, its destinations (with their `max_queue` and order keys) and the
/// reply route, if any, and a destination whose queue looks full.
fn routed(
    app: &Deps,
    config: &Config,
    source: &Source,
    wrapped: &Value,
    body: Bytes,
    content_type: Option<String>,
    signed_id: Option<String>,
) -> Result<Routed, ApiError> {
    let id = match signed_id {
        Some(id) => id,
        None => event_id(&source.event_id, &wrapped[0], &body),
    };
    // As its `webhook-id`: bounded, and nothing in it can break a log line (worked out
    // only when something logs).
    let span = Span::current();
    if !span.is_disabled() {
        span.record("event_id", crate::delivery::client::header_id(&id).as_ref());
    }
    let fanout = route(config, source, wrapped);
    // Fast path under overload: a destination's queue looks full without asking the store's
    // writer. The writer makes the exact check (`Admission::QueueFull`), which concurrent
    // requests cannot race past.
    let full = fanout
        .destinations
        .iter()
        .map(|&d| &config.destinations[d])
        .find(|dest| app.store.queue_depth(&dest.name) >= dest.max_queue)
        .map(|dest| dest.name.clone());
    let received_ms = now_ms();
    let reply = fanout
        .reply_route
        .and_then(|ri| config.routes[ri].reply.as_ref());
    let held = reply.map(|r| {
        let until = received_ms + r.timeout.as_millis() as u64 + reply::HOLD_MARGIN_MS;
        (config.destinations[r.from].name.clone(), until)
    });
    // `order_by` of the first route (in file order) that sends it to each destination;
    // nothing allocated when none of them orders.
    let ordered = |&ri: &usize| !config.routes[ri].order_by.is_empty();
    let order_keys = if fanout.via.iter().any(ordered) {
        fanout
            .via
            .iter()
            .map(|&ri| crate::event_id::order_key(&config.routes[ri].order_by, &wrapped[0]))
            .collect()
    } else {
        Vec::new()
    };
    let new = NewEvent {
        source: source.name.clone(),
        id: id.clone(),
        body: body.clone(), // a refcount: a reply route still needs the body
        content_type: content_type.clone(),
        received_ms,
        destinations: fanout
            .destinations
            .iter()
            .map(|&d| config.destinations[d].name.clone())
            .collect(),
        max_queue: fanout
            .destinations
            .iter()
            .map(|&d| config.destinations[d].max_queue)
            .collect(),
        order_keys,
        held,
        dedup_window: config.dedup_window,
    };
    Ok(Routed {
        id,
        full,
        new,
        reply: fanout.reply_route,
        received_ms,
        content_type,
        body,
    })
}

/// Stores the event durably (or finds it a duplicate): its sequence number, whether it is
/// a duplicate, and a reply route's kept answer.
async fn admit(
    app: &Deps,
    config: &Config,
    source: &Source,
    new: NewEvent,
) -> Result<(u64, bool, Option<StoredReply>), ApiError> {
    let started = std::time::Instant::now();
    if let Err(why) = app.store.available() {
        // Nothing could be stored now (a shared store out of reach): say so at once.
        return Err(store_unavailable(StoreError::Unavailable(why)));
    }
    // A store stuck on a failing disk must not hold the provider (or this task) forever.
    let admission = match tokio::time::timeout(ACCEPT_TIMEOUT, app.store.accept(new)).await {
        Ok(Ok(a)) => {
            app.health.set_store_healthy(true);
            a
        }
        Ok(Err(e)) => {
            // One damaged (or newer) record is that event's trouble, not the store's: the
            // others are still taken, so readiness stays.
            if !matches!(e, StoreError::Corrupt(_) | StoreError::Format(_)) {
                app.health.set_store_healthy(false);
            }
            return Err(store_unavailable(e));
        }
        Err(_) => {
            app.health.set_store_healthy(false);
            return Err(store_unavailable(StoreError::Unavailable(format!(
                "no commit within {ACCEPT_TIMEOUT:?}"
            ))));
        }
    };
    app.metrics
        .accept_duration
        .observe(started.elapsed().as_secs_f64());
    match admission {
        Admission::Accepted { seq } => Ok((seq, false, None)),
        Admission::Duplicate { seq, reply } => {
            app.metrics
                .duplicates
                .get_or_create(&crate::metrics::SourceLabel {
                    source: source.name.clone(),
                })
                .inc();
            Ok((seq, true, reply))
        }
        Admission::QueueFull { destination } => Err(queue_full(&destination, config)),
        Admission::TooLarge { limit } => Err(ApiError::record_too_large(limit)),
        Admission::IdCollides => Err(ApiError::unavailable(
            "this event's id collides with another kept event's; try again later",
            "60",
        )),
    }
}

/// The provider is told to come back; the operator (at most once a second) which
/// destination's `max_queue` was reached: its name is nothing for the internet to know.
fn queue_full(destination: &str, config: &Config) -> ApiError {
    static SAID: Throttle = Throttle::new();
    if let Some(held_back) = SAID.pass(now_ms()) {
        let max = config.destination(destination).map_or(0, |d| d.max_queue);
        warn!(
            destination,
            max_queue = max,
            held_back,
            "a destination's queue is full; shedding events (503)"
        );
    }
    ApiError::unavailable(
        "the relay's queue for this event is full; try again later",
        "5",
    )
}

fn store_unavailable(e: StoreError) -> ApiError {
    static SAID: Throttle = Throttle::new();
    if let Some(held_back) = SAID.pass(now_ms()) {
        warn!(error = %e, held_back, "store write failed; answering 503");
    }
    ApiError::unavailable("the event store is unavailable; try again later", "1")
}

/// Reads the body whole (within `limit` bytes and `timeout`), holding `room` for it as it
/// comes (when it counts against the budget); then `room` keeps just what the body takes.
async fn read_body(
    mut body: Incoming,
    limit: u64,
    timeout: Duration,
    mut room: Option<&mut body_memory::Room>,
) -> Result<Bytes, ApiError> {
    let read = async {
        // One frame (the usual case) is kept as it came; more are joined.
        let mut first: Option<Bytes> = None;
        let mut joined: Option<bytes::BytesMut> = None;
        let mut len = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("the body could not be read: {e}"),
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            len += data.len() as u64;
            if len > limit {
                return Err(ApiError::too_large(limit));
            }
            if let Some(room) = room.as_deref_mut() {
                room.grow_to(len)?;
            }
            match (&mut joined, first.take()) {
                (Some(j), _) => j.extend_from_slice(&data),
                (None, None) => first = Some(data),
                (None, Some(f)) => {
                    let mut j = bytes::BytesMut::with_capacity(f.len() + data.len());
                    j.extend_from_slice(&f);
                    j.extend_from_slice(&data);
                    joined = Some(j);
                }
            }
        }
        Ok(match joined {
            Some(j) => j.freeze(),
            None => first.unwrap_or_default(),
        })
    };
    let body = match tokio::time::timeout(timeout, read).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the body was not received within {timeout:?}"),
            ))
        }
        Ok(r) => r?,
    };
    if let Some(room) = room {
        room.shrink_to(body.len() as u64);
    }
    Ok(body)
}

/// Parses the body, decodes the source's `decode_json` fields, and returns `[event]`.
pub fn parse_event(source: &Source, body: &[u8]) -> Result<Value, ApiError> {
    let mut event: Value = (source.needs)
        .parse(body)
        .map_err(|e| ApiError::bad_json(format!("the body is not valid JSON: {e}")))?;
    for field in &source.decode_json {
        let Some(Value::String(text)) = event.get(field) else {
            continue;
        };
        let decoded: Value = crate::needed::Needed::All
            .parse(text.as_bytes())
            .map_err(|e| {
                ApiError::bad_json(format!(
                    "field {field:?} is a string but not valid JSON: {e}"
                ))
            })?;
        event[field] = decoded;
    }
    // After decoding: a `decode_json` field's text is searched as the JSON it holds.
    if source.descends {
        descent::check(&event)?;
    }
    Ok(Value::Array(vec![event]))
}
