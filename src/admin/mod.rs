//! The admin listener (`admin_listen`): health, readiness, metrics, the admin API (events,
//! dead letters and replay, destinations and pause, config and reload) and the operator
//! console.
//!
//! With `admin_token` set, every request but `GET /healthz`, `GET /readyz` and the console's
//! own files (which hold no data) needs `Authorization: Bearer <token>`, compared in
//! constant time. Without a token, a request another site's page makes through the
//! operator's browser is refused ([`origin`]). Answers are JSON; errors use the contract's `{"error","message"}` shape.
//! Nothing here prints a secret: events are shown as received (the provider's body),
//! destination URLs without user info or query, and the routing table without auth values.

mod console;
mod origin;
pub mod views;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app::App;
use crate::clock::now_ms;
use crate::config::Config;
use crate::store::{DeliveryState, EventQuery, ReplaySelector, StoreError};
use crate::web::response::{answer, json_response, ApiError, Body};
use crate::web::server::{self, Drain, Limits};

/// Most entries one list answer holds.
const MAX_LIMIT: usize = 10_000;
/// Admin connections open at once.
const MAX_CONNECTIONS: usize = 256;

pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) {
    server::serve(
        listener,
        limits(&app.config()),
        shutdown,
        move |_peer: SocketAddr, req| {
            let app = app.clone();
            async move { handle(&app, req).await }
        },
    )
    .await
}

/// How the admin listener serves connections.
pub fn limits(config: &Config) -> Limits {
    Limits {
        max_connections: MAX_CONNECTIONS,
        header_timeout: config.server.read_timeout,
        drain: Drain::fixed(Duration::from_secs(2)),
        tls: None,
        name: "admin",
        answered_itself: None,
    }
}

pub async fn handle(app: &App, req: Request<Incoming>) -> Response<Body> {
    let mut resp = match route(app, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    // Answers hold event bodies (personal data): kept by no browser or proxy cache, and
    // never read as anything but what they say they are. The console's files set their own.
    let h = resp.headers_mut();
    h.entry(header::CACHE_CONTROL)
        .or_insert(http::HeaderValue::from_static("no-store"));
    h.entry(header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(http::HeaderValue::from_static("nosniff"));
    resp
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn ok(v: impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(&v).expect("admin answers serialize");
    json_response(StatusCode::OK, body)
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn not_found(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
}

fn store_error(e: StoreError) -> ApiError {
    ApiError::unavailable(format!("{e}"), "1")
}

/// `Err` unless the request is made with `method`.
fn only(req: &Request<Incoming>, method: Method) -> Result<(), ApiError> {
    if req.method() == method {
        return Ok(());
    }
    let allow = if method == Method::GET { "GET" } else { "POST" };
    Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} takes {allow}", req.uri().path()),
    )
    .with_header(header::ALLOW, allow))
}

/// The request carries the admin token, or no token is configured.
fn authorized(app: &App, req: &Request<Incoming>) -> Result<(), ApiError> {
    let config = app.config();
    let Some(token) = &config.server.admin_token else {
        return Ok(());
    };
    let given = crate::web::authorization::credentials(req.headers(), "Bearer");
    match given {
        Some(t) if token.matches(t.as_bytes()) => Ok(()),
        Some(_) => Err(unauthorized("the admin token is not valid")),
        None => Err(unauthorized(
            "the admin API needs Authorization: Bearer <admin_token>",
        )),
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::unauthorized(message).with_header(header::WWW_AUTHENTICATE, "Bearer")
}

/// A positive `limit` no larger than [`MAX_LIMIT`], or `default`.
fn limit(q: &HashMap<String, String>, default: usize) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(default),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n.min(MAX_LIMIT)),
            _ => Err(bad_request("limit must be a positive whole number")),
        },
    }
}

