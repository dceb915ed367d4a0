//! The admin API's JSON: events, deliveries and destinations as the contract shows them.
//! A delivery always names its event (`event_id`, `source`); times are RFC 3339.

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::store::{Delivery, DeliveryState, EventView, StoredEvent};

/// Milliseconds since the epoch as RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One delivery of the event `event_id` from `source`.
pub fn delivery(event_id: &str, source: &str, d: &Delivery) -> Value {
    let mut v = json!({
        "event_id": event_id,
        "source": source,
        "destination": d.destination,
        "state": d.state,
        "attempts": d.attempts,
        "last_status": d.last_status,
        "last_error": d.last_error,
        "seq": d.seq,
        "updated_at": rfc3339(d.updated_ms),
    });
    if d.state == DeliveryState::Pending {
        // Behind another of its order key, this is the earliest it may go, not a plan.
        v["next_attempt_at"] = json!(rfc3339(d.next_due_ms));
        if d.waiting {
            v["waiting"] = json!(true);
        }
    }
    v
}

fn deliveries(e: &StoredEvent, ds: &[Delivery]) -> Vec<Value> {
    ds.iter().map(|d| delivery(&e.id, &e.source, d)).collect()
}

/// An event in a list: no body.
pub fn event_summary(v: &EventView) -> Value {
    let e = &v.event;
    json!({
        "id": e.id,
        "source": e.source,
        "seq": e.seq,
        "received": received(e.received_ms),
        "received_at": rfc3339(e.received_ms),
        "deliveries": deliveries(e, &v.deliveries),
    })
}

/// The received time as an HTTP date (the first shape of `/api/events/{id}`).
fn received(ms: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_millis(ms))
}

/// An event with its body, as `/api/events/{id}` shows it.
#[derive(Serialize)]
pub struct EventOut {
    #[serde(flatten)]
    summary: Value,
    /// When it was received and stored, for ordering several events with one id.
    #[serde(skip)]
    pub received_ms: u64,
    #[serde(skip)]
    pub seq: u64,
    body: EventBody,
    /// The JSON body as the text received, for the console to show as it is (a browser's
    /// JSON reading rounds large numbers and moves integer-like keys first).
    #[serde(skip_serializing_if = "Option::is_none")]
    body_text: Option<String>,
}

/// The body: the JSON exactly as received (its key order, numbers and spacing inside it
/// kept: building a tree would sort keys and round numbers), or base64 when it is not JSON.
#[derive(Serialize)]
#[serde(untagged)]
enum EventBody {
    Json(Box<RawValue>),
    Other { base64: String },
}

pub fn event(v: &EventView) -> EventOut {
    let e = &v.event;
    let (body, body_text) = match serde_json::from_slice::<Box<RawValue>>(&e.body) {
        Ok(raw) => {
            let text = raw.get().to_string();
            (EventBody::Json(raw), Some(text))
        }
        Err(_) => (
            EventBody::Other {
                base64: base64::engine::general_purpose::STANDARD.encode(&e.body),
            },
            None,
        ),
    };
    let mut summary = event_summary(v);
    summary["received_ms"] = json!(e.received_ms);
    summary["content_type"] = json!(e.content_type);
    EventOut {
        summary,
        received_ms: e.received_ms,
        seq: e.seq,
        body,
        body_text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_delivery_says_when_it_is_next_tried_and_a_dead_one_does_not() {
        let mut d = Delivery {
            seq: 7,
            destination: "calls".into(),
            state: DeliveryState::Pending,
            attempts: 1,
            window_base: 0,
            first_attempt_ms: Some(0),
            next_due_ms: 1_764_000_000_000,
            last_status: Some(503),
            last_error: Some("HTTP 503".into()),
            updated_ms: 1_764_000_000_000,
            order_key: None,
            waiting: false,
        };
        let v = delivery("ev-1", "voice", &d);
        assert_eq!(v["event_id"], "ev-1");
        assert_eq!(v["source"], "voice");
        assert_eq!(v["next_attempt_at"], "2025-11-24T16:00:00.000Z");
        assert!(v.get("waiting").is_none());
        d.waiting = true;
        assert_eq!(delivery("ev-1", "voice", &d)["waiting"], true);
        d.state = DeliveryState::Dead;
        assert!(delivery("ev-1", "voice", &d)
            .get("next_attempt_at")
            .is_none());
    }
}
