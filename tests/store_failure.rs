//! The store failing: the ingress answers 503 with `Retry-After` (the §3 row "store
//! unavailable"), loses nothing it accepted before, and accepts again once the store
//! recovers; an attempt's outcome that cannot be stored is stored later, not sent again; a
//! breaker probe whose event cannot be read does not leave the breaker waiting forever.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hookrelay::store::*;
use tokio::sync::Notify;

/// A real store whose writes can be switched to fail.
struct Flaky {
    inner: Arc<dyn Store>,
    failing: AtomicBool,
    /// Only the outcomes' writes fail.
    failing_records: AtomicBool,
    /// How many outcome writes were tried.
    records: tokio::sync::watch::Sender<usize>,
    /// Only the events' reads fail; and how many did.
    failing_events: AtomicBool,
    event_failures: tokio::sync::watch::Sender<usize>,
    /// The next read of an event finds it damaged.
    damaged_event: AtomicBool,
    /// How many times what is due was read.
    pending_reads: AtomicUsize,
}

impl Flaky {
    fn new(inner: Arc<dyn Store>) -> Flaky {
        Flaky {
            inner,
            failing: AtomicBool::new(false),
            failing_records: AtomicBool::new(false),
            records: tokio::sync::watch::channel(0).0,
            failing_events: AtomicBool::new(false),
            event_failures: tokio::sync::watch::channel(0).0,
            damaged_event: AtomicBool::new(false),
            pending_reads: AtomicUsize::new(0),
        }
    }
}

impl Flaky {
    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("disk full (simulated)".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for Flaky {
    async fn accept(&self, ev: NewEvent) -> Result<Admission, StoreError> {
        self.check()?;
        self.inner.accept(ev).await
    }
    async fn pending(
        &self,
        d: &str,
        limit: usize,
        skip: &(dyn Fn(u64) -> bool + Send + Sync),
    ) -> Result<Vec<Delivery>, StoreError> {
        self.pending_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.pending(d, limit, skip).await
    }
    async fn oldest_pending(&self, d: &str) -> Result<Option<u64>, StoreError> {
        self.inner.oldest_pending(d).await
    }
    async fn event(&self, seq: u64) -> Result<Option<StoredEvent>, StoreError> {
        if self.failing_events.load(Ordering::SeqCst) {
            self.event_failures.send_modify(|n| *n += 1);
            return Err(StoreError::Unavailable("event not read (simulated)".into()));
        }
        if self.damaged_event.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Corrupt("an event record (simulated)".into()));
        }
        self.inner.event(seq).await
    }
    async fn record(&self, key: &DeliveryKey, outcome: Outcome) -> Result<(), StoreError> {
        let result = match self.failing_records.load(Ordering::SeqCst) {
            true => Err(StoreError::Unavailable(
                "outcome not written (simulated)".into(),
            )),
            false => match self.check() {
                Ok(()) => self.inner.record(key, outcome).await,
                Err(e) => Err(e),
            },
        };
        self.records.send_modify(|n| *n += 1);
        result
    }
    fn after_reply(
        &self,
        seq: u64,
        reply: Option<StoredReply>,
        attempt: Option<(DeliveryKey, Outcome)>,
        fresh: bool,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.after_reply(seq, reply, attempt, fresh)
    }
    async fn dead_after(
        &self,
        d: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<NamedDelivery>, StoreError> {
        self.inner.dead_after(d, after, limit).await
    }
    async fn recent(&self, q: &EventQuery) -> Result<EventPage, StoreError> {
        self.inner.recent(q).await
    }
    async fn set_paused(&self, d: &str, paused: bool) -> Result<(), StoreError> {
        self.check()?;
        self.inner.set_paused(d, paused).await
    }
    fn paused(&self, d: &str) -> bool {
        self.inner.paused(d)
    }
    async fn replay(&self, which: ReplaySelector) -> Result<usize, StoreError> {
        self.check()?;
        self.inner.replay(which).await
    }
    async fn lookup(&self, id: &str) -> Result<Vec<EventView>, StoreError> {
        self.inner.lookup(id).await
    }
    async fn kept(&self, source: &str, id: &str) -> Result<bool, StoreError> {
        self.inner.kept(source, id).await
    }
    async fn purge(&self, retain: Duration) -> Result<usize, StoreError> {
        self.inner.purge(retain).await
    }
    fn queue_depth(&self, d: &str) -> u64 {
        self.inner.queue_depth(d)
    }
    fn queue_depths(&self) -> Vec<(String, u64)> {
        self.inner.queue_depths()
    }
    fn wakeup(&self, d: &str) -> Arc<Notify> {
        self.inner.wakeup(d)
    }
    async fn close(&self) -> Result<(), StoreError> {
        self.inner.close().await
    }
}

/// One source (`/open`, id at `$.id`) routed to one destination at `url`.
fn config(dir: &std::path::Path, url: &str) -> hookrelay::config::Config {
    config_with(dir, url, "retry = { first = \"1h\" }", "")
}

/// [`config`] with these `[delivery]` lines and these lines for the destination.
fn config_with(
    dir: &std::path::Path,
    url: &str,
    delivery: &str,
    destination: &str,
) -> hookrelay::config::Config {
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[delivery]
{delivery}
[[sources]]
name = "open"
path = "/open"
event_id = ["$.id"]
[[destinations]]
name = "calls"
url = "{url}"
{destination}
[[routes]]
name = "all"
source = "open"
to = ["calls"]
"#
    );
    hookrelay::config::parse(&toml, &dir.join("routes.toml"), &|_| None).unwrap()
}