async fn route(app: &App, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/healthz" => {
            only(&req, Method::GET)?;
            return Ok(ok(json!({"status": "ok"})));
        }
        "/readyz" => {
            only(&req, Method::GET)?;
            // Open to a balancer; what is pending for removed destinations (their names)
            // only to the operator.
            // Not to a cross-site page either (with no token set, DNS rebinding).
            let operator = authorized(app, &req).is_ok()
                && origin::same_site(&req, app.config().server.admin_token.is_some()).is_ok();
            return Ok(readyz(app, operator).await);
        }
        p => {
            if let Some(page) = console::asset(p) {
                only(&req, Method::GET)?;
                return Ok(page);
            }
        }
    }
    origin::same_site(&req, app.config().server.admin_token.is_some())?;
    authorized(app, &req)?;
    match path.as_str() {
        "/metrics" => {
            only(&req, Method::GET)?;
            // OpenMetrics to a scraper that asks for it (Prometheus does), else Prometheus
            // text 0.0.4.
            let openmetrics = req
                .headers()
                .get_all(http::header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let text = metrics(app, openmetrics).await;
            let content_type = if openmetrics {
                crate::metrics::OPENMETRICS
            } else {
                crate::metrics::PROMETHEUS_TEXT
            };
            Ok(answer(
                StatusCode::OK,
                http::HeaderValue::from_static(content_type),
                text,
            ))
        }
        "/api/events" => {
            only(&req, Method::GET)?;
            events(app, &query(&req)).await
        }
        "/api/dead" => {
            only(&req, Method::GET)?;
            let q = query(&req);
            let limit = limit(&q, 100)?;
            // An empty filter is no filter, as for /api/events.
            let dest = q
                .get("destination")
                .map(String::as_str)
                .filter(|d| !d.is_empty());
            // Past the 10,000 one answer holds: `after` is the last one's `cursor`.
            let after = cursor(
                &q,
                "after",
                "the `cursor` of a dead letter an earlier answer listed",
            )?;
            let dead = app
                .store
                .dead_after(dest, after.unwrap_or(0), limit)
                .await
                .map_err(store_error)?;
            // A name no destination has (a typo) is said, not shown as "nothing dead" (on a
            // first page: a later one may be empty).
            if let Some(d) = dest.filter(|d| {
                after.is_none() && dead.is_empty() && !destination_names(app).iter().any(|n| n == d)
            }) {
                return Err(unknown_destination(d));
            }
            Ok(ok(Value::Array(
                dead.iter()
                    .map(|n| {
                        let mut v = views::delivery(&n.event_id, &n.source, &n.delivery);
                        v["cursor"] = n.cursor.into();
                        v
                    })
                    .collect(),
            )))
        }
        "/api/dead/replay" => {
            only(&req, Method::POST)?;
            running(app)?;
            let q = query(&req);
            // Both: that event's dead delivery to that destination only (`seq`: of the
            // event with that sequence, when several have the id).
            let seq = match q.get("seq").map(|s| s.parse::<u64>()) {
                None => None,
                Some(Ok(s)) => Some(s),
                Some(Err(_)) => return Err(bad_request("seq is not a sequence number")),
            };
            let which = match (q.get("destination"), q.get("id")) {
                (Some(d), None) if seq.is_none() => ReplaySelector::Destination(d.clone()),
                (None, Some(id)) if seq.is_none() => ReplaySelector::EventId(id.clone()),
                (Some(d), Some(id)) => ReplaySelector::Delivery {
                    id: id.clone(),
                    destination: d.clone(),
                    seq,
                },
                _ => {
                    return Err(bad_request(
                        "give ?destination=, ?id=, or both (and then ?seq= if you will)",
                    ))
                }
            };
            // Only to a destination in the config: re-queued for one that left it, a dead
            // letter would leave the dead list and wait, unsent, until it came back.
            let configured = app
                .config()
                .destinations
                .iter()
                .map(|d| d.name.clone())
                .collect();
            let n = replay(app, which, &configured).await?;
            info!(replayed = n, "dead deliveries replayed");
            Ok(ok(json!({"replayed": n})))
        }
        "/api/destinations" => {
            only(&req, Method::GET)?;
            let mut out = Vec::new();
            for name in destination_names(app) {
                out.push(destination(app, &name).await);
            }
            Ok(ok(Value::Array(out)))
        }
        "/api/config" => {
            only(&req, Method::GET)?;
            let c = app.config();
            Ok(ok(json!({
                "file": c.file.display().to_string(),
                "routing_table": crate::config::routing_table(&c),
                "sources": c.sources.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
                "destinations": c.destinations.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            })))
        }
        "/api/reload" => {
            only(&req, Method::POST)?;
            Ok(reload(app))
        }
        p if p.starts_with("/api/destinations/") => {
            // The path first (no such endpoint: 404), then the method (405).
            let rest = &p["/api/destinations/".len()..];
            let (name, paused) = match rest.rsplit_once('/') {
                Some((n, "pause")) => (n, true),
                Some((n, "resume")) => (n, false),
                _ => {
                    return Err(not_found(
                        "use /api/destinations/{name}/pause or /api/destinations/{name}/resume",
                    ))
                }
            };
            only(&req, Method::POST)?;
            running(app)?;
            let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
            if !destination_names(app).iter().any(|d| *d == name) {
                return Err(unknown_destination(&name));
            }
            app.store
                .set_paused(&name, paused)
                .await
                .map_err(store_error)?;
            info!(destination = %name, paused, "destination {}", if paused { "paused" } else { "resumed" });
            Ok(ok(destination(app, &name).await))
        }
        p if p.starts_with("/api/events/") => {
            only(&req, Method::GET)?;
            let raw = &p["/api/events/".len()..];
            let id = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
            if id.is_empty() {
                return Err(bad_request("give an event id: /api/events/{id}"));
            }
            let found = app.store.lookup(&id).await.map_err(store_error)?;
            let mut events: Vec<views::EventOut> = found.iter().map(views::event).collect();
            events.sort_by_key(|e| std::cmp::Reverse((e.received_ms, e.seq)));
            // One event per id in the common case. Several (sources sharing an id): the
            // newest, as the contract's one event, and all of them, newest first.
            #[derive(serde::Serialize)]
            struct Several<'a> {
                #[serde(flatten)]
                newest: &'a views::EventOut,
                events: &'a [views::EventOut],
            }
            match events.as_slice() {
                [] => Err(not_found(format!("no stored event has id {id:?}"))),
                [one] => Ok(ok(one)),
                [newest, ..] => Ok(ok(Several {
                    newest,
                    events: &events,
                })),
            }
        }
        _ => Err(not_found(format!("no admin endpoint at {path}"))),
    }
}

