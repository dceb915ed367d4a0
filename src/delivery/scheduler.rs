//! One scheduler per destination: takes due deliveries from the store in due order and
//! starts an attempt for each, never faster than `rate` and never more than `max_in_flight`
//! at once; each attempt writes its outcome back to the store.
//!
//! Memory holds a bounded window, never the queue: one pass reads at most
//! `2 × max_in_flight` deliveries (16 to 1024), and the set of sequence numbers in flight
//! (which the next pass skips). Between passes the scheduler sleeps until the first of: the
//! store's wakeup for this destination (a new or replayed delivery, notified after the
//! commit), the earliest future due time it saw, an attempt finishing, a config change, or
//! the stop token. No polling in the common path.
//!
//! The rate limiter and the in-flight semaphore belong to the scheduler, so retries and
//! replays pass through them like first attempts. When several instances share the store
//! (jetstream), each sizes them to its part, `1/n` of the destination's limits; when those
//! allow fewer senders than instances, only that many send ([`senders`]), and the others
//! hand back what they hold. The destination's settings are looked up by name on every
//! pass, so a reload's new URL, headers, timeout, retry policy and limits apply to the
//! next attempts; a destination that left the config is not scheduled and its
//! deliveries stay on disk.
//!
//! A paused destination (stored, so it holds across restarts) gets nothing until a resume
//! wakes its scheduler. The destination's breaker ([`crate::destinations`]) is asked before
//! each attempt: while open nothing is sent and the scheduler sleeps to the end of the
//! cool-down; then one probe goes alone. Per-key order needs nothing here: the store puts
//! only the head of each `order_by` key in the due queue.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, info_span, warn, Instrument};

use super::client::{header_id, send_once};
use super::retry;
use super::Context;
use crate::clock::now_ms;
use crate::config::{Destination, Rate};
use crate::destinations::{DestinationStatus, Gate, SendLimits};
use crate::store::{Delivery, DeliveryKey, Outcome, StoreError};

/// The fewest and most deliveries one pass reads.
const MIN_WINDOW: usize = 16;
const MAX_WINDOW: usize = 1024;
/// The most concurrent requests one destination may be given.
const MAX_IN_FLIGHT: usize = 1 << 16;
/// How often an instance that does not send to a destination checks whether it does now.
const SENDERS_RECHECK: Duration = Duration::from_secs(1);
/// The wait before trying again after the store failed a read or write.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between tries to store an attempt's outcome.
const MAX_STORE_RETRY: Duration = Duration::from_secs(30);

/// A rate limiter for `rate`: `per_second` on average, `burst` at once.
fn limiter(rate: &Rate) -> DefaultDirectRateLimiter {
    let burst = NonZeroU32::new(rate.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    let quota = if rate.per_second.is_finite() && rate.per_second > 0.0 {
        Duration::try_from_secs_f64(1.0 / rate.per_second)
            .ok()
            .and_then(Quota::with_period)
    } else {
        None
    }
    .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX));
    RateLimiter::direct(quota.allow_burst(burst))
}

/// A destination's rate limiter and in-flight semaphore, resized when a reload changes them.
struct Limits {
    rate: Rate,
    limiter: Arc<DefaultDirectRateLimiter>,
    max_in_flight: usize,
    slots: Arc<Semaphore>,
    /// Permits still to take out of circulation after `max_in_flight` went down while
    /// they were held.
    debt: usize,
}

impl Limits {
    fn new((rate, max): (Rate, usize)) -> Self {
        let max = max.clamp(1, MAX_IN_FLIGHT);
        Limits {
            limiter: Arc::new(limiter(&rate)),
            rate,
            max_in_flight: max,
            slots: Arc::new(Semaphore::new(max)),
            debt: 0,
        }
    }

    fn update(&mut self, (rate, max): (Rate, usize)) {
        if rate != self.rate {
            // Empty, not full: the old limiter's burst may just have gone out, and a full
            // new one would let a second burst follow it at once.
            let fresh = limiter(&rate);
            let burst = NonZeroU32::new(rate.burst.max(1)).unwrap_or(NonZeroU32::MIN);
            let _ = fresh.check_n(burst);
            self.limiter = Arc::new(fresh);
            self.rate = rate;
        }
        let max = max.clamp(1, MAX_IN_FLIGHT);
        if max > self.max_in_flight {
            let up = max - self.max_in_flight;
            let repaid = up.min(self.debt);
            self.debt -= repaid;
            self.slots.add_permits(up - repaid);
        } else if max < self.max_in_flight {
            let down = self.max_in_flight - max;
            self.debt += down - self.slots.forget_permits(down);
        }
        self.max_in_flight = max;
    }

