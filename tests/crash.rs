//! Crash safety: every event answered 200 survives a SIGKILL right after, with its
//! deliveries.

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

async fn survive_sigkill(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("routes.toml");
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