/// `GET /api/events`: newest first, filtered, paged by the `next` cursor.
async fn events(app: &App, q: &HashMap<String, String>) -> Result<Response<Body>, ApiError> {
    let state = match q.get("state").map(String::as_str) {
        None | Some("") => None,
        Some("pending") => Some(DeliveryState::Pending),
        Some("delivered") => Some(DeliveryState::Delivered),
        Some("dead") => Some(DeliveryState::Dead),
        Some(other) => {
            return Err(bad_request(format!(
                "state {other:?} is not one of pending, delivered, dead"
            )))
        }
    };
    let before = cursor(q, "before", "the `next` of an earlier answer")?;
    let nonempty = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    let query = EventQuery {
        source: nonempty("source"),
        destination: nonempty("destination"),
        state,
        limit: limit(q, 50)?,
        before,
    };
    let page = app.store.recent(&query).await.map_err(store_error)?;
    // A name nothing has (a typo) is said, not shown as "no events", as for /api/dead:
    // asked for alone, a whole walk of the store found no event of it, and the config has
    // none by that name.
    // (Not on a later page: a source that left the config can page to an empty end.)
    if page.events.is_empty()
        && page.next.is_none()
        && query.state.is_none()
        && query.before.is_none()
    {
        let config = app.config();
        match (query.source.as_deref(), query.destination.as_deref()) {
            (Some(s), None) if !config.sources.iter().any(|c| c.name == *s) => {
                return Err(not_found(format!("no source is named {s:?}")));
            }
            (None, Some(d)) if !destination_names(app).iter().any(|n| n == d) => {
                return Err(unknown_destination(d));
            }
            _ => {}
        }
    }
    Ok(ok(json!({
        "events": page.events.iter().map(views::event_summary).collect::<Vec<_>>(),
        "next": page.next.map(|n| n.to_string()),
    })))
}