    /// A slot for one request.
    async fn slot(&mut self) -> OwnedSemaphorePermit {
        loop {
            let permit = self
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            if self.debt == 0 {
                return permit;
            }
            permit.forget();
            self.debt -= 1;
        }
    }
}

/// How many instances may send to a destination with these limits: one request or one
/// token of `burst` at least each, so no more than either allows.
fn senders(rate: &Rate, max_in_flight: usize) -> usize {
    max_in_flight.min(rate.burst as usize).max(1)
}

/// This instance's part of a destination's `rate` and `max_in_flight` when `share`
/// instances share the store: each sender takes `1/n`, `n` being `share` or, when
/// [`senders`] is smaller, that (only that many send).
fn part(rate: &Rate, max_in_flight: usize, share: usize) -> (Rate, usize) {
    let n = share.min(senders(rate, max_in_flight)).max(1);
    let rate = Rate {
        per_second: rate.per_second / n as f64,
        burst: (rate.burst / n as u32).max(1),
    };
    (rate, (max_in_flight / n).max(1))
}

/// An instance that does not send to destination `name` (its limits allow fewer senders
/// than there are instances): what waits here goes back to the others, and the count is
/// checked again after a while or a config change. `false` once the relay stops.
async fn not_a_sender(
    ctx: &Context,
    name: &str,
    in_flight: &(dyn Fn(u64) -> bool + Send + Sync),
    changes: &mut watch::Receiver<u64>,
) -> bool {
    ctx.deps.store.hand_back(name, in_flight).await;
    tokio::select! {
        _ = ctx.stop.cancelled() => false,
        _ = changed(changes) => true,
        _ = tokio::time::sleep(SENDERS_RECHECK) => true,
    }
}

/// Waits for a config change; never returns if the config can no longer change.
async fn changed(rx: &mut watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Sleeps `ms` milliseconds, or forever for `None`.
async fn sleep_ms(ms: Option<u64>) {
    match ms {
        Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        None => std::future::pending::<()>().await,
    }
}

/// Sequence numbers in flight; an attempt's guard takes its own out when dropped (after
/// the outcome is stored, so the next pass cannot send it twice) and wakes the scheduler.
#[derive(Clone)]
struct InFlight {
    seqs: Arc<Mutex<HashSet<u64>>>,
    finished: Arc<Notify>,
    status: Arc<DestinationStatus>,
}

impl InFlight {
    fn new(status: Arc<DestinationStatus>) -> Self {
        InFlight {
            seqs: Arc::default(),
            finished: Arc::default(),
            status,
        }
    }

    fn contains(&self, seq: u64) -> bool {
        self.seqs.lock().unwrap().contains(&seq)
    }

    fn enter(&self, seq: u64) -> InFlightGuard {
        self.seqs.lock().unwrap().insert(seq);
        self.status.started();
        InFlightGuard {
            seq,
            set: self.clone(),
        }
    }
}

struct InFlightGuard {
    seq: u64,
    set: InFlight,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.set.seqs.lock().unwrap().remove(&self.seq);
        self.set.status.finished();
        self.set.finished.notify_one();
    }
}