/// A relay on `config` over a [`Flaky`] redb store in `dir`, set up by `prepare` before
/// the relay starts.
async fn start_flaky(
    dir: &std::path::Path,
    config: hookrelay::config::Config,
    prepare: impl FnOnce(&Flaky),
) -> (Arc<Flaky>, support::RunningRelay) {
    let store = Arc::new(Flaky::new(
        hookrelay::store::redb::RedbStore::open(&dir.join("data")).unwrap(),
    ));
    prepare(&store);
    let relay = support::RunningRelay::new(
        hookrelay::Relay::start_with_store(config, store.clone())
            .await
            .unwrap(),
    );
    (store, relay)
}

#[tokio::test]
async fn store_failure_is_503_with_retry_after_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "http://127.0.0.1:9/");
    let (store, relay) = start_flaky(dir.path(), config, |_| {}).await;
    let url = format!("http://{}/open", relay.ingress);
    let post = |id: &'static str| {
        let url = url.clone();
        async move {
            support::send(
                http::Method::POST,
                &url,
                &[],
                format!("{{\"id\":\"{id}\"}}").as_bytes(),
            )
            .await
        }
    };
    assert_eq!(post("before").await.status, 200);

    store.failing.store(true, Ordering::SeqCst);
    let a = post("during").await;
    a.error(503, "unavailable");
    assert!(a.headers.contains_key("retry-after"));

    store.failing.store(false, Ordering::SeqCst);
    assert_eq!(
        post("during").await.json()["duplicate"],
        false,
        "not half-stored"
    );
    assert_eq!(post("after").await.status, 200);
    for id in ["before", "during", "after"] {
        let v = relay.app.store.lookup(id).await.unwrap();
        assert_eq!(v.len(), 1, "{id}");
        assert_eq!(v[0].deliveries.len(), 1, "{id}");
    }
    support::stop_relay(relay).await;
}

