//! The ingress against the contract's §3 table, with the 8x8 and dids fixtures.

mod support;

use std::time::Duration;

use hookrelay::store::DeliveryState;
use http::Method;
use support::{fixture, send, TestRelay, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Destinations point at a closed port with hour-long retries: deliveries stay pending.
fn config(extra_server: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
max_body_bytes = 4096
read_timeout = "500ms"
token_secret = "test-token-secret-0123456789abcdef"
{extra_server}

[delivery]
retry = {{ first = "1h" }}
max_queue = 1000

[[sources]]
name = "voice"
path = "/8x8/voice"
auth = {{ kind = "header", header = "Authorization", value = "Basic dGVzdA==" }}
event_id = ["$.payload.eventId"]

[[sources]]
name = "open"
path = "/open"

[[sources]]
name = "walled"
path = "/walled"
allow_ips = ["203.0.113.0/24"]

[[sources]]
name = "sms"
path = "/8x8/sms"
auth = {{ kind = "oauth2", clients = [{{ id = "c", secret = "s" }}] }}

[[destinations]]
name = "calls"
url = "http://127.0.0.1:9/calls"

[[destinations]]
name = "analytics"
url = "http://127.0.0.1:9/analytics"

[[routes]]
name = "voice-status"
source = "voice"
match = {{ namespace = "VOICE", eventType = ["CALL_STATUS", "SESSION_SUMMARY"] }}
filter = "@.payload.callDirection == 'INBOUND'"
to = ["calls", "analytics"]

[[routes]]
name = "all-voice"
source = "voice"
match = {{ namespace = "VOICE" }}
to = ["analytics"]

[[routes]]
name = "open"
source = "open"
to = ["calls"]

[[routes]]
name = "walled"
source = "walled"
to = ["calls"]
{extra}
"#
    )
}

const AUTH: (&str, &str) = ("authorization", "Basic dGVzdA==");

#[tokio::test]
async fn accepted_event_is_stored_with_one_delivery_per_destination() {
    let r = TestRelay::start(&config("", "")).await;
    let a = r
        .post_with(
            "/8x8/voice",
            &[AUTH],
            &fixture("8x8/voice-call-status.json"),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let v = a.json();
    assert_eq!(v["accepted"], true);
    assert_eq!(v["duplicate"], false);
    assert_eq!(v["id"], "eb0fc709-9693-11ea-454d-1705dde98182");
    // Two routes match; analytics is named by both and receives the event once.
    assert_eq!(v["deliveries"], 2);
    let views = r
        .app()
        .store
        .lookup("eb0fc709-9693-11ea-454d-1705dde98182")
        .await
        .unwrap();
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].event.source, "voice");
    assert_eq!(
        &views[0].event.body[..],
        &fixture("8x8/voice-call-status.json")[..]
    );
    let mut dests: Vec<_> = views[0]
        .deliveries
        .iter()
        .map(|d| d.destination.clone())
        .collect();
    dests.sort();
    assert_eq!(dests, ["analytics", "calls"]);
    assert!(views[0]
        .deliveries
        .iter()
        .all(|d| d.state == DeliveryState::Pending));
}

