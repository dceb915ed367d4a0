//! End-to-end throughput and latency on loopback. Each server measured runs as a process of
//! its own, so its CPU time counts neither the load generator's nor the sink's:
//! - the reference: a bare hyper 1 handler that reads the body and answers a small JSON;
//! - the relay binary on a temp store, one route to a fast sink in the bench's process;
//! - a load generator of `BENCH_CONNS` (64) HTTP/1.1 keep-alive connections posting the
//!   8x8 voice fixture with a unique `eventId` per request;
//! - the ceiling of any relay on these cores: a bare hyper forwarder that answers each request
//!   at once and posts its body to the sink through a pooled hyper client (no store, no
//!   checks). It does the two HTTP exchanges per event that a relay must do, nothing else.
//!
//! The relay's and the forwarder's CPU time count until the sink has every event they
//! accepted. A fixed-rate request's latency counts from when it was due, so one held up
//! behind a slow answer counts its wait.
//!
//! `BENCH_SECONDS` (default 5) sets each phase's length; `BENCH_RATE` (events/s, e.g. 2000, or
//! `half`: half the relay's closed-loop rate in the same phase)
//! runs an open-loop fixed-rate phase on the relay as well; `BENCH_BACKENDS` (default
//! "sled,redb") picks the stores. Prints one table with the ratios per round;
//! `BENCH_ROUNDS` (default 1) runs the whole sequence that many times and then prints each
//! round's ratios and their medians (the phases of a round are seconds apart, so a round's
//! ratio is steadier than figures taken minutes apart). The forwarder runs before the relay
//! and again after it, and the ratios are to the mean of the two: a machine that slows down
//! or speeds up during a round moves both sides of a ratio alike.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

mod support;

use support::child::Child;
use support::load::{drained, env_u64, run_load, Load};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};

/// The forwarder: answers at once, then posts the body to `sink` (at most 64 in flight).
async fn forwarder(sink: SocketAddr) -> SocketAddr {
    use hyper_util::client::legacy::Client;
    let client: Client<_, Full<Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let uri: http::Uri = format!("http://{sink}/hooks").parse().unwrap();
    support::answering_server(
        Bytes::from_static(b"{\"status\":\"accepted\"}"),
        move |body| {
            let (client, gate, uri) = (client.clone(), gate.clone(), uri.clone());
            tokio::spawn(async move {
                let _permit = gate.acquire().await;
                let req = Request::post(uri)
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .unwrap();
                if let Ok(resp) = client.request(req).await {
                    let _ = resp.into_body().collect().await;
                }
            });
        },
    )
    .await
}

/// A fast sink answering `{"ok":true}`, and how many requests it has had.
async fn counting_sink() -> (SocketAddr, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let c = n.clone();
    let addr = support::answering_server(Bytes::from_static(b"{\"ok\":true}"), move |_| {
        c.fetch_add(1, Ordering::Relaxed);
    })
    .await;
    (addr, n)
}

/// `BENCH_RATE`: events per second, or `half`: half the relay's closed-loop rate in the
/// same phase (the issue's "half the relay's maximum rate").
#[derive(Clone, Copy)]
enum FixedRate {
    Events(u64),
    HalfMax,
}

struct RelayPhase {
    accept: Load,
    /// The fixed-rate phase: its rate, and its load.
    fixed: Option<(u64, Load)>,
    /// Deliveries reaching the sink per second during the load.
    delivery_rate: f64,
    /// Events delivered per second over the load and the drain of its backlog.
    sustained: f64,
}

