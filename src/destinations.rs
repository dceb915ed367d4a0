//! What the delivery side knows of each destination right now, for the admin API and the
//! console: requests in flight, consecutive failed attempts, the last error, and its
//! breaker (CONTRACT §8). Written by the schedulers, read by the admin listener; kept in
//! memory only (a restart starts closed and at zero, while pauses, which are the
//! operator's decision, live in the store).
//!
//! The breaker: after `failures` consecutive failed (non-2xx) attempts it opens and nothing
//! is sent for `cool_down`; then one attempt probes: a 2xx closes it, a failure opens it
//! again. Deliveries wait meanwhile: no attempt is spent, nothing is made dead. Instances
//! sharing a store (JetStream) tell each other when theirs opens or closes
//! ([`DestinationStatus::peer_breaker`]): the others hold off too, for as long as the
//! opener's probe may take to say otherwise, and leave the probe to it. A hold nobody
//! renews (the opener gone, its news lost) lapses: the instance sends, and its own
//! failures open its own breaker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use governor::DefaultDirectRateLimiter;
use tokio::sync::Semaphore;

use crate::config::Breaker;

/// What a destination's scheduler sends under: its in-flight slots and its rate limiter
/// (this instance's part of them). A reply route's call takes from the same.
#[derive(Clone)]
pub struct SendLimits {
    pub slots: Arc<Semaphore>,
    pub limiter: Arc<DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for SendLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SendLimits")
    }
}

/// One destination's live figures.
#[derive(Debug, Default)]
pub struct DestinationStatus {
    in_flight: AtomicU64,
    consecutive_failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    breaker: Mutex<BreakerState>,
    /// The config in force turns the breaker off (`failures = 0`): an attempt that started
    /// under an older config, with it on, does not open it.
    breaker_off: AtomicBool,
    /// Set by the scheduler while this instance sends to the destination.
    limits: Mutex<Option<SendLimits>>,
    /// Told when a probe ends without an outcome, so the scheduler waiting on it probes
    /// again at once instead of at the next event.
    probe_released: tokio::sync::Notify,
    /// Until when (unix ms) the destination asked for quiet (a 429 or 503 with
    /// `Retry-After`): nothing is sent to it before then, and no attempt is spent.
    quiet_until_ms: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    #[default]
    Closed,
    /// Opened at this time (ms): nothing is sent for the breaker's `cool_down` in force
    /// (a reload that shortens it applies to a breaker already open).
    Open { since_ms: u64 },
    /// One attempt is out to probe the destination.
    Probing,
    /// Another instance's breaker is open: it probes after `cool_down` and says whether
    /// that closed it (a failed probe renews this). This one sends nothing until this time
    /// (ms, by its own clock), and is closed after it.
    PeerOpen { until_ms: u64 },
}

/// When a breaker opened at `since_ms` lets a probe go.
fn reopens(since_ms: u64, breaker: &Breaker) -> u64 {
    since_ms.saturating_add(breaker.cool_down.as_millis() as u64)
}

/// What a breaker in `state` lets an attempt do at `now_ms` under `breaker`.
fn gate_of(state: BreakerState, breaker: &Breaker, now_ms: u64) -> Gate {
    match state {
        _ if breaker.failures == 0 => Gate::Send,
        BreakerState::Closed => Gate::Send,
        BreakerState::Open { since_ms } if now_ms < reopens(since_ms, breaker) => {
            Gate::WaitUntil(reopens(since_ms, breaker))
        }
        BreakerState::Open { .. } => Gate::Probe,
        BreakerState::PeerOpen { until_ms } if now_ms < until_ms => Gate::WaitUntil(until_ms),
        BreakerState::PeerOpen { .. } => Gate::Send,
        BreakerState::Probing => Gate::WaitProbe,
    }
}

/// What the breaker lets the scheduler do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Send,
    /// Send this one only: it probes the destination.
    Probe,
    /// Send nothing before this time (ms).
    WaitUntil(u64),
    /// Send nothing until the probe's outcome.
    WaitProbe,
}

/// A change of the breaker's state, to be logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Opened,
    Reopened,
    Closed,
}

impl DestinationStatus {
    /// The destination asked for quiet until `until_ms` (a later ask extends it).
    pub fn quiet_until(&self, until_ms: u64) {
        self.quiet_until_ms.fetch_max(until_ms, Ordering::Relaxed);
    }

