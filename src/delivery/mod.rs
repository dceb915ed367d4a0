//! Delivery: gets every accepted event to every matched destination, at least once.
//!
//! - [`scheduler`]: one task per destination reads due deliveries from the store (a bounded
//!   window, never the whole queue), applies the destination's rate limit and in-flight
//!   limit, and starts one attempt per delivery.
//! - [`client`]: the pooled HTTP client and [`send_once`], the one request of an attempt
//!   (also what a reply route calls).
//! - [`retry`]: what an answer means (delivered, retried, dead) and when the next attempt is
//!   due; computed from the stored attempt count, so a restart resumes the schedule.
//!
//! The store is the truth: a delivery is pending until an attempt's outcome is recorded, so
//! whatever is in flight when the relay stops (or dies) is sent again after a restart.
//! Schedulers start for the destinations configured at start and for those a reload adds.
//! At shutdown the schedulers stop taking work; attempts in flight continue and are waited
//! for by [`Engine::wait`] (which the caller bounds with `shutdown_grace`); dropping the
//! [`Engine`] abandons those still unfinished, which stay pending in the store.

pub mod client;
pub mod retry;
mod scheduler;

use std::collections::HashSet;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use client::{send_once, Answer, AttemptResult, HttpClient, SendError};

use crate::clock::now_ms;
use crate::config::Destination;
use crate::destinations::{Change, DestinationStatus, Gate};
use crate::store::{Delivery, Outcome, Store, StoredEvent};

/// A reply route's synchronous call, as delivery judges it.
pub struct Called {
    /// The destination's answer when it is the reply: 2xx, body read whole.
    pub answer: Option<Answer>,
    /// What the call means for the held delivery, as if it were its first attempt; `None`
    /// when no call was made (the destination is paused or its breaker open): the held
    /// delivery then waits for the scheduler like any other.
    pub outcome: Option<Outcome>,
    /// What happened, for a log line.
    pub described: String,
    pub seconds: f64,
}

/// The one call a reply route makes: `event` to `dest` as attempt 1, within `timeout`,
/// judged by the destination's retry policy. The narrow way the ingress reaches delivery.
/// A paused destination, or one whose breaker is open, is not called; nor is one whose
/// `max_in_flight` or `rate` leaves no room before the timeout (the call takes a slot and a
/// token from its scheduler). The call counts in the destination's live figures and tells
/// its breaker the outcome, like an attempt.
pub async fn call_once(
    client: &HttpClient,
    store: &dyn Store,
    dest: &Destination,
    event: &StoredEvent,
    timeout: std::time::Duration,
    status: &DestinationStatus,
) -> Called {
    let skipped = |why: &str| Called {
        answer: None,
        outcome: None,
        described: why.to_string(),
        seconds: 0.0,
    };
    if store.paused(&dest.name) {
        return skipped("the destination is paused");
    }
    // An open breaker first (or a quiet the destination asked for), before a slot or a
    // token is spent on a call not made.
    if !status.would_send(&dest.breaker, now_ms()) {
        return skipped("the destination's breaker is open, or it asked for quiet (Retry-After)");
    }
    // Its scheduler's limits hold for this call too: a slot, then a token, both while a
    // quarter of the reply's timeout is left at least (later, a timeout would count
    // against a destination that is only busy; and a token not taken is not spent).
    let deadline = tokio::time::Instant::now() + timeout;
    let last_start = deadline - timeout / 4;
    let limits = status.limits();
    let _slot = match &limits {
        Some(l) => match tokio::time::timeout_at(last_start, l.slots.clone().acquire_owned()).await
        {
            Ok(Ok(p)) => Some(p),
            _ => return skipped("the destination has max_in_flight requests in flight"),
        },
        None => None,
    };
    if let Some(l) = &limits {
        if tokio::time::timeout_at(last_start, l.limiter.until_ready())
            .await
            .is_err()
        {
            return skipped("the destination's rate allows no request before the reply timeout");
        }
    }
    let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
    // Then the breaker's gate, as the scheduler does: a probe it lets through is made.
    let probe = match status.gate(&dest.breaker, now_ms()) {
        Gate::Send => false,
        Gate::Probe => true,
        Gate::WaitUntil(_) | Gate::WaitProbe => {
            return skipped(
                "the destination's breaker is open, or it asked for quiet (Retry-After)",
            )
        }
    };
    let started = std::time::Instant::now();
    // Dropped with the request (the provider hung up): the call stops counting as in
    // flight, and a probe it was lets the next attempt probe instead of waiting forever.
    let mut call = InCall::new(status, probe);
    let result = send_once(client, dest, event, 1, timeout).await;
    let seconds = started.elapsed().as_secs_f64();
    let described = retry::describe(&result);
    if let Some(until) = retry::quiet_until(&dest.retry, &result, now_ms()) {
        status.quiet_until(until);
    }
    let called = match result {
        // A cut-off body is not the destination's answer: the fallback goes instead.
        Ok(a) if (200..300).contains(&a.status) && !a.truncated => Called {
            outcome: Some(Outcome::Delivered { status: a.status }),
            answer: Some(a),
            described,
            seconds,
        },
        other => {
            let now = now_ms();
            let fresh = Delivery::first(event.seq, &dest.name, now, None, None);
            let mut outcome = retry::decide(&dest.retry, &fresh, &other, now, rand::random());
            // Decided from a fresh delivery: which attempt of the stored one it is, is not
            // known here (a resend's call may be its second).
            if let Outcome::Retry { attempt, .. } = &mut outcome {
                *attempt = None;
            }
            Called {
                outcome: Some(outcome),
                answer: None,
                described,
                seconds,
            }
        }
    };
    let error = match &called.outcome {
        Some(o) => o.error().map(str::to_string),
        None => None,
    };
    tell_breaker(store, status, dest, error.as_deref(), probe);
    call.settled = true;
    called
}

