//! Crash safety: every event answered 200 survives a SIGKILL right after, with its
//! deliveries. A relay that replaces one still stopping waits for its store.

mod support;

use hookrelay::store::redb::RedbStore;
use hookrelay::store::sled::SledStore;
use hookrelay::store::Store;

const N: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_answered_200_survive_sigkill_sled() {
    survive_sigkill("sled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_answered_200_survive_sigkill_redb() {
    survive_sigkill("redb").await;
}

/// A relay's config on the `backend` store in `dir`, delivering nowhere soon.
fn write_config(dir: &std::path::Path, backend: &str) -> std::path::PathBuf {
    let cfg = dir.join("routes.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[store]
backend = "{backend}"
[delivery]
retry = {{ first = "1h" }}
[[sources]]
name = "voice"
path = "/8x8/voice"
event_id = ["$.payload.eventId"]
[[destinations]]
name = "calls"
url = "http://127.0.0.1:9/calls"
[[destinations]]
name = "analytics"
url = "http://127.0.0.1:9/analytics"
[[routes]]
name = "all"
source = "voice"
to = ["calls", "analytics"]
"#
        ),
    )
    .unwrap();
    cfg
}

async fn survive_sigkill(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), backend);
    let relay = support::RelayProcess::spawn(&cfg, &dir.path().join("relay.log")).await;
    let addr = relay.ingress;

    let mut tasks = Vec::new();
    for i in 0..N {
        let url = format!("http://{addr}/8x8/voice");
        tasks.push(tokio::spawn(async move {
            let body = format!(r#"{{"namespace":"VOICE","payload":{{"eventId":"crash-{i}"}}}}"#);
            let a = support::send(http::Method::POST, &url, &[], body.as_bytes()).await;
            assert_eq!(a.status, 200, "{:?}", a.body);
            a.json()["id"].as_str().unwrap().to_string()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    relay.sigkill().await; // no shutdown, no final flush

    let data = dir.path().join("data");
    let store: std::sync::Arc<dyn Store> = match backend {
        "sled" => SledStore::open(&data).unwrap(),
        _ => RedbStore::open(&data).unwrap(),
    };
    for id in &ids {
        let views = store.lookup(id).await.unwrap();
        assert_eq!(views.len(), 1, "event {id} lost");
        assert_eq!(views[0].deliveries.len(), 2, "deliveries of {id} lost");
    }
    assert_eq!(store.queue_depth("calls") as usize, N);
    store.close().await.unwrap();
}

/// A relay started while another process holds the store (the relay it replaces, still
/// stopping: a rolling update on one volume) answers 503 and waits for it, then starts;
/// it once ended at once, "already open".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_waits_for_a_store_another_process_holds_redb() {
    waits_for_the_store("redb").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_waits_for_a_store_another_process_holds_sled() {
    waits_for_the_store("sled").await;
}

async fn waits_for_the_store(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), backend);
    let data = dir.path().join("data");
    let held: std::sync::Arc<dyn Store> = match backend {
        "sled" => SledStore::open(&data).unwrap(),
        _ => RedbStore::open(&data).unwrap(),
    };
    let log = dir.path().join("relay.log");
    let starting = {
        let (cfg, log) = (cfg.clone(), log.clone());
        tokio::spawn(async move { support::RelayProcess::spawn(&cfg, &log).await })
    };
    // Until the relay says it waits for the store.
    let deadline = std::time::Instant::now() + support::WAIT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("in use by another process")
    {
        assert!(
            std::time::Instant::now() < deadline && !starting.is_finished(),
            "no word of the store in use: {}",
            support::tail(&log)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    held.close().await.unwrap();
    drop(held);
    let relay = starting.await.unwrap();
    let a = support::send(
        http::Method::POST,
        &format!("http://{}/8x8/voice", relay.ingress),
        &[],
        br#"{"payload":{"eventId":"after-the-wait"}}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    relay.sigterm(std::time::Duration::from_secs(10)).await;
}
