//! The load generator of the end-to-end benches: keep-alive HTTP/1.1 connections posting
//! the 8x8 voice fixture with a unique `eventId` per request, closed loop or at a fixed
//! rate; latencies and the process's CPU time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub struct Load {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latencies_us: Vec<u32>,
    /// CPU time of the whole process (all threads, user + system) during the phase.
    pub cpu: Duration,
}

/// User + system CPU time of this process so far, from `/proc/self/stat` (clock ticks of
/// 10 ms: ~1 % resolution over a 5 s phase on 2 cores).
pub fn process_cpu() -> Duration {
    stat_cpu("/proc/self/stat")
}

/// User + system CPU time from a process's `stat` file.
pub fn stat_cpu(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 of the file: index 11 and 12 after the command name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    pub fn cpu_us_per_event(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.ok.max(1) as f64
    }
    pub fn pct(&mut self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.sort_unstable();
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

/// Waits (bounded: 120 s) until a sink's `count` reaches `target`: every accepted event
/// delivered.
pub async fn drained(count: &AtomicU64, target: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while count.load(Ordering::Relaxed) < target {
        assert!(
            Instant::now() < deadline,
            "the backlog was not delivered within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long one request may take before the connection's run ends as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub fn body_for(template: &str, n: u64) -> Bytes {
    Bytes::from(template.replace("EVENT_ID", &event_id(n)))
}

/// Event id number `n`, shaped as 8x8's are: a version-1 UUID (timestamp, then a fixed
/// clock sequence and node), whose timestamp runs up with `n`, as a relay that has run for
/// days sees them. A v1 UUID begins with its timestamp's *low* 32 bits, which wrap every
/// 429 s; a store that keeps a week of dedup records holds ~1,400 wraps, so each new id,
/// keyed as it is written, lands between old ones at random, one index leaf per event. A
/// bench store starts empty, so the timestamp steps by a Weyl stride (2^32 / golden ratio
/// ticks) that puts each id's low bits at random as in that steady state. Unique for each
/// `n`; the store keys v1 UUIDs in time order (docs/performance.md, 2026-12-06).
pub fn event_id(n: u64) -> String {
    /// 2026-01-01 in 100 ns ticks since 1582-10-15, the v1 UUID epoch.
    const BASE: u64 = 0x01b2_1dd2_1381_4000 + 1_767_225_600 * 10_000_000;
    let t = BASE + n * 0x9e37_79b9;
    format!(
        "{:08x}-{:04x}-{:04x}-9dd4-e911cc6fc82f",
        t & 0xffff_ffff,
        (t >> 32) & 0xffff,
        0x1000 | ((t >> 48) & 0x0fff)
    )
}

/// Closed loop: `conns` connections each send as fast as answers come. With `rate`, an
/// open loop instead: requests are started on a fixed schedule shared by the connections.
pub async fn run_load(
    addr: SocketAddr,
    path: &str,
    conns: usize,
    secs: u64,
    rate: Option<u64>,
    seq: Arc<AtomicU64>,
) -> Load {
    let template = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/payloads/8x8/voice-call-status.json"),
    )
    .expect("fixture")
    .replace("eb0fc709-9693-11ea-454d-1705dde98182", "EVENT_ID");
    let template = Arc::new(template);
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = process_cpu();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let template = template.clone();
        let seq = seq.clone();
        let stop = stop.clone();
        let uri = format!("http://{addr}{path}");
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut lat = Vec::new();
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut k: u64 = 0;
            loop {
                // A request's latency counts from when it was due (at a fixed rate) or sent,
                // so one held up behind a slow answer counts its wait.
                let mut t0 = Instant::now();
                if let Some(r) = rate {
                    // Request number k of this connection is due at start + (k*conns + c)/r.
                    let due = start
                        + Duration::from_secs_f64((k * conns as u64 + c as u64) as f64 / r as f64);
                    k += 1;
                    if due >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(due.into()).await;
                    t0 = due;
                } else if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
                    break;
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let req = Request::post(&uri)
                    .header("content-type", "application/json")
                    .header("host", "bench")
                    .body(Full::new(body_for(&template, n)))
                    .unwrap();
                if rate.is_none() {
                    t0 = Instant::now();
                }
                // Bounded: a server that stops answering ends the connection's run as an
                // error instead of hanging the bench.
                let exchange = async {
                    send.ready().await?;
                    let resp = send.send_request(req).await?;
                    let status = resp.status();
                    resp.into_body().collect().await?;
                    Ok::<_, hyper::Error>(status)
                };
                match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                    Ok(Ok(status)) if status.is_success() => {
                        ok += 1;
                        lat.push(t0.elapsed().as_micros() as u32);
                    }
                    Ok(Ok(_)) => errors += 1,
                    Ok(Err(_)) | Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            (ok, errors, lat)
        }));
    }
    let mut load = Load {
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
        cpu: Duration::ZERO,
    };
    for t in tasks {
        let (ok, errors, lat) = t.await.unwrap();
        load.ok += ok;
        load.errors += errors;
        load.latencies_us.extend(lat);
    }
    load.elapsed = start.elapsed();
    load.cpu = process_cpu().saturating_sub(cpu0);
    load
}
