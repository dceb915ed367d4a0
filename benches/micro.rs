//! Micro-benchmarks of the per-request work: routing with 1/50/500 routes, event-id
//! extraction, JSONPath filters, signatures, and the store's accept path.

mod support;

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hookrelay::config::Config;
use hookrelay::event_id::{event_id, IdPath};
use hookrelay::routing::route;
use hookrelay::rules::Filter;
use hookrelay::store::redb::RedbStore;
use hookrelay::store::sled::SledStore;
use hookrelay::store::{now_ms, NewEvent, Store};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/payloads")
            .join(name),
    )
    .unwrap()
}

/// A config with `n` routes on one source; the last one matches the voice fixture.
fn config_with_routes(n: usize) -> Config {
    let mut t = String::from(
        "[[sources]]\nname = \"voice\"\npath = \"/v\"\n[[destinations]]\nname = \"d\"\nurl = \"http://127.0.0.1:1/\"\n",
    );
    for i in 0..n {
        let event_type = if i + 1 == n { "CALL_STATUS" } else { "OTHER" };
        t.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nsource = \"voice\"\nmatch = {{ namespace = \"VOICE\", eventType = [\"X{i}\", \"{event_type}\"] }}\nto = [\"d\"]\n"
        ));
    }
    hookrelay::config::parse(&t, Path::new("bench.toml"), &|_| None).unwrap()
}

fn routing(c: &mut Criterion) {
    let body = fixture("8x8/voice-call-status.json");
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let wrapped = serde_json::Value::Array(vec![event]);
    let mut g = c.benchmark_group("routing");
    for n in [1usize, 50, 500] {
        let cfg = config_with_routes(n);
        let src = cfg.sources[0].clone();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let f = route(&cfg, &src, black_box(&wrapped));
                assert_eq!(f.destinations.len(), 1);
                f
            })
        });
    }
    g.finish();
}

fn ids_and_filters(c: &mut Criterion) {
    let body = fixture("8x8/voice-call-status.json");
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let plain = vec![IdPath::compile("$.payload.eventId").unwrap()];
    let general = vec![IdPath::compile("$['payload']['eventId']").unwrap()];
    let mut g = c.benchmark_group("event_id");
    g.bench_function("plain_member_path", |b| {
        b.iter(|| event_id(&plain, black_box(&event), &body))
    });
    g.bench_function("jsonpath_engine", |b| {
        b.iter(|| event_id(&general, black_box(&event), &body))
    });
    g.bench_function("sha256_fallback", |b| {
        b.iter(|| event_id(&[], black_box(&event), &body))
    });
    g.finish();

    let wrapped = serde_json::Value::Array(vec![event]);
    let f = Filter::compile("@.payload.callDirection == 'INBOUND' && @.payload.sipCode >= 200")
        .unwrap();
    c.bench_function("filter/two_comparisons", |b| {
        b.iter(|| assert!(f.matches(black_box(&wrapped))))
    });
    c.bench_function("parse_json/voice_call_status", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(&body)).unwrap())
    });
    // What the ingress does for a source whose rules read plain members: every byte read
    // and checked, only those members built.
    let mut needs = hookrelay::needed::Needed::nothing();
    for p in [&plain[0], &IdPath::compile("$.eventType").unwrap()] {
        needs.add(p.members());
    }
    c.bench_function("parse_json/voice_call_status_needed_members", |b| {
        b.iter(|| needs.parse(black_box(&body)).unwrap())
    });
}

fn signatures(c: &mut Criterion) {
    let body = fixture("8x8/voice-call-status.json");
    let secret = b"bench-signing-secret";
    let sig = hookrelay::signature::sign(secret, "msg_1", "1700000000", &body);
    c.bench_function("signature/sign", |b| {
        b.iter(|| hookrelay::signature::sign(secret, "msg_1", "1700000000", black_box(&body)))
    });
    c.bench_function("signature/verify", |b| {
        b.iter(|| {
            assert!(hookrelay::signature::verify(
                secret,
                "msg_1",
                "1700000000",
                black_box(&body),
                &sig
            ))
        })
    });
}

/// The store benches' runtime: two workers, as on the machine.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Event number `n` of the store benches: the voice sample for one destination.
fn voice_event(n: u64, body: &Bytes) -> NewEvent {
    NewEvent {
        source: "voice".into(),
        id: support::load::event_id(n),
        body: body.clone(),
        content_type: Some("application/json".into()),
        received_ms: now_ms(),
        destinations: vec!["d".into()],
        max_queue: Vec::new(),
        order_keys: Vec::new(),
        held: None,
        dedup_window: Duration::from_secs(3600),
    }
}

/// A `backend` ("sled" or "redb") store in `dir` (inside a runtime: the store starts tasks).
fn open_store(backend: &str, dir: &Path) -> Arc<dyn Store> {
    match backend {
        "sled" => SledStore::open(dir).unwrap(),
        _ => RedbStore::open(dir).unwrap(),
    }
}

fn store_accept(c: &mut Criterion) {
    let rt = runtime();
    let body = Bytes::from(fixture("8x8/voice-call-status.json"));
    let mut n = 0u64;
    let mut g = c.benchmark_group("store_accept");
    g.measurement_time(Duration::from_secs(5));
    for (backend, batch) in [("sled", 1usize), ("sled", 64), ("redb", 1), ("redb", 64)] {
        let dir = tempfile::tempdir().unwrap();
        let store = rt.block_on(async { open_store(backend, dir.path()) });
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(
            BenchmarkId::new(format!("{backend}/concurrent"), batch),
            &batch,
            |b, &batch| {
                b.to_async(&rt).iter(|| {
                    let tasks: Vec<_> = (0..batch)
                        .map(|_| {
                            n += 1;
                            let store = store.clone();
                            let ev = voice_event(n, &body);
                            tokio::spawn(async move { store.accept(ev).await })
                        })
                        .collect();
                    async move {
                        for t in tasks {
                            t.await.unwrap().unwrap();
                        }
                    }
                })
            },
        );
        // Closed before the next backend's runs, so its threads are not running beside them.
        rt.block_on(store.close()).unwrap();
    }
    g.finish();
}

/// A scheduler's pass: the next window of 128 due deliveries (records read back) out of
/// 10,000 pending for one destination.
fn store_pending(c: &mut Criterion) {
    let rt = runtime();
    let body = Bytes::from(fixture("8x8/voice-call-status.json"));
    let mut g = c.benchmark_group("store_pending");
    g.measurement_time(Duration::from_secs(5));
    for backend in ["sled", "redb"] {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = rt.block_on(async {
            let store = open_store(backend, dir.path());
            for n in 0..10_000u64 {
                store.accept(voice_event(n, &body)).await.unwrap();
            }
            store
        });
        g.throughput(Throughput::Elements(128));
        g.bench_function(BenchmarkId::new(backend, 128), |b| {
            b.to_async(&rt).iter(|| async {
                let window = store.pending("d", 128, &|_| false).await.unwrap();
                assert_eq!(window.len(), 128);
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    routing,
    ids_and_filters,
    signatures,
    store_accept,
    store_pending
);
criterion_main!(benches);
