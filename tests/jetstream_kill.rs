//! Killing under load on JetStream: 32 senders post to every live relay while one of three
//! relays is SIGKILLed again and again, or while one server of a 3-server cluster with
//! `replicas = 3` is. Every event answered 200 must arrive at both destinations.
//!
//! `HOOKRELAY_KILL_ROUNDS` sets the relay kills (default 3), as in tests/kill.rs.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use support::{
    client, jetstream_config, tail, try_post, FaultSink, NatsCluster, NatsServer, RelayProcess,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const SENDERS: usize = 32;
const MAX_REQUESTS_PER_SENDER: usize = 1_000_000;
const ROUND_WAIT: Duration = Duration::from_secs(60);
const DRAIN_WAIT: Duration = Duration::from_secs(90);

fn rounds() -> usize {
    std::env::var("HOOKRELAY_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn config(urls: &[String], replicas: usize, a: &FaultSink, b: &FaultSink) -> String {
    jetstream_config(
        urls,
        "k",
        replicas,
        &[("a", a.url("/a")), ("b", b.url("/b"))],
    )
}

/// What the senders share.
struct Load {
    /// Each relay's ingress; `None` while it is down.
    addrs: watch::Sender<Vec<Option<SocketAddr>>>,
    accepted: Mutex<HashSet<String>>,
    accepted_count: watch::Sender<usize>,
    next_id: AtomicU64,
    errors: AtomicUsize,
    refused: AtomicUsize,
    stop: CancellationToken,
}

impl Load {
    fn new(n: usize) -> Arc<Load> {
        Arc::new(Load {
            addrs: watch::channel(vec![None; n]).0,
            accepted: Mutex::default(),
            accepted_count: watch::channel(0).0,
            next_id: AtomicU64::new(0),
            errors: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        })
    }

    fn set(&self, i: usize, addr: Option<SocketAddr>) {
        self.addrs.send_modify(|a| a[i] = addr);
    }

    /// Waits until `more` events beyond now were accepted; panics after `ROUND_WAIT`.
    async fn more(&self, more: usize, logs: &[&Path]) {
        let want = *self.accepted_count.borrow() + more;
        let mut rx = self.accepted_count.subscribe();
        if tokio::time::timeout(ROUND_WAIT, rx.wait_for(|c| *c >= want))
            .await
            .is_err()
        {
            let logs: Vec<String> = logs.iter().map(|l| tail(l)).collect();
            panic!(
                "only {} accepted within {ROUND_WAIT:?}, wanted {want}; logs:\n{}",
                *rx.borrow(),
                logs.join("\n---\n")
            );
        }
    }
}

async fn sender(load: Arc<Load>) {
    let client = client();
    for _ in 0..MAX_REQUESTS_PER_SENDER {
        if load.stop.is_cancelled() {
            return;
        }
        let live: Vec<SocketAddr> = load.addrs.borrow().iter().flatten().copied().collect();
        if live.is_empty() {
            tokio::select! {
                _ = load.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            continue;
        }
        let at = live[rand::random_range(0..live.len())];
        let n = load.next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("k-{n}");
        let body = format!(r#"{{"namespace":"VOICE","payload":{{"eventId":"{id}"}}}}"#);
        let url = format!("http://{at}/8x8/voice");
        match try_post(&client, &url, body.into_bytes(), Duration::from_secs(10)).await {
            Ok(p) if p.status == 200 => {
                let v = p.json();
                if v["accepted"] == true && v["duplicate"] == false {
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
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => {
                load.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// `n` relay processes on `cfg` (logs `relay<i>.log`), each given to the senders, and the
/// senders started.
async fn start_under_load(
    dir: &Path,
    cfg: &Path,
    n: usize,
) -> (
    Vec<PathBuf>,
    Arc<Load>,
    Vec<RelayProcess>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let logs: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("relay{i}.log"))).collect();
    let load = Load::new(n);
    let mut relays = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        let r = RelayProcess::spawn(cfg, log).await;
        load.set(i, Some(r.ingress));
        relays.push(r);
    }
    let senders = (0..SENDERS)
        .map(|_| tokio::spawn(sender(load.clone())))
        .collect();
    (logs, load, relays, senders)
}

/// Stops the senders and checks that every accepted event reached both sinks.
async fn drain(
    what: &str,
    load: &Load,
    senders: Vec<tokio::task::JoinHandle<()>>,
    a: &FaultSink,
    b: &FaultSink,
    started: Instant,
) -> (String, usize) {
    load.stop.cancel();
    for s in senders {
        tokio::time::timeout(Duration::from_secs(15), s)
            .await
            .expect("senders stop")
            .unwrap();
    }
    let accepted = load.accepted.lock().unwrap().clone();
    let missing_a = a.wait_delivered(&accepted, DRAIN_WAIT).await;
    let missing_b = b.wait_delivered(&accepted, DRAIN_WAIT).await;
    let mut summary = format!(
        "{what}: senders={SENDERS} accepted={} no_answer={} refused={} took={:.1}s",
        accepted.len(),
        load.errors.load(Ordering::Relaxed),
        load.refused.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    let mut lost = 0;
    for (name, sink, missing) in [("a", a, &missing_a), ("b", b, &missing_b)] {
        let (delivered, unique) = sink.delivered_counts();
        let l = missing.as_ref().err().map_or(0, |m| m.len());
        lost += l;
        summary.push_str(&format!(
            " | {name}: delivered={delivered} unique={unique} lost={l} duplicates={}",
            delivered - unique
        ));
    }
    println!("{summary}");
    (summary, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_one_of_three_relays_under_load_loses_nothing() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    let b = FaultSink::answering(200).await;
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, config(&[nats.url()], 1, &a, &b)).unwrap();
    let (logs, load, mut relays, senders) = start_under_load(dir.path(), &cfg, 3).await;
    let log_refs: Vec<&Path> = logs.iter().map(|p| p.as_path()).collect();
    let _stop = load.stop.clone().drop_guard();
    let mut rng = rand::rng();
    let rounds = rounds();
    for round in 0..rounds {
        load.more(rng.random_range(300..1000), &log_refs).await;
        let i = round % 3;
        load.set(i, None);
        let old = std::mem::replace(&mut relays[i], RelayProcess::spawn(&cfg, &logs[i]).await);
        old.sigkill().await;
        load.set(i, Some(relays[i].ingress));
    }
    load.more(200, &log_refs).await;
    let (summary, lost) = drain(
        &format!("jetstream relay kills={rounds}"),
        &load,
        senders,
        &a,
        &b,
        started,
    )
    .await;
    for r in relays {
        r.sigterm(Duration::from_secs(10)).await;
    }
    assert_eq!(lost, 0, "{summary}");
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_server_cluster_loses_a_server_under_load_and_goes_on() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    let b = FaultSink::answering(200).await;
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, config(&cluster.urls(), 3, &a, &b)).unwrap();
    let (logs, load, relays, senders) = start_under_load(dir.path(), &cfg, 2).await;
    let log_refs: Vec<&Path> = logs.iter().map(|p| p.as_path()).collect();
    let _stop = load.stop.clone().drop_guard();
    load.more(500, &log_refs).await;
    cluster.servers[0].sigkill();
    // Accepts go on with two of three servers.
    load.more(500, &log_refs).await;
    cluster.servers[0].restart().await;
    support::wait_jetstream(&[cluster.servers[0].url()]).await;
    load.more(300, &log_refs).await;
    let (summary, lost) = drain(
        "jetstream cluster, one server killed",
        &load,
        senders,
        &a,
        &b,
        started,
    )
    .await;
    for r in relays {
        r.sigterm(Duration::from_secs(10)).await;
    }
    assert_eq!(lost, 0, "{summary}");
}