/// Runs the scheduler of destination `name` until the stop token is cancelled.
pub(super) async fn run(ctx: Arc<Context>, name: String) {
    let wakeup = ctx.deps.store.wakeup(&name);
    let in_flight = InFlight::new(ctx.deps.statuses.of(&name));
    let mut changes = ctx.deps.live.changes();
    let mut limits: Option<Limits> = None;
    debug!(destination = %name, "scheduler started");
    'passes: loop {
        if ctx.stop.is_cancelled() {
            break;
        }
        if ctx.deps.store.paused(&name) {
            // Paused by the operator: nothing is sent until a resume (which wakes us).
            tokio::select! {
                _ = ctx.stop.cancelled() => break,
                _ = wakeup.notified() => continue,
                _ = changed(&mut changes) => continue,
            }
        }
        // What this pass reads of the config is the latest: a swap from now on is seen
        // before each send (and ends the pass).
        changes.borrow_and_update();
        let Some(dest) = ctx.deps.live.get().destination(&name).cloned() else {
            // Not configured (any more): its deliveries wait on disk, and what this instance
            // holds of them goes back to the others (jetstream) that may still send them.
            ctx.deps
                .store
                .hand_back(&name, &|seq| in_flight.contains(seq))
                .await;
            tokio::select! {
                _ = ctx.stop.cancelled() => break,
                _ = changed(&mut changes) => continue,
            }
        };
        let skip = {
            let in_flight = in_flight.clone();
            move |seq: u64| in_flight.contains(seq)
        };
        let part = part(&dest.rate, dest.max_in_flight, ctx.deps.store.share());
        let limits = match &mut limits {
            Some(l) => {
                l.update(part);
                l
            }
            None => limits.insert(Limits::new(part)),
        };
        // A reply route's calls take from the same slots and tokens; on an instance that
        // does not send to the destination too (there, from a sender's part: bounded per
        // instance, where they would not be at all).
        in_flight.status.set_limits(Some(SendLimits {
            slots: limits.slots.clone(),
            limiter: limits.limiter.clone(),
        }));
        if !ctx
            .deps
            .store
            .delivers(senders(&dest.rate, dest.max_in_flight))
        {
            // Boxed: the common path's future stays as small as before.
            if Box::pin(not_a_sender(&ctx, &name, &skip, &mut changes)).await {
                continue;
            }
            break;
        }
        let window = limits
            .max_in_flight
            .saturating_mul(2)
            .clamp(MIN_WINDOW, MAX_WINDOW);
        // An open breaker, or a quiet the destination asked for, sends nothing: what is due
        // is not read while it holds (each accept's commit wakes this pass, and during an
        // outage the backlog grows).
        let gate = in_flight.status.peek(&dest.breaker, now_ms());
        let batch = match gate {
            Gate::WaitUntil(_) | Gate::WaitProbe => Vec::new(),
            Gate::Send | Gate::Probe => match ctx.deps.store.pending(&name, window, &skip).await {
                Ok(b) => b,
                Err(e) => {
                    warn!(destination = %name, error = %e, "reading pending deliveries failed");
                    tokio::select! {
                        _ = ctx.stop.cancelled() => break,
                        _ = tokio::time::sleep(STORE_RETRY) => continue,
                    }
                }
            },
        };
        let full = batch.len() >= window;
        let mut next_due = match gate {
            Gate::WaitUntil(t) => Some(t),
            _ => None,
        };
        for d in batch {
            if ctx.deps.store.paused(&name) {
                break;
            }
            if d.next_due_ms > now_ms() {
                next_due = Some(d.next_due_ms);
                break;
            }
            // The slot first, then the breaker: the attempt that held the slot has told the
            // breaker its outcome before letting go of it, so a breaker it opened is seen here.
            // A reload's new limits (or URL, or pause) apply at once, not after a wait on
            // the old ones: the next pass reads them.
            let permit = tokio::select! {
                biased;
                _ = ctx.stop.cancelled() => break 'passes,
                _ = changed(&mut changes) => continue 'passes,
                p = limits.slot() => p,
            };
            // An open breaker spends no token, nor a destination that asked for quiet
            // (Retry-After).
            match in_flight.status.peek(&dest.breaker, now_ms()) {
                Gate::Send | Gate::Probe => {}
                Gate::WaitUntil(t) => {
                    next_due = Some(t);
                    break;
                }
                Gate::WaitProbe => break,
            }
            tokio::select! {
                biased;
                _ = ctx.stop.cancelled() => break 'passes,
                _ = changed(&mut changes) => continue 'passes,
                _ = limits.limiter.until_ready() => {}
            }
            // Paused, or the config swapped, while this waited for its slot and token: not
            // sent on what it read before (the next pass reads the destination again).
            if ctx.deps.store.paused(&name) || changes.has_changed().unwrap_or(false) {
                break;
            }
            // Its hold lapsed while this waited (a shared store out of reach): another
            // instance may be sending it.
            if !ctx.deps.store.still_held(&name, d.seq) {
                continue;
            }
            // The breaker once the token came: an attempt that failed meanwhile may have
            // opened it (or got a Retry-After). A probe not handed to an attempt (any `break` below) is given back
            // on drop.
            let probing = match in_flight.status.gate(&dest.breaker, now_ms()) {
                Gate::Send => None,
                Gate::Probe => Some(Probing(in_flight.status.clone())),
                Gate::WaitUntil(t) => {
                    next_due = Some(t);
                    break;
                }
                Gate::WaitProbe => break,
            };
            let probe = probing.is_some();
            let guard = in_flight.enter(d.seq);
            ctx.tasks.spawn(attempt(
                ctx.clone(),
                dest.clone(),
                d,
                permit,
                guard,
                probing,
            ));
            if probe {
                info!(destination = %name, "breaker: cool-down over; one attempt probes the destination");
                break;
            }
        }
        if full && next_due.is_none() && !in_flight.status.breaker_open() {
            continue; // more may be due right now
        }
        let sleep = next_due.map(|t| t.saturating_sub(now_ms()));
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => break,
            _ = wakeup.notified() => {}
            _ = in_flight.finished.notified() => {}
            _ = in_flight.status.probe_released() => {}
            _ = changed(&mut changes) => {}
            _ = sleep_ms(sleep) => {}
        }
    }
    in_flight.status.set_limits(None);
    // Stopping: take no more, and give back what no attempt holds (jetstream), so other
    // instances send it while this one finishes its attempts in flight.
    ctx.deps
        .store
        .hand_back(&name, &|seq| in_flight.contains(seq))
        .await;
    debug!(destination = %name, "scheduler stopped");
}

