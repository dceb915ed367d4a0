//! The fault tests' relay: a `voice` source with padded events, destinations and routes
//! as TOML snippets, and a tolerant post and GET.

use std::time::Duration;

use super::{client, try_post, HttpClient, Posted};

/// How long any single wait in the fault tests may take.
pub const FAULT_WAIT: Duration = Duration::from_secs(20);

/// `[server]`, `[store]`, `[delivery]` and the `voice` source (id = `$.payload.eventId`);
/// destinations and routes are appended.
pub fn fault_config(store: &str, delivery: &str, rest: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "1s"
max_body_bytes = 262144

[store]
{store}

[delivery]
rate = {{ per_second = 100000, burst = 1000 }}
{delivery}

[[sources]]
name = "voice"
path = "/8x8/voice"
event_id = ["$.payload.eventId"]
{rest}
"#
    )
}

pub fn destination_toml(name: &str, url: &str, extra: &str) -> String {
    format!("\n[[destinations]]\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n")
}

pub fn route_toml(to: &[&str]) -> String {
    let to: Vec<String> = to.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        "\n[[routes]]\nname = \"all\"\nsource = \"voice\"\nto = [{}]\n",
        to.join(", ")
    )
}

pub fn voice_event(id: &str, pad: usize) -> Vec<u8> {
    format!(
        r#"{{"namespace":"VOICE","payload":{{"eventId":"{id}","pad":"{}"}}}}"#,
        "x".repeat(pad)
    )
    .into_bytes()
}

pub async fn post_event(c: &HttpClient, relay: &hookrelay::Relay, id: &str, pad: usize) -> Posted {
    let url = format!("http://{}/8x8/voice", relay.ingress);
    try_post(c, &url, voice_event(id, pad), FAULT_WAIT)
        .await
        .unwrap_or_else(|e| panic!("posting {id}: {e}"))
}

/// GET `url`: status and body.
pub async fn get_text(url: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let req = http::Request::get(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let (status, body) = tokio::time::timeout(FAULT_WAIT, async {
        let resp = client().request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    })
    .await
    .expect("answer in time");
    (status, String::from_utf8_lossy(&body).into_owned())
}