/// Tells `dest`'s breaker an attempt's outcome (`error`: `None` when delivered; `probe`:
/// the attempt was its probe); a change of its state is logged and shared with the other
/// instances on the store.
fn tell_breaker(
    store: &dyn Store,
    status: &DestinationStatus,
    dest: &Destination,
    error: Option<&str>,
    probe: bool,
) {
    let now = now_ms();
    let change = status.outcome(error, probe, &dest.breaker, now);
    crate::destinations::log_change(change, &dest.name, &dest.breaker);
    match change {
        Some(Change::Opened | Change::Reopened) => store.share_breaker(&dest.name, true),
        Some(Change::Closed) => store.share_breaker(&dest.name, false),
        None => {}
    }
}

/// Applies the breaker changes other instances share until `stop`: a destination's breaker
/// opened elsewhere holds this instance for as long as the opener's probe may take to say
/// otherwise (its cool-down and the probe's own timeout, twice over; a failed probe renews
/// it), and one closed elsewhere wakes its scheduler here.
async fn hear_breakers(ctx: Arc<Context>) {
    let Some(mut news) = ctx.deps.store.breaker_news() else {
        return;
    };
    loop {
        let (name, open) = tokio::select! {
            _ = ctx.stop.cancelled() => return,
            n = news.recv() => match n {
                Some(n) => n,
                None => return,
            },
        };
        let Some(dest) = ctx.deps.live.get().destination(&name).cloned() else {
            continue;
        };
        let hold = 2 * (dest.breaker.cool_down + dest.timeout);
        let until = now_ms().saturating_add(hold.as_millis() as u64);
        let change = ctx
            .deps
            .statuses
            .of(&name)
            .peer_breaker(open, until, &dest.breaker);
        if change.is_some() {
            tracing::info!(destination = %name, open, "breaker: as another instance's");
        }
        if change == Some(Change::Closed) {
            ctx.deps.store.wakeup(&name).notify_one();
        }
    }
}

/// A reply route's call under way.
struct InCall<'a> {
    status: &'a DestinationStatus,
    probe: bool,
    /// Its outcome reached the breaker.
    settled: bool,
}

impl<'a> InCall<'a> {
    fn new(status: &'a DestinationStatus, probe: bool) -> Self {
        status.started();
        InCall {
            status,
            probe,
            settled: false,
        }
    }
}

impl Drop for InCall<'_> {
    fn drop(&mut self) {
        self.status.finished();
        if self.probe && !self.settled {
            self.status.probe_abandoned();
        }
    }
}

/// What delivery is handed: the config in force, the store, metrics, the outbound client,
/// and the live destination figures it reports.
pub struct Deps {
    pub live: Arc<crate::config::Live>,
    pub store: Arc<dyn crate::store::Store>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub client: HttpClient,
    pub statuses: Arc<crate::destinations::Statuses>,
}

/// What the schedulers and their attempts share.
struct Context {
    deps: Deps,
    stop: CancellationToken,
    /// Cancelled when the engine is dropped: attempts still in flight are abandoned (their
    /// deliveries stay pending and go out again after a restart).
    abort: CancellationToken,
    /// Schedulers and attempts in flight.
    tasks: TaskTracker,
}

/// The running delivery engine. Dropping it abandons attempts still in flight.
pub struct Engine {
    tasks: TaskTracker,
    abort: CancellationToken,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.abort.cancel();
    }
}

impl Engine {
    /// Abandons the attempts still in flight: they end without an outcome and stay pending.
    pub fn abandon(&self) {
        self.abort.cancel();
    }

    /// Waits until every scheduler has stopped (after the stop token) and every attempt in
    /// flight has finished and stored its outcome.
    pub async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Starts the engine: a scheduler per configured destination, and one for each destination
/// a later reload adds. Stops taking work when `stop` is cancelled.
pub fn start(deps: Deps, stop: CancellationToken) -> Engine {
    let tasks = TaskTracker::new();
    let abort = CancellationToken::new();
    let ctx = Arc::new(Context {
        deps,
        stop,
        abort: abort.clone(),
        tasks: tasks.clone(),
    });
    tasks.spawn(hear_breakers(ctx.clone()));
    tasks.spawn(supervise(ctx));
    Engine { tasks, abort }
}

/// Starts a scheduler for every destination in the config, now and after each reload.
/// A scheduler whose destination leaves the config idles until it comes back.
async fn supervise(ctx: Arc<Context>) {
    let mut running: HashSet<String> = HashSet::new();
    let mut changes = ctx.deps.live.changes();
    loop {
        for d in &ctx.deps.live.get().destinations {
            if running.insert(d.name.clone()) {
                ctx.tasks.spawn(scheduler::run(ctx.clone(), d.name.clone()));
            }
        }
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            r = changes.changed() => if r.is_err() {
                ctx.stop.cancelled().await;
                return;
            },
        }
    }
}