/// The relay binary on `backend`, with one route to an in-process fast sink. Its CPU time
/// counts until the sink has every accepted event, as the forwarder's does.
async fn relay_phase(
    backend: &str,
    conns: usize,
    secs: u64,
    rate: Option<FixedRate>,
    seq: Arc<AtomicU64>,
) -> RelayPhase {
    let (sink, delivered) = counting_sink().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.toml");
    let data = dir.path().join("data");
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[store]
backend = "{backend}"
path = "{}"
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
"#,
        data.display()
    );
    std::fs::write(&file, toml).unwrap();
    // Blocking while it starts: off the runtime's workers, which run the sink.
    let (relay, ingress, _) = tokio::task::spawn_blocking(move || Child::relay(&file))
        .await
        .unwrap();
    let (t0, cpu0, d0) = (
        Instant::now(),
        relay.cpu(),
        delivered.load(Ordering::Relaxed),
    );
    let mut accept = run_load(ingress, "/8x8/voice", conns, secs, None, seq.clone()).await;
    let delivery_rate =
        (delivered.load(Ordering::Relaxed) - d0) as f64 / accept.elapsed.as_secs_f64();
    drained(&delivered, d0 + accept.ok).await;
    let sustained = accept.ok as f64 / t0.elapsed().as_secs_f64();
    accept.cpu = relay.cpu().saturating_sub(cpu0);
    let fixed = match rate {
        Some(r) => {
            let r = match r {
                FixedRate::Events(n) => n,
                // Half of what this relay just accepted at most, in this run.
                FixedRate::HalfMax => (accept.rate() / 2.0).round().max(1.0) as u64,
            };
            let (cpu0, d0) = (relay.cpu(), delivered.load(Ordering::Relaxed));
            let mut fixed = run_load(ingress, "/8x8/voice", conns, secs, Some(r), seq).await;
            drained(&delivered, d0 + fixed.ok).await;
            fixed.cpu = relay.cpu().saturating_sub(cpu0);
            Some((r, fixed))
        }
        None => None,
    };
    tokio::task::spawn_blocking(move || relay.stop())
        .await
        .unwrap();
    RelayPhase {
        accept,
        fixed,
        delivery_rate,
        sustained,
    }
}

/// One round's figures per backend: accepted / fully relayed by the forwarder, and CPU
/// per event / the forwarder's.
type RoundRatios = Vec<(String, f64, f64)>;

/// This bench run again as a server of its own (`Child::role`): the reference or the
/// forwarder, on a runtime of 2 threads as the relay's.
fn serve_role(role: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let addr = match role {
            "reference" => {
                support::answering_server(Bytes::from_static(b"{\"ok\":true}"), |_| {}).await
            }
            "forwarder" => {
                let sink = std::env::var("BENCH_SINK").unwrap().parse().unwrap();
                forwarder(sink).await
            }
            other => panic!("no bench role {other}"),
        };
        tokio::task::spawn_blocking(move || support::child::serve_until_stdin_closes(addr))
            .await
            .unwrap();
    });
}

fn main() {
    if let Ok(role) = std::env::var("BENCH_ROLE") {
        return serve_role(&role);
    }
    let secs = env_u64("BENCH_SECONDS", 5);
    let conns = env_u64("BENCH_CONNS", 64) as usize;
    let rounds = env_u64("BENCH_ROUNDS", 1).max(1);
    let rate = std::env::var("BENCH_RATE").ok().map(|v| match v.as_str() {
        "half" => FixedRate::HalfMax,
        n => FixedRate::Events(n.parse().expect("BENCH_RATE: events per second, or half")),
    });
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sled,redb".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let seq = Arc::new(AtomicU64::new(0));
        let mut all: Vec<RoundRatios> = Vec::new();
        let mut disk = Vec::new();
        for r in 1..=rounds {
            println!();
            println!("round {r} of {rounds}");
            disk.push(disk_now());
            all.push(round(conns, secs, rate, &backends, seq.clone()).await);
        }
        if rounds > 1 {
            println!();
            println!(
                "disk by round (µs per synced 4 KiB write, median of 200): {}",
                listed(&disk)
            );
            for (i, (backend, _, _)) in all[0].iter().enumerate() {
                let accept: Vec<f64> = all.iter().map(|r| r[i].1).collect();
                let cpu: Vec<f64> = all.iter().map(|r| r[i].2).collect();
                println!(
                    "{backend} by round: accept / fully relayed {} (median {:.2}); CPU per \
                     event / the forwarder's {} (median {:.2})",
                    listed(&accept),
                    median(&accept),
                    listed(&cpu),
                    median(&cpu)
                );
            }
        }
    });
}

/// The disk's speed now (the store's figures move with it), printed and returned.
fn disk_now() -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let us = support::disk::synced_write_us(dir.path(), 200);
    println!("disk: {us:.0} µs per synced 4 KiB write (median of 200)");
    us
}

