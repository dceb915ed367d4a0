//! The project on its own: the shipped `routes.toml` passes `check` and `serve` runs on it
//! with no environment variable set, on the redb store (the default), and answers an 8x8
//! sample payload from `examples/payloads/`.

mod support;

use std::time::Duration;

use http::Method;
use support::{bin, fixture, send, RelayProcess, Reply, Sink};

#[tokio::test]
async fn shipped_routes_toml_checks_and_serves_on_redb_with_no_environment() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("routes.toml");
    let text = std::fs::read_to_string(&shipped).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The shipped file as it is, but on free ports (tests run side by side), with the ivr
    // destination a sink answering the call action sample.
    let call_action = fixture("8x8/voice-call-action-reply.json");
    let ivr = Sink::start(
        Vec::new(),
        Reply::status(200)
            .header("content-type", "application/json")
            .body(&call_action),
    )
    .await;
    let file = dir.path().join("routes.toml");
    // Swapped below for ports of their own: present, or the relay would take the defaults.
    assert!(text.contains("127.0.0.1:8080") && text.contains("127.0.0.1:9090"));
    std::fs::write(
        &file,
        text.replace("127.0.0.1:8080", "127.0.0.1:0")
            .replace("127.0.0.1:9090", "127.0.0.1:0")
            .replace(
                "http://127.0.0.1:8003/call-action",
                &ivr.url("/call-action"),
            ),
    )
    .unwrap();

    let check = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&shipped)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    let relay = RelayProcess::spawn_with_no_environment(&file, &dir.path().join("relay.log")).await;
    let (ingress, admin) = (relay.ingress, relay.admin);

    // The development value of VOICE_AUTH, as the README's "Try it" posts it.
    let a = send(
        Method::POST,
        &format!("http://{ingress}/8x8/voice"),
        &[("authorization", "Basic dm9pY2U6ZGV2")],
        &fixture("8x8/voice-call-status.json"),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["accepted"], true);
    // Every call handle posted to the Voice Call Action URL is answered with ivr's call
    // action: a CALL_ACTION event, and a Number Masking call handle, which comes as
    // CALL_STATUS (8x8's own example).
    let handle = String::from_utf8(fixture("8x8/voice-call-status.json").to_vec())
        .unwrap()
        .replace(
            "eb0fc709-9693-11ea-454d-1705dde98182",
            "c4f805bc-9693-11ea-454d-1705dde98182",
        );
    for body in [
        fixture("8x8/voice-call-action.json").to_vec(),
        handle.into_bytes(),
    ] {
        let a = send(
            Method::POST,
            &format!("http://{ingress}/8x8/voice/call-action"),
            &[("authorization", "Basic dm9pY2U6ZGV2")],
            &body,
        )
        .await;
        assert_eq!((a.status.as_u16(), &a.body[..]), (200, &call_action[..]));
    }
    assert_eq!(ivr.seen().len(), 2);
    let ready = send(Method::GET, &format!("http://{admin}/readyz"), &[], b"").await;
    assert_eq!(ready.status, 200);
    assert!(
        dir.path().join("data/hookrelay.redb").is_file(),
        "the default store is redb"
    );

    let status = relay.sigterm(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}");
}
