//! SIGKILL under load: the `hookrelay` binary is killed again and again while 32 senders
//! post to it and it delivers to two destinations; every event it answered 200 must reach
//! both destinations (at least once) once it runs again.
//!
//! `HOOKRELAY_KILL_ROUNDS` sets the number of kills (default 3, a few seconds per backend);
//! e.g. `HOOKRELAY_KILL_ROUNDS=20 cargo test --test kill -- --nocapture` for a long run.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use support::{client, tail, try_post, FaultSink, RelayProcess};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const SENDERS: usize = 32;
/// The most requests one sender makes (a bound on its loop; never reached in practice).
const MAX_REQUESTS_PER_SENDER: usize = 1_000_000;
/// How long one round may take to see its share of accepted events.
const ROUND_WAIT: Duration = Duration::from_secs(30);
/// How long the relay gets to deliver everything after the last kill.
const DRAIN_WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_sled() {
    kill_under_load("sled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_redb() {
    kill_under_load("redb").await;
}

fn rounds() -> usize {
    match std::env::var("HOOKRELAY_KILL_ROUNDS") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("HOOKRELAY_KILL_ROUNDS={v:?} is not a number")),
        Err(_) => 3,
    }
}

fn config(backend: &str, a: &FaultSink, b: &FaultSink) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "2s"

[store]
backend = "{backend}"
path = "data"

[delivery]
timeout = "5s"
max_in_flight = 32
rate = {{ per_second = 1000000, burst = 10000 }}
retry = {{ first = "100ms", factor = 2.0, max_delay = "1s" }}

[[sources]]
name = "voice"
path = "/8x8/voice"
event_id = ["$.payload.eventId"]

[[destinations]]
name = "a"
url = "{}"

[[destinations]]
name = "b"
url = "{}"

[[routes]]
name = "both"
source = "voice"
match = {{ namespace = "VOICE" }}
to = ["a", "b"]
"#,
        a.url("/a"),
        b.url("/b")
    )
}

/// What the senders share.
struct Load {
    /// The relay's ingress now; `None` while it is down.
    addr: watch::Sender<Option<SocketAddr>>,
    /// Ids answered 200 (accepted, not a duplicate).
    accepted: Mutex<HashSet<String>>,
    /// `accepted.len()`, to wait on.
    accepted_count: watch::Sender<usize>,
    next_id: AtomicU64,
    /// Requests that got no answer (refused, reset, cut off by the kill).
    errors: AtomicUsize,
    /// Requests answered with anything but an acceptance.
    refused: AtomicUsize,
    stop: CancellationToken,
}

