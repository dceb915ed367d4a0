//! Several relays on one JetStream (CONTRACT §7): each test starts its own nats-server(s)
//! on free loopback ports and relay processes, and stops them all.

mod support;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use http::Method;

use hookrelay::store::DeliveryState;
use support::{
    client, nats_server_on_its_own_port, send, try_post, Action, Answer, FaultSink, NatsCluster,
    NatsServer, RelayProcess,
};
use support::{fixture, get_text, jetstream_config, Reply, Sink, TestRelay};

/// The relay config these tests share (prefix `t`, one server: 1 replica).
fn config(urls: &[String], destinations: &[(&str, String)]) -> String {
    jetstream_config(urls, "t", 1, destinations)
}

fn voice(id: &str) -> Vec<u8> {
    format!(r#"{{"namespace":"VOICE","payload":{{"eventId":"{id}"}}}}"#).into_bytes()
}

/// `n` relay processes on the config `text`, each logging to its own file.
async fn relays(dir: &Path, text: &str, n: usize) -> Vec<RelayProcess> {
    let cfg = dir.join("routes.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        out.push(RelayProcess::spawn(&cfg, &dir.join(format!("relay{i}.log"))).await);
    }
    out
}

/// Runs `hookrelay serve --config <cfg>`, expected to fail at start: its output once it
/// exits, bounded (killed if it is still running after 30 s, and if the test fails).
async fn serve_to_exit(cfg: &Path) -> std::process::Output {
    let child = tokio::process::Command::new(support::bin())
        .args(["serve", "--config"])
        .arg(cfg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("hookrelay serve exits within 30 s")
        .unwrap()
}

async fn post(relay: &RelayProcess, id: &str) -> (u16, serde_json::Value) {
    let p = post_at(relay.ingress, id).await;
    let v = serde_json::from_slice(&p.body).unwrap_or_default();
    (p.status, v)
}

/// The voice event `id` posted to the ingress at `ingress`: its answer.
/// The status an in-process relay answers the voice event `id` with (bounded: 10 s).
async fn post_status(r: &TestRelay, id: &str) -> u16 {
    let p = try_post(
        &client(),
        &r.url("/8x8/voice"),
        voice(id),
        Duration::from_secs(10),
    )
    .await;
    p.expect("an answer").status
}

async fn post_at(ingress: std::net::SocketAddr, id: &str) -> support::Posted {
    let url = format!("http://{ingress}/8x8/voice");
    try_post(&client(), &url, voice(id), Duration::from_secs(10))
        .await
        .expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_on_one_server_deliver_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    let b = FaultSink::answering(200).await;
    let text = config(&[nats.url()], &[("a", a.url("/a")), ("b", b.url("/b"))]);
    let relays = relays(dir.path(), &text, 3).await;
    let mut ids = HashSet::new();
    for i in 0..1000 {
        let id = format!("rr-{i}");
        let (status, v) = post(&relays[i % 3], &id).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["duplicate"], false, "{v}");
        ids.insert(id);
    }
    let missing_a = a.wait_delivered(&ids, Duration::from_secs(60)).await;
    let missing_b = b.wait_delivered(&ids, Duration::from_secs(60)).await;
    let (da, ua) = a.delivered_counts();
    let (db, ub) = b.delivered_counts();
    println!(
        "three relays, 1000 events round-robin: a delivered={da} unique={ua} duplicates={} | b delivered={db} unique={ub} duplicates={}",
        da - ua,
        db - ub
    );
    for r in relays {
        r.sigterm(Duration::from_secs(10)).await;
    }
    assert!(
        missing_a.is_ok(),
        "a misses {:?}",
        missing_a.err().map(|m| m.len())
    );
    assert!(
        missing_b.is_ok(),
        "b misses {:?}",
        missing_b.err().map(|m| m.len())
    );
    drop(nats);
}

async fn admin(relay: &RelayProcess, method: Method, path: &str) -> Answer {
    send(method, &format!("http://{}{path}", relay.admin), &[], b"").await
}

/// Waits (bounded) until `relay`'s `/api/destinations` shows `want` as `field` of `name`.
async fn wait_destination(relay: &RelayProcess, name: &str, field: &str, want: serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = admin(relay, Method::GET, "/api/destinations").await.json();
        let got = list
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .map(|d| d[field].clone());
        if got.as_ref() == Some(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} shows {name}.{field} = {got:?}, not {want}",
            relay.ingress
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until every relay counts `n` instances sharing the store.
async fn wait_instances(relays: &[RelayProcess], n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    'relays: for r in relays {
        while Instant::now() < deadline {
            let a = admin(r, Method::GET, "/readyz").await;
            if a.status == 200 && a.json()["instances"] == n {
                continue 'relays;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("relay {} never counted {n} instances", r.ingress);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_id_posted_to_two_instances_at_once_is_accepted_once() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    let text = config(&[nats.url()], &[("a", a.url("/a"))]);
    let relays = relays(dir.path(), &text, 2).await;
    let mut ids = HashSet::new();
    for i in 0..100 {
        let id = format!("race-{i}");
        let ((s1, v1), (s2, v2)) = tokio::join!(post(&relays[0], &id), post(&relays[1], &id));
        assert_eq!((s1, s2), (200, 200), "{v1} {v2}");
        let fresh = [&v1, &v2]
            .iter()
            .filter(|v| v["duplicate"] == false)
            .count();
        assert_eq!(fresh, 1, "accepted exactly once: {v1} {v2}");
        assert_eq!(v1["id"], id.as_str());
        ids.insert(id);
    }
    a.wait_delivered(&ids, Duration::from_secs(60))
        .await
        .expect("every event delivered");
    let (delivered, unique) = a.delivered_counts();
    assert_eq!(unique, 100);
    println!("race: 100 ids, each posted to two instances at once: delivered={delivered} unique={unique}");
    for r in relays {
        r.sigterm(Duration::from_secs(10)).await;
    }
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_server_killed_means_503_until_it_is_back_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start(dir.path()).await;
    // The sink holds its answers a while: deliveries are in flight when the server dies.
    let a = FaultSink::start(|_| Action::Later(200, 50)).await;
    let text = config(&[nats.url()], &[("a", a.url("/a"))]);
    let relays = relays(dir.path(), &text, 2).await;
    let mut ids = HashSet::new();
    for i in 0..100 {
        let id = format!("before-{i}");
        assert_eq!(post(&relays[i % 2], &id).await.0, 200);
        ids.insert(id);
    }
    nats.sigkill();
    // While it is gone: 503 with Retry-After, and readiness says why.
    let url = format!("http://{}/8x8/voice", relays[0].ingress);
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let p = try_post(&client(), &url, voice("during"), Duration::from_secs(10))
            .await
            .expect("an answer");
        if p.status == 503 {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after the server died",
            p.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(refused.headers.contains_key("retry-after"));
    let v: serde_json::Value = serde_json::from_slice(&refused.body).unwrap();
    assert_eq!(v["error"], "unavailable", "{v}");
    // Relay 1 learns of the loss on its own (its connection's state): bounded polling.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = admin(&relays[1], Method::GET, "/readyz").await;
        if ready.status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay 1's /readyz still {} after the server died: {:?}",
            ready.status,
            ready.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    nats.restart().await;
    // Back: relay 0, whose last accept failed, says it is ready again before any event
    // comes (a balancer that believed its 503 sends it none).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = admin(&relays[0], Method::GET, "/readyz").await;
        if ready.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay 0 still not ready: {:?}",
            ready.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Both relays accept again on their own (reconnect), bounded.
    for (n, r) in relays.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let id = format!("after-{n}");
            let (status, _) = post(r, &id).await;
            if status == 200 {
                ids.insert(id);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "relay {n} still answers {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let missing = a.wait_delivered(&ids, Duration::from_secs(60)).await;
    for r in relays {
        r.sigterm(Duration::from_secs(10)).await;
    }
    assert!(
        missing.is_ok(),
        "lost {:?}; nats log:\n{}",
        missing.err(),
        nats.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_on_one_instance_is_listed_and_replayed_through_another() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    // The first 5 requests are refused for good (400: dead at once), the rest accepted.
    let a = FaultSink::start(|n| Action::Answer(if n < 5 { 400 } else { 200 })).await;
    let text = config(&[nats.url()], &[("a", a.url("/a"))]);
    let relays = relays(dir.path(), &text, 3).await;
    let mut ids = HashSet::new();
    for i in 0..5 {
        let id = format!("dead-{i}");
        assert_eq!(post(&relays[0], &id).await.0, 200);
        ids.insert(id);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let listed = loop {
        let d = admin(&relays[1], Method::GET, "/api/dead?destination=a")
            .await
            .json();
        if d.as_array().unwrap().len() == 5 {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "dead list on another instance: {d}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let listed_ids: HashSet<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed_ids, ids);
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["last_status"] == 400));
    let ev = admin(&relays[2], Method::GET, "/api/events/dead-3")
        .await
        .json();
    assert_eq!(ev["deliveries"][0]["state"], "dead", "{ev}");

    let r = admin(&relays[2], Method::POST, "/api/dead/replay?destination=a").await;
    assert_eq!(r.json()["replayed"], 5);
    a.wait_delivered(&ids, Duration::from_secs(30))
        .await
        .expect("replayed through a third instance, delivered");
    let d = admin(&relays[0], Method::GET, "/api/dead").await.json();
    assert_eq!(d.as_array().unwrap().len(), 0, "{d}");
    for r in relays {
        r.sigterm(Duration::from_secs(10)).await;
    }
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_holds_for_the_destination_across_three_instances() {
    rate_holds_across_three_instances(6).await;
}

/// A burst of one, below the instance count: one instance sends, at the whole rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_below_the_instance_count_still_holds() {
    rate_holds_across_three_instances(1).await;
}

/// 150 events posted round-robin to three instances, delivered to a destination with
/// `rate = { per_second = 30, burst }`: at most `per_second × t + burst` arrivals within
/// any time `t` of the first, and most of the rate used.
async fn rate_holds_across_three_instances(burst: u32) {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    let text = config(&[nats.url()], &[("a", a.url("/a"))]).replace(
        "[[destinations]]\nname = \"a\"\n",
        &format!("[[destinations]]\nname = \"a\"\nrate = {{ per_second = 30, burst = {burst} }}\n"),
    );
    let relays = relays(dir.path(), &text, 3).await;
    wait_instances(&relays, 3).await;
    // Paused while the events are posted, so that what is measured is the delivery's pace,
    // not how fast a loaded machine posts them.
    let p = admin(&relays[0], Method::POST, "/api/destinations/a/pause").await;
    assert_eq!(p.json()["state"], "paused");
    for r in &relays[1..] {
        wait_destination(r, "a", "state", serde_json::json!("paused")).await;
    }
    let mut ids = HashSet::new();
    for i in 0..150 {
        let id = format!("rate-{i}");
        assert_eq!(post(&relays[i % 3], &id).await.0, 200);
        ids.insert(id);
    }
    assert_eq!(a.count(), 0, "delivered while paused");
    let r = admin(&relays[1], Method::POST, "/api/destinations/a/resume").await;
    assert_eq!(r.json()["state"], "ok");
    a.wait_delivered(&ids, Duration::from_secs(60))
        .await
        .expect("all delivered");
    let mut at: Vec<Instant> = a.arrivals().iter().map(|r| r.at).collect();
    at.sort();
    let t0 = at[0];
    // Within any time t of the first arrival: at most per_second × (t + 0.1 s) + burst
    // arrivals (the 0.1 s: the first may come late, paying for a new connection on a
    // loaded machine, which makes every later one look early; an instance taking more
    // than its third still shows within a second).
    let mut worst = 0.0f64;
    for (k, t) in at.iter().enumerate() {
        let allowed = 30.0 * (t.duration_since(t0).as_secs_f64() + 0.1) + burst as f64;
        worst = worst.max((k + 1) as f64 - allowed);
    }
    let took = at.last().unwrap().duration_since(t0).as_secs_f64();
    println!(
        "rate 30/s burst {burst} over three instances: 150 arrivals in {took:.2}s ({:.1}/s); worst excess {worst:.1}",
        149.0 / took
    );
    for r in relays {
        r.sigterm(Duration::from_secs(10)).await;
    }
    // A single sender paced at exactly the rate sits on the line: most of an arrival of
    // room for the timing of the first (a new connection) and the sink's own; one request
    // too many is a whole one.
    assert!(
        worst <= 0.9,
        "arrivals exceeded per_second × t + burst by {worst}"
    );
    // And the instances together used most of it (each took a third, not less).
    assert!(149.0 / took > 30.0 * 0.6, "{:.1}/s", 149.0 / took);
}

/// Fixed free loopback ports for `text`'s two listeners (a relay that is still starting
/// prints none), and what they are.
fn on_fixed_ports(text: &str) -> (String, std::net::SocketAddr, std::net::SocketAddr) {
    let (ingress, admin) = (support::free_port(), support::free_port());
    let text = text
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{ingress}\""),
            1,
        )
        .replacen(
            "admin_listen = \"127.0.0.1:0\"",
            &format!("admin_listen = \"127.0.0.1:{admin}\""),
            1,
        );
    let addr = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
    (text, addr(ingress), addr(admin))
}

/// SIGTERM while the JetStream is out of reach: the relay stops within its grace and a
/// few seconds, exit 0 (its close waited for a flush the NATS client only answers once it
/// is connected again, so it hung until SIGKILL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stops_while_its_jetstream_is_out_of_reach() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    // (Its shutdown_grace: 2 s.)
    let text = config(&[nats.url()], &[("a", a.url("/a"))]);
    let relay = relays(dir.path(), &text, 1).await.remove(0);
    assert_eq!(post(&relay, "before").await.0, 200);
    assert!(a.wait_count(1, Duration::from_secs(20)).await);
    nats.sigkill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin(&relay, Method::GET, "/readyz").await.status != 503 {
        assert!(
            Instant::now() < deadline,
            "still ready after the server died"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = relay.sigterm(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_out_of_reach_at_start_is_waited_for_with_503s_then_used() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start(dir.path()).await;
    let port = nats.port;
    nats.sigkill();
    let a = FaultSink::answering(200).await;
    // Credentials in the URL never reach the output or an answer.
    let (text, ingress, admin) = on_fixed_ports(&config(
        &[format!("nats://relay:s3cret@127.0.0.1:{port}")],
        &[("a", a.url("/a"))],
    ));
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, &text).unwrap();
    let mut child = tokio::process::Command::new(support::bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("HOOKRELAY_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stderr.take().unwrap()));
    let mut logged = String::new();
    // The listeners are bound before the store is tried, so they answer once it says so.
    let said = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = stderr.next_line().await {
            logged.push_str(&line);
            logged.push('\n');
            if line.contains("JetStream is out of reach") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(matches!(said, Ok(true)), "no wait was logged:\n{logged}");
    assert!(
        logged.contains("cannot connect to NATS at nats://127.0.0.1:"),
        "{logged}"
    );

    let r = send(Method::GET, &format!("http://{admin}/healthz"), &[], b"").await;
    assert_eq!(r.status, 200, "the process runs");
    let r = send(Method::GET, &format!("http://{admin}/readyz"), &[], b"").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "5");
    let why = r.json()["message"].as_str().unwrap().to_string();
    assert!(why.contains("cannot connect to NATS"), "{why}");
    let r = send(Method::GET, &format!("http://{admin}/api/dead"), &[], b"").await;
    assert_eq!(r.status, 503, "nothing to show before the store is open");
    // What is awaited is said on /readyz only (the token is not checked yet).
    let said = r.json()["message"].as_str().unwrap().to_string();
    assert!(!said.contains("127.0.0.1"), "{said}");
    let p = post_at(ingress, "early").await;
    assert_eq!(p.status, 503);
    assert_eq!(p.headers["retry-after"], "5");
    let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
    assert_eq!(v["error"], "unavailable", "{v}");
    assert!(
        !String::from_utf8_lossy(&p.body).contains("127.0.0.1"),
        "{v}"
    );

    // JetStream comes: the relay opens its store and says it listens, where it answered.
    nats.restart().await;
    let mut stdout =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("the relay started within 30 s of JetStream")
        .unwrap()
        .unwrap_or_default();
    assert!(line.contains(&format!("ingress={ingress}")), "{line}");
    let r = send(Method::GET, &format!("http://{admin}/readyz"), &[], b"").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let p = post_at(ingress, "late").await;
    assert_eq!(p.status, 200, "{}", String::from_utf8_lossy(&p.body));
    assert!(
        a.wait_count(1, Duration::from_secs(20)).await,
        "the event accepted after the wait is delivered"
    );
    child.kill().await.unwrap();
    while let Ok(Some(line)) = stderr.next_line().await {
        logged.push_str(&line);
    }
    assert!(
        !logged.contains("s3cret") && !why.contains("s3cret"),
        "{logged}"
    );
}

#[tokio::test]
async fn a_server_without_jetstream_or_refusing_the_account_is_a_start_error_saying_which() {
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        &["nats://127.0.0.1:9".to_string()],
        &[("a", "http://127.0.0.1:9/".into())],
    );
    let cfg = dir.path().join("routes.toml");
    // A server without -js.
    let (plain, port) =
        nats_server_on_its_own_port("nats-server", &[], &dir.path().join("plain-ports")).await;
    std::fs::write(
        &cfg,
        text.replace(
            &text[text.find("url = [").unwrap()..text.find("\nprefix").unwrap()],
            &format!("url = [\"nats://127.0.0.1:{port}\"]"),
        ),
    )
    .unwrap();
    let out = serve_to_exit(&cfg).await;
    drop(plain);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("offers no JetStream"), "{err}");

    // A server that wants credentials the config does not give.
    let js = dir.path().join("js");
    let args = ["-js", "--user", "u", "--pass", "s3cret-pw", "-sd"].map(OsStr::new);
    let (guarded, port) = nats_server_on_its_own_port(
        "nats-server",
        &[&args[..], &[js.as_os_str()]].concat(),
        &dir.path().join("guarded-ports"),
    )
    .await;
    let at = |p: u16| {
        text.replace(
            &text[text.find("url = [").unwrap()..text.find("\nprefix").unwrap()],
            &format!("url = [\"nats://127.0.0.1:{p}\"]"),
        )
    };
    std::fs::write(&cfg, at(port)).unwrap();
    let out = serve_to_exit(&cfg).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("refused the account"), "{err}");

    // replicas = 3 on a server that is not clustered: said at once, not waited for.
    let three = jetstream_config(
        &[format!("nats://u:s3cret-pw@127.0.0.1:{port}")],
        "r3",
        3,
        &[("a", "http://127.0.0.1:9/".into())],
    );
    std::fs::write(&cfg, three).unwrap();
    let started = std::time::Instant::now();
    let out = serve_to_exit(&cfg).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("replicas"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "waited {:?} for settings refused for good",
        started.elapsed()
    );

    // The credentials in the address: the relay logs in, and never logs the password,
    // even at debug level (where the NATS client logs the addresses it connects to).
    let with_login = at(port).replace("nats://127.0.0.1", "nats://u:s3cret-pw@127.0.0.1");
    std::fs::write(&cfg, with_login).unwrap();
    let log = dir.path().join("login.log");
    let relay = RelayProcess::spawn_at(&cfg, &log, "debug").await;
    let (status, v) = post(&relay, "with-login").await;
    assert_eq!(status, 200, "{v}");
    let text = relay.finish().await;
    drop(guarded);
    assert!(
        !text.contains("s3cret-pw"),
        "the password was logged:\n{text}"
    );
}

const CALL_ACTION_REPLY: &[u8] =
    include_bytes!("../examples/payloads/8x8/voice-call-action-reply.json");

/// A relay config on JetStream at `nats` with one reply route: voice `CALL_ACTION` events
/// to ivr at `ivr` (its table gets `ivr_keys`; the call's timeout is `timeout`) and to
/// analytics at `analytics`, if given. Retries are an hour off.
fn call_action_config(
    nats: &str,
    ivr: &str,
    ivr_keys: &str,
    analytics: Option<&str>,
    timeout: &str,
) -> String {
    let (analytics_table, to) = match analytics {
        Some(url) => (
            format!("[[destinations]]\nname = \"analytics\"\nurl = \"{url}\"\n"),
            r#"["ivr", "analytics"]"#,
        ),
        None => (String::new(), r#"["ivr"]"#),
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_body_bytes = 65536
[store]
backend = "jetstream"
url = "{nats}"
prefix = "reply"
[delivery]
retry = {{ first = "1h" }}
[[sources]]
name = "voice"
path = "/8x8/voice"
event_id = ["$.payload.eventId"]
[[destinations]]
name = "ivr"
url = "{ivr}"
{ivr_keys}{analytics_table}[[routes]]
name = "ivr"
source = "voice"
match = {{ eventType = "CALL_ACTION" }}
to = {to}
reply = {{ from = "ivr", timeout = "{timeout}", fallback = {{ status = 200, body = '{{"callflow":[{{"action":"hangup"}}]}}' }} }}
"#
    )
}

/// The call action reply sample grown to `len` bytes with spaces before its last brace.
fn padded_reply(len: usize) -> Vec<u8> {
    let end = CALL_ACTION_REPLY.iter().rposition(|&b| b == b'}').unwrap();
    let mut v = CALL_ACTION_REPLY[..end].to_vec();
    v.resize(len - (CALL_ACTION_REPLY.len() - end), b' ');
    v.extend_from_slice(&CALL_ACTION_REPLY[end..]);
    v
}

/// Waits (10 s at most) until `relay` sees event `id`'s delivery to ivr delivered.
async fn ivr_delivered(relay: &TestRelay, id: &str) {
    ivr_delivered_within(relay, id, Duration::from_secs(10)).await
}

/// [`ivr_delivered`], waiting up to `within`.
async fn ivr_delivered_within(relay: &TestRelay, id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let views = relay.app().store.lookup(id).await.unwrap();
        let ivr_state = views
            .first()
            .and_then(|v| v.deliveries.iter().find(|d| d.destination == "ivr"))
            .map(|d| d.state);
        if ivr_state == Some(DeliveryState::Delivered) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: ivr's delivery: {ivr_state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_action_reply_is_kept_for_a_duplicate_at_another_instance() {
    let dir = tempfile::tempdir().unwrap();
    // nats-server's default message size, 1 MiB.
    let nats = NatsServer::start_with(dir.path(), "1MB").await;
    // A large answer (400 KB: kept as JSON numbers it took 3.5 bytes a byte, past the
    // server's 1 MiB messages), then one of 1 MiB (past them in any form: not kept).
    let large = padded_reply(400 << 10);
    let too_large = padded_reply(1 << 20);
    let reply = |body: &[u8]| {
        Reply::status(200)
            .header("content-type", "application/json")
            .body(body)
    };
    let ivr = Sink::start(vec![reply(&large), reply(&too_large)], reply(&large)).await;
    let analytics = Sink::always(200).await;
    let text = call_action_config(
        &nats.url(),
        &ivr.url("/call-action"),
        "",
        Some(&analytics.url("/ingest")),
        "2s",
    );
    let one = TestRelay::start(&text).await;
    let two = TestRelay::start(&text).await;
    let body = fixture("8x8/voice-call-action.json");
    let a = one.post("/8x8/voice", &body).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, large);
    assert_eq!(analytics.wait_for(1).await[0].body, body);
    // The answer and the attempt are stored just after the reply: wait for the attempt.
    let id = "77e6a667-133a-11ef-9dd4-e911cc6fc82f";
    ivr_delivered(&two, id).await;
    // A duplicate at the other instance gets the stored reply without a new call.
    let again = two.post("/8x8/voice", &body).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, large);
    assert_eq!(ivr.seen().len(), 1, "no second call to ivr");
    // An answer too large to keep still delivers the held delivery: the scheduler does not
    // send the event to ivr again (its retry is an hour off, but a pending delivery held
    // for the call would be due seconds after it).
    let other = "9a0c2f1e-133a-11ef-9dd4-e911cc6fc82f";
    let body = String::from_utf8(body.to_vec()).unwrap().replace(id, other);
    let a = one.post("/8x8/voice", body.as_bytes()).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, too_large);
    ivr_delivered(&two, other).await;
    assert_eq!(ivr.seen().len(), 2);
    one.stop().await;
    two.stop().await;
    drop(nats);
}

/// A duplicate's call that gets ivr's answer delivers the delivery the first call's 404
/// left dead, and takes it off the dead list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_whose_call_succeeds_delivers_a_delivery_left_dead() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let answering = Reply::status(200)
        .header("content-type", "application/json")
        .body(CALL_ACTION_REPLY);
    let ivr = Sink::start(vec![Reply::status(404)], answering).await;
    let text = call_action_config(&nats.url(), &ivr.url("/call-action"), "", None, "2s");
    let relay = TestRelay::start(&text).await;
    let body = fixture("8x8/voice-call-action.json");
    let a = relay.post("/8x8/voice", &body).await;
    assert_eq!(&a.body[..], br#"{"callflow":[{"action":"hangup"}]}"#);
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay
        .app()
        .store
        .dead(Some("ivr"), 10)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "never dead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("reply").await.unwrap();
    let dead_entry = || async {
        // One message a subject: the first on any of ivr's index subjects is the entry.
        match stream
            .get_first_raw_message_by_subject("reply.dl.n-ivr.>", 1)
            .await
        {
            Ok(m) => Some(m.payload.to_vec()),
            Err(e) if e.to_string().contains("no message found") => None,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(dead_entry().await.as_deref(), Some(&b"dead"[..]));
    let again = relay.post("/8x8/voice", &body).await;
    assert_eq!(&again.body[..], CALL_ACTION_REPLY);
    ivr_delivered(&relay, "77e6a667-133a-11ef-9dd4-e911cc6fc82f").await;
    assert!(relay
        .app()
        .store
        .dead(Some("ivr"), 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(ivr.seen().len(), 2);
    // Its dead-letter index entry is marked replayed (and expires), not left "dead" for
    // every walk of the dead list to read again.
    assert_ne!(dead_entry().await.as_deref(), Some(&b"dead"[..]));
    relay.stop().await;
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_delivery_in_flight_is_sent_by_another_soon() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    // The first request hangs (the instance that sends it is killed meanwhile).
    let a = FaultSink::start(|n| {
        if n == 0 {
            Action::Hang
        } else {
            Action::Answer(200)
        }
    })
    .await;
    let text = config(&[nats.url()], &[("a", a.url("/a"))]);
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, &text).unwrap();
    let first = RelayProcess::spawn(&cfg, &dir.path().join("first.log")).await;
    assert_eq!(post(&first, "in-flight").await.0, 200);
    assert!(a.wait_count(1, Duration::from_secs(10)).await, "sent once");
    let second = RelayProcess::spawn(&cfg, &dir.path().join("second.log")).await;
    let killed = Instant::now();
    first.sigkill().await;
    let timeout = Duration::from_secs(3); // the config's delivery timeout
    assert!(
        a.wait_count(2, timeout + Duration::from_secs(10)).await,
        "not sent again"
    );
    let took = killed.elapsed();
    let arrivals = a.arrivals();
    assert_eq!(arrivals[1].id, "in-flight");
    println!("a killed instance's delivery in flight was sent again after {took:?}");
    assert!(
        took <= timeout + Duration::from_secs(8),
        "{took:?}: more than the timeout plus a few seconds"
    );
    second.sigterm(Duration::from_secs(10)).await;
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_longer_than_the_ack_wait_is_not_sent_by_another_instance_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    // The first answer takes 9 s, longer than the consumers' 6 s ack wait: only the lease's
    // renewals keep the server from giving the delivery to the other instance meanwhile.
    let a = FaultSink::start(|n| {
        if n == 0 {
            Action::Later(200, 9_000)
        } else {
            Action::Answer(200)
        }
    })
    .await;
    let text = config(&[nats.url()], &[("a", a.url("/a"))])
        .replace("timeout = \"3s\"", "timeout = \"20s\"");
    assert!(text.contains("timeout = \"20s\""), "{text}");
    let relays = relays(dir.path(), &text, 2).await;
    wait_instances(&relays, 2).await;
    assert_eq!(post(&relays[0], "slow").await.0, 200);
    assert!(a.wait_count(1, Duration::from_secs(10)).await, "sent");
    // Answered after 9 s, its outcome stored: delivered, once.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ev = admin(&relays[1], Method::GET, "/api/events/slow")
            .await
            .json();
        if ev["deliveries"][0]["state"] == "delivered" {
            break;
        }
        assert!(Instant::now() < deadline, "not delivered: {ev}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let arrivals = a.arrivals();
    assert_eq!(arrivals.len(), 1, "sent again while the first attempt ran");
    assert!(arrivals[0].delivered());
    // Nor given to either instance again: the destination's consumer handed out the pending
    // state once, then the delivered state written over it (acked on sight); a lapsed lease
    // would have been a third.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("t")
        .await
        .unwrap()
        .get_consumer("t-n-a")
        .await
        .unwrap();
    // Once the consumer holds nothing (the delivered state acked on sight by a puller),
    // bounded: the admin API may say delivered before that.
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let info = consumer.info().await.unwrap().clone();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break info;
        }
        assert!(Instant::now() < deadline, "still held: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(info.delivered.consumer_sequence, 2, "{info:?}");
    for r in relays {
        r.sigterm(Duration::from_secs(10)).await;
    }
    drop(nats);
}

/// A relay started while its cluster has no JetStream leader (two of three servers down:
/// the one left answers nothing, or "not available") waits, answering 503, and starts once
/// a quorum is back; it once ended at once, "offers no JetStream to this account".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_waits_for_a_cluster_without_a_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = NatsCluster::start(dir.path()).await;
    cluster.servers[1].sigkill();
    cluster.servers[2].sigkill();
    let first = cluster.servers[0].url();
    // Until the server left says it has no JetStream to offer (bounded: each query times
    // out on its own).
    let js = async_nats::jetstream::new(async_nats::connect(first.clone()).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while js.query_account().await.is_ok() {
        assert!(Instant::now() < deadline, "JetStream still answers");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let a = FaultSink::answering(200).await;
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, config(&[first], &[("a", a.url("/a"))])).unwrap();
    let log = dir.path().join("relay.log");
    let starting = {
        let (cfg, log) = (cfg.clone(), log.clone());
        tokio::spawn(async move { RelayProcess::spawn_at(&cfg, &log, "info").await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("not ready yet")
    {
        assert!(
            Instant::now() < deadline && !starting.is_finished(),
            "no word of waiting: {}",
            support::tail(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.servers[1].restart().await;
    let relay = starting.await.unwrap();
    assert_eq!(post(&relay, "after-the-election").await.0, 200);
    assert!(a.wait_count(1, Duration::from_secs(30)).await, "delivered");
    relay.sigterm(Duration::from_secs(10)).await;
    drop(cluster);
}

/// A stream made beforehand (by an operator) with settings that break the relay's promises
/// is refused at start, naming each: it was taken as it was, memory storage losing every
/// accepted event at the server's restart, `max_age` deleting pending deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_beforehand_with_unsafe_settings_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "t".into(),
        subjects: vec!["t.>".into()],
        max_messages_per_subject: 1,
        storage: async_nats::jetstream::stream::StorageType::Memory,
        max_age: Duration::from_secs(3600),
        max_message_size: 1 << 20,
        allow_message_ttl: true,
        allow_atomic_publish: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let cfg = dir.path().join("routes.toml");
    std::fs::write(
        &cfg,
        config(&[nats.url()], &[("a", "http://127.0.0.1:9/".into())]),
    )
    .unwrap();
    let out = serve_to_exit(&cfg).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("storage is memory"), "{err}");
    assert!(err.contains("max_age"), "{err}");
    assert!(err.contains("max_msg_size is 1048576"), "{err}");
    assert!(err.contains("nats stream edit t"), "{err}");
    drop(nats);
}

/// The stream is marked with the format of its records: a stream a newer build marked is
/// refused (this build would misread that build's records), one made before the marker is
/// marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_a_newer_format_is_refused_at_start_and_an_unmarked_one_marked() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let text = config(&[nats.url()], &[("a", "http://127.0.0.1:9/".into())]);
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let marker = || async {
        let mut stream = js.get_stream("t").await.unwrap();
        let config = stream.info().await.unwrap().config.clone();
        (config.metadata.get("hookrelay_format").cloned(), config)
    };
    TestRelay::start(&text).await.stop().await;
    let (format, mut config) = marker().await;
    assert_eq!(format.as_deref(), Some("2"), "this build's format");
    // As a build before the marker made it.
    config.metadata.remove("hookrelay_format");
    js.update_stream(&config).await.unwrap();
    assert_eq!(marker().await.0, None);
    TestRelay::start(&text).await.stop().await;
    let (format, mut config) = marker().await;
    assert_eq!(format.as_deref(), Some("2"), "marked at start");
    // As a newer build marks it.
    config
        .metadata
        .insert("hookrelay_format".into(), "3".into());
    js.update_stream(&config).await.unwrap();
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, &text).unwrap();
    let out = serve_to_exit(&cfg).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("records in format 3"), "{err}");
    assert!(err.contains("newer hookrelay"), "{err}");
    drop(nats);
}

/// A delivery state of a newer build's format (a rolling upgrade) is handed back to be
/// offered again later, not terminated: the destination's consumer is every instance's, so
/// a terminated state would be sent by none, ever, even once all run the newer build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_formats_delivery_state_is_offered_again_not_terminated() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    let r = TestRelay::start(&config(&[nats.url()], &[("a", a.url("/a"))])).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let publish = |subject: &'static str, payload: &'static str| {
        let js = js.clone();
        async move {
            let ack = js.publish(subject, payload.into()).await.unwrap();
            ack.await.unwrap().sequence
        }
    };
    let newer = publish(
        "t.q.n-a.0123456789abcdef.0123456789abcdef",
        concat!(
            r#"{"delivery":{"seq":1,"destination":"a","state":"dead","attempts":1,"#,
            r#""first_attempt_ms":1,"next_due_ms":1,"last_status":400,"last_error":"x","#,
            r#""updated_ms":1},"event":{"v":99,"id":"new","source":"voice","received_ms":1,"#,
            r#""content_type":null}}"#,
            "\n{}"
        ),
    )
    .await;
    // Its dead-letter index entry, and a damaged event: the operator's lists leave them
    // out, and still list the rest.
    publish("t.dl.n-a.0123456789abcdef.0123456789abcdef", "dead").await;
    publish(
        "t.ev.0123456789abcdef.0123456789abcdef",
        "{\"garbage\":1}\n",
    )
    .await;
    // Taken after it, by the same consumer: once it is delivered, the newer one was
    // handled.
    let url = r.url("/8x8/voice");
    let p = try_post(&client(), &url, voice("after"), Duration::from_secs(10)).await;
    assert_eq!(p.expect("an answer").status, 200);
    let after: HashSet<String> = ["after".to_string()].into();
    a.wait_delivered(&after, Duration::from_secs(15))
        .await
        .expect("delivered");
    let mut consumer = js
        .get_stream("t")
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("t-n-a")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert!(
        info.ack_floor.stream_sequence < newer && info.num_ack_pending >= 1,
        "the newer state is still the consumer's to offer: {info:?}"
    );
    let store = &r.app().store;
    assert!(store.dead(None, 10).await.unwrap().is_empty());
    let page = store
        .recent(&hookrelay::store::EventQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = page.events.iter().map(|v| v.event.id.as_str()).collect();
    assert_eq!(ids, ["after"]);
    r.stop().await;
    drop(nats);
}

/// [`config`] on `nats` to the sink `a` with `retain` and the dedup window at 1 s.
fn short_lived(nats: &NatsServer, a: &FaultSink) -> String {
    config(&[nats.url()], &[("a", a.url("/a"))])
        .replace("prefix = \"t\"", "prefix = \"t\"\nretain = \"1s\"")
        + "\n[dedup]\nwindow = \"1s\"\n"
}

/// A fan-out consumer made again reads every event kept, each as if for the first time: an
/// event whose delivery went apart (an earlier event with its id still held the usual
/// subject) was written a second time on the usual one once that had emptied, and sent
/// again. Here the earlier event's state is deleted by hand, as its age would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_consumer_made_again_does_not_send_an_event_a_second_time() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    let r = TestRelay::start(&short_lived(&nats, &a)).await;
    let post = || {
        let url = r.url("/8x8/voice");
        async move {
            let p = try_post(&client(), &url, voice("x"), Duration::from_secs(10)).await;
            let p = p.expect("an answer");
            assert_eq!(p.status, 200);
            serde_json::from_slice::<serde_json::Value>(&p.body).unwrap()
        }
    };
    assert_eq!(post().await["duplicate"], false);
    assert!(a.wait_count(1, Duration::from_secs(10)).await);
    // Past the dedup window (1 s): the same id is a new event.
    let deadline = Instant::now() + Duration::from_secs(10);
    while post().await["duplicate"] != false {
        assert!(Instant::now() < deadline, "still a duplicate");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(a.wait_count(2, Duration::from_secs(10)).await);
    // The first event's message went with the second's (one per subject); its delivered
    // state ages out (deleted here), emptying the usual subject.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("t").await.unwrap();
    let hash = |s: &str| -> String {
        sha2::Sha256::digest(s.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let usual = format!("t.q.n-a.{}.{}", hash("x"), hash("voice"));
    let state = stream
        .get_last_raw_message_by_subject(&usual)
        .await
        .unwrap();
    assert!(stream.delete_message(state.sequence).await.unwrap());
    // The fan-out's consumer is made again, and goes through every event kept.
    assert!(stream.delete_consumer("t-fanout").await.unwrap().success);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let through = match stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("t-fanout")
            .await
        {
            Ok(mut c) => {
                let info = c.info().await.unwrap();
                info.num_pending == 0
                    && info.num_ack_pending == 0
                    && info.delivered.stream_sequence > 0
            }
            Err(_) => false,
        };
        if through {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fan-out never went through again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !a.wait_count(3, Duration::from_secs(3)).await,
        "sent again: {:?}",
        a.arrivals().iter().map(|r| &r.id).collect::<Vec<_>>()
    );
}

/// An accepted event waits for its fan-out as long as that takes, however short `retain`
/// and the dedup window are: it once expired with them (1 s here) while the fan-out was held
/// up, and was never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_waiting_for_its_fan_out_outlives_a_short_retain() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    let text = short_lived(&nats, &a);
    let r = TestRelay::start(&text).await;
    // The fan-out held up for 3 s: the server hands its consumer nothing until then.
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let until = humantime::format_rfc3339(std::time::SystemTime::now() + Duration::from_secs(3));
    let paused = nc
        .request(
            "$JS.API.CONSUMER.PAUSE.t.t-fanout",
            serde_json::json!({ "pause_until": until.to_string() })
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    let paused: serde_json::Value = serde_json::from_slice(&paused.payload).unwrap();
    assert_eq!(paused["paused"], true, "{paused}");
    let url = r.url("/8x8/voice");
    let p = try_post(&client(), &url, voice("waits"), Duration::from_secs(10)).await;
    assert_eq!(p.expect("an answer").status, 200);
    assert!(
        a.wait_count(1, Duration::from_secs(20)).await,
        "the event expired before its fan-out"
    );
    r.stop().await;
    drop(nats);
}

/// Consumers edited between two starts (by an operator, or made by an older build) are set
/// back to the relay's settings, the fan-out's mark kept; one the server cannot set back in
/// place and that would lose deliveries (no acks) is not used: deliveries wait until it is
/// deleted, and then go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_edited_between_starts_are_set_back_or_left_unused() {
    use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    let text = config(&[nats.url()], &[("a", a.url("/a"))]);
    TestRelay::start(&text).await.stop().await;
    // Taken up again as they were made, the consumers are not changed: nothing is said of
    // their settings (against what the server fills in itself).
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, &text).unwrap();
    let again = RelayProcess::spawn_at(&cfg, &dir.path().join("again.log"), "info").await;
    assert_eq!(post(&again, "e0").await.0, 200);
    let ids = |ids: &[&str]| -> HashSet<String> { ids.iter().map(|s| s.to_string()).collect() };
    a.wait_delivered(&ids(&["e0"]), Duration::from_secs(15))
        .await
        .expect("delivered");
    // Stopped cleanly: its delivery's outcome is stored, so it is not sent again later.
    let (status, log) = again.sigterm_with_log(Duration::from_secs(30)).await;
    assert!(status.success(), "{log}");
    assert!(log.contains("stopped"), "the whole log read: {log}");
    assert!(!log.contains("consumer's settings"), "{log}");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("t").await.unwrap();
    let config_of = |name: &'static str| {
        let stream = stream.clone();
        async move {
            let mut c: PullConsumer = stream.get_consumer(name).await.unwrap();
            let info = c.info().await.unwrap().config.clone();
            pull::Config {
                durable_name: info.durable_name,
                description: info.description,
                deliver_policy: info.deliver_policy,
                ack_policy: info.ack_policy,
                ack_wait: info.ack_wait,
                max_deliver: info.max_deliver,
                filter_subject: info.filter_subject,
                max_ack_pending: info.max_ack_pending,
                metadata: info.metadata,
                ..Default::default()
            }
        }
    };
    let (fanout, deliveries) = (config_of("t-fanout").await, config_of("t-n-a").await);
    let mark = fanout.metadata["hookrelay_replay_until"].clone();
    let edited = |c: &pull::Config| pull::Config {
        max_deliver: 2,
        ack_wait: Duration::from_secs(1),
        max_ack_pending: 1,
        ..c.clone()
    };
    stream.update_consumer(edited(&fanout)).await.unwrap();
    stream.update_consumer(edited(&deliveries)).await.unwrap();
    let r = TestRelay::start(&text).await;
    assert_eq!(post_status(&r, "e1").await, 200);
    a.wait_delivered(&ids(&["e1"]), Duration::from_secs(15))
        .await
        .expect("delivered");
    for (name, was) in [("t-fanout", &fanout), ("t-n-a", &deliveries)] {
        let now = config_of(name).await;
        assert_eq!(
            (now.max_deliver, now.ack_wait, now.max_ack_pending),
            (was.max_deliver, was.ack_wait, was.max_ack_pending),
            "{name} set back"
        );
    }
    assert_eq!(
        config_of("t-fanout").await.metadata["hookrelay_replay_until"],
        mark,
        "the fan-out's mark kept"
    );
    r.stop().await;
    // Made again without acks: the server cannot change an ack policy in place.
    assert!(stream.delete_consumer("t-n-a").await.unwrap().success);
    stream
        .create_consumer(pull::Config {
            ack_policy: AckPolicy::None,
            metadata: Default::default(),
            ..deliveries.clone()
        })
        .await
        .unwrap();
    let r = TestRelay::start(&text).await;
    assert_eq!(post_status(&r, "e2").await, 200);
    // Nothing is taken through it (it would be gone unacknowledged): e2 waits in the
    // stream. Waited out: what is checked is that nothing happens.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !a.delivered_ids().contains("e2"),
        "not sent through a consumer without acks"
    );
    let mut c: PullConsumer = stream.get_consumer("t-n-a").await.unwrap();
    assert_eq!(
        c.info().await.unwrap().delivered.stream_sequence,
        0,
        "nothing taken"
    );
    // Deleted, it is made again, and e2 goes.
    assert!(stream.delete_consumer("t-n-a").await.unwrap().success);
    a.wait_delivered(&ids(&["e2"]), Duration::from_secs(15))
        .await
        .expect("delivered once deleted");
    assert_eq!(config_of("t-n-a").await.ack_policy, AckPolicy::Explicit);
    r.stop().await;
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_deleted_under_a_running_relay_are_made_again() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    // Delivered states are kept as long as their events, not only for `retain`: the new
    // fan-out consumer reads every event kept. Here the dedup window is raised from 1 s
    // to 24 h by a reload before the first event (an event is kept a day at least anyway).
    let text = short_lived(&nats, &a);
    let r = TestRelay::start(&text).await;
    let file = r.dir.as_ref().unwrap().path().join("routes.toml");
    let written = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        written.replace("window = \"1s\"", "window = \"24h\""),
    )
    .unwrap();
    r.app().reload().unwrap();
    assert_eq!(post_status(&r, "before").await, 200);
    assert!(a.wait_count(1, Duration::from_secs(10)).await, "delivered");
    // Past `retain` and the first window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // An operator (or a mistaken script) deletes the fan-out's and the destination's
    // consumers while the relay runs.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("t").await.unwrap();
    for name in ["t-fanout", "t-n-a"] {
        assert!(
            stream.delete_consumer(name).await.unwrap().success,
            "{name}"
        );
    }
    assert_eq!(post_status(&r, "after").await, 200);
    let after: HashSet<String> = ["after".to_string()].into();
    a.wait_delivered(&after, Duration::from_secs(15))
        .await
        .expect("fanned out and delivered through new consumers");
    // Once the new consumers are through every event, "before" was not sent again.
    let deadline = Instant::now() + Duration::from_secs(15);
    for name in ["t-fanout", "t-n-a"] {
        loop {
            let mut c = stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(name)
                .await
                .unwrap();
            let info = c.info().await.unwrap();
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{name} never through: {info:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(a.count(), 2, "each event sent once");
    // The new fan-out consumer is marked with where the events it reads again end (so they
    // are not counted against max_queue as unfanned): past "before" at least.
    let mut fanout = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("t-fanout")
        .await
        .unwrap();
    let info = fanout.info().await.unwrap().clone();
    let mark: u64 = info.config.metadata["hookrelay_replay_until"]
        .parse()
        .unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    assert!((1..=last).contains(&mark), "{mark} of {last}: {info:?}");
    r.stop().await;
    drop(nats);
}

/// An operator's edit of the stream while the relay runs (`max_age`, under which the
/// server would delete pending deliveries) makes it refuse events, saying why, until the
/// edit is set back: as it would have refused to start on such a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_edited_unsafely_under_a_running_relay_refuses_events_until_set_back() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    let r = TestRelay::start(&short_lived(&nats, &a)).await;
    assert_eq!(post_status(&r, "before").await, 200);
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let edit = |max_age: Duration| {
        let js = js.clone();
        async move {
            let mut config = js
                .get_stream("t")
                .await
                .unwrap()
                .cached_info()
                .config
                .clone();
            config.max_age = max_age;
            js.update_stream(&config).await.unwrap();
        }
    };
    edit(Duration::from_secs(3600)).await;
    // Seen at the next read of the stream (every 10 s): bounded wait for /readyz to say so.
    let ready = r.admin_url("/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get_text(&ready).await;
        if status == 503 {
            assert!(body.contains("max_age"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz still {status}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(post_status(&r, "while-edited").await, 503);
    edit(Duration::ZERO).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_text(&ready).await.0 != 200 {
        assert!(Instant::now() < deadline, "/readyz never ready again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(post_status(&r, "after").await, 200);
    r.stop().await;
    drop(nats);
}

#[tokio::test]
async fn a_server_older_than_the_oldest_supported_is_refused_at_start() {
    let old = std::env::var("HOOKRELAY_OLD_NATS").expect(
        "HOOKRELAY_OLD_NATS names an old nats-server (Debian's 2.9.10); scripts/test sets it",
    );
    // Its version as it says it ("nats-server: v2.9.10"): what the refusal must name.
    let said = std::process::Command::new(&old)
        .arg("--version")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&said.stdout);
    let version = said.trim().rsplit('v').next().unwrap().to_string();
    assert!(version.starts_with("2."), "{said}");
    let dir = tempfile::tempdir().unwrap();
    let js = dir.path().join("js");
    let (server, port) = nats_server_on_its_own_port(
        &old,
        &[OsStr::new("-js"), OsStr::new("-sd"), js.as_os_str()],
        &dir.path().join("ports"),
    )
    .await;
    let text = config(
        &[format!("nats://127.0.0.1:{port}")],
        &[("a", "http://127.0.0.1:9/".into())],
    );
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, &text).unwrap();
    let out = serve_to_exit(&cfg).await;
    drop(server);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("nats-server {version}")), "{err}");
    assert!(err.contains("needs 2.12.0 or newer"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_through_one_instance_holds_on_all_and_a_resume_through_another_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let paused = FaultSink::answering(200).await;
    let witness = FaultSink::answering(200).await;
    let text = config(
        &[nats.url()],
        &[("p", paused.url("/p")), ("w", witness.url("/w"))],
    );
    let relays = relays(dir.path(), &text, 2).await;
    let p = admin(&relays[0], Method::POST, "/api/destinations/p/pause").await;
    assert_eq!(p.json()["state"], "paused");
    // The other instance sees the pause (bounded wait).
    wait_destination(&relays[1], "p", "state", serde_json::json!("paused")).await;
    let mut ids = HashSet::new();
    for i in 0..10 {
        let id = format!("pause-{i}");
        assert_eq!(post(&relays[i % 2], &id).await.0, 200);
        ids.insert(id);
    }
    // The witness shares every event: once it has them all, `p` had every chance.
    witness
        .wait_delivered(&ids, Duration::from_secs(30))
        .await
        .expect("the witness gets everything");
    assert_eq!(paused.count(), 0, "a paused destination got requests");
    // Either instance counts the whole backlog (from the shared consumer), bounded wait.
    for r in &relays {
        wait_destination(r, "p", "queue_depth", serde_json::json!(10)).await;
    }
    let r = admin(&relays[1], Method::POST, "/api/destinations/p/resume").await;
    assert_eq!(r.json()["state"], "ok");
    paused
        .wait_delivered(&ids, Duration::from_secs(30))
        .await
        .expect("resumed through the other instance, everything delivered");
    for r in relays {
        r.sigterm(Duration::from_secs(10)).await;
    }
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_holds_for_the_destination_across_three_instances() {
    // Each answer takes 100 ms: requests overlap unless the relays hold them back.
    let max = most_at_once_across_three_instances(3, 60, 100).await;
    assert!(max <= 3, "{max} requests at once");
    assert!(max >= 2, "the instances shared the work: {max}");
}

/// Fewer requests allowed at once than there are instances: only that many instances send
/// to the destination (the first live members by id), one request at a time each, and
/// every event still arrives, whichever instance accepted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_below_the_instance_count_still_holds() {
    let max = most_at_once_across_three_instances(1, 30, 50).await;
    assert_eq!(max, 1, "{max} requests at once");
}

/// A reply route's calls on an instance that does not send to the destination (its
/// `max_in_flight` is below the instance count) take from a sender's part too: each
/// instance makes one call at a time, where those that do not send made as many as came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_calls_on_instances_that_do_not_send_are_limited_too() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let ivr = Sink::start(
        Vec::new(),
        Reply::status(200)
            .header("content-type", "application/json")
            .body(CALL_ACTION_REPLY)
            .delay(Duration::from_millis(300)),
    )
    .await;
    let text = call_action_config(
        &nats.url(),
        &ivr.url("/call-action"),
        "max_in_flight = 1\n",
        None,
        "10s",
    );
    let relays = relays(dir.path(), &text, 3).await;
    wait_instances(&relays, 3).await;
    let body = String::from_utf8(fixture("8x8/voice-call-action.json").to_vec()).unwrap();
    // Three at once at each instance.
    let mut calls = Vec::new();
    for i in 0..9 {
        let url = format!("http://{}/8x8/voice", relays[i % 3].ingress);
        let body = body.replace("77e6a667-133a-11ef", &format!("77e6a667-{i:04x}-11ef"));
        calls.push(tokio::spawn(async move {
            send(Method::POST, &url, &[], body.as_bytes()).await
        }));
    }
    for c in calls {
        let a = c.await.unwrap();
        assert_eq!(&a.body[..], CALL_ACTION_REPLY, "each call answered in time");
    }
    let max = ivr.max_concurrent();
    assert!(max <= 3, "{max} calls at once from three instances");
    for r in relays {
        r.sigterm(Duration::from_secs(10)).await;
    }
}

/// `events` posted round-robin to three instances, delivered to a destination with
/// `max_in_flight` that answers after `delay_ms`: the most requests it had at once, once
/// every event arrived.
async fn most_at_once_across_three_instances(
    max_in_flight: usize,
    events: usize,
    delay_ms: u64,
) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let sink = Sink::start(
        Vec::new(),
        Reply::status(200).delay(Duration::from_millis(delay_ms)),
    )
    .await;
    let text = config(&[nats.url()], &[("a", sink.url("/a"))]).replace(
        "[[destinations]]\nname = \"a\"\n",
        &format!("[[destinations]]\nname = \"a\"\nmax_in_flight = {max_in_flight}\n"),
    );
    let relays = relays(dir.path(), &text, 3).await;
    wait_instances(&relays, 3).await;
    for i in 0..events {
        assert_eq!(post(&relays[i % 3], &format!("mif-{i}")).await.0, 200);
    }
    let seen = sink.wait_for(events).await;
    let max = sink.max_concurrent();
    println!(
        "max_in_flight {max_in_flight} over three instances: {} requests, at most {max} at once",
        seen.len()
    );
    for r in relays {
        r.sigterm(Duration::from_secs(10)).await;
    }
    max
}

/// A destination that leaves one instance's config (a rolling reload) is sent by the others:
/// what that instance held for it goes back to them, not kept there until its restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_removed_from_one_instance_is_sent_by_another() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let x = FaultSink::answering(200).await;
    let y = FaultSink::answering(200).await;
    let both = config(&[nats.url()], &[("x", x.url("/x")), ("y", y.url("/y"))]);
    // On the first instance x is slow: one a second, so it holds most of them a while.
    let slow = both.replace(
        &format!("url = \"{}\"\n", x.url("/x")),
        &format!(
            "url = \"{}\"\nrate = {{ per_second = 1, burst = 1 }}\n",
            x.url("/x")
        ),
    );
    assert_ne!(slow, both);
    let first_cfg = dir.path().join("first.toml");
    std::fs::write(&first_cfg, &slow).unwrap();
    let mut first = RelayProcess::spawn_at(&first_cfg, &dir.path().join("first.log"), "info").await;
    const N: usize = 20;
    for i in 0..N {
        assert_eq!(post(&first, &format!("e-{i}")).await.0, 200);
    }
    assert!(
        y.wait_count(N, Duration::from_secs(20)).await,
        "y has them all"
    );
    assert!(
        x.wait_count(1, Duration::from_secs(10)).await,
        "x has begun"
    );
    // The first instance loses x; a second one, with x, starts.
    let only_y = config(&[nats.url()], &[("y", y.url("/y"))]);
    std::fs::write(&first_cfg, &only_y).unwrap();
    first.signal("HUP");
    assert!(
        first
            .wait_log("config reloaded", Duration::from_secs(10))
            .await,
        "the first instance reloaded"
    );
    let second_cfg = dir.path().join("second.toml");
    std::fs::write(&second_cfg, &both).unwrap();
    let second = RelayProcess::spawn(&second_cfg, &dir.path().join("second.log")).await;
    let all =
        |a: &[support::Arrival]| a.iter().map(|a| a.id.clone()).collect::<HashSet<_>>().len() == N;
    assert!(
        x.wait_until(all, Duration::from_secs(30)).await,
        "x got {} of {N} events",
        x.arrivals()
            .iter()
            .map(|a| a.id.clone())
            .collect::<HashSet<_>>()
            .len()
    );
    second.sigterm(Duration::from_secs(10)).await;
    first.sigterm(Duration::from_secs(10)).await;
    drop(nats);
}

/// `replicas` raised in the config (a cluster that grew) holds for a stream made before
/// with one: the relay scales it at start, so one server's loss loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_made_with_one_replica_takes_the_configs_three() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    let cfg = dir.path().join("routes.toml");
    let with = |replicas| jetstream_config(&cluster.urls(), "t", replicas, &[("a", a.url("/a"))]);
    let js = async_nats::jetstream::new(
        async_nats::connect(cluster.urls()[1].clone())
            .await
            .unwrap(),
    );
    let replicas = || async {
        js.get_stream("t")
            .await
            .unwrap()
            .cached_info()
            .config
            .num_replicas
    };
    std::fs::write(&cfg, with(1)).unwrap();
    let relay = RelayProcess::spawn(&cfg, &dir.path().join("one.log")).await;
    assert_eq!(post(&relay, "before").await.0, 200);
    relay.sigterm(Duration::from_secs(10)).await;
    assert_eq!(replicas().await, 1);
    std::fs::write(&cfg, with(3)).unwrap();
    let relay = RelayProcess::spawn(&cfg, &dir.path().join("three.log")).await;
    assert_eq!(replicas().await, 3);
    assert_eq!(post(&relay, "after").await.0, 200);
    assert!(
        a.wait_count(2, Duration::from_secs(10)).await,
        "both delivered"
    );
    relay.sigterm(Duration::from_secs(10)).await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_may_not_raise_max_body_bytes_past_what_nats_takes() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await; // max_payload: 8MB
    let text = config(&[nats.url()], &[("a", "http://127.0.0.1:9/".into())]);
    let r = TestRelay::start(&text).await;
    let file = r.dir.as_ref().unwrap().path().join("routes.toml");
    let written = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        written.replace("max_body_bytes = 65536", "max_body_bytes = 16777216"),
    )
    .unwrap();
    let err = r.app().reload().unwrap_err().to_string();
    assert!(err.contains("server.max_body_bytes"), "{err}");
    assert!(err.contains("max_payload"), "{err}");
    assert_eq!(
        r.app().config().server.max_body_bytes,
        65536,
        "the old config stays"
    );
    // Within it, the reload goes through.
    std::fs::write(
        &file,
        written.replace("max_body_bytes = 65536", "max_body_bytes = 1048576"),
    )
    .unwrap();
    r.app().reload().unwrap();
    assert_eq!(r.app().config().server.max_body_bytes, 1048576);
}

/// A reply route's call answered while JetStream is out of reach: its attempt is recorded
/// once JetStream is back, so the held delivery is not sent to the destination again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_calls_attempt_is_recorded_after_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start(dir.path()).await;
    let ivr = FaultSink::start(|n| {
        if n == 0 {
            Action::Held(200)
        } else {
            Action::Answer(200)
        }
    })
    .await;
    // The held delivery falls due 29 s after the event (the reply's timeout and 4 s): room
    // for the outage, the restart and the reconnection on a loaded machine.
    let text = call_action_config(&nats.url(), &ivr.url("/call-action"), "", None, "25s");
    let one = TestRelay::start(&text).await;
    let body = fixture("8x8/voice-call-action.json");
    let posting = {
        let url = one.url("/8x8/voice");
        tokio::spawn(async move { try_post(&client(), &url, body, Duration::from_secs(20)).await })
    };
    assert!(ivr.wait_count(1, Duration::from_secs(10)).await, "the call");
    // JetStream goes while the call is out; the destination answers meanwhile.
    nats.sigkill();
    ivr.release();
    let answered = posting.await.unwrap().expect("answered");
    assert_eq!(answered.status, 200);
    // The outage itself: longer than a JetStream request's 5 s timeout.
    tokio::time::sleep(Duration::from_secs(6)).await;
    nats.restart().await;
    let id = "77e6a667-133a-11ef-9dd4-e911cc6fc82f";
    ivr_delivered_within(&one, id, Duration::from_secs(30)).await;
    assert_eq!(ivr.count(), 1, "ivr got the event once");
    one.stop().await;
}

/// An event whose id makes its records larger than the server takes is refused with 413
/// (not accepted and then never fanned out, nor a 503 the provider retries for ever); every
/// event accepted up to that size is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_for_its_records_is_refused_and_every_accepted_one_delivered() {
    let dir = tempfile::tempdir().unwrap();
    // max_body_bytes = 65536 needs 80 KiB; the id can take as much again as the body.
    let nats = NatsServer::start_with(dir.path(), "96KB").await;
    let sink = Sink::always(200).await;
    let r = TestRelay::start(&config(&[nats.url()], &[("a", sink.url("/a"))])).await;
    let url = r.url("/8x8/voice");
    let mut posted = 0usize;
    let mut accepted = 0usize;
    // The event with an id `len` bytes long (each one new): whether it was accepted.
    let mut send = |len: usize| {
        posted += 1;
        let id = format!("{posted:06}{}", "x".repeat(len - 6));
        let url = url.clone();
        async move {
            let p = try_post(&client(), &url, voice(&id), Duration::from_secs(10))
                .await
                .expect("an answer");
            let text = String::from_utf8_lossy(&p.body).to_string();
            match p.status {
                200 => true,
                413 => {
                    assert!(text.contains("payload_too_large"), "{text}");
                    assert!(text.contains("bytes per record"), "{text}");
                    false
                }
                other => panic!("id of {len} bytes: {other} {text}"),
            }
        }
    };
    // The longest id accepted, by bisection (bodies stay within max_body_bytes).
    let (mut ok, mut too_long) = (1_000usize, 65_000usize);
    assert!(send(ok).await, "a short id is accepted");
    accepted += 1;
    assert!(
        !send(too_long).await,
        "an id as large as the body limit is refused"
    );
    while too_long - ok > 1 {
        let mid = (ok + too_long) / 2;
        if send(mid).await {
            accepted += 1;
            ok = mid;
        } else {
            too_long = mid;
        }
    }
    // Around that edge, every size is accepted up to it and refused past it.
    for len in (ok - 600..ok + 200).step_by(8) {
        let took = send(len).await;
        assert_eq!(took, len <= ok, "an id of {len} bytes (the edge: {ok})");
        accepted += usize::from(took);
    }
    sink.wait_for(accepted).await;
    r.stop().await;
    sink.stop().await;
}

/// A breaker that opens on one instance holds on the others (CONTRACT §8 across §7): with
/// `max_in_flight = 1` only one instance sends to the destination, so only its own
/// failures could open the others' breakers. Its probe closes them all again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_on_one_instance_holds_on_the_others_and_its_probe_closes_them() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let down = FaultSink::answering(503).await;
    let text = config(&[nats.url()], &[("down", down.url("/down"))])
        .replace("max_in_flight = 32", "max_in_flight = 1")
        .replace(
            "[delivery]\n",
            "[delivery]\nbreaker = { failures = 2, cool_down = \"2s\" }\n",
        );
    assert!(text.contains("breaker =") && text.contains("max_in_flight = 1"));
    let relays = relays(dir.path(), &text, 2).await;
    wait_instances(&relays, 2).await;
    let mut ids = HashSet::new();
    for i in 0..4 {
        let id = format!("brk-{i}");
        assert_eq!(post(&relays[i % 2], &id).await.0, 200);
        ids.insert(id);
    }
    // Open on both: the one that sends, and the one that only heard of it.
    for r in &relays {
        wait_destination(r, "down", "state", serde_json::json!("open")).await;
    }
    down.set_behaviour(|_| Action::Answer(200));
    // The sender's probe, after the cool-down, closes both.
    for r in &relays {
        wait_destination(r, "down", "state", serde_json::json!("ok")).await;
    }
    down.wait_delivered(&ids, Duration::from_secs(30))
        .await
        .expect("every event delivered once the breaker closed");
    for r in relays {
        // CONTRACT §6 on JetStream too: SIGTERM exits 0.
        assert_eq!(r.sigterm(Duration::from_secs(10)).await.code(), Some(0));
    }
    drop(nats);
}
