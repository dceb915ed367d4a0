//! The delivery engine against CONTRACT.md §4: fan-out, headers and signatures, retries and
//! `Retry-After`, dead letters and replay, restarts mid-schedule, rate and in-flight limits.
//! Every relay and sink runs in this process on 127.0.0.1:0; every wait is bounded.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use hmac::{KeyInit, Mac};
use hookrelay::config::{Breaker, Destination, Rate, RetryPolicy};
use hookrelay::delivery::{send_once, HttpClient, SendError};
use hookrelay::store::{DeliveryState, ReplaySelector, StoredEvent};
use support::{post, start_relay, stop_relay, wait_state, Reply, Sink};

const CALL_STATUS_ID: &str = "eb0fc709-9693-11ea-454d-1705dde98182";

fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/payloads")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A config with the `voice` (8x8, id from `$.payload.eventId`) and `open` (id = body hash)
/// sources, short retries by default, and `destinations` + `routes` appended.
fn config(rest: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "5s"

[store]
path = "data"

[delivery]
timeout = "2s"
retry = {{ first = "50ms", factor = 2.0, max_delay = "1s", give_up_after = "1m" }}

[[sources]]
name = "voice"
path = "/8x8/voice"
event_id = ["$.payload.eventId"]

[[sources]]
name = "open"
path = "/open"
{rest}
"#
    )
}

/// One destination `d` at `url` with extra settings, fed by the `open` source.
fn one_destination(url: &str, settings: &str) -> String {
    config(&format!(
        r#"
[[destinations]]
name = "d"
url = "{url}"
{settings}

[[routes]]
name = "all"
source = "open"
to = ["d"]
"#
    ))
}