fn listed(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One run of the bare forwarder: its load, the rate its deliveries reached the sink, and
/// events fully relayed per second over the load and its drain.
struct ForwarderRun {
    load: Load,
    delivered: f64,
    sustained: f64,
}

async fn forwarder_phase(conns: usize, secs: u64, seq: Arc<AtomicU64>) -> ForwarderRun {
    let (fwd_sink, fwd_count) = counting_sink().await;
    let env = [("BENCH_SINK", fwd_sink.to_string())];
    let (fwd, fwd_addr) = tokio::task::spawn_blocking(move || Child::role("forwarder", &env))
        .await
        .unwrap();
    let (t0, cpu0) = (Instant::now(), fwd.cpu());
    let mut load = run_load(fwd_addr, "/", conns, secs, None, seq).await;
    let delivered = fwd_count.load(Ordering::Relaxed) as f64 / load.elapsed.as_secs_f64();
    // Its backlog drains before the next phase; events fully relayed per second over the
    // whole time (load + drain) is what a relay whose deliveries keep up can reach.
    drained(&fwd_count, load.ok).await;
    let sustained = fwd_count.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    load.cpu = fwd.cpu().saturating_sub(cpu0);
    ForwarderRun {
        load,
        delivered,
        sustained,
    }
}

/// The reference, the forwarder, the relay on each backend, then the forwarder again,
/// seconds apart: one table and its ratios.
async fn round(
    conns: usize,
    secs: u64,
    rate: Option<FixedRate>,
    backends: &str,
    seq: Arc<AtomicU64>,
) -> RoundRatios {
    // Reference.
    let (reference_server, ref_addr) =
        tokio::task::spawn_blocking(|| Child::role("reference", &[]))
            .await
            .unwrap();
    let cpu0 = reference_server.cpu();
    let mut reference = run_load(ref_addr, "/", conns, secs, None, seq.clone()).await;
    reference.cpu = reference_server.cpu().saturating_sub(cpu0);
    drop(reference_server);

    // The ceiling: two HTTP exchanges per event and nothing else; before the relay and after.
    let mut before = forwarder_phase(conns, secs, seq.clone()).await;

    let mut rows = Vec::new();
    for backend in backends.split(',') {
        rows.push((
            backend,
            relay_phase(backend, conns, secs, rate, seq.clone()).await,
        ));
    }
    let mut after = forwarder_phase(conns, secs, seq.clone()).await;
    let sustained = (before.sustained + after.sustained) / 2.0;
    let ceiling_cpu = (before.load.cpu_us_per_event() + after.load.cpu_us_per_event()) / 2.0;
    println!("hookrelay e2e bench: {conns} connections, {secs}s per phase, 2 runtime threads");
    println!("| run | ok/s | p50 ms | p99 ms | errors | CPU µs/event |");
    println!("|---|---:|---:|---:|---:|---:|");
    let row = |name: &str, l: &mut Load| {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {} | {:.1} |",
            l.rate(),
            l.pct(0.50),
            l.pct(0.99),
            l.errors,
            l.cpu_us_per_event()
        );
    };
    row("bare hyper reference", &mut reference);
    for (when, f) in [("before", &mut before), ("after", &mut after)] {
        row(
            &format!("bare forwarder (2 exchanges per event, no store), {when} the relay"),
            &mut f.load,
        );
        println!(
            "| deliveries reaching the sink, bare forwarder, {when} | {:.0} | | | | |",
            f.delivered
        );
        println!(
            "| bare forwarder, events fully relayed (load + drain), {when} | {:.0} | | | | |",
            f.sustained
        );
    }
    for (backend, p) in rows.iter_mut() {
        row(
            &format!("relay accept, {backend} (durable, deduplicated, routed)"),
            &mut p.accept,
        );
        if let Some((r, f)) = p.fixed.as_mut() {
            row(&format!("relay accept, {backend}, at fixed {r}/s"), f);
        }
        println!(
            "| deliveries reaching the sink during the load, {backend} | {:.0} | | | | |",
            p.delivery_rate
        );
        println!(
            "| {backend}, events fully relayed (load + drain) | {:.0} | | | | |",
            p.sustained
        );
    }
    println!();
    println!(
        "bare forwarder / reference = {:.2}; fully relayed / reference = {:.2} \
         (the most a relay whose deliveries keep up can reach here; forwarder figures are \
         the mean of before and after the relay)",
        (before.load.rate() + after.load.rate()) / 2.0 / reference.rate(),
        sustained / reference.rate()
    );
    let mut ratios = Vec::new();
    for (backend, p) in rows.iter() {
        let accept = p.accept.rate() / sustained;
        let cpu = p.accept.cpu_us_per_event() / ceiling_cpu;
        println!(
            "{backend}: accept / reference = {:.2}; accept / fully relayed by the bare \
             forwarder = {accept:.2}; fully relayed / fully relayed by the bare forwarder = \
             {:.2}; CPU per event / the bare forwarder's = {cpu:.2}; deliveries during the \
             load / accepts = {:.2}",
            p.accept.rate() / reference.rate(),
            p.sustained / sustained,
            p.delivery_rate / p.accept.rate()
        );
        ratios.push((backend.to_string(), accept, cpu));
    }
    ratios
}
