//! Reply routes (8x8 Voice Call Action): the provider expects the next call action in the
//! HTTP answer, so after the event is stored the relay calls `reply.from` synchronously and
//! answers with that destination's status, body and content type.
//!
//! The stored delivery to `reply.from` is held back (due after the reply timeout), so the
//! scheduler does not send it meanwhile. A 2xx answer is kept with the event (a duplicate
//! gets it again, without a new call) and counts as that destination's delivery. A timeout,
//! connection failure or non-2xx answer gets the route's `fallback`, and the held delivery
//! follows the destination's retry policy like any other. A paused destination, or one
//! whose breaker is open, is not called: the fallback goes at once, and the held delivery
//! waits for the scheduler like any other.
//!
//! A duplicate that arrives while this instance's call for the event is still out (the
//! provider retried a slow answer) waits for that call's answer ([`InProgress`]) instead
//! of calling the destination a second time at once. The call runs on a task of its own,
//! so a provider that hangs up does not cut it off: its answer is kept all the same.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Response, StatusCode};
use http_body_util::Full;
use tracing::{info, warn, Instrument, Span};

use super::Deps;
use crate::config::{Config, Reply};
use crate::delivery::call_once;
use crate::store::{DeliveryKey, Outcome, StoredEvent, StoredReply};
use crate::web::response::Body;

/// How long after the reply timeout the held delivery falls due: the call ends within the
/// timeout of the request's arrival, but its outcome then needs a commit (up to the
/// accept's own timeout), so the scheduler does not send it while that outcome is on its
/// way.
pub const HOLD_MARGIN_MS: u64 = super::ACCEPT_TIMEOUT.as_millis() as u64 + 2_000;

/// What a finished call answered: the destination's 2xx (status, content type, body), or
/// `None` for the fallback.
type Answered = Option<(u16, Option<String>, Bytes)>;

/// Reply calls out on this instance, by event sequence number: each one's answer once it
/// has one.
#[derive(Default)]
pub struct InProgress(Mutex<HashMap<u64, tokio::sync::watch::Receiver<Option<Answered>>>>);

/// A call registered in [`InProgress`]: says its answer, and leaves when dropped (a call
/// that ended without one lets a waiting duplicate call).
struct Registered {
    calls: Arc<InProgress>,
    seq: u64,
    answered: tokio::sync::watch::Sender<Option<Answered>>,
}

impl InProgress {
    fn register(self: &Arc<Self>, seq: u64) -> Registered {
        let (answered, rx) = tokio::sync::watch::channel(None);
        self.0.lock().unwrap().insert(seq, rx);
        Registered {
            calls: self.clone(),
            seq,
            answered,
        }
    }

    fn out(&self, seq: u64) -> Option<tokio::sync::watch::Receiver<Option<Answered>>> {
        self.0.lock().unwrap().get(&seq).cloned()
    }
}

impl Registered {
    fn answer(&self, a: Answered) {
        self.answered.send_replace(Some(a));
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.calls.0.lock().unwrap().remove(&self.seq);
    }
}

/// The answer for a stored reply.
pub fn stored(reply: &StoredReply) -> Response<Body> {
    answer(
        reply.status,
        reply.content_type.as_deref(),
        Bytes::from(reply.body.clone()),
    )
}

fn answer(status: u16, content_type: Option<&str>, body: Bytes) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    match content_type.and_then(|c| HeaderValue::from_str(c).ok()) {
        Some(ct) => crate::web::response::answer(status, ct, body),
        None => {
            let mut r = Response::new(Full::new(body));
            *r.status_mut() = status;
            r
        }
    }
}

fn fallback(reply: &Reply) -> Response<Body> {
    answer(
        reply.fallback_status,
        Some(&reply.fallback_content_type),
        Bytes::from(reply.fallback_body.clone()),
    )
}

