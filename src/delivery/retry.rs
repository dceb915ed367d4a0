//! The retry policy: which answers are final, how long to wait before the next attempt, and
//! when to give up.
//!
//! Pure functions over the stored attempt count and times, so a restart resumes the schedule
//! where it was: nothing here keeps state between attempts.
//!
//! - 2xx: delivered. 408, 429, 5xx, connection errors and timeouts: retried. Any other status
//!   (including 3xx: redirects are not followed): dead at once.
//! - The wait after the n-th failed attempt is `first × factor^(n-1)`, capped at `max_delay`,
//!   minus up to [`JITTER`] of itself at random (so it never exceeds the cap, and retries of
//!   many deliveries that failed together spread out).
//! - A `Retry-After` (seconds or HTTP date) on a retried answer raises the wait to at least
//!   what it says.
//! - Dead when `max_attempts` (> 0) attempts were made, or when the next attempt would fall
//!   after `give_up_after` counted from the first attempt of the current retry window.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::config::RetryPolicy;
use crate::store::{Delivery, Outcome};

use super::client::AttemptResult;

/// The largest share of a backoff delay that jitter takes off.
pub const JITTER: f64 = 0.25;

/// What an answer (or its absence) means for the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Delivered,
    Retry,
    Dead,
}

/// The class of an HTTP status.
pub fn classify_status(status: u16) -> Class {
    match status {
        200..=299 => Class::Delivered,
        408 | 429 | 500..=599 => Class::Retry,
        _ => Class::Dead,
    }
}

/// The class of one attempt's result: every failure to get an answer is retried.
pub fn classify(result: &AttemptResult) -> Class {
    match result {
        Ok(answer) => classify_status(answer.status),
        Err(_) => Class::Retry,
    }
}