#[tokio::test]
async fn an_outcome_that_cannot_be_stored_is_stored_later_not_sent_again() {
    let sink = support::FaultSink::answering(200).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &sink.url("/"));
    let (store, relay) = start_flaky(dir.path(), config, |s| {
        s.failing_records.store(true, Ordering::SeqCst)
    })
    .await;
    let url = format!("http://{}/open", relay.ingress);
    let r = support::send(http::Method::POST, &url, &[], br#"{"id":"once"}"#).await;
    assert_eq!(r.status, 200);

    // The destination took it; storing that failed, and failed again when tried again.
    let mut records = store.records.subscribe();
    tokio::time::timeout(Duration::from_secs(10), records.wait_for(|n| *n >= 2))
        .await
        .expect("the outcome is written again")
        .unwrap();
    assert_eq!(sink.count(), 1, "the delivery is not sent again");

    // The store takes writes again: the outcome is stored, still without a second request.
    store.failing_records.store(false, Ordering::SeqCst);
    let mut delivered = false;
    for _ in 0..200 {
        let v = relay.app.store.lookup("once").await.unwrap();
        if v[0].deliveries[0].state == DeliveryState::Delivered {
            delivered = true;
            break;
        }
        tokio::time::timeout(Duration::from_secs(10), records.changed())
            .await
            .expect("the outcome is written again within 10 s")
            .unwrap();
    }
    assert!(delivered, "the outcome was stored");
    assert_eq!(sink.count(), 1);
    support::stop_relay(relay).await;
}

#[tokio::test]
async fn a_probe_whose_event_cannot_be_read_lets_the_next_attempt_probe() {
    // The first attempt fails and opens the breaker; the probe after the cool-down cannot
    // read its event; once reads work again the next probe delivers it.
    let sink =
        support::FaultSink::start(|n| support::Action::Answer(if n == 0 { 500 } else { 200 }))
            .await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        &sink.url("/"),
        "retry = { first = \"50ms\", factor = 1.0 }\nbreaker = { failures = 1, cool_down = \"300ms\" }",
        "",
    );
    let (store, relay) = start_flaky(dir.path(), config, |_| {}).await;
    let url = format!("http://{}/open", relay.ingress);
    let r = support::send(http::Method::POST, &url, &[], br#"{"id":"probe"}"#).await;
    assert_eq!(r.status, 200);
    assert!(sink.wait_count(1, Duration::from_secs(10)).await);
    store.failing_events.store(true, Ordering::SeqCst);
    let mut failures = store.event_failures.subscribe();
    tokio::time::timeout(Duration::from_secs(10), failures.wait_for(|n| *n >= 1))
        .await
        .expect("the probe tried to read its event")
        .unwrap();
    store.failing_events.store(false, Ordering::SeqCst);
    // No new event, replay or reload comes to wake the scheduler: the abandoned probe must.
    assert!(
        sink.wait_count(2, Duration::from_secs(10)).await,
        "the breaker still waits for a probe that ended without an outcome"
    );
    support::stop_relay(relay).await;
}

