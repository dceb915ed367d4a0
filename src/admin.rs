//! The admin listener (`admin_listen`, keep it private): health, readiness, metrics, event
//! lookup, dead letters and replay, and config reload.
//!
//! Answers are JSON; errors use the contract's `{"error","message"}` shape. Nothing here
//! prints a secret: events are shown as received (the provider's body), deliveries by
//! state, and the routing table never includes auth values.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::app::App;
use crate::ingress::error::{json_response, ApiError, Body};
use crate::metrics::DestinationLabel;
use crate::store::{now_ms, Delivery, ReplaySelector};

/// Most dead deliveries one `/api/dead` answer lists.
const MAX_LIMIT: usize = 10_000;

pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let svc = hyper::service::service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(&app, req).await) }
        });
        let conn = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn ok(v: Value) -> Response<Body> {
    json_response(StatusCode::OK, v.to_string().into_bytes())
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

pub async fn handle(app: &App, req: Request<Incoming>) -> Response<Body> {
    match route(app, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn route(app: &App, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let get_only = |allowed: Method| {
        if method == allowed {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{path} takes {allowed}"),
            )
            .with_header(
                http::header::ALLOW,
                if allowed == Method::GET {
                    "GET"
                } else {
                    "POST"
                },
            ))
        }
    };
    match path.as_str() {
        "/healthz" => {
            get_only(Method::GET)?;
            Ok(ok(json!({"status": "ok"})))
        }
        "/readyz" => {
            get_only(Method::GET)?;
            Ok(readyz(app))
        }
        "/metrics" => {
            get_only(Method::GET)?;
            let text = metrics(app).await;
            let mut r = Response::new(http_body_util::Full::new(bytes::Bytes::from(text)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            Ok(r)
        }
        "/api/dead" => {
            get_only(Method::GET)?;
            let q = query(&req);
            let limit = match q.get("limit") {
                None => 100,
                Some(l) => match l.parse::<usize>() {
                    Ok(n) if n > 0 => n.min(MAX_LIMIT),
                    _ => return Err(bad_request("limit must be a positive whole number")),
                },
            };
            let dest = q.get("destination").map(String::as_str);
            let dead = app.store.dead(dest, limit).await.map_err(store_error)?;
            Ok(ok(Value::Array(dead.iter().map(delivery_json).collect())))
        }
        "/api/dead/replay" => {
            get_only(Method::POST)?;
            let q = query(&req);
            let which = match (q.get("destination"), q.get("id")) {
                (Some(d), None) => ReplaySelector::Destination(d.clone()),
                (None, Some(id)) => ReplaySelector::EventId(id.clone()),
                _ => return Err(bad_request("give exactly one of ?destination= or ?id=")),
            };
            let n = app.store.replay(which).await.map_err(store_error)?;
            info!(replayed = n, "dead deliveries replayed");
            Ok(ok(json!({"replayed": n})))
        }
        "/api/reload" => {
            get_only(Method::POST)?;
            Ok(reload(app))
        }
        p if p.starts_with("/api/events/") => {
            get_only(Method::GET)?;
            let raw = &p["/api/events/".len()..];
            let id = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
            if id.is_empty() {
                return Err(bad_request("give an event id: /api/events/{id}"));
            }
            let views = app.store.lookup(&id).await.map_err(store_error)?;
            if views.is_empty() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no stored event has id {id:?}"),
                ));
            }
            let events: Vec<Value> = views
                .iter()
                .map(|v| {
                    let body = match serde_json::from_slice::<Value>(&v.event.body) {
                        Ok(j) => j,
                        Err(_) => json!({"base64": base64::engine::general_purpose::STANDARD
                            .encode(&v.event.body)}),
                    };
                    json!({
                        "id": v.event.id,
                        "source": v.event.source,
                        "received_ms": v.event.received_ms,
                        "received": httpdate::fmt_http_date(
                            std::time::UNIX_EPOCH + Duration::from_millis(v.event.received_ms)),
                        "content_type": v.event.content_type,
                        "body": body,
                        "deliveries": v.deliveries.iter().map(delivery_json).collect::<Vec<_>>(),
                    })
                })
                .collect();
            // One event per id in the common case; several when sources share an id.
            Ok(ok(if events.len() == 1 {
                events.into_iter().next().unwrap()
            } else {
                json!({"events": events})
            }))
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no admin endpoint at {path}"),
        )),
    }
}

fn delivery_json(d: &Delivery) -> Value {
    json!({
        "seq": d.seq,
        "destination": d.destination,
        "state": d.state,
        "attempts": d.attempts,
        "last_status": d.last_status,
        "last_error": d.last_error,
        "next_due_ms": d.next_due_ms,
        "updated_ms": d.updated_ms,
    })
}

fn store_error(e: crate::store::StoreError) -> ApiError {
    ApiError::unavailable(format!("{e}"), "1")
}

/// Destinations with pending deliveries that the config no longer names.
fn orphaned(app: &App) -> Vec<(String, u64)> {
    let config = app.config();
    app.store
        .queue_depths()
        .into_iter()
        .filter(|(d, _)| config.destination(d).is_none())
        .collect()
}

fn readyz(app: &App) -> Response<Body> {
    let orphans: serde_json::Map<String, Value> = orphaned(app)
        .into_iter()
        .map(|(d, n)| (d, json!(n)))
        .collect();
    if app.is_stopping() {
        return ApiError::unavailable("the relay is shutting down", "5").into_response();
    }
    if !app.store_healthy() {
        return ApiError::unavailable(
            "the store failed its last write (disk full or I/O error?); the ingress answers 503",
            "5",
        )
        .into_response();
    }
    ok(json!({"status": "ready", "unconfigured_destinations_with_pending": orphans}))
}

async fn metrics(app: &App) -> String {
    let config = app.config();
    let now = now_ms();
    let mut names: Vec<String> = config.destinations.iter().map(|d| d.name.clone()).collect();
    for (d, _) in app.store.queue_depths() {
        if !names.contains(&d) {
            names.push(d);
        }
    }
    for d in names {
        let label = DestinationLabel {
            destination: d.clone(),
        };
        app.metrics
            .queue_depth
            .get_or_create(&label)
            .set(app.store.queue_depth(&d) as i64);
        let oldest = match app.store.pending(&d, 1, &|_| false).await {
            Ok(p) => p
                .first()
                .map(|x| now.saturating_sub(x.next_due_ms.min(now)) / 1000)
                .unwrap_or(0),
            Err(_) => 0,
        };
        app.metrics
            .oldest_pending_age
            .get_or_create(&label)
            .set(oldest as i64);
    }
    app.metrics.render()
}

fn reload(app: &App) -> Response<Body> {
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