/// The wait before the next attempt after `failed` failed attempts (1 = the first one
/// failed), without jitter: `first × factor^(failed-1)`, capped at `max_delay` — backon's
/// exponential policy, evaluated at the stored count so a restart resumes the schedule.
pub fn base_delay(policy: &RetryPolicy, failed: u32) -> Duration {
    use backon::BackoffBuilder;
    let cap = longest_delay(policy);
    // The curve is flat once it reaches the cap: no more steps than it takes to get there
    // (a factor near 1 takes many: 1.05 from 1 s to 10 m, 132; `check` takes none below
    // 1.01, so at most some 2,900, from 1 ms to 100 years).
    let factor = policy.factor.max(1.0);
    let to_cap = if factor > 1.0 && !policy.first.is_zero() {
        let steps = (cap.as_secs_f64() / policy.first.as_secs_f64()).ln() / factor.ln();
        steps.ceil().clamp(0.0, 4096.0) as usize + 1
    } else {
        0
    };
    let step = (failed.max(1) as usize - 1).min(to_cap);
    let d = backon::ExponentialBuilder::default()
        .with_min_delay(policy.first)
        .with_factor(factor as f32)
        .with_max_delay(cap)
        .without_max_times()
        .build()
        .nth(step)
        .unwrap_or(cap)
        .min(cap);
    // backon multiplies in f32; whole microseconds drop its rounding noise.
    Duration::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The longest a delivery waits between attempts (`max_delay`, or `first` if larger), and
/// so the longest a destination's `Retry-After` holds it as a whole.
pub fn longest_delay(policy: &RetryPolicy) -> Duration {
    policy.max_delay.max(policy.first)
}

/// [`base_delay`] with jitter: `unit` (in `[0, 1)`, random) takes off up to [`JITTER`].
pub fn backoff(policy: &RetryPolicy, failed: u32, unit: f64) -> Duration {
    let base = base_delay(policy, failed);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    base.mul_f64(1.0 - JITTER * unit)
}

/// A `Retry-After` value: delay-seconds or an HTTP date (then relative to `now`; a date in
/// the past means no wait). `None` when it is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Absurd values saturate; the give-up rule deals with them.
        return Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Until when (unix ms) a destination that answered `result` at `now_ms` asked to be left
/// alone as a whole: a 429 or 503 with a `Retry-After`, held no longer than the policy's
/// `max_delay` (one answer must not stop a destination for days).
pub fn quiet_until(policy: &RetryPolicy, result: &AttemptResult, now_ms: u64) -> Option<u64> {
    let answer = result.as_ref().ok()?;
    if !matches!(answer.status, 429 | 503) {
        return None;
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_millis(now_ms);
    let told = retry_after(&answer.headers, now)?.min(longest_delay(policy));
    Some(now_ms.saturating_add(ms(told)))
}

/// The `Retry-After` of a response, if it has a valid one.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(v, now)
}

/// The most of a description kept (a store's records leave it bounded room).
const DESCRIPTION_MAX: usize = 1024;

/// A short description of a result for the delivery's `last_error` and logs, at most
/// [`DESCRIPTION_MAX`] bytes. Never holds the response body (it may carry anything).
pub fn describe(result: &AttemptResult) -> String {
    let mut what = describe_in_full(result);
    if what.len() > DESCRIPTION_MAX {
        let mut cut = DESCRIPTION_MAX;
        while !what.is_char_boundary(cut) {
            cut -= 1;
        }
        what.truncate(cut);
    }
    what
}

fn describe_in_full(result: &AttemptResult) -> String {
    match result {
        Ok(a) => match http::StatusCode::from_u16(a.status)
            .ok()
            .and_then(|s| s.canonical_reason())
        {
            Some(reason) => format!("HTTP {} {reason}", a.status),
            None => format!("HTTP {}", a.status),
        },
        Err(e) => e.to_string(),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The outcome to store for an attempt on `delivery` (as it was before the attempt) that
/// gave `result`. `now_ms` is when the answer came; `unit` is the jitter draw in `[0, 1)`.
pub fn decide(
    policy: &RetryPolicy,
    delivery: &Delivery,
    result: &AttemptResult,
    now_ms: u64,
    unit: f64,
) -> Outcome {
    let status = result.as_ref().ok().map(|a| a.status);
    let what = describe(result);
    match classify(result) {
        Class::Delivered => Outcome::Delivered {
            status: status.unwrap_or(200),
        },
        Class::Dead => Outcome::Dead {
            status,
            error: format!("{what}: not retried"),
        },
        Class::Retry => {
            // Counted from the current retry window (a replay starts a new one).
            let failed = delivery
                .attempts
                .saturating_sub(delivery.window_base)
                .saturating_add(1);
            if policy.max_attempts > 0 && failed >= policy.max_attempts {
                return Outcome::Dead {
                    status,
                    error: format!("{what}; gave up after {failed} attempts (max_attempts)"),
                };
            }
            let mut wait = backoff(policy, failed, unit);
            let told = match result {
                Ok(a) => {
                    let now = SystemTime::UNIX_EPOCH + Duration::from_millis(now_ms);
                    retry_after(&a.headers, now)
                }
                Err(_) => None,
            };
            let told_ms = told.map(|t| now_ms.saturating_add(ms(t)));
            if let Some(told) = told {
                wait = wait.max(told);
            }
            let window_start = delivery.first_attempt_ms.unwrap_or(now_ms);
            let deadline = window_start.saturating_add(ms(policy.give_up_after));
            // Tried until `give_up_after` is up: a backoff that would pass the deadline
            // makes the last attempt at it. Dead once it is up, or when the destination's
            // own Retry-After falls past it (not retried earlier than it asked).
            let due_ms = now_ms.saturating_add(ms(wait)).min(deadline);
            if now_ms >= deadline || told_ms.is_some_and(|t| t > deadline) {
                return Outcome::Dead {
                    status,
                    error: format!(
                        "{what}; gave up after {failed} attempts (give_up_after {})",
                        humantime::format_duration(policy.give_up_after)
                    ),
                };
            }
            Outcome::Retry {
                due_ms,
                status,
                error: what,
                attempt: Some(delivery.attempts.saturating_add(1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::client::{Answer, SendError};
    use crate::store::DeliveryState;
    use bytes::Bytes;
    use http::HeaderValue;

    #[test]
    fn a_long_error_is_kept_short_at_a_char_boundary() {
        // "request failed: " is 16 bytes: the 2-byte 'é' straddles the limit.
        let long = format!("{}é", "x".repeat(DESCRIPTION_MAX - 16 - 1));
        let what = describe(&Err(SendError::Request(long)));
        assert_eq!(what.len(), DESCRIPTION_MAX - 1, "cut before the 'é'");
        assert!(what.starts_with("request failed: xxx"), "{what}");
        assert!(what.ends_with('x'), "{what}");
        let short = describe(&Err(SendError::Connect("refused".into())));
        assert_eq!(short, "connection failed: refused");
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            first: Duration::from_millis(100),
            factor: 2.0,
            max_delay: Duration::from_secs(1),
            give_up_after: Duration::from_secs(60),
            max_attempts: 0,
        }
    }

    fn delivery(attempts: u32, first_attempt_ms: Option<u64>) -> Delivery {
        Delivery {
            seq: 1,
            destination: "d".into(),
            state: DeliveryState::Pending,
            attempts,
            window_base: 0,
            first_attempt_ms,
            next_due_ms: 0,
            last_status: None,
            last_error: None,
            updated_ms: 0,
            order_key: None,
            waiting: false,
        }
    }

    #[test]
    fn a_429_or_503_with_retry_after_quiets_the_destination_up_to_max_delay() {
        let p = policy(); // max_delay 1 s
        let now = 1_000_000;
        let told = |status, after| quiet_until(&p, &answer(status, &[("retry-after", after)]), now);
        assert_eq!(told(429, "0"), Some(now));
        assert_eq!(
            quiet_until(
                &RetryPolicy {
                    max_delay: Duration::from_secs(60),
                    ..p.clone()
                },
                &answer(503, &[("retry-after", "2")]),
                now
            ),
            Some(now + 2_000)
        );
        assert_eq!(told(429, "3600"), Some(now + 1_000), "capped at max_delay");
        assert_eq!(told(500, "2"), None, "only 429 and 503");
        assert_eq!(
            quiet_until(&p, &answer(429, &[]), now),
            None,
            "no Retry-After"
        );
        assert_eq!(told(429, "soon"), None, "unreadable");
        assert_eq!(
            quiet_until(&p, &Err(SendError::Connect("refused".into())), now),
            None
        );
    }

    fn answer(status: u16, headers: &[(&str, &str)]) -> AttemptResult {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        Ok(Answer {
            status,
            content_type: None,
            headers: h,
            body: Bytes::new(),
            truncated: false,
        })
    }

    #[test]
    fn classes() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(classify_status(s), Class::Delivered, "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(classify_status(s), Class::Retry, "{s}");
        }
        for s in [
            100, 301, 302, 304, 400, 401, 403, 404, 405, 409, 410, 413, 422,
        ] {
            assert_eq!(classify_status(s), Class::Dead, "{s}");
        }
        assert_eq!(
            classify(&Err(SendError::Timeout(Duration::from_secs(1)))),
            Class::Retry
        );
        assert_eq!(
            classify(&Err(SendError::Connect("refused".into()))),
            Class::Retry
        );
        assert_eq!(
            classify(&Err(SendError::Request("reset".into()))),
            Class::Retry
        );
    }

    #[test]
    fn backoff_grows_by_factor_and_caps() {
        let p = policy();
        let got: Vec<u128> = (1..=8).map(|n| base_delay(&p, n).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        // Huge attempt counts neither overflow nor exceed the cap.
        assert_eq!(base_delay(&p, u32::MAX), Duration::from_secs(1));
        // factor 1: constant.
        let flat = RetryPolicy { factor: 1.0, ..p };
        assert_eq!(base_delay(&flat, 7), Duration::from_millis(100));
        // A factor near 1 reaches the cap too, after many steps (1 s × 1.05^132 > 10 m);
        // it once stopped growing at the 64th (~21.6 s).
        let slow = RetryPolicy {
            first: Duration::from_secs(1),
            factor: 1.05,
            max_delay: Duration::from_secs(600),
            ..p
        };
        assert_eq!(base_delay(&slow, 200), Duration::from_secs(600));
        assert_eq!(base_delay(&slow, u32::MAX), Duration::from_secs(600));
        let d100 = base_delay(&slow, 100).as_secs_f64();
        assert!((d100 - 1.05f64.powi(99)).abs() < 0.01 * d100, "{d100}");
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let p = policy();
        for n in 1..=10 {
            let base = base_delay(&p, n);
            assert_eq!(backoff(&p, n, 0.0), base);
            let low = base.mul_f64(1.0 - JITTER);
            for i in 0..100 {
                let d = backoff(&p, n, i as f64 / 100.0);
                assert!(d <= base && d >= low, "n={n} d={d:?} base={base:?}");
                assert!(d <= p.max_delay);
            }
            let d = backoff(&p, n, rand::random::<f64>());
            assert!(d <= base && d >= low);
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn decide_outcomes() {
        let p = policy();
        let now = 1_000_000;
        assert_eq!(
            decide(&p, &delivery(0, None), &answer(204, &[]), now, 0.5),
            Outcome::Delivered { status: 204 }
        );
        match decide(&p, &delivery(0, None), &answer(400, &[]), now, 0.5) {
            Outcome::Dead { status, error } => {
                assert_eq!(status, Some(400));
                assert!(error.contains("HTTP 400"), "{error}");
            }
            o => panic!("{o:?}"),
        }
        // Third failure: 400 ms base, jitter takes at most 25 %.
        match decide(
            &p,
            &delivery(2, Some(now - 300)),
            &answer(503, &[]),
            now,
            0.99,
        ) {
            Outcome::Retry { due_ms, status, .. } => {
                assert_eq!(status, Some(503));
                assert!((now + 300..=now + 400).contains(&due_ms), "{due_ms}");
            }
            o => panic!("{o:?}"),
        }
        match decide(
            &p,
            &delivery(0, None),
            &Err(SendError::Connect("refused".into())),
            now,
            0.0,
        ) {
            Outcome::Retry {
                due_ms,
                status,
                error,
                attempt,
            } => {
                assert_eq!(due_ms, now + 100);
                assert_eq!(attempt, Some(1));
                assert_eq!(status, None);
                assert!(error.contains("refused"), "{error}");
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn retry_after_raises_the_delay_never_lowers_it() {
        let p = policy();
        let now = 1_700_000_000_000;
        match decide(
            &p,
            &delivery(0, None),
            &answer(429, &[("retry-after", "2")]),
            now,
            0.0,
        ) {
            Outcome::Retry { due_ms, .. } => assert_eq!(due_ms, now + 2000),
            o => panic!("{o:?}"),
        }
        // A date 3 s ahead.
        let date = httpdate::fmt_http_date(
            SystemTime::UNIX_EPOCH + Duration::from_millis(now) + Duration::from_secs(3),
        );
        match decide(
            &p,
            &delivery(0, None),
            &answer(503, &[("retry-after", &date)]),
            now,
            0.0,
        ) {
            Outcome::Retry { due_ms, .. } => assert_eq!(due_ms, now + 3000),
            o => panic!("{o:?}"),
        }
        // Shorter than the backoff: the backoff wins.
        match decide(
            &p,
            &delivery(3, Some(now)),
            &answer(429, &[("retry-after", "0")]),
            now,
            0.0,
        ) {
            Outcome::Retry { due_ms, .. } => assert_eq!(due_ms, now + 800),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn gives_up_by_count_and_by_time() {
        let now = 10_000_000;
        let counted = RetryPolicy {
            max_attempts: 3,
            ..policy()
        };
        assert!(matches!(
            decide(
                &counted,
                &delivery(1, Some(now)),
                &answer(500, &[]),
                now,
                0.0
            ),
            Outcome::Retry { .. }
        ));
        match decide(
            &counted,
            &delivery(2, Some(now)),
            &answer(500, &[]),
            now,
            0.0,
        ) {
            Outcome::Dead { error, .. } => assert!(error.contains("3 attempts"), "{error}"),
            o => panic!("{o:?}"),
        }
        let timed = RetryPolicy {
            give_up_after: Duration::from_secs(10),
            ..policy()
        };
        // 9.5 s into the window, the next retry (>= 750 ms) would fall after 10 s: the
        // last one is made at 10 s; failing then, the time is up.
        match decide(
            &timed,
            &delivery(5, Some(now - 9_500)),
            &answer(503, &[]),
            now,
            0.0,
        ) {
            Outcome::Retry { due_ms, .. } => assert_eq!(due_ms, now + 500),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            decide(
                &timed,
                &delivery(6, Some(now - 10_000)),
                &answer(503, &[]),
                now,
                0.0
            ),
            Outcome::Dead { .. }
        ));
        assert!(matches!(
            decide(
                &timed,
                &delivery(5, Some(now - 5_000)),
                &answer(503, &[]),
                now,
                0.0
            ),
            Outcome::Retry { .. }
        ));
        // A Retry-After past the deadline gives up rather than retry early.
        assert!(matches!(
            decide(
                &timed,
                &delivery(0, None),
                &answer(429, &[("retry-after", "3600")]),
                now,
                0.0
            ),
            Outcome::Dead { .. }
        ));
    }

    #[test]
    fn a_replay_starts_a_new_retry_window() {
        let mut p = policy();
        p.max_attempts = 2;
        let mut d = delivery(7, None);
        d.window_base = 7; // replayed after 7 attempts
        let busy = answer(503, &[]);
        match decide(&p, &d, &busy, 1_000, 0.0) {
            Outcome::Retry { due_ms, .. } => {
                assert_eq!(due_ms, 1_000 + base_delay(&p, 1).as_millis() as u64)
            }
            o => panic!("a replayed delivery gets its own attempts: {o:?}"),
        }
    }
}
