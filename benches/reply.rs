//! What a reply route adds to the destination's own latency: the 8x8 Call Action fixture
//! posted straight to an in-process destination that answers the reply fixture, then
//! through the relay's reply route to the same destination (stored durably first, then
//! forwarded synchronously). One request at a time on a keep-alive connection, so the
//! figures are latencies, not throughput. `BENCH_REQUESTS` (default 2000) per side;
//! `BENCH_BACKENDS` (default "sled,redb").

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

mod support;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/payloads/8x8")
            .join(name),
    )
    .unwrap()
}

/// Latencies (µs) of `n` sequential posts with unique event ids.
async fn measure(addr: SocketAddr, path: &str, n: usize, template: &str) -> Vec<u64> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let body = template.replace("EVENT_ID", &format!("reply-bench-{i}-{}", addr.port()));
        let req = Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let t0 = Instant::now();
        send.ready().await.unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert!(resp.status().is_success());
        let _ = resp.into_body().collect().await;
        lat.push(t0.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    lat
}

fn pct(v: &[u64], p: f64) -> f64 {
    v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

fn main() {
    let n: usize = std::env::var("BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sled,redb".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let template = String::from_utf8(fixture("voice-call-action.json"))
            .unwrap()
            .replace("77e6a667-133a-11ef-9dd4-e911cc6fc82f", "EVENT_ID");
        let reply = Bytes::from(fixture("voice-call-action-reply.json"));
        let dest = support::answering_server(reply, |_| {}).await;
        println!();
        println!("reply route latency, {n} sequential requests per row");
        println!("| path | p50 ms | p99 ms |");
        println!("|---|---:|---:|");
        for backend in backends.split(',') {
            // Measured again just before each backend: the machine drifts within minutes.
            let direct = measure(dest, "/call-action", n, &template).await;
            println!(
                "| destination directly, before {backend} | {:.3} | {:.3} |",
                pct(&direct, 0.5),
                pct(&direct, 0.99)
            );
            let dir = tempfile::tempdir().unwrap();
            let toml = format!(
                r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[store]
backend = "{backend}"
[[sources]]
name = "voice"
path = "/8x8/voice"
event_id = ["$.payload.eventId"]
[[destinations]]
name = "ivr"
url = "http://{dest}/call-action"
[[routes]]
name = "ivr"
source = "voice"
match = {{ eventType = "CALL_ACTION" }}
to = ["ivr"]
reply = {{ from = "ivr", timeout = "3s" }}
"#
            );
            let config =
                hookrelay::config::parse(&toml, &dir.path().join("routes.toml"), &|_| None)
                    .unwrap();
            let relay = hookrelay::Relay::start(config).await.unwrap();
            let via = measure(relay.ingress, "/8x8/voice", n, &template).await;
            println!(
                "| through the reply route, {backend} | {:.3} | {:.3} |",
                pct(&via, 0.5),
                pct(&via, 0.99)
            );
            println!(
                "| added by the relay, {backend} | {:.3} | {:.3} |",
                pct(&via, 0.5) - pct(&direct, 0.5),
                pct(&via, 0.99) - pct(&direct, 0.99)
            );
            relay.shutdown();
            tokio::time::timeout(Duration::from_secs(10), relay.stopped())
                .await
                .expect("the relay stops within 10 s")
                .unwrap();
        }
    });
}