    /// A reload's `max_delay` bounds a quiet already asked for: it ends by `latest_ms`.
    pub fn quiet_at_most(&self, latest_ms: u64) {
        self.quiet_until_ms.fetch_min(latest_ms, Ordering::Relaxed);
    }

    /// When sending may resume, if the destination asked for quiet past `now_ms`.
    pub fn quiet(&self, now_ms: u64) -> Option<u64> {
        let until = self.quiet_until_ms.load(Ordering::Relaxed);
        (until > now_ms).then_some(until)
    }

    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished(&self) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// What `breaker` (and a quiet the destination asked for, first) would let the
    /// scheduler do at `now_ms`, changing nothing (a probe [`gate`](Self::gate) would hand
    /// out is not taken).
    pub fn peek(&self, breaker: &Breaker, now_ms: u64) -> Gate {
        if let Some(t) = self.quiet(now_ms) {
            return Gate::WaitUntil(t);
        }
        gate_of(*self.breaker.lock().unwrap(), breaker, now_ms)
    }

    /// What `breaker` (and a quiet the destination asked for, first) lets the scheduler do
    /// at `now_ms`: a probe it lets go is taken.
    pub fn gate(&self, breaker: &Breaker, now_ms: u64) -> Gate {
        if let Some(t) = self.quiet(now_ms) {
            return Gate::WaitUntil(t);
        }
        let mut state = self.breaker.lock().unwrap();
        let gate = gate_of(*state, breaker, now_ms);
        match gate {
            // Turned off, or another instance's hold lapsed: closed.
            Gate::Send if breaker.failures == 0 || *state != BreakerState::Closed => {
                *state = BreakerState::Closed
            }
            Gate::Probe => *state = BreakerState::Probing,
            _ => {}
        }
        gate
    }

    /// Whether [`gate`](Self::gate) would let an attempt go at `now_ms` (send or probe),
    /// changing nothing.
    pub fn would_send(&self, breaker: &Breaker, now_ms: u64) -> bool {
        matches!(self.peek(breaker, now_ms), Gate::Send | Gate::Probe)
    }