#[tokio::test]
async fn a_delivery_whose_event_is_damaged_is_dead_not_tried_each_second() {
    let sink = support::FaultSink::answering(200).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &sink.url("/"));
    let (_store, relay) = start_flaky(dir.path(), config, |s| {
        s.damaged_event.store(true, Ordering::SeqCst)
    })
    .await;
    let url = format!("http://{}/open", relay.ingress);
    let r = support::send(http::Method::POST, &url, &[], br#"{"id":"damaged"}"#).await;
    assert_eq!(r.status, 200);
    // Dead, saying why, on the dead list; nothing was sent.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let d = loop {
        let v = relay.app.store.lookup("damaged").await.unwrap();
        let d = v[0].deliveries[0].clone();
        if d.state != DeliveryState::Pending {
            break d;
        }
        assert!(std::time::Instant::now() < deadline, "still pending: {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(d.state, DeliveryState::Dead, "{d:?}");
    let error = d.last_error.clone().unwrap_or_default();
    assert!(error.contains("cannot be read"), "{error}");
    assert_eq!(
        relay.app.store.dead(Some("calls"), 10).await.unwrap().len(),
        1
    );
    assert_eq!(sink.count(), 0);
    // The record mended (here: read again), a replay sends it.
    let n = relay
        .app
        .store
        .replay(hookrelay::store::ReplaySelector::Destination(
            "calls".into(),
        ))
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(sink.wait_count(1, Duration::from_secs(10)).await);
    support::stop_relay(relay).await;
}

#[tokio::test]
async fn an_open_breaker_reads_nothing_due_while_events_come_in() {
    let sink = support::FaultSink::answering(503).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(
        dir.path(),
        &sink.url("/"),
        "breaker = { failures = 1, cool_down = \"1h\" }",
        "",
    );
    let (store, relay) = start_flaky(dir.path(), config, |_| {}).await;
    let url = format!("http://{}/open", relay.ingress);
    let post = |id: String| {
        let url = url.clone();
        async move {
            let body = format!("{{\"id\":\"{id}\"}}");
            support::send(http::Method::POST, &url, &[], body.as_bytes()).await
        }
    };
    assert_eq!(post("first".into()).await.status, 200);
    assert!(sink.wait_count(1, Duration::from_secs(10)).await);
    let status = relay.app.statuses.of("calls");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !status.breaker_open() {
        assert!(std::time::Instant::now() < deadline, "never opened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Each accept wakes the destination's scheduler: with the breaker open it reads nothing.
    let before = store.pending_reads.load(Ordering::SeqCst);
    for i in 0..20 {
        assert_eq!(post(format!("later-{i}")).await.status, 200);
    }
    let reads = store.pending_reads.load(Ordering::SeqCst) - before;
    assert!(
        reads <= 1,
        "{reads} reads of what is due while the breaker was open"
    );
    assert_eq!(sink.count(), 1);
    support::stop_relay(relay).await;
}

#[tokio::test]
async fn while_outcomes_cannot_be_stored_the_queue_is_not_all_sent() {
    let sink = support::FaultSink::answering(200).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(dir.path(), &sink.url("/"), "", "max_in_flight = 2");
    let (store, relay) = start_flaky(dir.path(), config, |s| {
        s.failing_records.store(true, Ordering::SeqCst)
    })
    .await;
    let url = format!("http://{}/open", relay.ingress);
    for i in 0..10 {
        let body = format!("{{\"id\":\"q{i}\"}}");
        let r = support::send(http::Method::POST, &url, &[], body.as_bytes()).await;
        assert_eq!(r.status, 200);
    }
    // The two sent first have had their outcomes tried twice (a second round, a second
    // later): by then more would have been sent if failed outcomes gave their slots back.
    let mut records = store.records.subscribe();
    tokio::time::timeout(Duration::from_secs(10), records.wait_for(|n| *n >= 4))
        .await
        .expect("outcomes are tried again")
        .unwrap();
    let sent = sink.count();
    assert_eq!(
        sent, 2,
        "{sent} of 10 sent while no outcome could be stored (max_in_flight 2)"
    );
    // The store takes writes again: the rest goes, each once.
    store.failing_records.store(false, Ordering::SeqCst);
    assert!(sink.wait_count(10, Duration::from_secs(20)).await);
    support::stop_relay(relay).await;
    assert_eq!(sink.count(), 10, "nothing sent twice");
}

/// A directory holding one engine's store is refused by the other, before it writes a
/// thing: opened, it would start a new, empty store beside the old one, whose pending
/// deliveries, dead letters and dedup records would be silently left behind (as after an
/// upgrade that changed the default backend from sled to redb).
#[tokio::test]
async fn a_store_of_the_other_engine_is_refused_not_started_afresh_beside() {
    let open_as = |backend: &str, dir: &std::path::Path| -> Result<Arc<dyn Store>, StoreError> {
        Ok(match backend {
            "sled" => hookrelay::store::sled::SledStore::open(dir)? as Arc<dyn Store>,
            _ => hookrelay::store::redb::RedbStore::open(dir)? as Arc<dyn Store>,
        })
    };
    let root = tempfile::tempdir().unwrap();
    // (the store made, the engine that must refuse it, a file that engine would make)
    for (made, other, its_file) in [("sled", "redb", "hookrelay.redb"), ("redb", "sled", "conf")] {
        let dir = root.path().join(made);
        open_as(made, &dir).unwrap().close().await.unwrap();
        let e = open_as(other, &dir).err().expect("refused").to_string();
        assert!(
            e.contains(&format!("holds a {made} store"))
                && e.contains(&format!("backend = \"{made}\"")),
            "{e}"
        );
        assert!(!dir.join(its_file).exists(), "{other} wrote nothing");
        // It still opens as what it is.
        open_as(made, &dir).unwrap().close().await.unwrap();
    }
}
