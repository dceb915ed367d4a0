//! A large backlog: `BENCH_PENDING` (default 1,000,000) pending deliveries on disk, then the
//! relay binary started on them. Prints how long the first delivery takes to reach a sink
//! after the start, and the relay's resident memory (VmRSS from /proc) 3 s after the start,
//! for each backend (`BENCH_BACKENDS`, default "redb,sled"): once after a clean stop, once
//! after a SIGKILL. `BENCH_ORDER_KEYS=100000` gives the deliveries that many `order_by` keys
//! (round robin), so that only each key's head is in the due queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use bytes::Bytes;
use hookrelay::store::{now_ms, EventQuery, NewEvent, Store};
use support::child::Child;
use tokio::sync::mpsc;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn fill(store: Arc<dyn Store>, n: u64, keys: Option<u64>) {
    let body = Bytes::from_static(
        br#"{"namespace":"VOICE","eventType":"CALL_STATUS","payload":{"eventId":"x"}}"#,
    );
    let concurrency = 512;
    let mut next = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    while next < n || !tasks.is_empty() {
        while next < n && tasks.len() < concurrency {
            let store = store.clone();
            let body = body.clone();
            let id = format!("backlog-{next}");
            let key = keys.map(|k| format!("key-{}", next % k));
            tasks.spawn(async move {
                store
                    .accept(NewEvent {
                        source: "voice".into(),
                        id,
                        body,
                        content_type: Some("application/json".into()),
                        received_ms: now_ms(),
                        destinations: vec!["slow".into()],
                        max_queue: Vec::new(),
                        order_keys: vec![key],
                        held: None,
                        dedup_window: Duration::from_secs(3600),
                    })
                    .await
                    .unwrap();
            });
            next += 1;
        }
        tasks.join_next().await;
    }
}

/// The admin API's event list on the full store: the first page and the 10th (reached
/// through the cursor), 50 events each, median of 5 reads.
async fn pages(store: &dyn Store, backend: &str) {
    let timed = |q: EventQuery| async move {
        let mut took = Vec::new();
        let mut page = None;
        for _ in 0..5 {
            let t = Instant::now();
            page = Some(store.recent(&q).await.unwrap());
            took.push(t.elapsed());
        }
        took.sort();
        (took[2], page.unwrap())
    };
    let q = EventQuery {
        limit: 50,
        ..EventQuery::default()
    };
    let (first, mut page) = timed(q.clone()).await;
    for _ in 0..8 {
        page = store
            .recent(&EventQuery {
                before: page.next,
                ..q.clone()
            })
            .await
            .unwrap();
    }
    let (tenth, _) = timed(EventQuery {
        before: page.next,
        ..q
    })
    .await;
    eprintln!(
        "{backend}: the event list (what GET /api/events reads), 50 per page: page 1 {} µs, page 10 {} µs (median of 5)",
        first.as_micros(),
        tenth.as_micros()
    );
}

/// Starts the relay binary on `cfg`; returns how long the first delivery took and the
/// relay's RSS 3 s after the start, then SIGKILLs it.
async fn start_relay(
    cfg: &std::path::Path,
    arrivals: &mut mpsc::UnboundedReceiver<Instant>,
) -> (Option<Duration>, u64) {
    while arrivals.try_recv().is_ok() {}
    let start = Instant::now();
    let cfg = cfg.to_path_buf();
    // Killed when dropped, a panic included.
    let (relay, _, _) = tokio::task::spawn_blocking(move || Child::relay(&cfg))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(60), arrivals.recv())
        .await
        .ok()
        .flatten()
        .map(|t| t.duration_since(start));
    tokio::time::sleep_until((start + Duration::from_secs(3)).into()).await;
    let rss = rss_kib(relay.id());
    drop(relay);
    (first, rss)
}

fn main() {
    let n: u64 = std::env::var("BENCH_PENDING")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "redb,sled".into());
    let keys: Option<u64> = std::env::var("BENCH_ORDER_KEYS")
        .ok()
        .and_then(|v| v.parse().ok());
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!(
        "| backend | pending | order keys | fill time | restart after | first delivery after start | relay RSS |"
    );
    println!("|---|---:|---:|---:|---|---:|---:|");
    for backend in backends.split(',') {
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            let started = Instant::now();
            let store: Arc<dyn Store> = match backend {
                "sled" => hookrelay::store::sled::SledStore::open(&data).unwrap(),
                _ => hookrelay::store::redb::RedbStore::open(&data).unwrap(),
            };
            fill(store.clone(), n, keys).await;
            let fill_time = started.elapsed();
            pages(store.as_ref(), backend).await;
            store.close().await.unwrap();
            drop(store);

            let (tx, mut arrivals) = mpsc::unbounded_channel();
            let addr = support::answering_server(Bytes::new(), move |_| {
                let _ = tx.send(Instant::now());
            })
            .await;
            let cfg = dir.path().join("routes.toml");
            std::fs::write(
                &cfg,
                format!(
                    r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[store]
backend = "{backend}"
[[sources]]
name = "voice"
path = "/v"
[[destinations]]
name = "slow"
url = "http://{addr}/"
rate = {{ per_second = 50, burst = 1 }}
"#
                ),
            )
            .unwrap();
            // First after the clean close of the fill, then after a SIGKILL of that relay.
            for restart in ["clean stop", "SIGKILL"] {
                let (first, rss) = start_relay(&cfg, &mut arrivals).await;
                println!(
                    "| {backend} | {n} | {} | {:.1} s | {restart} | {} | {:.1} MiB |",
                    keys.map_or("none".to_string(), |k| k.to_string()),
                    fill_time.as_secs_f64(),
                    first.map_or("none within 60 s".to_string(), |d| format!(
                        "{} ms",
                        d.as_millis()
                    )),
                    rss as f64 / 1024.0
                );
            }
        });
    }
}
