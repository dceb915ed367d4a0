//! The admin API refuses what another site's page sends through the operator's browser (a
//! form post, a fetch from another origin, a DNS-rebound host name), and changes nothing.

mod support;

use http::Method;
use support::{send, TestRelay};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"

[[sources]]
name = "open"
path = "/open"

[[destinations]]
name = "calls"
url = "http://127.0.0.1:9/calls"

[[routes]]
name = "open"
source = "open"
to = ["calls"]
"#;

#[tokio::test]
async fn another_sites_page_cannot_pause_a_destination_or_read_events() {
    let r = TestRelay::start(CONFIG).await;
    let pause = r.admin_url("/api/destinations/calls/pause");
    let form = [
        ("origin", "https://evil.example"),
        ("sec-fetch-site", "cross-site"),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    send(Method::POST, &pause, &form, b"")
        .await
        .error(403, "forbidden");
    let old_browser = [("origin", "https://evil.example")];
    send(Method::POST, &pause, &old_browser, b"")
        .await
        .error(403, "forbidden");
    let rebound = [("host", "evil.example"), ("sec-fetch-site", "same-origin")];
    send(Method::GET, &r.admin_url("/api/events"), &rebound, b"")
        .await
        .error(403, "forbidden");
    assert!(
        !r.app().store.paused("calls"),
        "a refused request paused it"
    );

    // The console itself (same origin) and a script (no browser headers) get through.
    let host = r.admin_url("").trim_start_matches("http://").to_string();
    let origin = format!("http://{host}");
    let console = [
        ("origin", origin.as_str()),
        ("sec-fetch-site", "same-origin"),
    ];
    assert_eq!(send(Method::POST, &pause, &console, b"").await.status, 200);
    assert!(r.app().store.paused("calls"));
    let resume = r.admin_url("/api/destinations/calls/resume");
    assert_eq!(send(Method::POST, &resume, &[], b"").await.status, 200);
    assert!(!r.app().store.paused("calls"));
}