/// An attempt that probes the breaker: if it ends without telling the breaker an outcome
/// (its event could not be read, the relay stopped), dropping this lets the next attempt
/// probe instead of every one waiting for an outcome that never comes.
struct Probing(Arc<DestinationStatus>);

impl Drop for Probing {
    fn drop(&mut self) {
        self.0.probe_abandoned();
    }
}

/// One attempt on one delivery: send, decide, store the outcome.
async fn attempt(
    ctx: Arc<Context>,
    dest: Arc<Destination>,
    d: Delivery,
    permit: OwnedSemaphorePermit,
    guard: InFlightGuard,
    probing: Option<Probing>,
) {
    let key = DeliveryKey {
        seq: d.seq,
        destination: dest.name.clone(),
    };
    let n = d.attempts.saturating_add(1);
    let event = match ctx.deps.store.event(d.seq).await {
        Ok(Some(e)) => e,
        // A damaged event cannot be sent, now or later: dead (listed, replayable once
        // mended), not retried each second, spending the rate and holding its key's line.
        found @ (Ok(None) | Err(StoreError::Corrupt(_))) => {
            let slots = permit.semaphore().clone();
            drop(permit);
            let error = match found {
                Err(e) => format!("the event cannot be read: {e}"),
                _ => "the event is no longer stored".to_string(),
            };
            warn!(destination = %dest.name, seq = d.seq, %error, "delivery dropped as dead");
            let outcome = Outcome::Dead {
                status: None,
                error,
            };
            // Counted, but no request was made: no duration to observe.
            ctx.deps
                .metrics
                .deliveries
                .get_or_create(&crate::metrics::DestinationOutcome {
                    destination: dest.name.clone(),
                    outcome: outcome.word(),
                })
                .inc();
            store_outcome(&ctx, &key, outcome, guard, &slots).await;
            return;
        }
        Err(e) => {
            drop(permit);
            warn!(destination = %dest.name, seq = d.seq, error = %e, "reading the event failed; the delivery stays pending");
            hold(&ctx, guard).await;
            return;
        }
    };
    // The id as its `webhook-id`: bounded, and nothing in it can break a log line.
    let span = info_span!("delivery", destination = %dest.name, event_id = %header_id(&event.id), attempt = n);
    async move {
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            biased;
            _ = ctx.abort.cancelled() => {
                info!("abandoned at shutdown; the delivery stays pending");
                return;
            }
            r = send_once(&ctx.deps.client, &dest, &event, n, dest.timeout) => r,
        };
        let took = started.elapsed();
        let answered_ms = now_ms();
        let outcome = retry::decide(&dest.retry, &d, &result, answered_ms, rand::random::<f64>());
        // Its Retry-After holds the whole destination, not only this delivery: the others
        // would spend attempts on answers it said would be the same. Told before the slot
        // goes, so the next attempt waiting for it sees it.
        if let Some(until) = retry::quiet_until(&dest.retry, &result, answered_ms) {
            guard.set.status.quiet_until(until);
        }
        match &outcome {
            Outcome::Delivered { status } => {
                debug!(status, ms = took.as_millis() as u64, "delivered");
            }
            Outcome::Retry { due_ms, error, .. } => {
                info!(
                    error = %error,
                    retry_in_ms = due_ms.saturating_sub(now_ms()),
                    "attempt failed; will retry"
                );
            }
            Outcome::Dead { error, .. } => {
                warn!(error = %error, "delivery is dead; replay it from the admin API");
            }
        };
        ctx.deps
            .metrics
            .delivery(&dest.name, outcome.word(), took.as_secs_f64());
        super::tell_breaker(
            &*ctx.deps.store,
            &guard.set.status,
            &dest,
            outcome.error(),
            probing.is_some(),
        );
        // The breaker has its outcome: no longer probing (a no-op on drop).
        drop(probing);
        let slots = permit.semaphore().clone();
        drop(permit); // only now: the breaker knows this outcome before the next attempt starts
        store_outcome(&ctx, &key, outcome, guard, &slots).await;
    }
    .instrument(span)
    .await
}