/// Replays the dead deliveries `which` names to the destinations in `configured`. A name
/// that is no destination (or no longer one) is a mistake to say, not "nothing replayed";
/// an event's dead deliveries to destinations that left the config stay dead.
async fn replay(
    app: &App,
    which: ReplaySelector,
    configured: &HashSet<String>,
) -> Result<usize, ApiError> {
    let id = match which {
        ReplaySelector::Destination(d) | ReplaySelector::Delivery { destination: d, .. }
            if !configured.contains(&d) =>
        {
            let left = destination_names(app).contains(&d)
                || !app
                    .store
                    .dead(Some(&d), 1)
                    .await
                    .map_err(store_error)?
                    .is_empty();
            return Err(match left {
                true => not_found(format!("{d:?} is no longer in the config: its dead deliveries stay dead until it is back")),
                false => unknown_destination(&d),
            });
        }
        ReplaySelector::EventId(id) => id,
        ReplaySelector::Delivery { id, .. }
            if app.store.lookup(&id).await.map_err(store_error)?.is_empty() =>
        {
            return Err(not_found(format!("no event has the id {id:?}")));
        }
        which => {
            // To its end even when the request is gone (a client's timeout on a large one),
            // rather than some of the letters replayed and the rest left for no reason.
            let store = app.store.clone();
            let whole = app
                .background
                .spawn(async move {
                    let replayed = store.replay(which).await;
                    // Said here too: the request may be gone.
                    match &replayed {
                        Ok(n) => info!(replayed = n, "a destination's dead deliveries replayed"),
                        Err(e) => {
                            warn!(error = %e, "replaying a destination's dead deliveries failed")
                        }
                    }
                    replayed
                })
                .await;
            return match whole {
                Ok(replayed) => replayed.map_err(store_error),
                Err(e) => Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("the replay ended: {e}"),
                )),
            };
        }
    };
    let views = app.store.lookup(&id).await.map_err(store_error)?;
    if views.is_empty() {
        return Err(not_found(format!("no event has the id {id:?}")));
    }
    let mut n = 0;
    for view in views {
        for d in &view.deliveries {
            if d.state == DeliveryState::Dead && configured.contains(&d.destination) {
                let one = ReplaySelector::Delivery {
                    id: id.clone(),
                    destination: d.destination.clone(),
                    seq: Some(view.event.seq),
                };
                n += app.store.replay(one).await.map_err(store_error)?;
            }
        }
    }
    Ok(n)
}

/// The answer for a destination name that no destination has.
fn unknown_destination(name: &str) -> ApiError {
    not_found(format!("no destination is named {name:?}"))
}

/// Configured destinations, then those with pending deliveries the config no longer names.
fn destination_names(app: &App) -> Vec<String> {
    let config = app.config();
    let mut names: Vec<String> = config.destinations.iter().map(|d| d.name.clone()).collect();
    for (d, _) in app.store.queue_depths() {
        if !names.contains(&d) {
            names.push(d);
        }
    }
    names
}

/// `ok`, `open` or `paused`.
fn state_of(app: &App, name: &str) -> &'static str {
    if app.store.paused(name) {
        "paused"
    } else if app.statuses.of(name).breaker_open() {
        "open"
    } else {
        "ok"
    }
}

/// Seconds since the event of `name`'s oldest pending delivery was received (0 with none
/// pending).
async fn oldest_pending_age(app: &App, name: &str) -> u64 {
    match app.store.oldest_pending(name).await {
        Ok(Some(received)) => now_ms().saturating_sub(received) / 1000,
        _ => 0,
    }
}

