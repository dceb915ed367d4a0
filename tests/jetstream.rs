//! Several relays on one JetStream (CONTRACT §7): each test starts its own nats-server(s)
//! on free loopback ports and relay processes, and stops them all.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{client, try_post, FaultSink, NatsServer, RelayProcess};

/// A relay config on JetStream at `urls`, one voice source, destinations `(name, url)`.
fn config(urls: &[String], extra_delivery: &str, destinations: &[(&str, String)]) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    let mut text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "2s"
max_body_bytes = 65536

[store]
backend = "jetstream"
url = [{}]
prefix = "t"

[delivery]
timeout = "3s"
max_in_flight = 32
rate = {{ per_second = 1000000, burst = 10000 }}
retry = {{ first = "100ms", factor = 2.0, max_delay = "1s" }}
{extra_delivery}

[[sources]]
name = "voice"
path = "/8x8/voice"
event_id = ["$.payload.eventId"]
"#,
        urls.join(", ")
    );
    let mut names = Vec::new();
    for (name, url) in destinations {
        text.push_str(&format!("\n[[destinations]]\nname = \"{name}\"\nurl = \"{url}\"\n"));
        names.push(format!("\"{name}\""));
    }
    text.push_str(&format!(
        "\n[[routes]]\nname = \"all\"\nsource = \"voice\"\nmatch = {{ namespace = \"VOICE\" }}\nto = [{}]\n",
        names.join(", ")
    ));
    text
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

async fn post(relay: &RelayProcess, id: &str) -> (u16, serde_json::Value) {
    let url = format!("http://{}/8x8/voice", relay.ingress);
    let p = try_post(&client(), &url, voice(id), Duration::from_secs(10))
        .await
        .expect("an answer");
    let v = serde_json::from_slice(&p.body).unwrap_or_default();
    (p.status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_on_one_server_deliver_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = FaultSink::answering(200).await;
    let b = FaultSink::answering(200).await;
    let text = config(
        &[nats.url()],
        "",
        &[("a", a.url("/a")), ("b", b.url("/b"))],
    );
    let relays = relays(dir.path(), &text, 3).await;
    let mut ids = std::collections::HashSet::new();
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
    assert!(missing_a.is_ok(), "a misses {:?}", missing_a.err().map(|m| m.len()));
    assert!(missing_b.is_ok(), "b misses {:?}", missing_b.err().map(|m| m.len()));
    drop(nats);
}
