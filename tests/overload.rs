//! More load than `max_queue` allows: the ingress sheds it with 503 and Retry-After, never
//! lets concurrent posts push a queue past `max_queue`, and keeps its memory bounded under a
//! flood while the destination is down.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use support::{client, tail, try_post, RelayProcess};
use support::{destination_toml, fault_config, get_text, post_event, route_toml, voice_event};
use support::{start_relay, stop_relay, FAULT_WAIT as WAIT};

fn down_config(max_queue: usize) -> String {
    fault_config(
        "",
        &format!("max_queue = {max_queue}\nretry = {{ first = \"1h\" }}"),
        &format!(
            "{}{}",
            destination_toml("down", "http://127.0.0.1:9/down", ""),
            route_toml(&["down"])
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_queue_the_ingress_sheds_load_with_503() {
    const MAX_QUEUE: u64 = 50;
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &down_config(MAX_QUEUE as usize)).await;
    let store = relay.app.store.clone();
    let c = client();
    let (mut ok, mut shed) = (0, 0);
    for i in 0..200 {
        let p = post_event(&c, &relay, &format!("q-{i}"), 0).await;
        match p.status {
            200 => {
                assert_eq!(
                    shed, 0,
                    "no 200 after the first 503 while the queue is full"
                );
                ok += 1;
            }
            503 => {
                assert!(p.headers.contains_key("retry-after"), "{:?}", p.headers);
                assert_eq!(p.json()["error"], "unavailable");
                shed += 1;
            }
            s => panic!("unexpected {s}: {:?}", p.body),
        }
        assert!(store.queue_depth("down") <= MAX_QUEUE);
    }
    assert_eq!((ok, shed), (MAX_QUEUE, 200 - MAX_QUEUE));
    let metrics = get_text(&format!("http://{}/metrics", relay.admin)).await.1;
    let depth = metrics
        .lines()
        .find(|l| l.starts_with(r#"hookrelay_queue_depth{destination="down"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no queue depth in\n{metrics}"));
    assert_eq!(depth, MAX_QUEUE as f64);
    stop_relay(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_never_push_the_queue_past_max_queue() {
    const MAX_QUEUE: u64 = 50;
    const SENDERS: usize = 32;
    const N: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &down_config(MAX_QUEUE as usize)).await;
    let url = format!("http://{}/8x8/voice", relay.ingress);
    let (accepted, shed) = flood(&url, SENDERS, N, "cq", 0).await;
    let depth = relay.app.store.queue_depth("down");
    stop_relay(relay).await;
    println!("max_queue={MAX_QUEUE} with {SENDERS} concurrent senders: {accepted} accepted, {shed} shed, queue depth {depth}");
    // N distinct events to a destination that is down (retry in 1 h): the queue fills to
    // exactly max_queue and no further. (A relay that refused everything, or let the queue
    // run past the limit, fails here.)
    assert_eq!(accepted + shed, N);
    assert_eq!(
        (accepted, depth),
        (MAX_QUEUE as usize, MAX_QUEUE),
        "accepted and queue depth with max_queue {MAX_QUEUE}"
    );
}

/// Posts `n` events (ids `<prefix>-<i>`, `pad` bytes of padding) from `senders` concurrent
/// clients. Every answer is 200 or 503 with Retry-After; returns how many of each.
async fn flood(url: &str, senders: usize, n: usize, prefix: &str, pad: usize) -> (usize, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let mut tasks = Vec::new();
    for _ in 0..senders {
        let (url, prefix) = (url.to_string(), prefix.to_string());
        let (next, counts) = (next.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let p = try_post(&c, &url, voice_event(&format!("{prefix}-{i}"), pad), WAIT)
                    .await
                    .unwrap();
                match p.status {
                    200 => counts[0].fetch_add(1, Ordering::Relaxed),
                    503 => {
                        assert!(p.headers.contains_key("retry-after"));
                        counts[1].fetch_add(1, Ordering::Relaxed)
                    }
                    s => panic!("unexpected {s}: {:?}", p.body),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_a_flood_while_the_destination_is_down() {
    const MAX_QUEUE: usize = 1000;
    const POSTS: usize = 20_000;
    const SENDERS: usize = 16;
    const MAX_GROWTH_KIB: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, down_config(MAX_QUEUE)).unwrap();
    let log = dir.path().join("relay.log");
    let relay = RelayProcess::spawn(&cfg, &log).await;
    let url = format!("http://{}/8x8/voice", relay.ingress);
    let before = relay.rss_kib();

    let started = Instant::now();
    let (ok, shed) = flood(&url, SENDERS, POSTS, "flood", 512).await;
    let took = started.elapsed();
    let after = relay.rss_kib();
    let peak = relay.peak_rss_kib();
    let metrics = get_text(&format!("http://{}/metrics", relay.admin)).await.1;
    let status = relay.sigterm(WAIT).await;
    let growth = after.saturating_sub(before);
    println!(
        "flood: {POSTS} posts ({SENDERS} senders, max_queue={MAX_QUEUE}, destination down) in \
         {took:.1?}: {ok} accepted, {shed} answered 503; RSS {} KiB -> {} KiB (+{} KiB), \
         peak {} KiB",
        before, after, growth, peak
    );
    assert_eq!(ok + shed, POSTS);
    // The store's writer checks max_queue against every accept in order, so the queue fills
    // exactly, however many requests are in flight.
    assert_eq!(ok, MAX_QUEUE, "accepted with max_queue {MAX_QUEUE}");
    assert!(
        growth < MAX_GROWTH_KIB,
        "RSS grew by {growth} KiB under the flood; log:\n{}",
        tail(&log)
    );
    assert!(
        metrics.contains(r#"hookrelay_queue_depth{destination="down"}"#),
        "{metrics}"
    );
    assert!(status.success(), "{status}");
}