    /// Whether the config in force turns the breaker on (`failures > 0`). Turned off, an
    /// open breaker closes now, not when an attempt next passes it; returns whether it did.
    pub fn set_breaker_on(&self, on: bool) -> bool {
        self.breaker_off.store(!on, Ordering::Relaxed);
        let mut state = self.breaker.lock().unwrap();
        if on || *state == BreakerState::Closed {
            return false;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        *state = BreakerState::Closed;
        true
    }

    /// An attempt was delivered (`error` is `None`) or failed with `error`, at `now_ms`;
    /// `probe` says whether it was the breaker's probe. Returns the breaker's change of
    /// state, if any. While the breaker is open only its probe's outcome decides: any other
    /// attempt ending then was sent before it opened, and neither closes it (the cool-down
    /// would not be kept) nor opens it again (a second probe could go out beside the first).
    pub fn outcome(
        &self,
        error: Option<&str>,
        probe: bool,
        breaker: &Breaker,
        now_ms: u64,
    ) -> Option<Change> {
        *self.last_error.lock().unwrap() = error.map(str::to_string);
        let mut state = self.breaker.lock().unwrap();
        let held = match *state {
            BreakerState::Closed => false,
            BreakerState::Open { .. } | BreakerState::Probing => !probe,
            // Held by another instance's breaker: the opener's probe decides, not this.
            BreakerState::PeerOpen { until_ms } => now_ms < until_ms,
        };
        let Some(_) = error else {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            if held {
                return None;
            }
            let was = std::mem::take(&mut *state);
            return (was != BreakerState::Closed).then_some(Change::Closed);
        };
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let open = BreakerState::Open { since_ms: now_ms };
        match *state {
            _ if breaker.failures == 0 || self.breaker_off.load(Ordering::Relaxed) => None,
            BreakerState::Probing if probe => {
                *state = open;
                Some(Change::Reopened)
            }
            BreakerState::Closed if failures >= u64::from(breaker.failures) => {
                *state = open;
                Some(Change::Opened)
            }
            _ => None,
        }
    }

    /// Another instance sharing the store says its breaker for this destination opened
    /// (`open`; this one then holds off until `until_ms`, by its own clock) or closed;
    /// returns this one's change of state. Closed there (its probe got a 2xx), closed here
    /// too, unless a probe of this one's is out: its outcome decides.
    pub fn peer_breaker(&self, open: bool, until_ms: u64, breaker: &Breaker) -> Option<Change> {
        if breaker.failures == 0 || self.breaker_off.load(Ordering::Relaxed) {
            return None;
        }
        let mut state = self.breaker.lock().unwrap();
        match (open, *state) {
            (_, BreakerState::Probing) => None,
            (true, BreakerState::Closed) => {
                *state = BreakerState::PeerOpen { until_ms };
                Some(Change::Opened)
            }
            (true, BreakerState::PeerOpen { until_ms: was }) => {
                *state = BreakerState::PeerOpen {
                    until_ms: until_ms.max(was),
                };
                None
            }
            // Open here as well: this one probes after its own cool-down.
            (true, BreakerState::Open { .. }) => None,
            (false, BreakerState::Closed) => None,
            (false, BreakerState::Open { .. } | BreakerState::PeerOpen { .. }) => {
                *state = BreakerState::Closed;
                self.consecutive_failures.store(0, Ordering::Relaxed);
                Some(Change::Closed)
            }
        }
    }

    /// A probe ended without an outcome (its request was dropped): the next attempt probes.
    pub fn probe_abandoned(&self) {
        let mut state = self.breaker.lock().unwrap();
        if *state == BreakerState::Probing {
            *state = BreakerState::Open { since_ms: 0 };
            self.probe_released.notify_one();
        }
    }

    /// Resolves once a probe has ended without an outcome (at once if one did since the
    /// last wait).
    pub async fn probe_released(&self) {
        self.probe_released.notified().await;
    }

    /// Whether the breaker is open (or probing): the destination's state is `open`.
    pub fn breaker_open(&self) -> bool {
        match *self.breaker.lock().unwrap() {
            BreakerState::Closed => false,
            BreakerState::PeerOpen { until_ms } => crate::clock::now_ms() < until_ms,
            BreakerState::Open { .. } | BreakerState::Probing => true,
        }
    }

    /// The scheduler's limits now (`None`: this instance does not send to it).
    pub fn limits(&self) -> Option<SendLimits> {
        self.limits.lock().unwrap().clone()
    }

    pub fn set_limits(&self, limits: Option<SendLimits>) {
        *self.limits.lock().unwrap() = limits;
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn consecutive_failures(&self) -> u64 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap().clone()
    }
}

/// Logs a change of `destination`'s breaker.
pub fn log_change(change: Option<Change>, destination: &str, breaker: &Breaker) {
    match change {
        Some(Change::Opened) => tracing::warn!(
            destination,
            failures = breaker.failures,
            cool_down = ?breaker.cool_down,
            "breaker open: nothing is sent to this destination during the cool-down"
        ),
        Some(Change::Reopened) => tracing::warn!(
            destination,
            cool_down = ?breaker.cool_down,
            "breaker: the probe failed; open again"
        ),
        Some(Change::Closed) => {
            tracing::info!(destination, "breaker closed: the destination answers again")
        }
        None => {}
    }
}

/// Every destination's status, by name.
#[derive(Debug, Default)]
pub struct Statuses(RwLock<HashMap<String, Arc<DestinationStatus>>>);

impl Statuses {
    pub fn of(&self, name: &str) -> Arc<DestinationStatus> {
        if let Some(s) = self.0.read().unwrap().get(name) {
            return s.clone();
        }
        self.0
            .write()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_quiet_asked_for_is_extended_by_a_later_ask_and_bounded_by_a_reload() {
        let s = DestinationStatus::default();
        assert_eq!(s.quiet(1_000), None);
        s.quiet_until(5_000);
        s.quiet_until(3_000);
        assert_eq!(
            s.quiet(1_000),
            Some(5_000),
            "a shorter ask does not shorten it"
        );
        assert_eq!(s.quiet(5_000), None, "over at its time");
        s.quiet_at_most(2_000);
        assert_eq!(
            s.quiet(1_000),
            Some(2_000),
            "a reload's max_delay bounds it"
        );
        // The scheduler and reply calls see it through the breaker's gate, on or off.
        let off = Breaker {
            failures: 0,
            cool_down: Duration::from_secs(1),
        };
        assert_eq!(s.gate(&off, 1_000), Gate::WaitUntil(2_000));
        assert!(!s.would_send(&off, 1_000));
        assert_eq!(s.gate(&off, 2_000), Gate::Send);
    }

    #[test]
    fn a_reloaded_cool_down_applies_to_a_breaker_already_open() {
        let hour = Breaker {
            failures: 1,
            cool_down: Duration::from_secs(3600),
        };
        let s = DestinationStatus::default();
        assert_eq!(
            s.outcome(Some("HTTP 503"), false, &hour, 1000),
            Some(Change::Opened)
        );
        assert_eq!(s.gate(&hour, 2000), Gate::WaitUntil(3_601_000));
        let second = Breaker {
            cool_down: Duration::from_secs(1),
            ..hour
        };
        assert!(s.would_send(&second, 2000));
        assert_eq!(s.gate(&second, 2000), Gate::Probe);
    }

    #[test]
    fn opens_after_n_failures_waits_probes_once_and_closes_on_success() {
        let b = Breaker {
            failures: 3,
            cool_down: Duration::from_secs(1),
        };
        let s = DestinationStatus::default();
        assert_eq!(s.outcome(Some("HTTP 503"), false, &b, 0), None);
        assert_eq!(s.outcome(Some("HTTP 503"), false, &b, 0), None);
        assert_eq!(s.gate(&b, 0), Gate::Send);
        assert_eq!(
            s.outcome(Some("HTTP 503"), false, &b, 10),
            Some(Change::Opened)
        );
        assert!(s.breaker_open());
        assert_eq!(s.gate(&b, 500), Gate::WaitUntil(1010));
        assert_eq!(s.gate(&b, 1010), Gate::Probe);
        assert_eq!(s.gate(&b, 1011), Gate::WaitProbe, "one probe at a time");
        assert_eq!(
            s.outcome(Some("timeout"), true, &b, 1100),
            Some(Change::Reopened)
        );
        assert_eq!(s.gate(&b, 1200), Gate::WaitUntil(2100));
        assert_eq!(s.gate(&b, 2100), Gate::Probe);
        assert_eq!(s.outcome(None, true, &b, 2150), Some(Change::Closed));
        assert!(!s.breaker_open());
        assert_eq!(s.consecutive_failures(), 0);
        assert_eq!(s.gate(&b, 2151), Gate::Send);
    }

    #[test]
    fn only_the_probe_settles_an_open_breaker() {
        let b = Breaker {
            failures: 2,
            cool_down: Duration::from_secs(1),
        };
        let s = DestinationStatus::default();
        assert_eq!(s.outcome(Some("HTTP 503"), false, &b, 0), None);
        assert_eq!(
            s.outcome(Some("HTTP 503"), false, &b, 10),
            Some(Change::Opened)
        );
        // Attempts sent before it opened end now: a 2xx does not close it, a failure does
        // not restart the cool-down.
        assert_eq!(s.outcome(None, false, &b, 20), None);
        assert_eq!(s.outcome(Some("HTTP 503"), false, &b, 30), None);
        assert!(s.breaker_open());
        assert_eq!(s.gate(&b, 500), Gate::WaitUntil(1010));
        assert_eq!(s.gate(&b, 1010), Gate::Probe);
        // While the probe is out, a late failure neither reopens it nor lets a second
        // probe go; a late 2xx does not close it.
        assert_eq!(s.outcome(Some("timeout"), false, &b, 1020), None);
        assert_eq!(s.outcome(None, false, &b, 1030), None);
        assert_eq!(s.gate(&b, 2100), Gate::WaitProbe, "one probe at a time");
        assert_eq!(s.outcome(None, true, &b, 2150), Some(Change::Closed));
        assert_eq!(s.gate(&b, 2151), Gate::Send);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_attempt_probe() {
        let b = Breaker {
            failures: 1,
            cool_down: Duration::from_secs(1),
        };
        let s = DestinationStatus::default();
        assert_eq!(
            s.outcome(Some("HTTP 503"), false, &b, 0),
            Some(Change::Opened)
        );
        assert_eq!(s.gate(&b, 1000), Gate::Probe);
        assert_eq!(s.gate(&b, 1001), Gate::WaitProbe);
        s.probe_abandoned();
        assert_eq!(s.gate(&b, 1002), Gate::Probe, "not stuck waiting for it");
        assert!(s.breaker_open());
    }

    #[test]
    fn another_instances_breaker_holds_this_one_until_its_probe_or_the_hold_lapses() {
        let b = Breaker {
            failures: 3,
            cool_down: Duration::from_secs(1),
        };
        let s = DestinationStatus::default();
        // Opened elsewhere: nothing sent here until 2100, no probe of ours.
        assert_eq!(s.peer_breaker(true, 2100, &b), Some(Change::Opened));
        assert_eq!(s.gate(&b, 500), Gate::WaitUntil(2100));
        assert!(!s.would_send(&b, 1100));
        // Its probe failed: the hold is renewed, never shortened.
        assert_eq!(s.peer_breaker(true, 3150, &b), None);
        assert_eq!(s.peer_breaker(true, 1000, &b), None);
        assert_eq!(s.gate(&b, 2200), Gate::WaitUntil(3150));
        // An attempt of ours from before the opening succeeds: the probe decides, not it.
        assert_eq!(s.outcome(None, false, &b, 2300), None);
        assert_eq!(s.gate(&b, 2400), Gate::WaitUntil(3150));
        // Its next probe closed it: closed here too.
        assert_eq!(s.peer_breaker(false, 0, &b), Some(Change::Closed));
        assert_eq!(s.gate(&b, 2500), Gate::Send);
        assert_eq!(s.peer_breaker(false, 0, &b), None, "closed already");
        // No renewal (the opener gone): the hold lapses, and this one sends.
        assert_eq!(s.peer_breaker(true, 5000, &b), Some(Change::Opened));
        assert_eq!(s.gate(&b, 5000), Gate::Send);
        assert_eq!(s.gate(&b, 5001), Gate::Send, "closed now");
        // Its own failures open its own breaker, and its probe is its own.
        for _ in 0..2 {
            assert_eq!(s.outcome(Some("HTTP 503"), false, &b, 5100), None);
        }
        assert_eq!(
            s.outcome(Some("HTTP 503"), false, &b, 5100),
            Some(Change::Opened)
        );
        assert_eq!(s.peer_breaker(true, 9000, &b), None, "open here already");
        assert_eq!(s.gate(&b, 6100), Gate::Probe);
        // News waits for the outcome of a probe of its own.
        assert_eq!(s.peer_breaker(false, 0, &b), None);
        assert_eq!(s.gate(&b, 6101), Gate::WaitProbe);
        assert_eq!(s.outcome(None, true, &b, 6200), Some(Change::Closed));
        // The breaker off: news changes nothing.
        let off = Breaker {
            failures: 0,
            cool_down: Duration::from_secs(1),
        };
        assert_eq!(s.peer_breaker(true, 9000, &off), None);
        assert!(!s.breaker_open());
    }

    #[test]
    fn failures_zero_is_off() {
        let b = Breaker {
            failures: 0,
            cool_down: Duration::from_secs(1),
        };
        let s = DestinationStatus::default();
        for _ in 0..100 {
            assert_eq!(s.outcome(Some("HTTP 503"), false, &b, 0), None);
        }
        assert_eq!(s.gate(&b, 0), Gate::Send);
        assert_eq!(s.consecutive_failures(), 100);
    }

    #[test]
    fn a_config_turning_the_breaker_off_closes_it_and_keeps_it_closed() {
        let on = Breaker {
            failures: 1,
            cool_down: Duration::from_secs(1),
        };
        let s = DestinationStatus::default();
        assert_eq!(
            s.outcome(Some("HTTP 503"), false, &on, 0),
            Some(Change::Opened)
        );
        assert!(s.set_breaker_on(false), "it was open");
        assert!(!s.breaker_open());
        assert_eq!(s.consecutive_failures(), 0);
        // An attempt started under the old config fails: the breaker stays closed.
        assert_eq!(s.outcome(Some("HTTP 503"), false, &on, 10), None);
        assert!(
            !s.set_breaker_on(false),
            "closed already: counts are left alone"
        );
        assert_eq!(s.consecutive_failures(), 1);
        // On again, the next failure opens it.
        assert!(!s.set_breaker_on(true));
        assert_eq!(
            s.outcome(Some("HTTP 503"), false, &on, 20),
            Some(Change::Opened)
        );
    }
}