/// Posts `{"n":i}` to the `open` source; returns the event id.
async fn post_open(relay: &hookrelay::Relay, i: usize) -> String {
    let (status, v) = post(
        relay,
        "/open",
        "application/json",
        format!(r#"{{"n":{i}}}"#).as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["deliveries"], 1, "{v}");
    v["id"].as_str().unwrap().to_string()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `v1,<base64 HMAC-SHA256(key, "id.ts.body")>`, computed here rather than by the crate.
fn expected_signature(key: &[u8], id: &str, ts: &str, body: &[u8]) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn fan_out_sends_identical_bytes_and_all_headers() {
    let calls = Sink::always(200).await;
    let analytics = Sink::always(204).await;
    let key = b"a signing key of 32 bytes, random";
    let toml = config(&format!(
        r#"
[[destinations]]
name = "calls"
url = "{}"
headers = {{ "X-Api-Key" = "calls-key", "User-Agent" = "acme/1" }}
sign = {{ secret = "whsec_{}" }}

[[destinations]]
name = "analytics"
url = "{}"

[[routes]]
name = "voice-status"
source = "voice"
match = {{ namespace = "VOICE", eventType = "CALL_STATUS" }}
to = ["calls", "analytics"]
"#,
        calls.url("/hooks"),
        STANDARD.encode(key),
        analytics.url("/ingest"),
    ));
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &toml).await;
    let body = fixture("8x8/voice-call-status.json");
    let before = unix_now();
    let content_type = "application/json; charset=utf-8";
    let (status, v) = post(&relay, "/8x8/voice", content_type, &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["id"], CALL_STATUS_ID);
    assert_eq!(v["deliveries"], 2);

    let a = calls.wait_for(1).await.remove(0);
    let b = analytics.wait_for(1).await.remove(0);
    let after = unix_now();
    for (seen, path) in [(&a, "/hooks"), (&b, "/ingest")] {
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.path, path);
        assert_eq!(seen.body, Bytes::from(body.clone()), "byte-for-byte");
        assert_eq!(seen.header("content-type"), Some(content_type));
        assert_eq!(seen.header("webhook-id"), Some(CALL_STATUS_ID));
        let ts: u64 = seen.header("webhook-timestamp").unwrap().parse().unwrap();
        assert!(
            (before..=after).contains(&ts),
            "{ts} not in {before}..={after}"
        );
        assert_eq!(seen.header("x-hookrelay-source"), Some("voice"));
        assert_eq!(seen.attempt(), 1);
    }
    // Only `calls` has headers and signing.
    assert_eq!(a.header("x-api-key"), Some("calls-key"));
    assert_eq!(b.header("x-api-key"), None);
    // A destination's own User-Agent goes instead of the relay's.
    assert_eq!(a.header("user-agent"), Some("acme/1"));
    assert!(
        b.header("user-agent").unwrap().starts_with("hookrelay/"),
        "{:?}",
        b.header("user-agent")
    );
    let ts = a.header("webhook-timestamp").unwrap();
    assert_eq!(
        a.header("webhook-signature").unwrap(),
        expected_signature(key, CALL_STATUS_ID, ts, &body)
    );
    assert_eq!(b.header("webhook-signature"), None);

    for dest in ["calls", "analytics"] {
        let d = wait_state(&relay, CALL_STATUS_ID, dest, DeliveryState::Delivered).await;
        assert_eq!(d.attempts, 1);
    }
    assert_eq!(calls.seen().len(), 1);
    assert_eq!(analytics.seen().len(), 1);
    stop_relay(relay).await;
    calls.stop().await;
    analytics.stop().await;
}

/// An id a header cannot carry as it is (here not ASCII) still reaches the destination as
/// its `webhook-id`, percent-encoded, and the signature is over that same header value, so
/// a Standard Webhooks receiver verifies it. (It went without `webhook-id`, signed over the
/// raw id: every such delivery failed verification.)
#[tokio::test]
async fn an_id_a_header_cannot_carry_is_sent_encoded_and_signed_as_sent() {
    let sink = Sink::always(200).await;
    let key = b"a signing key of 32 bytes, random";
    let toml = config(&format!(
        r#"
[[destinations]]
name = "calls"
url = "{}"
sign = {{ secret = "whsec_{}" }}

[[routes]]
name = "voice"
source = "voice"
to = ["calls"]
"#,
        sink.url("/hooks"),
        STANDARD.encode(key),
    ));
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &toml).await;
    let body = r#"{"payload":{"eventId":"évt 1"}}"#.as_bytes();
    let (status, v) = post(&relay, "/8x8/voice", "application/json", body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["id"], "évt 1", "the event keeps its id");
    let seen = sink.wait_for(1).await.remove(0);
    assert_eq!(seen.header("webhook-id"), Some("%C3%A9vt%201"));
    let ts = seen.header("webhook-timestamp").unwrap();
    assert_eq!(
        seen.header("webhook-signature").unwrap(),
        expected_signature(key, "%C3%A9vt%201", ts, body)
    );
    stop_relay(relay).await;
    sink.stop().await;
}

/// A reload that raises a destination's rate applies to the delivery already waiting for a
/// token of the old one (it waited out the old rate: here 20 s).
#[tokio::test]
async fn a_reloaded_rate_applies_to_a_delivery_waiting_for_a_token() {
    let sink = Sink::always(200).await;
    let dir = tempfile::tempdir().unwrap();
    let slow = one_destination(&sink.url("/x"), "rate = { per_second = 0.05, burst = 1 }");
    let relay = start_relay(dir.path(), &slow).await;
    post_open(&relay, 1).await;
    post_open(&relay, 2).await;
    sink.wait_for(1).await;
    let fast = one_destination(&sink.url("/x"), "rate = { per_second = 100, burst = 1 }");
    std::fs::write(dir.path().join("routes.toml"), fast).unwrap();
    let started = std::time::Instant::now();
    relay.app.reload().unwrap();
    sink.wait_for(2).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the second went {:?} after the reload",
        started.elapsed()
    );
    stop_relay(relay).await;
    sink.stop().await;
}

