//! The jetstream backend's accept rate against JetStream's own: on one nats-server this
//! bench starts (nats-server 2.15.1 on PATH; `scripts/test` installs it), it measures
//! 1. JetStream's acknowledged-publish rate with 64 publishes in flight (async-nats), the
//!    ceiling of any accept path built on it; the same with the accept's condition (empty
//!    subject), and atomic batches of two (what an accept of event + delivery in one
//!    batch would cost);
//! 2. one relay instance, then three sharing the stream, under `BENCH_CONNS` (64) keep-alive
//!    connections posting the voice fixture (spread over the instances), each event routed
//!    to one in-process sink, which gets every accepted event before the relays stop.
//!
//! `BENCH_SECONDS` (default 5) sets each phase. Prints accepted events/s, the events fully
//! relayed per second (over the load and the delivery of its backlog) and the ratios. The
//! server keeps nats-server's default `sync_interval` (stored writes reach the disk within
//! 2 minutes, not at each publish; a cluster's replicas are what make an accept durable), so
//! these rates compare with JetStream's publish rate, not with the embedded stores' fsynced
//! ones.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::load::{env_u64, run_load, Load};
use support::nats::server;

/// Acked publishes/s with `in_flight` outstanding, for `secs`.
async fn raw_publish(url: &str, in_flight: usize, secs: u64) -> f64 {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "rawbench".into(),
        subjects: vec!["rawbench.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let body = Bytes::from(
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/payloads/8x8/voice-call-status.json"),
        )
        .unwrap(),
    );
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..in_flight {
        let (js, body, done) = (js.clone(), body.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let ack = js
                    .publish(format!("rawbench.{t}.{n}"), body.clone())
                    .await
                    .unwrap();
                ack.await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Atomic batches of `size` messages/s (the accept path's write: the first message
/// conditional on an empty subject), `in_flight` outstanding, for `secs`.
async fn raw_batches(url: &str, size: usize, in_flight: usize, secs: u64) -> f64 {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: format!("batchbench{size}_{in_flight}"),
        subjects: vec![format!("batchbench{size}_{in_flight}.>")],
        max_messages_per_subject: 1,
        allow_atomic_publish: true,
        allow_message_ttl: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let body = Bytes::from(vec![b'x'; 600]);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..in_flight {
        let (client, body, done) = (client.clone(), body.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let id = format!("{t}-{n}");
                for i in 1..=size {
                    let mut h = async_nats::HeaderMap::new();
                    if size > 1 {
                        h.insert("Nats-Batch-Id", id.as_str());
                        h.insert("Nats-Batch-Sequence", i.to_string().as_str());
                    }
                    if i == 1 {
                        h.insert("Nats-Expected-Last-Subject-Sequence", "0");
                    }
                    let subject = format!("batchbench{size}_{in_flight}.{i}.{t}.{n}");
                    if i < size {
                        client
                            .publish_with_headers(subject, h, body.clone())
                            .await
                            .unwrap();
                    } else {
                        if size > 1 {
                            h.insert("Nats-Batch-Commit", "1");
                        }
                        let a = client
                            .request_with_headers(subject, h, body.clone())
                            .await
                            .unwrap();
                        assert!(
                            !a.payload.windows(5).any(|w| w == b"error"),
                            "{:?}",
                            a.payload
                        );
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// `instances` relays on the server, posted to by `conns` connections spread over them;
/// `ordered`: the route has `order_by` (a key per event, so no delivery waits).
async fn relays(
    url: &str,
    instances: usize,
    conns: usize,
    secs: u64,
    seq: Arc<AtomicU64>,
    ordered: bool,
) -> (Load, f64) {
    let order_by = if ordered {
        r#"order_by = ["$.payload.eventId"]"#
    } else {
        ""
    };
    let prefix = format!("bench{instances}{}", if ordered { "o" } else { "" });
    let delivered = Arc::new(AtomicU64::new(0));
    let count = delivered.clone();
    let sink = support::answering_server(Bytes::from_static(b"{\"ok\":true}"), move |_| {
        count.fetch_add(1, Ordering::Relaxed);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_body_bytes = 65536
[store]
backend = "jetstream"
url = "{url}"
prefix = "{prefix}"
[delivery]
max_in_flight = 64
max_queue = 100000000
rate = {{ per_second = 1000000000, burst = 1000000 }}
[[sources]]
name = "voice"
path = "/8x8/voice"
event_id = ["$.payload.eventId"]
[[destinations]]
name = "sink"
url = "http://{sink}/hooks"
[[routes]]
name = "all"
source = "voice"
match = {{ namespace = "VOICE" }}
to = ["sink"]
{order_by}
"#
    );
    let mut started = Vec::new();
    for _ in 0..instances {
        let config =
            hookrelay::config::parse(&toml, &dir.path().join("routes.toml"), &|_| None).unwrap();
        started.push(hookrelay::Relay::start(config).await.unwrap());
    }
    let addrs: Vec<SocketAddr> = started.iter().map(|r| r.ingress).collect();
    let per = conns / instances;
    let start = Instant::now();
    let loads = futures_util::future::join_all(
        addrs
            .iter()
            .map(|a| run_load(*a, "/8x8/voice", per, secs, None, seq.clone())),
    )
    .await;
    // Every accepted event is delivered (at least once) before the relays stop (bounded).
    let accepted: u64 = loads.iter().map(|l| l.ok).sum();
    support::load::drained(&delivered, accepted).await;
    let sustained = accepted as f64 / start.elapsed().as_secs_f64();
    for r in started {
        r.shutdown();
        tokio::time::timeout(Duration::from_secs(15), r.stopped())
            .await
            .expect("a relay stops within 15 s")
            .unwrap();
    }
    let mut total = Load {
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
        cpu: Duration::ZERO,
    };
    for l in loads {
        total.ok += l.ok;
        total.errors += l.errors;
        total.elapsed = total.elapsed.max(l.elapsed);
        total.latencies_us.extend(l.latencies_us);
    }
    (total, sustained)
}

fn main() {
    let secs = env_u64("BENCH_SECONDS", 5);
    let conns = env_u64("BENCH_CONNS", 64) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let nats = server().await;
        let seq = Arc::new(AtomicU64::new(0));
        let raw = raw_publish(&nats.url, 64, secs).await;
        // Why accept is one conditional publish and not an atomic batch of the event and
        // its deliveries: what the server does with each.
        let single = raw_batches(&nats.url, 1, 64, secs).await;
        let batch2 = raw_batches(&nats.url, 2, 64, secs).await;
        let batch2_one = raw_batches(&nats.url, 2, 1, secs).await;
        let (mut one, one_full) = relays(&nats.url, 1, conns, secs, seq.clone(), false).await;
        let (mut three, three_full) =
            relays(&nats.url, 3, conns.max(3), secs, seq.clone(), false).await;
        let (mut ordered, ordered_full) = relays(&nats.url, 1, conns, secs, seq, true).await;
        println!("| phase | events/s | p50 ms | p99 ms | errors | fully relayed/s |");
        println!("|---|---:|---:|---:|---:|---:|");
        println!("| JetStream acked publish, 64 in flight | {raw:.0} | | | | |");
        println!("| conditional publish (empty subject), 64 in flight | {single:.0} | | | | |");
        println!("| atomic batch of 2, 64 in flight | {batch2:.0} | | | | |");
        println!("| atomic batch of 2, one at a time | {batch2_one:.0} | | | | |");
        for (name, l, full) in [
            ("one relay", &mut one, one_full),
            ("three relays, one server", &mut three, three_full),
            (
                "one relay, `order_by` (a key per event)",
                &mut ordered,
                ordered_full,
            ),
        ] {
            println!(
                "| {name} | {:.0} | {:.2} | {:.2} | {} | {full:.0} |",
                l.rate(),
                l.pct(0.5),
                l.pct(0.99),
                l.errors
            );
        }
        println!(
            "ratios: one relay / JetStream publish {:.2}; three relays / JetStream publish {:.2}",
            one.rate() / raw,
            three.rate() / raw
        );
        drop(nats);
    });
}