#[tokio::test]
async fn duplicate_within_window_adds_no_delivery() {
    let r = TestRelay::start(&config("", "")).await;
    let body = fixture("8x8/voice-session-summary.json");
    let first = r.post_with("/8x8/voice", &[AUTH], &body).await.json();
    assert_eq!(first["duplicate"], false);
    // No eventId in a session summary: the id is the body's SHA-256.
    let id = first["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64);
    let second = r.post_with("/8x8/voice", &[AUTH], &body).await;
    assert_eq!(second.status, 200);
    let v = second.json();
    assert_eq!(v["duplicate"], true);
    assert_eq!(v["deliveries"], 0);
    assert_eq!(v["id"], id.as_str());
    let views = r.app().store.lookup(&id).await.unwrap();
    assert_eq!(views.len(), 1, "one event stored");
    assert_eq!(
        views[0].deliveries.len(),
        1,
        "only all-voice matched (no callDirection)"
    );
    assert_eq!(r.app().store.queue_depth("analytics"), 1);
}

#[tokio::test]
async fn every_8x8_fixture_is_accepted() {
    let r = TestRelay::start(&config("", "")).await;
    for f in [
        "voice-call-action.json",
        "voice-call-status.json",
        "voice-session-summary.json",
        "voice-virtual-number-update.json",
    ] {
        let a = r
            .post_with("/8x8/voice", &[AUTH], &fixture(&format!("8x8/{f}")))
            .await;
        assert_eq!(a.status, 200, "{f}");
        assert!(a.json()["deliveries"].as_u64().unwrap() >= 1, "{f}");
    }
    for f in [
        "sms-inbound.json",
        "sms-delivery-receipt.json",
        "chatapps-inbound.json",
    ] {
        let a = r.post("/open", &fixture(&format!("8x8/{f}"))).await;
        assert_eq!(a.status, 200, "{f}");
        assert_eq!(a.json()["deliveries"], 1, "{f}");
    }
}

#[tokio::test]
async fn no_matching_route_is_accepted_with_zero_deliveries() {
    let r = TestRelay::start(&config("", "")).await;
    let a = r
        .post_with("/8x8/voice", &[AUTH], br#"{"namespace":"SMS"}"#)
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["deliveries"], 0);
    assert_eq!(a.json()["duplicate"], false);
}

#[tokio::test]
async fn unknown_path_is_404() {
    let r = TestRelay::start(&config("", "")).await;
    r.post("/nope", b"{}").await.error(404, "not_found");
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    let r = TestRelay::start(&config("", "")).await;
    let a = send(Method::GET, &r.url("/open"), &[], b"").await;
    a.error(405, "method_not_allowed");
    assert_eq!(a.headers["allow"], "POST");
}

#[tokio::test]
async fn address_outside_allowlist_is_403_even_before_method() {
    let r = TestRelay::start(&config("", "")).await;
    r.post("/walled", b"{}").await.error(403, "forbidden");
    // IP is checked before the method.
    send(Method::GET, &r.url("/walled"), &[], b"")
        .await
        .error(403, "forbidden");
    // X-Forwarded-For is not believed from an untrusted peer.
    r.post_with("/walled", &[("x-forwarded-for", "203.0.113.7")], b"{}")
        .await
        .error(403, "forbidden");
}

#[tokio::test]
async fn address_and_method_are_checked_before_credentials() {
    let extra = r#"
[[sources]]
name = "walled-locked"
path = "/walled-locked"
allow_ips = ["203.0.113.0/24"]
auth = { kind = "header", header = "Authorization", value = "Basic dGVzdA==" }
"#;
    let r = TestRelay::start(&config("", extra)).await;
    // No credentials, from outside the allowlist: the address answers first.
    r.post("/walled-locked", b"{}")
        .await
        .error(403, "forbidden");
    // No credentials, the wrong method: the method answers first.
    let a = send(Method::GET, &r.url("/8x8/voice"), &[], b"").await;
    a.error(405, "method_not_allowed");
    assert_eq!(a.headers["allow"], "POST");
    let a = send(Method::GET, &r.url("/8x8/sms"), &[], b"").await;
    a.error(405, "method_not_allowed");
}

#[tokio::test]
async fn forwarded_address_is_believed_from_a_trusted_proxy() {
    let r = TestRelay::start(&config(r#"trusted_proxies = ["127.0.0.0/8"]"#, "")).await;
    let ok = r
        .post_with(
            "/walled",
            &[("x-forwarded-for", "203.0.113.7, 127.0.0.5")],
            b"{}",
        )
        .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    // The right-most untrusted entry counts, not a spoofed left-most one.
    r.post_with(
        "/walled",
        &[("x-forwarded-for", "203.0.113.7, 198.51.100.1")],
        b"{}",
    )
    .await
    .error(403, "forbidden");
}

#[tokio::test]
async fn missing_or_wrong_credentials_are_401() {
    let r = TestRelay::start(&config("", "")).await;
    let body = fixture("8x8/voice-call-status.json");
    r.post("/8x8/voice", &body).await.error(401, "unauthorized");
    r.post_with("/8x8/voice", &[("authorization", "Basic dGVzdA=!")], &body)
        .await
        .error(401, "unauthorized");
    let a = r.post("/8x8/sms", &fixture("8x8/sms-inbound.json")).await;
    a.error(401, "unauthorized");
    assert_eq!(a.headers["www-authenticate"], "Bearer");
    let a = r
        .post_with(
            "/8x8/sms",
            &[("authorization", "Bearer forged.token")],
            b"{}",
        )
        .await;
    a.error(401, "unauthorized");
    assert_eq!(
        a.headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    // Auth is checked before size and JSON.
    r.post("/8x8/voice", &[b'x'; 10_000])
        .await
        .error(401, "unauthorized");
}

#[tokio::test]
async fn oversize_body_is_413_announced_or_streamed() {
    let r = TestRelay::start(&config("", "")).await;
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(5000));
    r.post("/open", big.as_bytes())
        .await
        .error(413, "payload_too_large");
    // A chunked body with no length announced is cut off at the limit, not buffered.
    let mut s = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
    s.write_all(b"POST /open HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = format!("1000\r\n{}\r\n", "y".repeat(4096));
    let mut answer = Vec::new();
    for _ in 0..4 {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("payload_too_large"), "{text}");
}

#[tokio::test]
async fn invalid_json_is_400_saying_where() {
    let r = TestRelay::start(&config("", "")).await;
    let msg = r
        .post("/open", b"{\"a\": 1,\n \"b\": }")
        .await
        .error(400, "invalid_json");
    assert!(msg.contains("line 2"), "{msg}");
}

#[tokio::test]
async fn stalled_body_is_cut_off_by_the_read_timeout() {
    let r = TestRelay::start(&config("", "")).await;
    let mut s = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
    s.write_all(b"POST /open HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"a\":")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the relay must answer or close within its read timeout"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
}

#[tokio::test]
async fn stalled_headers_are_cut_off() {
    let r = TestRelay::start(&config("", "")).await;
    let mut s = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
    s.write_all(b"POST /open HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "connection closed by the header read timeout");
}

#[tokio::test]
async fn queue_over_max_queue_is_503_with_retry_after() {
    let extra_server = "";
    let cfg = config(extra_server, "").replace("max_queue = 1000", "max_queue = 2");
    let r = TestRelay::start(&cfg).await;
    for i in 0..2 {
        let a = r.post("/open", format!("{{\"n\":{i}}}").as_bytes()).await;
        assert_eq!(a.status, 200);
    }
    let a = r.post("/open", b"{\"n\":3}").await;
    a.error(503, "unavailable");
    assert!(a.headers.contains_key("retry-after"));
    // Nothing was stored for the refused event.
    let id = hookrelay::event_id::body_hash(b"{\"n\":3}");
    assert!(r.app().store.lookup(&id).await.unwrap().is_empty());
    // A provider's retry of an event already accepted is answered as the duplicate it is,
    // full queue or not: it must not be told to come back later.
    let again = r.post("/open", b"{\"n\":1}").await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.json()["duplicate"], true);
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let r = TestRelay::start(&config("", "")).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = http::Request::post(r.url("/open"))
        .body(Full::new(Bytes::from_static(b"{\"h2\":true}")))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("an answer in time")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("the body in time")
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("\"accepted\":true"));
}

#[tokio::test]
async fn huge_headers_and_malformed_http_are_refused_without_harm() {
    let r = TestRelay::start(&config("", "")).await;
    let mut s = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
    let big = format!(
        "POST /open HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let mut answer = Vec::new();
    // Answered and closed, promptly (a reset while the rest of the head was still being
    // written may lose the answer: then nothing was read).
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("answered or closed within 5 s");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );

    let mut s = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
    s.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("answered and closed within 5 s");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    // The relay still serves.
    assert_eq!(r.post("/open", b"{}").await.status, 200);
}

/// Without an oauth2 source the token endpoint does not exist.
#[tokio::test]
async fn the_token_path_is_unknown_without_an_oauth2_source() {
    let r = TestRelay::start(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[sources]]\nname = \"open\"\npath = \"/open\"\n",
    )
    .await;
    let a = r
        .post_with(
            "/oauth/token",
            &[("content-type", "application/x-www-form-urlencoded")],
            b"grant_type=client_credentials&client_id=a&client_secret=b",
        )
        .await;
    a.error(404, "not_found");
}

/// The answers hyper makes itself (head over the limit: 431; not HTTP: 400) carry the
/// contract's JSON error body like every other error.
#[tokio::test]
async fn the_http_layers_own_answers_are_json_errors() {
    let r = TestRelay::start(&config("", "")).await;
    for (request, status, kind) in [
        (
            format!(
                "POST /open HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
                "a".repeat(100 * 1024)
            ),
            "431",
            "headers_too_large",
        ),
        ("NOT HTTP AT ALL\r\n\r\n".to_string(), "400", "bad_request"),
    ] {
        let mut s = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
        let _ = s.write_all(request.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.contains("content-type: application/json"), "{head}");
        let v: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert_eq!(v["error"], kind, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_their_turn() {
    // Idle connections are closed after `read_timeout`: long enough here that only closing
    // a held one frees a slot, however slow the machine.
    let text = config("max_connections = 2", "")
        .replace("read_timeout = \"500ms\"", "read_timeout = \"30s\"");
    let r = TestRelay::start(&text).await;
    let req = b"POST /open HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";
    // Two keep-alive connections, each served once and left open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("served in time")
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    // A third is accepted by the kernel but not served while both are open.
    let mut third = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
    third.write_all(req).await.unwrap();
    let mut buf = [0u8; 512];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond max_connections");
    // Closing one frees a slot.
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
}

#[tokio::test]
async fn a_body_too_costly_for_a_descendant_jsonpath_is_refused() {
    let cfg = r#"
[server]
listen = "127.0.0.1:0"

[[sources]]
name = "deep"
path = "/deep"
event_id = ["$..eventId"]

[[sources]]
name = "decoded"
path = "/decoded"
decode_json = ["data"]
event_id = ["$..eventId"]

[[sources]]
name = "wild"
path = "/wild"
event_id = ["$.*[*]"]
"#;
    let r = TestRelay::start(cfg).await;
    // ~600 KB: 100 objects, each one key of 4,000 bytes, around 100,000 zeros. A search of
    // every descendant would write ~40 GB of paths.
    let mut body = String::new();
    for _ in 0..100 {
        body.push_str(&format!("{{\"{}\":", "k".repeat(4000)));
    }
    body.push('[');
    body.push_str(&vec!["0"; 100_000].join(","));
    body.push(']');
    body.push_str(&"}".repeat(100));
    let a = r.post("/deep", body.as_bytes()).await;
    let msg = a.error(400, "invalid_json");
    assert!(msg.contains("too deeply nested"), "{msg}");
    // The same, as the text of a `decode_json` field: searched once decoded, so refused too.
    let wrapped = serde_json::json!({ "data": body }).to_string();
    let a = r.post("/decoded", wrapped.as_bytes()).await;
    let msg = a.error(400, "invalid_json");
    assert!(msg.contains("too deeply nested"), "{msg}");
    // A wildcard under a long key writes that key in the path of every element below it.
    let wide = format!(
        "{{\"{}\":[{}]}}",
        "k".repeat(4000),
        vec!["0"; 100_000].join(",")
    );
    let a = r.post("/wild", wide.as_bytes()).await;
    let msg = a.error(400, "invalid_json");
    assert!(msg.contains("too deeply nested"), "{msg}");
    let a = r.post("/wild", br#"{"ids":["w-1"]}"#).await;
    assert_eq!(a.json()["id"], "w-1");
    // An ordinary event on the same sources is accepted, its id found by the search.
    let a = r.post("/deep", br#"{"payload":{"eventId":"e-1"}}"#).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["id"], "e-1");
    let a = r
        .post(
            "/decoded",
            br#"{"data":"{\"payload\":{\"eventId\":\"e-2\"}}"}"#,
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["id"], "e-2");
}

/// A member no rule reads is still checked: a body that is not JSON is a 400 whichever
/// member holds the fault.
#[tokio::test]
async fn a_body_that_is_not_json_in_a_member_no_rule_reads_is_refused() {
    let cfg = r#"
[server]
listen = "127.0.0.1:0"

[[sources]]
name = "voice"
path = "/voice"
event_id = ["$.payload.eventId"]
"#;
    let r = TestRelay::start(cfg).await;
    for bad in [
        &b"{\"payload\":{\"eventId\":\"e-1\",\"text\":\"\xff\"}}"[..],
        br#"{"payload":{"eventId":"e-1"},"note":"\ud800"}"#,
        br#"{"payload":{"eventId":"e-1"},"n":[1e400]}"#,
    ] {
        let a = r.post("/voice", bad).await;
        a.error(400, "invalid_json");
    }
    let a = r
        .post("/voice", br#"{"payload":{"eventId":"e-1"},"n":1e300}"#)
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
}