/// Calls `reply.from` of route `route` for `event` and answers with its response or the
/// fallback, within `reply.timeout` of the request's arrival (`arrived`: reading the body
/// and the store's commit count too, since the provider's clock runs through them).
/// `fresh` says whether this request stored the event (a duplicate's call settles the held
/// delivery only by delivering it).
///
/// The call runs on a task of its own: a provider that gives up on a slow answer hangs up
/// (and then sends the event again), which drops this request but not the call. Its answer
/// is then kept for the duplicate, which waits for it while it is out, and the destination
/// is not called once per try.
pub async fn call(
    app: &Deps,
    config: &Arc<Config>,
    route: usize,
    event: &StoredEvent,
    fresh: bool,
    arrived: tokio::time::Instant,
) -> Response<Body> {
    let Some(reply) = config.routes[route].reply.as_ref() else {
        unreachable!("only a reply route's events are called");
    };
    // A duplicate that waits for the call already out calls within what is left of its own
    // timeout, not a whole new one: the provider waits for one timeout, not two.
    let deadline = arrived + reply.timeout;
    if !fresh {
        if let Some(mut out) = app.replies.out(event.seq) {
            match tokio::time::timeout_at(deadline, out.wait_for(Option::is_some)).await {
                Ok(Ok(a)) => {
                    if let Some(Some((status, ct, body))) = a.clone() {
                        info!(status, "reply of the call already out for this event");
                        return answer(status, ct.as_deref(), body);
                    }
                    // That call got the fallback: this one calls again, as after a kept
                    // fallback.
                }
                Ok(Err(_)) => {} // that call was dropped unanswered: this one calls
                Err(_) => return fallback(reply), // none in time, as that call would
            }
        }
    }
    // Registered before the task starts: a duplicate right behind finds the call out.
    let registered = fresh.then(|| app.replies.register(event.seq));
    let task = app.background.spawn(
        calling(
            app.clone(),
            config.clone(),
            route,
            event.clone(),
            fresh,
            deadline,
            registered,
        )
        .instrument(Span::current()),
    );
    task.await.unwrap_or_else(|_| fallback(reply))
}

/// [`call`]'s call, on its own task: the rest of [`call`] with what it holds.
async fn calling(
    app: Deps,
    config: Arc<Config>,
    route: usize,
    event: StoredEvent,
    fresh: bool,
    deadline: tokio::time::Instant,
    registered: Option<Registered>,
) -> Response<Body> {
    let (app, event) = (&app, &event);
    let Some(reply) = config.routes[route].reply.as_ref() else {
        unreachable!("only a reply route's events are called");
    };
    let dest = &config.destinations[reply.from];
    let status = app.statuses.of(&dest.name);
    // Less than a quarter of it left, a call would mostly time out, and count against the
    // destination's breaker as a failure of its own.
    let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
    if timeout < reply.timeout / 4 {
        static SAID: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
        if let Some(held_back) = SAID.pass(crate::clock::now_ms()) {
            info!(destination = %dest.name, ?timeout, held_back, "reply destination not called: too little of the reply's timeout is left; answering the fallback");
        }
        return fallback(reply);
    }
    let called = call_once(&app.client, &*app.store, dest, event, timeout, &status).await;
    if called.outcome.is_some() {
        // Its outcome may have closed (or opened) the breaker: the scheduler looks again.
        app.store.wakeup(&dest.name).notify_one();
    }
    let key = DeliveryKey {
        seq: event.seq,
        destination: dest.name.clone(),
    };
    if let Some(r) = &registered {
        r.answer(
            called
                .answer
                .as_ref()
                .map(|a| (a.status, a.content_type.clone(), a.body.clone())),
        );
    }
    // A duplicate's call settles the held delivery only when it delivered it (the first
    // call failed and the delivery waits for a retry): a failure of its own would move that
    // retry, which the first call's outcome already scheduled. A delivery no longer pending
    // is left as it is.
    let outcome = called
        .outcome
        .clone()
        .filter(|o| fresh || matches!(o, Outcome::Delivered { .. }));
    match called.answer {
        Some(a) => {
            let kept = StoredReply {
                status: a.status,
                content_type: a.content_type.clone(),
                body: a.body.to_vec(),
            };
            settle(app, key, Some(kept), outcome, fresh, called.seconds);
            info!(destination = %dest.name, status = a.status, "reply forwarded");
            answer(a.status, a.content_type.as_deref(), a.body)
        }
        None if called.outcome.is_none() => {
            static SAID: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
            if let Some(held_back) = SAID.pass(crate::clock::now_ms()) {
                info!(destination = %dest.name, why = %called.described, held_back, "reply destination not called; answering the fallback");
            }
            fallback(reply)
        }
        None => {
            static SAID: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
            if let Some(held_back) = SAID.pass(crate::clock::now_ms()) {
                warn!(destination = %dest.name, result = %called.described, held_back, "reply destination failed; answering the fallback");
            }
            settle(app, key, None, outcome, fresh, called.seconds);
            fallback(reply)
        }
    }
}

/// Queues the kept answer and the held delivery's outcome; the answer does not wait.
/// `fresh`: the call was made for the request that stored the event.
fn settle(
    app: &Deps,
    key: DeliveryKey,
    reply: Option<StoredReply>,
    outcome: Option<Outcome>,
    fresh: bool,
    seconds: f64,
) {
    if let Some(o) = &outcome {
        app.metrics.delivery(&key.destination, o.word(), seconds);
    }
    if let Err(e) = app
        .store
        .after_reply(key.seq, reply, outcome.map(|o| (key, o)), fresh)
    {
        warn!(error = %e, "keeping the reply failed; a duplicate will call again");
    }
}