#[tokio::test]
async fn retries_5xx_and_408_with_growing_delays_counting_attempts() {
    let sink = Sink::start(
        vec![Reply::status(503), Reply::status(500), Reply::status(408)],
        Reply::status(200),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &one_destination(&sink.url("/x"), "")).await;
    let id = post_open(&relay, 1).await;
    let seen = sink.wait_for(4).await;
    let attempts: Vec<u32> = seen.iter().map(|s| s.attempt()).collect();
    assert_eq!(attempts, [1, 2, 3, 4]);
    for s in &seen {
        assert_eq!(s.header("webhook-id"), Some(id.as_str()));
        assert_eq!(s.body, seen[0].body);
    }
    // first = 50ms, factor 2, jitter takes at most a quarter.
    let gap1 = seen[1].at - seen[0].at;
    let gap2 = seen[2].at - seen[1].at;
    assert!(gap1 >= Duration::from_millis(37), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(75), "{gap2:?}");
    assert!(gap2 < Duration::from_secs(2), "{gap2:?}");
    let d = wait_state(&relay, &id, "d", DeliveryState::Delivered).await;
    assert_eq!((d.attempts, d.last_status), (4, Some(200)));
    assert_eq!(sink.seen().len(), 4);
    stop_relay(relay).await;
    sink.stop().await;
}

#[tokio::test]
async fn honours_retry_after_on_429() {
    let sink = Sink::start(
        vec![Reply::status(429).header("retry-after", "1")],
        Reply::status(200),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &one_destination(&sink.url("/x"), "")).await;
    let id = post_open(&relay, 1).await;
    let seen = sink.wait_for(2).await;
    let gap = seen[1].at - seen[0].at;
    // The backoff alone would retry after 50 ms. (990: the relay's due times are whole
    // milliseconds of the wall clock; the sink measures on the monotonic clock.)
    assert!(gap >= Duration::from_millis(990), "retried after {gap:?}");
    assert!(gap < Duration::from_secs(3), "{gap:?}");
    assert_eq!(seen[1].attempt(), 2);
    let d = wait_state(&relay, &id, "d", DeliveryState::Delivered).await;
    assert_eq!(d.attempts, 2);
    stop_relay(relay).await;
    sink.stop().await;
}

/// A 429's `Retry-After` holds the whole destination: the deliveries queued behind the one
/// that got it wait too, instead of each spending an attempt on the same answer.
#[tokio::test]
async fn retry_after_holds_the_whole_destination() {
    let sink = Sink::start(
        vec![Reply::status(429).header("retry-after", "1")],
        Reply::status(200),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(
        dir.path(),
        &one_destination(&sink.url("/x"), "max_in_flight = 1"),
    )
    .await;
    let ids = [post_open(&relay, 1).await, post_open(&relay, 2).await];
    let seen = sink.wait_for(3).await;
    // Whichever went first got the 429; nothing went out for the second it asked.
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(990), "next sent after {gap:?}");
    for id in &ids {
        wait_state(&relay, id, "d", DeliveryState::Delivered).await;
    }
    assert_eq!(
        sink.seen().len(),
        3,
        "one attempt spent on the 429, none more"
    );
    stop_relay(relay).await;
    sink.stop().await;
}