async fn sender(load: Arc<Load>) {
    let client = client();
    let mut addr = load.addr.subscribe();
    for _ in 0..MAX_REQUESTS_PER_SENDER {
        if load.stop.is_cancelled() {
            return;
        }
        let current = *addr.borrow_and_update();
        let Some(at) = current else {
            // The relay is down: wait for the next one (bounded, and rechecked).
            tokio::select! {
                _ = load.stop.cancelled() => return,
                _ = addr.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        let n = load.next_id.fetch_add(1, Ordering::Relaxed);
        let id = event_id(n);
        let body = format!(r#"{{"namespace":"VOICE","payload":{{"eventId":"{id}"}}}}"#);
        let url = format!("http://{at}/8x8/voice");
        match try_post(&client, &url, body.into_bytes(), Duration::from_secs(10)).await {
            Ok(p) if p.status == 200 => {
                let v = p.json();
                if v["accepted"] == true && v["id"] == id.as_str() && v["duplicate"] == false {
                    let mut acc = load.accepted.lock().unwrap();
                    acc.insert(id);
                    let len = acc.len();
                    drop(acc);
                    load.accepted_count.send_replace(len);
                } else {
                    load.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(_) => {
                load.refused.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                load.errors.fetch_add(1, Ordering::Relaxed);
                // Most likely killed: wait for a new address (bounded: it may be a blip).
                tokio::select! {
                    _ = load.stop.cancelled() => return,
                    _ = addr.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
}

/// Event id `n`: every other one a version-1 UUID (as 8x8 sends; the store keys those in
/// time order), the others plain, so both of the store's dedup key layouts are killed under.
fn event_id(n: u64) -> String {
    if n % 2 == 1 {
        return format!("k-{n}");
    }
    let t = 0x01ef_133a_0000_0000 + n * 0x9e37_79b9;
    format!(
        "{:08x}-{:04x}-1{:03x}-9dd4-e911cc6fc82f",
        t & 0xffff_ffff,
        (t >> 32) & 0xffff,
        (t >> 48) & 0x0fff
    )
}

/// Waits until at least `n` events have been accepted in all; panics after `ROUND_WAIT`.
async fn accepted_at_least(load: &Load, n: usize, log: &std::path::Path) {
    let mut rx = load.accepted_count.subscribe();
    if tokio::time::timeout(ROUND_WAIT, rx.wait_for(|c| *c >= n))
        .await
        .is_err()
    {
        panic!(
            "only {} events accepted within {ROUND_WAIT:?}, wanted {n}; relay log:\n{}",
            *rx.borrow(),
            tail(log)
        );
    }
}

async fn kill_under_load(backend: &str) {
    let rounds = rounds();
    let started = Instant::now();
    let a = FaultSink::answering(200).await;
    let b = FaultSink::answering(200).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, config(backend, &a, &b)).unwrap();
    let log = dir.path().join("relay.log");

    let load = Arc::new(Load {
        addr: watch::channel(None).0,
        accepted: Mutex::new(HashSet::new()),
        accepted_count: watch::channel(0).0,
        next_id: AtomicU64::new(0),
        errors: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
        stop: CancellationToken::new(),
    });
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| tokio::spawn(sender(load.clone())))
        .collect();
    // If an assertion fails below, the senders stop too.
    let _stop_senders = load.stop.clone().drop_guard();

    let mut relay = RelayProcess::spawn(&cfg, &log).await;
    load.addr.send_replace(Some(relay.ingress));
    let mut rng = rand::rng();
    for _ in 0..rounds {
        // Let a random share of load through, then kill mid-stream: requests, commits and
        // deliveries are all in flight at that moment.
        let now = *load.accepted_count.borrow();
        accepted_at_least(&load, now + rng.random_range(300..1500), &log).await;
        load.addr.send_replace(None);
        relay.sigkill().await;
        relay = RelayProcess::spawn(&cfg, &log).await;
        load.addr.send_replace(Some(relay.ingress));
    }
    // The last relay takes load too before the senders stop.
    let now = *load.accepted_count.borrow();
    accepted_at_least(&load, now + 200, &log).await;
    load.stop.cancel();
    for s in senders {
        tokio::time::timeout(Duration::from_secs(15), s)
            .await
            .expect("senders stop")
            .unwrap();
    }
    let accepted = load.accepted.lock().unwrap().clone();
    let sending = started.elapsed();

    // Everything accepted must arrive at both destinations while this relay runs.
    let missing_a = a.wait_delivered(&accepted, DRAIN_WAIT).await;
    let missing_b = b.wait_delivered(&accepted, DRAIN_WAIT).await;
    let status = relay.sigterm(Duration::from_secs(20)).await;

    let mut lost_total = 0;
    let mut summary = format!(
        "kill test backend={backend} kills={rounds} senders={SENDERS} accepted={} \
         no_answer={} refused={} took={:.1}s",
        accepted.len(),
        load.errors.load(Ordering::Relaxed),
        load.refused.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    for (name, sink, missing) in [("a", &a, &missing_a), ("b", &b, &missing_b)] {
        let (delivered, unique) = sink.delivered_counts();
        let lost = missing.as_ref().err().map_or(0, |m| m.len());
        lost_total += lost;
        let unacknowledged = sink.delivered_ids().difference(&accepted).count();
        summary.push_str(&format!(
            " | {name}: delivered={delivered} unique={unique} lost={lost} \
             duplicates={} unacknowledged_but_delivered={unacknowledged}",
            delivered - unique
        ));
    }
    println!("{summary} (sending phase {:.1}s)", sending.as_secs_f64());
    a.stop().await;
    b.stop().await;

    for (name, missing) in [("a", &missing_a), ("b", &missing_b)] {
        if let Err(m) = missing {
            let mut some: Vec<_> = m.iter().take(10).collect();
            some.sort();
            panic!(
                "{} accepted events never reached destination {name} (e.g. {some:?}); \
                 {summary}; relay log:\n{}",
                m.len(),
                tail(&log)
            );
        }
    }
    assert_eq!(lost_total, 0);
    assert!(
        accepted.len() > rounds * 300,
        "the load was real: {summary}"
    );
    assert!(status.success(), "SIGTERM exits 0, got {status}");
}
