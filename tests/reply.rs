//! Reply routes (8x8 Voice Call Action): the destination's answer goes back to 8x8; the
//! fallback on a slow or failing destination; the stored reply for a duplicate; the other
//! destinations still get the event.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use hookrelay::store::{Delivery, DeliveryState};
use support::{fixture, TestRelay};
use support::{Reply, Sink};

fn config(ivr: SocketAddr, analytics: SocketAddr) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[delivery]
retry = {{ first = "1h" }}
[[sources]]
name = "voice"
path = "/8x8/voice"
event_id = ["$.payload.eventId"]
[[destinations]]
name = "ivr"
url = "http://{ivr}/call-action"
[[destinations]]
name = "analytics"
url = "http://{analytics}/ingest"
[[routes]]
name = "ivr"
source = "voice"
match = {{ eventType = "CALL_ACTION" }}
to = ["ivr", "analytics"]
reply = {{ from = "ivr", timeout = "300ms", fallback = {{ status = 200, body = '{{"callflow":[{{"action":"hangup"}}]}}' }} }}
"#
    )
}

/// The call-action fixture's delivery to `dest`, once `ready` holds (bounded wait: the
/// reply route records it just after answering).
async fn delivery_of(r: &TestRelay, dest: &str, ready: impl Fn(&Delivery) -> bool) -> Delivery {
    for _ in 0..500 {
        let v = r
            .app()
            .store
            .lookup("77e6a667-133a-11ef-9dd4-e911cc6fc82f")
            .await
            .unwrap();
        if let Some(d) = v
            .first()
            .and_then(|v| v.deliveries.iter().find(|d| d.destination == dest))
        {
            if ready(d) {
                return d.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the delivery to {dest} was not recorded within 5 s");
}

/// A destination answering `status` with `body` (JSON) after `delay`.
async fn replying(status: u16, body: &[u8], delay: Duration) -> Sink {
    let reply = Reply::status(status)
        .header("content-type", "application/json")
        .body(body)
        .delay(delay);
    Sink::start(Vec::new(), reply).await
}

/// Posts `body` in the background, as 8x8's first try, once ivr has its call.
async fn first_try_out(
    r: &TestRelay,
    ivr: &Sink,
    body: &[u8],
) -> tokio::task::JoinHandle<support::Answer> {
    let (url, body) = (r.url("/8x8/voice"), body.to_vec());
    let first =
        tokio::spawn(async move { support::send(http::Method::POST, &url, &[], &body).await });
    assert_eq!(ivr.wait_for(1).await.len(), 1, "the first call is out");
    first
}

/// The call-action fixture `first` as another call action (its own event id).
fn next_call_action(first: Vec<u8>) -> Vec<u8> {
    String::from_utf8(first)
        .unwrap()
        .replace("77e6a667-133a-11ef-9dd4-e911cc6fc82f", "next-call-action")
        .into_bytes()
}

const REPLY: &[u8] = include_bytes!("../examples/payloads/8x8/voice-call-action-reply.json");

#[tokio::test]
async fn call_action_is_answered_with_the_destination_reply() {
    let ivr = replying(200, REPLY, Duration::ZERO).await;
    let analytics = Sink::always(200).await;
    let r = TestRelay::start(&config(ivr.addr, analytics.addr)).await;
    let body = fixture("8x8/voice-call-action.json");
    let a = r.post("/8x8/voice", &body).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(&a.body[..], REPLY);
    assert_eq!(ivr.wait_for(1).await[0].body, body);
    // The analytics destination still gets the event, asynchronously.
    assert_eq!(analytics.wait_for(1).await[0].body, body);
    // The reply counts as ivr's delivery: recorded delivered, not sent again.
    // (Recorded right after the answer, in the store's next commit.)
    let d = delivery_of(&r, "ivr", |d| d.state != DeliveryState::Pending).await;
    assert_eq!(d.state, DeliveryState::Delivered);

    // A duplicate gets the stored reply without a new call.
    let again = r.post("/8x8/voice", &body).await;
    assert_eq!(again.status, 200);
    assert_eq!(&again.body[..], REPLY);
    // Had it called ivr, that call would have finished before this answer.
    assert_eq!(ivr.seen().len(), 1, "no second call to ivr");
}

#[tokio::test]
async fn slow_destination_gets_the_fallback() {
    let ivr = replying(200, REPLY, Duration::from_secs(3)).await;
    let analytics = Sink::always(200).await;
    let r = TestRelay::start(&config(ivr.addr, analytics.addr)).await;
    let started = std::time::Instant::now();
    let a = r
        .post("/8x8/voice", &fixture("8x8/voice-call-action.json"))
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at the reply timeout"
    );
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[..], br#"{"callflow":[{"action":"hangup"}]}"#);
    analytics.wait_for(1).await;
}

#[tokio::test]
async fn failing_destination_gets_the_fallback_and_stays_pending() {
    let ivr = replying(500, b"oops", Duration::ZERO).await;
    let analytics = Sink::always(200).await;
    let r = TestRelay::start(&config(ivr.addr, analytics.addr)).await;
    let a = r
        .post("/8x8/voice", &fixture("8x8/voice-call-action.json"))
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[..], br#"{"callflow":[{"action":"hangup"}]}"#);
    let d = delivery_of(&r, "ivr", |d| d.attempts > 0).await;
    assert_eq!(d.state, DeliveryState::Pending, "retried later");
    assert_eq!(d.attempts, 1);
    assert_eq!(d.last_status, Some(500));
}

#[tokio::test]
async fn a_paused_reply_destination_is_not_called() {
    let ivr = replying(200, REPLY, Duration::ZERO).await;
    let analytics = Sink::always(200).await;
    let r = TestRelay::start(&config(ivr.addr, analytics.addr)).await;
    r.app().store.set_paused("ivr", true).await.unwrap();
    let body = fixture("8x8/voice-call-action.json");
    let a = r.post("/8x8/voice", &body).await;
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[..], br#"{"callflow":[{"action":"hangup"}]}"#);
    // A call would have been made before the answer.
    assert!(ivr.seen().is_empty(), "a paused destination was called");
    analytics.wait_for(1).await;
    let d = delivery_of(&r, "ivr", |_| true).await;
    assert_eq!((d.state, d.attempts), (DeliveryState::Pending, 0));
    // Resumed, the held delivery goes like any other.
    r.app().store.set_paused("ivr", false).await.unwrap();
    assert_eq!(ivr.wait_for(1).await[0].body, body);
}

#[tokio::test]
async fn an_open_breaker_skips_the_reply_call() {
    let ivr = replying(500, b"oops", Duration::ZERO).await;
    let analytics = Sink::always(200).await;
    let text = config(ivr.addr, analytics.addr).replace(
        "url = \"http://",
        "breaker = { failures = 1, cool_down = \"1h\" }\nurl = \"http://",
    );
    let r = TestRelay::start(&text).await;
    let first = fixture("8x8/voice-call-action.json");
    let a = r.post("/8x8/voice", &first).await;
    assert_eq!(&a.body[..], br#"{"callflow":[{"action":"hangup"}]}"#);
    assert_eq!(ivr.seen().len(), 1);
    assert!(
        r.app().statuses.of("ivr").breaker_open(),
        "one failed call opens it"
    );
    // The next call action gets the fallback at once: the destination is not called.
    let a = r.post("/8x8/voice", &next_call_action(first)).await;
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[..], br#"{"callflow":[{"action":"hangup"}]}"#);
    assert_eq!(ivr.seen().len(), 1, "called with its breaker open");
}

/// A reply call answered 429 with `Retry-After` holds the destination: the next call action
/// gets the fallback at once, the destination is not called again meanwhile.
#[tokio::test]
async fn a_retry_after_skips_the_next_reply_call() {
    let ivr = Sink::start(Vec::new(), Reply::status(429).header("retry-after", "3600")).await;
    let analytics = Sink::always(200).await;
    // max_delay (which bounds the hold) an hour, as the Retry-After asks.
    let text = config(ivr.addr, analytics.addr).replace(
        "retry = { first = \"1h\" }",
        "retry = { first = \"1h\", max_delay = \"1h\" }",
    );
    let r = TestRelay::start(&text).await;
    let first = fixture("8x8/voice-call-action.json");
    let a = r.post("/8x8/voice", &first).await;
    assert_eq!(&a.body[..], br#"{"callflow":[{"action":"hangup"}]}"#);
    assert_eq!(ivr.seen().len(), 1);
    assert!(r.app().statuses.of("ivr").quiet(0).is_some(), "held");
    let a = r.post("/8x8/voice", &next_call_action(first)).await;
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[..], br#"{"callflow":[{"action":"hangup"}]}"#);
    assert_eq!(
        ivr.seen().len(),
        1,
        "called while it asked to be left alone"
    );
}

#[tokio::test]
async fn a_reply_call_takes_a_slot_within_max_in_flight() {
    // ivr takes 3 s to answer anything; it may have one request in flight.
    let ivr = replying(200, REPLY, Duration::from_secs(3)).await;
    let analytics = Sink::always(200).await;
    let text = config(ivr.addr, analytics.addr).replace(
        "name = \"ivr\"\nurl",
        "name = \"ivr\"\nmax_in_flight = 1\nurl",
    ) + "[[routes]]\nname = \"status\"\nsource = \"voice\"\nmatch = { eventType = \"CALL_STATUS\" }\nto = [\"ivr\"]\n";
    let r = TestRelay::start(&text).await;
    // A call status event's delivery holds ivr's one slot.
    let status = r
        .post("/8x8/voice", &fixture("8x8/voice-call-status.json"))
        .await;
    assert_eq!(status.status, 200);
    ivr.wait_for(1).await;
    // The call action gets the fallback at its timeout, without a second request to ivr.
    let a = r
        .post("/8x8/voice", &fixture("8x8/voice-call-action.json"))
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[..], br#"{"callflow":[{"action":"hangup"}]}"#);
    assert_eq!(ivr.seen().len(), 1, "a call beyond max_in_flight was made");
    assert_eq!(ivr.max_concurrent(), 1);
}

#[tokio::test]
async fn a_duplicate_while_the_call_is_out_gets_its_answer_without_a_second_call() {
    // 8x8 retries a slow answer: the retry waits for the call already out.
    let ivr = replying(200, REPLY, Duration::from_millis(400)).await;
    let analytics = Sink::always(200).await;
    let text = config(ivr.addr, analytics.addr).replace("timeout = \"300ms\"", "timeout = \"5s\"");
    let r = TestRelay::start(&text).await;
    let body = fixture("8x8/voice-call-action.json");
    let first = first_try_out(&r, &ivr, &body).await;
    let again = r.post("/8x8/voice", &body).await;
    assert_eq!(again.status, 200);
    assert_eq!(&again.body[..], REPLY);
    let first = first.await.unwrap();
    assert_eq!(&first.body[..], REPLY);
    assert_eq!(ivr.seen().len(), 1, "one call to ivr for both requests");
}

#[tokio::test]
async fn a_call_goes_on_when_the_provider_hangs_up_and_its_answer_is_kept_for_the_retry() {
    // 8x8 gives up on a slow answer and hangs up before ivr answers; then it sends the
    // event again. The call it left is not cut off: ivr's answer counts as its delivery and
    // is kept, and the retry gets it without a second call.
    let ivr = replying(200, REPLY, Duration::from_millis(500)).await;
    let analytics = Sink::always(200).await;
    let text = config(ivr.addr, analytics.addr).replace("timeout = \"300ms\"", "timeout = \"5s\"");
    let r = TestRelay::start(&text).await;
    let body = fixture("8x8/voice-call-action.json");
    let first = first_try_out(&r, &ivr, &body).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    let d = delivery_of(&r, "ivr", |d| d.state != DeliveryState::Pending).await;
    assert_eq!(
        (d.state, d.last_status),
        (DeliveryState::Delivered, Some(200))
    );
    let again = r.post("/8x8/voice", &body).await;
    assert_eq!(again.status, 200);
    assert_eq!(&again.body[..], REPLY);
    assert_eq!(ivr.seen().len(), 1, "one call to ivr for both tries");
}

#[tokio::test]
async fn a_resend_whose_call_succeeds_delivers_a_delivery_the_first_call_left_dead() {
    // The first call gets a 404: the held delivery is dead at once. 8x8 sends the event
    // again and that call gets ivr's answer: the delivery is delivered, off the dead list
    // (a replay of the dead list would have sent the call action a second time).
    let ivr = Sink::start(
        vec![Reply::status(404)],
        Reply::status(200)
            .header("content-type", "application/json")
            .body(REPLY),
    )
    .await;
    let analytics = Sink::always(200).await;
    let r = TestRelay::start(&config(ivr.addr, analytics.addr)).await;
    let body = fixture("8x8/voice-call-action.json");
    let a = r.post("/8x8/voice", &body).await;
    assert_eq!(&a.body[..], br#"{"callflow":[{"action":"hangup"}]}"#);
    delivery_of(&r, "ivr", |d| d.state == DeliveryState::Dead).await;
    assert_eq!(r.app().store.dead(Some("ivr"), 10).await.unwrap().len(), 1);
    assert_eq!(&r.post("/8x8/voice", &body).await.body[..], REPLY);
    let d = delivery_of(&r, "ivr", |d| d.state != DeliveryState::Dead).await;
    assert_eq!(d.state, DeliveryState::Delivered);
    assert_eq!((d.attempts, d.last_status), (2, Some(200)));
    assert!(r
        .app()
        .store
        .dead(Some("ivr"), 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(ivr.seen().len(), 2);
}

#[tokio::test]
async fn a_resend_whose_call_succeeds_delivers_the_held_delivery() {
    // The first call fails: 8x8 gets the fallback and the held delivery waits for its retry
    // (an hour off). 8x8 sends the event again; that call gets ivr's answer, which is
    // ivr's delivery: no retry is left to send it a third time.
    let failing = Reply::status(500).body(b"oops");
    let answering = Reply::status(200)
        .header("content-type", "application/json")
        .body(REPLY);
    let ivr = Sink::start(vec![failing], answering).await;
    let analytics = Sink::always(200).await;
    let r = TestRelay::start(&config(ivr.addr, analytics.addr)).await;
    let body = fixture("8x8/voice-call-action.json");
    let a = r.post("/8x8/voice", &body).await;
    assert_eq!(&a.body[..], br#"{"callflow":[{"action":"hangup"}]}"#);
    delivery_of(&r, "ivr", |d| d.attempts == 1).await;
    let again = r.post("/8x8/voice", &body).await;
    assert_eq!(again.status, 200);
    assert_eq!(&again.body[..], REPLY);
    let d = delivery_of(&r, "ivr", |d| d.state != DeliveryState::Pending).await;
    assert_eq!(d.state, DeliveryState::Delivered);
    assert_eq!((d.attempts, d.last_status), (2, Some(200)));
    // A third copy gets the kept answer without a call.
    assert_eq!(&r.post("/8x8/voice", &body).await.body[..], REPLY);
    assert_eq!(ivr.seen().len(), 2);
}

#[tokio::test]
async fn a_resend_waiting_for_the_call_out_is_answered_within_its_own_timeout() {
    // ivr answers long after the reply timeout (3 s). A resend 1.5 s after the first call,
    // which ends in the fallback, calls again within what is left of its own timeout (~1.5
    // s), not a whole new one: 8x8 waits for one timeout. (A whole one: ~4.5 s.)
    let ivr = replying(200, REPLY, Duration::from_secs(10)).await;
    let analytics = Sink::always(200).await;
    let text = config(ivr.addr, analytics.addr).replace("timeout = \"300ms\"", "timeout = \"3s\"");
    let r = TestRelay::start(&text).await;
    let body = fixture("8x8/voice-call-action.json");
    let first = first_try_out(&r, &ivr, &body).await;
    // Not a synchronisation: the resend comes halfway through the first call's timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = std::time::Instant::now();
    let again = r.post("/8x8/voice", &body).await;
    let took = sent.elapsed();
    assert_eq!(&again.body[..], br#"{"callflow":[{"action":"hangup"}]}"#);
    assert!(
        took < Duration::from_millis(4200),
        "answered after {took:?}"
    );
    assert_eq!(
        ivr.seen().len(),
        2,
        "the resend called, within its time left"
    );
    assert_eq!(
        &first.await.unwrap().body[..],
        br#"{"callflow":[{"action":"hangup"}]}"#
    );
}

#[tokio::test]
async fn a_bodiless_fallback_is_answered_as_configured() {
    // A fallback of 404 with no body: the provider gets exactly that (not turned into the
    // JSON error the relay puts on hyper's own bodiless answers).
    let ivr = Sink::always(503).await;
    let analytics = Sink::always(200).await;
    let toml = config(ivr.addr, analytics.addr).replace(
        r#"fallback = { status = 200, body = '{"callflow":[{"action":"hangup"}]}' }"#,
        r#"fallback = { status = 404, body = "" }"#,
    );
    assert!(toml.contains("status = 404"));
    let r = TestRelay::start(&toml).await;
    let a = r
        .post("/8x8/voice", &fixture("8x8/voice-call-action.json"))
        .await;
    assert_eq!(a.status, 404);
    assert!(a.body.is_empty(), "{:?}", a.body);
    analytics.wait_for(1).await;
}

#[tokio::test]
async fn the_reply_timeout_counts_from_the_requests_arrival() {
    // The timeout is 3 s and ivr answers after 2.5 s, but the body comes 1.2 s after the
    // headers: what is left for the call (~1.8 s) is too short, so 8x8 gets the fallback
    // by the end of its 3 s. (Counted from the call's start: ivr's answer, after ~3.7 s.)
    let ivr = replying(200, REPLY, Duration::from_millis(2500)).await;
    let analytics = Sink::always(200).await;
    let text = config(ivr.addr, analytics.addr).replace("timeout = \"300ms\"", "timeout = \"3s\"");
    let r = TestRelay::start(&text).await;
    let body = fixture("8x8/voice-call-action.json");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
    let head = format!(
        "POST /8x8/voice HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // Not a synchronisation: a slow upload is the case under test.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.write_all(&body).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("answered within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with(r#"{"callflow":[{"action":"hangup"}]}"#),
        "{text}"
    );
    // Called, with the time left (not skipped for lack of it): the sink counts a request
    // when it comes, before its answer's delay.
    assert_eq!(ivr.seen().len(), 1, "called with the time left");
}

#[tokio::test]
async fn a_reply_call_whose_provider_hung_up_is_recorded_before_the_store_closes() {
    // 8x8 hangs up on a slow answer; the relay is stopped while the call it left is out.
    // The stop waits for that call (within shutdown_grace), so its answer counts as the
    // delivery: after the restart the held delivery is not sent a second time.
    let ivr = replying(200, REPLY, Duration::from_secs(1)).await;
    let analytics = Sink::always(200).await;
    let text = config(ivr.addr, analytics.addr).replace("timeout = \"300ms\"", "timeout = \"4s\"");
    let r = TestRelay::start(&text).await;
    let first = first_try_out(&r, &ivr, &fixture("8x8/voice-call-action.json")).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    let dir = r.stop().await;
    let store = hookrelay::store::redb::RedbStore::open(&dir.path().join("data")).unwrap();
    use hookrelay::store::Store;
    let views = store
        .lookup("77e6a667-133a-11ef-9dd4-e911cc6fc82f")
        .await
        .unwrap();
    let ivr_delivery = views[0]
        .deliveries
        .iter()
        .find(|d| d.destination == "ivr")
        .unwrap();
    assert_eq!(
        ivr_delivery.state,
        DeliveryState::Delivered,
        "{ivr_delivery:?}"
    );
    store.close().await.unwrap();
}

/// A reply route's call still out at shutdown is waited for, however short `read_timeout`
/// is (the drain was three read timeouts): the provider gets the next call action, not a
/// connection closed under it.
#[tokio::test]
async fn a_reply_call_out_at_shutdown_is_answered() {
    let ivr = replying(200, REPLY, Duration::from_secs(2)).await;
    let analytics = Sink::always(200).await;
    let text = config(ivr.addr, analytics.addr)
        .replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\nread_timeout = \"250ms\"",
        )
        .replace("timeout = \"300ms\"", "timeout = \"4s\"");
    let r = TestRelay::start(&text).await;
    let first = first_try_out(&r, &ivr, &fixture("8x8/voice-call-action.json")).await;
    let dir = r.stop().await;
    let a = first.await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(&a.body[..], REPLY);
    drop(dir);
}