#[tokio::test]
async fn client_error_is_dead_at_once_then_replayed() {
    let sink = Sink::start(vec![Reply::status(400)], Reply::status(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &one_destination(&sink.url("/x"), "")).await;
    let id = post_open(&relay, 1).await;
    sink.wait_for(1).await;
    let d = wait_state(&relay, &id, "d", DeliveryState::Dead).await;
    assert_eq!((d.attempts, d.last_status), (1, Some(400)));
    assert!(d.last_error.as_deref().unwrap().contains("400"), "{d:?}");
    // Dead means out of the queue: no retry happened or can.
    assert_eq!(sink.seen().len(), 1);
    assert_eq!(relay.app.store.queue_depth("d"), 0);
    let dead = relay.app.store.dead(Some("d"), 10).await.unwrap();
    assert_eq!(dead.len(), 1);

    let n = relay
        .app
        .store
        .replay(ReplaySelector::Destination("d".into()))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let seen = sink.wait_for(2).await;
    assert_eq!(seen[1].attempt(), 2);
    assert_eq!(seen[1].body, seen[0].body);
    let d = wait_state(&relay, &id, "d", DeliveryState::Delivered).await;
    assert_eq!((d.attempts, d.last_status), (2, Some(200)));
    assert!(relay
        .app
        .store
        .dead(Some("d"), 10)
        .await
        .unwrap()
        .is_empty());
    stop_relay(relay).await;
    sink.stop().await;
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_retried() {
    // The first answer comes too late for the 200 ms timeout.
    let slow = Sink::start(
        vec![Reply::status(200).delay(Duration::from_secs(2))],
        Reply::status(200),
    )
    .await;
    // Nothing listens here.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let toml = config(&format!(
        r#"
[[destinations]]
name = "slow"
url = "{}"
timeout = "200ms"

[[destinations]]
name = "gone"
url = "http://{closed}/x"
retry = {{ first = "10s" }}

[[routes]]
name = "all"
source = "open"
to = ["slow", "gone"]
"#,
        slow.url("/x")
    ));
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &toml).await;
    let (status, v) = post(&relay, "/open", "application/json", b"{}").await;
    assert_eq!(status, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let seen = slow.wait_for(2).await;
    assert_eq!(seen[1].attempt(), 2);
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(200), "{gap:?}");
    assert!(
        gap < Duration::from_secs(2),
        "not waiting for the slow answer: {gap:?}"
    );
    wait_state(&relay, &id, "slow", DeliveryState::Delivered).await;

    // The refused one is pending with one attempt and the error, due in ~10 s.
    let deadline = Instant::now() + support::WAIT;
    let d = loop {
        let views = relay.app.store.lookup(&id).await.unwrap();
        let d = views[0]
            .deliveries
            .iter()
            .find(|d| d.destination == "gone")
            .unwrap()
            .clone();
        if d.attempts == 1 || Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(d.state, DeliveryState::Pending, "{d:?}");
    assert_eq!(d.attempts, 1, "{d:?}");
    assert!(
        d.last_error.as_deref().unwrap().contains("connect"),
        "{d:?}"
    );
    assert!(d.next_due_ms > hookrelay::store::now_ms() + 5_000, "{d:?}");
    stop_relay(relay).await;
    slow.stop().await;
}

#[tokio::test]
async fn a_restart_resumes_the_retry_schedule() {
    let sink = Sink::start(
        vec![Reply::status(503), Reply::status(503)],
        Reply::status(200),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    // factor 1: every retry 2.25 to 3 s after the last answer (room for the stop).
    let toml = one_destination(
        &sink.url("/x"),
        r#"retry = { first = "3s", factor = 1.0, give_up_after = "1m" }"#,
    );
    let relay = start_relay(dir.path(), &toml).await;
    let id = post_open(&relay, 1).await;
    sink.wait_for(2).await;
    stop_relay(relay).await;
    // Stopped before the third attempt fell due.
    assert_eq!(sink.seen().len(), 2);

    let relay = start_relay(dir.path(), &toml).await;
    let seen = sink.wait_for(3).await;
    assert_eq!(seen[2].attempt(), 3, "the stored count carries over");
    assert_eq!(seen[2].header("webhook-id"), Some(id.as_str()));
    let gap = seen[2].at - seen[1].at;
    assert!(
        gap >= Duration::from_millis(740),
        "the stored due time holds: {gap:?}"
    );
    let d = wait_state(&relay, &id, "d", DeliveryState::Delivered).await;
    assert_eq!(d.attempts, 3);
    assert_eq!(sink.seen().len(), 3);
    stop_relay(relay).await;
    sink.stop().await;
}

#[tokio::test]
async fn shutdown_lets_attempts_in_flight_finish() {
    let sink = Sink::start(
        Vec::new(),
        Reply::status(200).delay(Duration::from_millis(1500)),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let toml = one_destination(&sink.url("/x"), "");
    let relay = start_relay(dir.path(), &toml).await;
    let id = post_open(&relay, 1).await;
    sink.wait_for(1).await;
    let t = Instant::now();
    stop_relay(relay).await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1000),
        "did not wait for the answer: {took:?}"
    );
    // Its outcome was stored before the store closed: nothing is sent again.
    let relay = start_relay(dir.path(), &toml).await;
    let d = wait_state(&relay, &id, "d", DeliveryState::Delivered).await;
    assert_eq!(d.attempts, 1);
    assert_eq!(relay.app.store.queue_depth("d"), 0);
    stop_relay(relay).await;
    assert_eq!(sink.seen().len(), 1);
    sink.stop().await;
}

