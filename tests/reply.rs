//! Reply routes (8x8 Voice Call Action): the destination's answer goes back to 8x8; the
//! fallback on a slow or failing destination; the stored reply for a duplicate; the other
//! destinations still get the event.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{fixture, TestRelay};
use hookrelay::store::{Delivery, DeliveryState};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;

/// A destination that answers `status` with `body` after `delay`, and reports each request
/// body on a channel. Stops when dropped.
struct Sink {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Bytes>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    async fn start(status: u16, body: &'static [u8], delay: Duration) -> Sink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let b = req.into_body().collect().await.unwrap().to_bytes();
                            let _ = tx.send(b);
                            tokio::time::sleep(delay).await;
                            let mut r = Response::new(Full::new(Bytes::from_static(body)));
                            *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            r.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Sink { addr, seen, task }
    }

    async fn next(&mut self) -> Bytes {
        tokio::time::timeout(Duration::from_secs(10), self.seen.recv())
            .await
            .expect("a request within 10s")
            .unwrap()
    }
}

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

const REPLY: &[u8] = include_bytes!("../../shared/fixtures/8x8/voice-call-action-reply.json");

#[tokio::test]
async fn call_action_is_answered_with_the_destination_reply() {
    let mut ivr = Sink::start(200, REPLY, Duration::ZERO).await;
    let mut analytics = Sink::start(200, b"{}", Duration::ZERO).await;
    let r = TestRelay::start(&config(ivr.addr, analytics.addr)).await;
    let body = fixture("8x8/voice-call-action.json");
    let a = r.post("/8x8/voice", &body).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(&a.body[..], REPLY);
    assert_eq!(ivr.next().await, Bytes::from(body.clone()));
    // The analytics destination still gets the event, asynchronously.
    assert_eq!(analytics.next().await, Bytes::from(body.clone()));
    // The reply counts as ivr's delivery: recorded delivered, not sent again.
    // (Recorded right after the answer, in the store's next commit.)
    let d = delivery_of(&r, "ivr", |d| d.state != DeliveryState::Pending).await;
    assert_eq!(d.state, DeliveryState::Delivered);

    // A duplicate gets the stored reply without a new call.
    let again = r.post("/8x8/voice", &body).await;
    assert_eq!(again.status, 200);
    assert_eq!(&again.body[..], REPLY);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), ivr.seen.recv())
            .await
            .is_err(),
        "no second call to ivr"
    );
}

#[tokio::test]
async fn slow_destination_gets_the_fallback() {
    let ivr = Sink::start(200, REPLY, Duration::from_secs(3)).await;
    let mut analytics = Sink::start(200, b"{}", Duration::ZERO).await;
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
    analytics.next().await;
}

#[tokio::test]
async fn failing_destination_gets_the_fallback_and_stays_pending() {
    let ivr = Sink::start(500, b"oops", Duration::ZERO).await;
    let analytics = Sink::start(200, b"{}", Duration::ZERO).await;
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
