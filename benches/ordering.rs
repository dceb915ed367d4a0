//! Ordered against unordered delivery: `BENCH_EVENTS` (default 20,000) deliveries queued
//! while the destination is paused, then resumed; the time until a fast in-process sink has
//! them all, for unordered events and for `order_by` keys spread over 10 and 10,000 keys.
//! Prints deliveries/s and each ordered mode's ratio to unordered (median of
//! `BENCH_RUNS`, default 3). A key's deliveries are serial by design, so 10 keys run at most
//! 10 requests at once; 10,000 keys should cost next to nothing.
//!
//! `BENCH_BACKEND` picks the store: `redb` (default), `sled`, or `jetstream` (one relay on
//! a nats-server of its own per run; `BENCH_EVENTS=5000` keeps it short).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hookrelay::store::{now_ms, NewEvent};
use tokio::sync::Notify;

async fn run(backend: &str, events: u64, keys: Option<u64>) -> f64 {
    let nats = match backend {
        "jetstream" => Some(support::nats::server().await),
        _ => None,
    };
    let store = match &nats {
        Some(n) => format!("backend = \"jetstream\"\nurl = \"{}\"\n", n.url),
        None => format!("backend = \"{backend}\"\n"),
    };
    let count = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let (c, d) = (count.clone(), done.clone());
    let sink = support::answering_server(Bytes::new(), move |_| {
        if c.fetch_add(1, Ordering::Relaxed) + 1 == events {
            d.notify_one();
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.toml");
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[store]
{store}
[delivery]
max_in_flight = 32
max_queue = 10000000
rate = {{ per_second = 10000000, burst = 100000 }}
[[sources]]
name = "voice"
path = "/v"
[[destinations]]
name = "d"
url = "http://{sink}/"
"#
    );
    std::fs::write(&file, &toml).unwrap();
    let config = hookrelay::config::parse(&toml, &file, &|_| None).unwrap();
    let relay = hookrelay::Relay::start(config).await.unwrap();
    let store = relay.app.store.clone();
    store.set_paused("d", true).await.unwrap();
    let body = Bytes::from_static(
        br#"{"namespace":"VOICE","eventType":"CALL_STATUS","payload":{"eventId":"x"}}"#,
    );
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..events {
        let (store, body) = (store.clone(), body.clone());
        tasks.spawn(async move {
            store
                .accept(NewEvent {
                    source: "voice".into(),
                    id: format!("ev-{i}"),
                    body,
                    content_type: Some("application/json".into()),
                    received_ms: now_ms(),
                    destinations: vec!["d".into()],
                    max_queue: Vec::new(),
                    order_keys: vec![keys.map(|k| format!("key-{}", i % k))],
                    held: None,
                    dedup_window: Duration::from_secs(3600),
                })
                .await
                .unwrap();
        });
        if tasks.len() >= 512 {
            tasks.join_next().await;
        }
    }
    while tasks.join_next().await.is_some() {}
    let started = Instant::now();
    store.set_paused("d", false).await.unwrap();
    tokio::time::timeout(Duration::from_secs(300), done.notified())
        .await
        .expect("every delivery within 300 s");
    let rate = events as f64 / started.elapsed().as_secs_f64();
    relay.shutdown();
    tokio::time::timeout(Duration::from_secs(15), relay.stopped())
        .await
        .expect("the relay stops within 15 s")
        .unwrap();
    drop(nats);
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let var = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (events, runs) = (var("BENCH_EVENTS", 20_000), var("BENCH_RUNS", 3) as usize);
    let backend = std::env::var("BENCH_BACKEND").unwrap_or_else(|_| "redb".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "hookrelay ordering bench ({backend}): {events} deliveries, max_in_flight 32, median of {runs}"
    );
    println!("| mode | deliveries/s (runs) | / unordered |");
    println!("|---|---:|---:|");
    let mut unordered = 0.0;
    for (name, keys) in [
        ("unordered", None),
        ("10 keys", Some(10)),
        ("10,000 keys", Some(10_000)),
    ] {
        let all: Vec<f64> = (0..runs)
            .map(|_| rt.block_on(run(&backend, events, keys)))
            .collect();
        let m = median(all.clone());
        if keys.is_none() {
            unordered = m;
        }
        let shown: Vec<String> = all.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "| {name} | {m:.0} ({}) | {:.2} |",
            shown.join(", "),
            m / unordered
        );
    }
}