#[tokio::test]
async fn an_attempt_cut_off_by_the_grace_goes_out_after_restart() {
    let sink = Sink::start(
        vec![Reply::status(200).delay(Duration::from_secs(10))],
        Reply::status(200),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let toml = one_destination(&sink.url("/x"), "timeout = \"20s\"")
        .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"200ms\"");
    let relay = start_relay(dir.path(), &toml).await;
    let id = post_open(&relay, 1).await;
    sink.wait_for(1).await;
    let t = Instant::now();
    stop_relay(relay).await;
    let took = t.elapsed();
    // Not the 10 s the attempt would take.
    assert!(
        took < Duration::from_secs(5),
        "the grace bounds the stop: {took:?}"
    );

    let relay = start_relay(dir.path(), &toml).await;
    let seen = sink.wait_for(2).await;
    // No outcome was stored for the first send: it is attempt 1 again (at least once).
    assert_eq!(seen[1].attempt(), 1);
    assert_eq!(seen[1].body, seen[0].body);
    let d = wait_state(&relay, &id, "d", DeliveryState::Delivered).await;
    assert_eq!(d.attempts, 1);
    stop_relay(relay).await;
    sink.stop().await;
}

#[tokio::test]
async fn reloads_add_and_remove_destinations_keeping_their_deliveries() {
    let a = Sink::start(vec![Reply::status(503)], Reply::status(200)).await;
    let b = Sink::always(200).await;
    let dest_a = format!(
        r#"
[[destinations]]
name = "a"
url = "{}"
retry = {{ first = "1s", factor = 1.0 }}
"#,
        a.url("/a")
    );
    let dest_b = format!(
        r#"
[[destinations]]
name = "b"
url = "{}"
"#,
        b.url("/b")
    );
    let route = |to: &str| format!("[[routes]]\nname = \"all\"\nsource = \"open\"\nto = [{to}]\n");
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &config(&format!("{dest_a}{}", route("\"a\"")))).await;
    let first = post_open(&relay, 1).await;
    a.wait_for(1).await;

    // `a` leaves the config, `b` joins: b gets a scheduler, a's delivery waits on disk.
    let file = dir.path().join("routes.toml");
    std::fs::write(&file, config(&format!("{dest_b}{}", route("\"b\"")))).unwrap();
    relay.app.reload().unwrap();
    let second = post_open(&relay, 2).await;
    b.wait_for(1).await;
    wait_state(&relay, &second, "b", DeliveryState::Delivered).await;
    let d = wait_state(&relay, &first, "a", DeliveryState::Pending).await;
    assert_eq!(d.attempts, 1);
    // Let its retry fall due (a deadline, to check that nothing is sent): still pending.
    let due = Duration::from_millis(d.next_due_ms.saturating_sub(hookrelay::store::now_ms()));
    tokio::time::sleep(due + Duration::from_millis(200)).await;
    assert_eq!(
        a.seen().len(),
        1,
        "a destination out of the config gets nothing"
    );
    assert_eq!(relay.app.store.queue_depth("a"), 1);

    // Back in the config: the delivery resumes with its stored count.
    std::fs::write(
        &file,
        config(&format!("{dest_a}{dest_b}{}", route("\"a\", \"b\""))),
    )
    .unwrap();
    let back = Instant::now();
    relay.app.reload().unwrap();
    let seen = a.wait_for(2).await;
    assert_eq!(seen[1].attempt(), 2);
    // Sent once `a` was back, not a stray request while it was out of the config.
    assert!(
        seen[1].at >= back,
        "the second attempt arrived {:?} before `a` was back in the config",
        back - seen[1].at
    );
    wait_state(&relay, &first, "a", DeliveryState::Delivered).await;
    stop_relay(relay).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_rate_limit_holds_at_the_sink() {
    let sink = Sink::always(200).await;
    let dir = tempfile::tempdir().unwrap();
    // 20/s = one every 50 ms after a burst of 2.
    let relay = start_relay(
        dir.path(),
        &one_destination(
            &sink.url("/x"),
            "rate = { per_second = 20, burst = 2 }\nmax_in_flight = 8",
        ),
    )
    .await;
    const N: usize = 12;
    for i in 0..N {
        post_open(&relay, i).await;
    }
    let seen = sink.wait_for(N).await;
    let mut at: Vec<Instant> = seen.iter().map(|s| s.at).collect();
    at.sort();
    // Any k consecutive arrivals span at least (k - burst) periods, less 100 ms of slack
    // for scheduling noise between the limiter and the sink's clock on a loaded machine
    // (from k = 5: a window of 12 still needs 400 ms, where an unlimited relay takes a few).
    let period = Duration::from_millis(50);
    let slack = Duration::from_millis(100);
    for k in 5..=N {
        for w in at.windows(k) {
            let span = w[k - 1] - w[0];
            let least = period * (k as u32 - 2);
            assert!(
                span + slack >= least,
                "{k} requests within {span:?}, the rate allows no less than {least:?}"
            );
        }
    }
    let total = at[N - 1] - at[0];
    assert!(
        total < Duration::from_secs(3),
        "far slower than the rate: {total:?}"
    );
    stop_relay(relay).await;
    sink.stop().await;
}