/// Stores an attempt's outcome, trying again (at growing intervals, until abandoned)
/// while the store fails. The delivery stays in flight meanwhile, so it is not sent again:
/// the destination may already have it, and a failed attempt waits its backoff. A shutdown
/// lets it go on trying through its grace; abandoned then, the delivery stays pending and
/// is sent after the restart.
///
/// The attempt let go of its slot in `slots` before the first try (a commit's wait is not
/// the destination's); after a failed one it takes a slot again until the outcome is
/// stored, so while the store fails the scheduler starts no more than `max_in_flight`
/// attempts whose outcomes wait, instead of sending the whole queue.
async fn store_outcome(
    ctx: &Context,
    key: &DeliveryKey,
    outcome: Outcome,
    guard: InFlightGuard,
    slots: &Arc<Semaphore>,
) {
    let mut pause = STORE_RETRY;
    let mut held = None;
    loop {
        let Err(e) = ctx.deps.store.record(key, outcome.clone()).await else {
            break;
        };
        warn!(
            error = %e,
            retry_in_ms = pause.as_millis() as u64,
            "storing the outcome failed; trying again (the delivery is not sent again meanwhile)"
        );
        if held.is_none() {
            held = tokio::select! {
                _ = ctx.abort.cancelled() => break,
                p = slots.clone().acquire_owned() => p.ok(),
            };
        }
        tokio::select! {
            _ = ctx.abort.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_STORE_RETRY);
    }
    drop(guard);
    drop(held);
}

/// Keeps a delivery out of the scheduler's passes for a while after a store failure, so a
/// failing store does not turn into a tight resend loop.
async fn hold(ctx: &Context, guard: InFlightGuard) {
    tokio::select! {
        _ = ctx.stop.cancelled() => {}
        _ = tokio::time::sleep(STORE_RETRY) => {}
    }
    drop(guard);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: f64, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn each_sender_takes_its_part_of_the_limits() {
        let r = rate(30.0, 9);
        // Alone: everything.
        assert_eq!(part(&r, 64, 1), (rate(30.0, 9), 64));
        // Three instances, room for each: a third each.
        assert_eq!(part(&r, 64, 3), (rate(10.0, 3), 21));
        // Fewer requests at once than instances: only that many send, sharing the rate.
        assert_eq!(part(&r, 2, 3), (rate(15.0, 4), 1));
        assert_eq!(part(&r, 1, 3), (rate(30.0, 9), 1));
        // A burst smaller than the instances: as many senders as tokens.
        assert_eq!(senders(&rate(30.0, 2), 64), 2);
        assert_eq!(part(&rate(30.0, 2), 64, 3), (rate(15.0, 1), 32));
        assert_eq!(part(&rate(30.0, 1), 64, 3), (rate(30.0, 1), 64));
    }

    #[test]
    fn a_changed_rate_starts_with_no_burst_to_spend() {
        let mut l = Limits::new((rate(1.0, 10), 4));
        assert!(l
            .limiter
            .check_n(NonZeroU32::new(10).unwrap())
            .unwrap()
            .is_ok());
        // The burst just went out; a reload nudges the rate: no second burst at once.
        l.update((rate(1.1, 10), 4));
        assert!(l.limiter.check().is_err(), "a fresh burst after the reload");
        // The same rate again changes nothing.
        let before = Arc::as_ptr(&l.limiter);
        l.update((rate(1.1, 10), 4));
        assert_eq!(Arc::as_ptr(&l.limiter), before);
    }
}