async fn destination(app: &App, name: &str) -> Value {
    let config = app.config();
    let status = app.statuses.of(name);
    json!({
        "name": name,
        "url": config.destination(name).map(|d| d.shown_url.as_str()),
        "configured": config.destination(name).is_some(),
        "state": state_of(app, name),
        "queue_depth": app.store.queue_depth(name),
        "in_flight": status.in_flight(),
        "oldest_pending_age_seconds": oldest_pending_age(app, name).await,
        "consecutive_failures": status.consecutive_failures(),
        "last_error": status.last_error(),
        // Until when the destination asked to be left alone (Retry-After); null if not.
        "quiet_until": status.quiet(now_ms()).map(views::rfc3339),
    })
}

/// How long readiness waits for the store's probe.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// Ready or not, and why; to the `operator` (the admin token given, or none configured)
/// also the pending counts of destinations no longer configured, by name.
async fn readyz(app: &App, operator: bool) -> Response<Body> {
    let config = app.config();
    if app.health.is_stopping() {
        return ApiError::unavailable("the relay is shutting down", "5").into_response();
    }
    if let Err(why) = app.store.available() {
        return ApiError::unavailable(why, "5").into_response();
    }
    if !app.health.store_healthy() && app.health.probe_turn() {
        // The last accept failed. Without traffic (a balancer that believed this answer
        // sends none) no accept would say it recovered: the probe does.
        let largest = config.server.max_body_bytes as usize;
        if let Ok(Ok(())) = tokio::time::timeout(PROBE_WAIT, app.store.probe(largest)).await {
            app.health.set_store_healthy(true);
        }
    }
    if !app.health.store_healthy() {
        return ApiError::unavailable(
            "the store failed its last write (disk full or I/O error?); the ingress answers 503",
            "5",
        )
        .into_response();
    }
    let mut ready = json!({
        "status": "ready",
        "instances": app.store.share(),
    });
    if operator {
        let orphans: serde_json::Map<String, Value> = app
            .store
            .queue_depths()
            .into_iter()
            .filter(|(d, _)| config.destination(d).is_none())
            .map(|(d, n)| (d, json!(n)))
            .collect();
        ready["unconfigured_destinations_with_pending"] = Value::Object(orphans);
    }
    ok(ready)
}

async fn metrics(app: &App, openmetrics: bool) -> String {
    // The figures first (reading an age may wait), then all the gauges at once, so two
    // scrapes around a reload cannot leave a removed destination's series behind.
    let mut gauges = Vec::new();
    for name in destination_names(app) {
        gauges.push(crate::metrics::DestinationGauges {
            depth: app.store.queue_depth(&name) as i64,
            oldest_pending_age: oldest_pending_age(app, &name).await as i64,
            state: state_of(app, &name),
            name,
        });
    }
    app.metrics
        .set_destination_gauges(&gauges, &|| destination_names(app));
    app.metrics.render(openmetrics)
}

/// The paging cursor `key` of a query (absent or empty: none); `what` says what it must be.
fn cursor(q: &HashMap<String, String>, key: &str, what: &str) -> Result<Option<u64>, ApiError> {
    match q.get(key).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| bad_request(format!("{key} must be {what}"))),
    }
}

/// A change (a replay, a pause, a reload) is refused while the relay stops: what it would
/// start has no time left to run, and the store closes under it (a replay of a whole
/// destination could be cut off half done).
fn running(app: &App) -> Result<(), ApiError> {
    match app.health.is_stopping() {
        true => Err(ApiError::unavailable(
            "the relay is stopping: make the change on a running instance, or after its restart",
            "5",
        )),
        false => Ok(()),
    }
}

fn reload(app: &App) -> Response<Body> {
    if let Err(e) = running(app) {
        return e.into_response();
    }
    match app.reload() {
        Ok(table) => {
            info!("config reloaded");
            ok(json!({"reloaded": true, "routing_table": table}))
        }
        Err(errors) => {
            warn!(
                problems = errors.0.len(),
                "config reload refused; the old config stays"
            );
            let problems: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            json_response(
                StatusCode::BAD_REQUEST,
                json!({
                    "error": "invalid_config",
                    "message": format!("the config has {} problem(s); the old config stays in force", problems.len()),
                    "problems": problems,
                })
                .to_string()
                .into_bytes(),
            )
        }
    }
}