#[tokio::test]
async fn max_in_flight_holds_at_the_sink() {
    let slow = Sink::start(
        Vec::new(),
        Reply::status(200).delay(Duration::from_millis(150)),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(
        dir.path(),
        &one_destination(
            &slow.url("/x"),
            "max_in_flight = 3\nrate = { per_second = 1000, burst = 1000 }",
        ),
    )
    .await;
    const N: usize = 9;
    let relay = Arc::new(relay);
    let posts: Vec<_> = (0..N)
        .map(|i| {
            let relay = relay.clone();
            tokio::spawn(async move { post_open(&relay, i).await })
        })
        .collect();
    for p in posts {
        p.await.unwrap();
    }
    let seen = slow.wait_for(N).await;
    assert_eq!(
        slow.max_concurrent(),
        3,
        "max_in_flight = 3 is used and never exceeded"
    );
    // Nine requests of 150 ms, three at a time: at least three rounds.
    let mut at: Vec<Instant> = seen.iter().map(|s| s.at).collect();
    at.sort();
    assert!(
        at[N - 1] - at[0] >= Duration::from_millis(290),
        "{:?}",
        at[N - 1] - at[0]
    );
    let relay = Arc::into_inner(relay).unwrap();
    stop_relay(relay).await;
    slow.stop().await;
}

fn destination(url: &str) -> Destination {
    Destination {
        name: "reply".into(),
        url: url.parse().unwrap(),
        shown_url: url.into(),
        headers: Vec::new(),
        sign: None,
        timeout: Duration::from_secs(2),
        max_in_flight: 1,
        max_queue: 10,
        retry: RetryPolicy {
            first: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(10),
            give_up_after: Duration::from_secs(60),
            max_attempts: 0,
        },
        rate: Rate {
            per_second: 1.0,
            burst: 1,
        },
        breaker: Breaker {
            failures: 0,
            cool_down: Duration::from_secs(30),
        },
    }
}

#[tokio::test]
async fn send_once_returns_the_answer_for_reply_routes() {
    let body = fixture("8x8/voice-call-action-reply.json");
    let sink = Sink::start(
        Vec::new(),
        Reply::status(201)
            .header("content-type", "application/json")
            .body(&body),
    )
    .await;
    let client = HttpClient::new().unwrap();
    let event = StoredEvent {
        seq: 1,
        id: "ev-1".into(),
        source: "voice".into(),
        received_ms: 0,
        content_type: Some("application/json".into()),
        body: Bytes::from_static(br#"{"eventType":"CALL_ACTION"}"#),
    };
    let answer = send_once(
        &client,
        &destination(&sink.url("/call-action")),
        &event,
        1,
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 201);
    assert_eq!(answer.content_type.as_deref(), Some("application/json"));
    assert_eq!(answer.body, Bytes::from(body));
    assert!(!answer.truncated);
    let seen = sink.wait_for(1).await;
    assert_eq!(seen[0].body, event.body);
    assert_eq!(seen[0].header("webhook-id"), Some("ev-1"));
    assert_eq!(seen[0].attempt(), 1);

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = send_once(
        &client,
        &destination(&format!("http://{closed}/")),
        &event,
        1,
        Duration::from_secs(2),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SendError::Connect(_)), "{err:?}");
    sink.stop().await;
}
