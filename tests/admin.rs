//! The admin API, metrics, reload (API and SIGHUP), SIGTERM, secrets kept out of logs and
//! admin answers, and requests another site's page makes refused.

mod support;

use std::process::Command;

use hookrelay::store::{DeliveryKey, Outcome};
use http::Method;
use std::time::Duration;
use support::{fixture, metric, send, RelayProcess, TestRelay, WAIT};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[delivery]
retry = { first = "1h" }

[[sources]]
name = "open"
path = "/open"
event_id = ["$.payload.eventId"]

[[sources]]
name = "locked"
path = "/locked"
auth = { kind = "header", header = "X-Key", value = "k" }

[[destinations]]
name = "calls"
url = "http://127.0.0.1:9/calls"

[[routes]]
name = "open"
source = "open"
to = ["calls"]
"#;

#[tokio::test]
async fn health_ready_and_unknown_paths() {
    let r = TestRelay::start(CONFIG).await;
    let a = send(Method::GET, &r.admin_url("/healthz"), &[], b"").await;
    assert_eq!(a.status, 200);
    let a = send(Method::GET, &r.admin_url("/readyz"), &[], b"").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["status"], "ready");
    send(Method::GET, &r.admin_url("/nope"), &[], b"")
        .await
        .error(404, "not_found");
    let a = send(Method::GET, &r.admin_url("/api/reload"), &[], b"").await;
    a.error(405, "method_not_allowed");
    assert_eq!(a.headers["allow"], "POST");
    send(Method::GET, &r.admin_url("/api/dead?limit=zero"), &[], b"")
        .await
        .error(400, "bad_request");
    send(Method::GET, &r.admin_url("/api/dead?after=last"), &[], b"")
        .await
        .error(400, "bad_request");
    send(Method::POST, &r.admin_url("/api/dead/replay"), &[], b"")
        .await
        .error(400, "bad_request");
    send(Method::GET, &r.admin_url("/api/events/missing"), &[], b"")
        .await
        .error(404, "not_found");
    // No such endpoint is a 404 whatever the method; a known one asked wrongly, a 405.
    send(
        Method::GET,
        &r.admin_url("/api/destinations/calls"),
        &[],
        b"",
    )
    .await
    .error(404, "not_found");
    let a = send(
        Method::GET,
        &r.admin_url("/api/destinations/calls/pause"),
        &[],
        b"",
    )
    .await;
    a.error(405, "method_not_allowed");
    // Every answer, an error too, is kept by no cache and read only as what it says it is
    // (event bodies hold personal data).
    for (method, path) in [
        (Method::GET, "/healthz"),
        (Method::GET, "/api/events"),
        (Method::GET, "/api/events/missing"),
        (Method::GET, "/api/dead"),
        (Method::GET, "/api/destinations"),
        (Method::GET, "/api/config"),
        (Method::GET, "/metrics"),
        (Method::POST, "/api/reload"),
    ] {
        let a = send(method, &r.admin_url(path), &[], b"").await;
        assert_eq!(a.headers["cache-control"], "no-store", "{path}");
        assert_eq!(a.headers["x-content-type-options"], "nosniff", "{path}");
    }
}

/// `/readyz` answers a balancer without the admin token, but names destinations (those
/// removed from the config with deliveries pending) only to the operator.
#[tokio::test]
async fn readiness_names_removed_destinations_only_to_the_operator() {
    let text = CONFIG.replace(
        "admin_listen = \"127.0.0.1:0\"\n",
        "admin_listen = \"127.0.0.1:0\"\nadmin_token = \"tok-0123\"\n",
    );
    assert_ne!(text, CONFIG);
    let r = TestRelay::start(&text).await;
    let body = br#"{"payload":{"eventId":"orphan-1"}}"#;
    assert_eq!(r.post("/open", body).await.status, 200);
    let bearer = [("authorization", "Bearer tok-0123")];
    let file = r.dir.as_ref().unwrap().path().join("routes.toml");
    std::fs::write(
        &file,
        text.replace("name = \"calls\"", "name = \"elsewhere\"")
            .replace("to = [\"calls\"]", "to = [\"elsewhere\"]"),
    )
    .unwrap();
    let a = send(Method::POST, &r.admin_url("/api/reload"), &bearer, b"").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let open = send(Method::GET, &r.admin_url("/readyz"), &[], b"").await;
    assert_eq!(open.status, 200);
    assert_eq!(open.json()["status"], "ready");
    assert!(
        !String::from_utf8_lossy(&open.body).contains("calls"),
        "{:?}",
        open.body
    );
    let operator = send(Method::GET, &r.admin_url("/readyz"), &bearer, b"").await;
    assert_eq!(
        operator.json()["unconfigured_destinations_with_pending"]["calls"],
        1,
        "{:?}",
        operator.body
    );
}

/// With no admin token (a loopback admin listener), a cross-site page (DNS rebinding) gets
/// `/readyz`'s status but not the names the operator gets.
#[tokio::test]
async fn readiness_names_no_destination_to_a_cross_site_page() {
    let r = TestRelay::start(CONFIG).await;
    let body = br#"{"payload":{"eventId":"orphan-1"}}"#;
    assert_eq!(r.post("/open", body).await.status, 200);
    let file = r.dir.as_ref().unwrap().path().join("routes.toml");
    std::fs::write(
        &file,
        CONFIG
            .replace("name = \"calls\"", "name = \"elsewhere\"")
            .replace("to = [\"calls\"]", "to = [\"elsewhere\"]"),
    )
    .unwrap();
    let a = send(Method::POST, &r.admin_url("/api/reload"), &[], b"").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    // A page of another site, and one whose name was rebound to the loopback address.
    for page in [
        ("sec-fetch-site", "cross-site"),
        ("host", "attacker.example"),
    ] {
        let open = send(Method::GET, &r.admin_url("/readyz"), &[page], b"").await;
        assert_eq!(open.status, 200, "{page:?}");
        assert_eq!(open.json()["status"], "ready");
        assert!(
            !String::from_utf8_lossy(&open.body).contains("calls"),
            "{page:?}: {:?}",
            open.body
        );
    }
    let operator = send(Method::GET, &r.admin_url("/readyz"), &[], b"").await;
    assert_eq!(
        operator.json()["unconfigured_destinations_with_pending"]["calls"],
        1,
        "{:?}",
        operator.body
    );
}

/// The routing table (`/api/config`, a reload's answer, `check`) shows a source's path, match
/// values and filter as the file writes them: a `${VAR}` there may hold a secret (a secret
/// URL path, a verification token).
#[tokio::test]
async fn the_routing_table_shows_variables_not_their_values() {
    let text = CONFIG
        .replace("path = \"/open\"", "path = \"/open/${HOOK_PATH}\"")
        .replace(
            "source = \"open\"\n",
            "source = \"open\"\nmatch = { kind = \"${KIND}\" }\nfilter = \"$[?@.token == '${VERIFY}']\"\n",
        );
    let env = [
        ("HOOK_PATH", "p-7f3c9e"),
        ("KIND", "k-51d2aa"),
        ("VERIFY", "v-90be13"),
    ];
    let r = TestRelay::start_env(&text, &env).await;
    let body = br#"{"kind":"k-51d2aa","token":"v-90be13","payload":{"eventId":"shown-1"}}"#;
    let a = r.post("/open/p-7f3c9e", body).await;
    assert_eq!(a.json()["deliveries"], 1, "{:?}", a.body);
    // (A reload's answer shows the same table; `check` prints it.)
    let config = send(Method::GET, &r.admin_url("/api/config"), &[], b"").await;
    let shown = String::from_utf8_lossy(&config.body);
    for value in ["p-7f3c9e", "k-51d2aa", "v-90be13"] {
        assert!(!shown.contains(value), "{value} in {shown}");
    }
    for var in ["${HOOK_PATH}", "${KIND}", "${VERIFY}"] {
        assert!(shown.contains(var), "{var} not in {shown}");
    }
}

/// `GET /api/events/{id}` shows the body exactly as received (key order, numbers), and one
/// event at its top level even when two sources used the id (the newest; all of them, newest
/// first, under `events`).
#[tokio::test]
async fn an_event_is_shown_with_its_body_as_received_and_one_shape() {
    let text = format!(
        "{CONFIG}\n[[sources]]\nname = \"other\"\npath = \"/other\"\nevent_id = [\"$.payload.eventId\"]\n"
    );
    let r = TestRelay::start(&text).await;
    let body = br#"{"payload":{"eventId":"same-1"},"z":1,"a":12345678901234567890123,"d":1.10}"#;
    assert_eq!(r.post("/open", body).await.status, 200);
    let get = || async {
        let a = send(Method::GET, &r.admin_url("/api/events/same-1"), &[], b"").await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        a
    };
    let a = get().await;
    let raw = String::from_utf8(a.body.to_vec()).unwrap();
    let want = format!("\"body\":{}", std::str::from_utf8(body).unwrap());
    assert!(raw.contains(&want), "{raw}");
    assert_eq!(a.json()["source"], "open");
    assert!(a.json().get("events").is_none());
    // The same id from another source, later.
    let later = br#"{"payload":{"eventId":"same-1"},"from":"other"}"#;
    assert_eq!(r.post("/other", later).await.status, 200);
    let v = get().await.json();
    assert_eq!(v["source"], "other", "{v}");
    assert_eq!(v["body"]["from"], "other");
    let all: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["source"].as_str().unwrap())
        .collect();
    assert_eq!(all, ["other", "open"]);
}

/// `?id=` with `?destination=` replays that event's dead delivery to that destination only
/// (the console's Replay on one delivery row); `?id=` alone, all of them.
#[tokio::test]
async fn a_replay_of_one_delivery_leaves_the_events_other_dead_ones() {
    let text = CONFIG.replace(
        "to = [\"calls\"]",
        "to = [\"calls\", \"audit\"]\n\n[[destinations]]\nname = \"audit\"\nurl = \"http://127.0.0.1:9/audit\"",
    );
    assert_ne!(text, CONFIG);
    let r = TestRelay::start(&text).await;
    let a = r
        .post("/open", br#"{"payload":{"eventId":"two-dead"}}"#)
        .await;
    assert_eq!(a.json()["deliveries"], 2, "{:?}", a.body);
    let seq = r.app().store.lookup("two-dead").await.unwrap()[0].event.seq;
    for destination in ["calls", "audit"] {
        let key = DeliveryKey {
            seq,
            destination: destination.into(),
        };
        let dead = Outcome::Dead {
            status: Some(400),
            error: "HTTP 400".into(),
        };
        r.app().store.record(&key, dead).await.unwrap();
    }
    let replay = |q: &'static str| {
        let url = r.admin_url(&format!("/api/dead/replay?{q}"));
        async move { send(Method::POST, &url, &[], b"").await.json()["replayed"].clone() }
    };
    let states = || async {
        let v = send(Method::GET, &r.admin_url("/api/events/two-dead"), &[], b"")
            .await
            .json();
        let mut s: Vec<(String, String)> = v["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let name = d["destination"].as_str().unwrap().to_string();
                (name, d["state"].as_str().unwrap().to_string())
            })
            .collect();
        s.sort();
        s
    };
    assert_eq!(replay("id=two-dead&destination=calls").await, 1);
    let want = |audit: &str, calls: &str| {
        vec![
            ("audit".to_string(), audit.to_string()),
            ("calls".to_string(), calls.to_string()),
        ]
    };
    assert_eq!(states().await, want("dead", "pending"));
    assert_eq!(replay("id=two-dead").await, 1);
    assert_eq!(states().await, want("pending", "pending"));
}

#[tokio::test]
async fn event_lookup_dead_list_and_replay() {
    let r = TestRelay::start(CONFIG).await;
    let body = fixture("8x8/voice-call-status.json");
    let id = r.post("/open", &body).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a = send(
        Method::GET,
        &r.admin_url(&format!("/api/events/{id}")),
        &[],
        b"",
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let v = a.json();
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["source"], "open");
    assert_eq!(v["body"]["payload"]["eventId"], id.as_str());
    assert!(v["received"].as_str().unwrap().ends_with("GMT"));
    assert_eq!(v["deliveries"][0]["destination"], "calls");
    assert_eq!(v["deliveries"][0]["state"], "pending");

    // Make it dead as delivery would after a final 4xx.
    let seq = r.app().store.lookup(&id).await.unwrap()[0].event.seq;
    let key = DeliveryKey {
        seq,
        destination: "calls".into(),
    };
    r.app()
        .store
        .record(
            &key,
            Outcome::Dead {
                status: Some(400),
                error: "HTTP 400".into(),
            },
        )
        .await
        .unwrap();
    let a = send(
        Method::GET,
        &r.admin_url("/api/dead?destination=calls&limit=10"),
        &[],
        b"",
    )
    .await;
    let dead = a.json();
    assert_eq!(dead.as_array().unwrap().len(), 1, "{dead}");
    assert_eq!(dead[0]["state"], "dead");
    assert_eq!(dead[0]["last_status"], 400);
    // Its cursor goes on past it: nothing after the only one.
    let after = dead[0]["cursor"].as_u64().expect("a cursor");
    let a = send(
        Method::GET,
        &r.admin_url(&format!("/api/dead?destination=calls&after={after}")),
        &[],
        b"",
    )
    .await;
    assert_eq!(a.json(), serde_json::json!([]));
    // A name no destination has (a typo) is said, not answered as "nothing dead".
    let a = send(
        Method::GET,
        &r.admin_url("/api/dead?destination=other"),
        &[],
        b"",
    )
    .await;
    assert_eq!(a.status, 404);
    assert!(a.json()["message"].as_str().unwrap().contains("\"other\""));

    let a = send(
        Method::POST,
        &r.admin_url(&format!("/api/dead/replay?id={id}")),
        &[],
        b"",
    )
    .await;
    assert_eq!(a.json()["replayed"], 1);
    let a = send(
        Method::POST,
        &r.admin_url("/api/dead/replay?destination=calls"),
        &[],
        b"",
    )
    .await;
    assert_eq!(a.json()["replayed"], 0, "nothing left to replay");
    // A destination that does not exist is named as such, not "nothing replayed"; so is
    // an id no event has, alone or with a destination (the console's replay of one row: a
    // purged event is not "nothing was dead").
    for q in [
        "destination=nosuch",
        "destination=nosuch&id=x",
        "id=nosuch",
        "id=nosuch&destination=calls",
    ] {
        let a = send(
            Method::POST,
            &r.admin_url(&format!("/api/dead/replay?{q}")),
            &[],
            b"",
        )
        .await;
        assert_eq!(a.status, 404, "{q}");
        assert_eq!(a.json()["error"], "not_found", "{q}");
        assert!(
            a.json()["message"].as_str().unwrap().contains("\"nosuch\""),
            "{}",
            a.json()
        );
    }
    let a = send(Method::GET, &r.admin_url("/api/dead"), &[], b"").await;
    assert_eq!(a.json().as_array().unwrap().len(), 0);
    // The event list says so too, for a source or a destination: a typo is not "no events".
    for (q, named) in [
        ("source=nosuch", "no source is named \"nosuch\""),
        ("destination=nosuch", "no destination is named \"nosuch\""),
    ] {
        let a = send(
            Method::GET,
            &r.admin_url(&format!("/api/events?{q}")),
            &[],
            b"",
        )
        .await;
        assert_eq!(a.status, 404, "{q}");
        assert_eq!(a.json()["message"], named, "{q}");
    }
    // A known one with nothing to show is an empty page; so is a later page of any (a
    // source that left the config pages to an empty end).
    for q in ["source=open&state=dead", "source=nosuch&before=1"] {
        let a = send(
            Method::GET,
            &r.admin_url(&format!("/api/events?{q}")),
            &[],
            b"",
        )
        .await;
        assert_eq!(a.status, 200, "{q}: {:?}", a.body);
    }
}

#[tokio::test]
async fn metrics_count_known_traffic_exactly() {
    let r = TestRelay::start(CONFIG).await;
    for i in 0..3 {
        let a = r
            .post(
                "/open",
                format!("{{\"payload\":{{\"eventId\":\"m{i}\"}}}}").as_bytes(),
            )
            .await;
        assert_eq!(a.status, 200);
    }
    assert_eq!(
        r.post("/open", br#"{"payload":{"eventId":"m0"}}"#)
            .await
            .json()["duplicate"],
        true
    );
    assert_eq!(r.post("/locked", b"{}").await.status, 401);
    assert_eq!(r.post("/locked", b"{}").await.status, 401);
    assert_eq!(r.post("/nowhere", b"{}").await.status, 404);
    // A request hyper answers itself, never seen by a handler: counted all the same.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
        s.write_all(b"NOT AN HTTP REQUEST\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
            .await
            .expect("answered")
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 400"), "{answer:?}");
    }
    // Prometheus text 0.0.4 by default; OpenMetrics to a scraper that asks for it.
    let plain = send(Method::GET, &r.admin_url("/metrics"), &[], b"").await;
    assert_eq!(
        plain.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = String::from_utf8(plain.body.to_vec()).unwrap();
    let open = send(
        Method::GET,
        &r.admin_url("/metrics"),
        &[(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )],
        b"",
    )
    .await;
    assert!(open.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let open = String::from_utf8(open.body.to_vec()).unwrap();
    assert!(
        open.contains("# TYPE hookrelay_deliveries counter"),
        "{open}"
    );
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(!text.contains("# EOF"), "{text}");
    assert_eq!(
        metric(
            &text,
            r#"hookrelay_ingress_requests_total{source="open",status="200"}"#
        ),
        4.0
    );
    assert_eq!(
        metric(
            &text,
            r#"hookrelay_ingress_requests_total{source="locked",status="401"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            r#"hookrelay_ingress_requests_total{source="(none)",status="404"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"hookrelay_ingress_requests_total{source="(none)",status="400"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(&text, r#"hookrelay_events_duplicate_total{source="open"}"#),
        1.0
    );
    assert_eq!(
        metric(&text, r#"hookrelay_queue_depth{destination="calls"}"#),
        3.0
    );
    assert!(
        text.contains("# TYPE hookrelay_delivery_duration_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE hookrelay_deliveries_total counter"),
        "{text}"
    );
    assert!(
        text.contains(r#"hookrelay_deliveries_total{destination="calls",outcome="dead"}"#),
        "{text}"
    );
}

#[tokio::test]
async fn reload_refuses_a_broken_file_and_applies_a_good_one() {
    let r = TestRelay::start(CONFIG).await;
    let file = r.dir.as_ref().unwrap().path().join("routes.toml");
    std::fs::write(
        &file,
        CONFIG.replace("url = \"http://127.0.0.1:9/calls\"", "url = \"nope\""),
    )
    .unwrap();
    let a = send(Method::POST, &r.admin_url("/api/reload"), &[], b"").await;
    assert_eq!(a.status, 400);
    let v = a.json();
    assert_eq!(v["error"], "invalid_config");
    assert!(
        v["problems"][0]
            .as_str()
            .unwrap()
            .contains("destinations[0].url"),
        "{v}"
    );
    // The old routes still work.
    assert_eq!(r.post("/open", b"{}").await.status, 200);
    assert_eq!(r.post("/new", b"{}").await.status, 404);

    let good = format!("{CONFIG}\n[[sources]]\nname = \"new\"\npath = \"/new\"\n");
    std::fs::write(&file, good).unwrap();
    let a = send(Method::POST, &r.admin_url("/api/reload"), &[], b"").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert!(a.json()["routing_table"]
        .as_str()
        .unwrap()
        .contains("source new"));
    assert_eq!(r.post("/new", b"{}").await.status, 200);
}

/// A destination a reload removed, with nothing pending, leaves `/metrics`: its gauges
/// would otherwise keep their last values (a paused state, an age) and an alert on them
/// would never clear.
#[tokio::test]
async fn a_removed_destination_leaves_the_metrics() {
    let with_spare = format!(
        "{CONFIG}\n[[destinations]]\nname = \"spare\"\nurl = \"http://127.0.0.1:9/spare\"\n"
    );
    let r = TestRelay::start(&with_spare).await;
    let a = send(
        Method::POST,
        &r.admin_url("/api/destinations/spare/pause"),
        &[],
        b"",
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let metrics = || async {
        let a = send(Method::GET, &r.admin_url("/metrics"), &[], b"").await;
        String::from_utf8(a.body.to_vec()).unwrap()
    };
    let m = metrics().await;
    assert!(
        m.contains(r#"hookrelay_destination_state{destination="spare",state="paused"} 1"#),
        "{m}"
    );
    let file = r.dir.as_ref().unwrap().path().join("routes.toml");
    std::fs::write(&file, CONFIG).unwrap();
    let a = send(Method::POST, &r.admin_url("/api/reload"), &[], b"").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    // One added and removed again between two scrapes leaves nothing either.
    std::fs::write(&file, with_spare.replace("\"spare\"", "\"brief\"")).unwrap();
    let a = send(Method::POST, &r.admin_url("/api/reload"), &[], b"").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    std::fs::write(&file, CONFIG).unwrap();
    let a = send(Method::POST, &r.admin_url("/api/reload"), &[], b"").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let m = metrics().await;
    // Its series go, the counters and the histogram with the gauges.
    for gone in ["spare", "brief"] {
        for series in [
            "hookrelay_destination_state{",
            "hookrelay_queue_depth{",
            "hookrelay_oldest_pending_age_seconds{",
            "hookrelay_deliveries_total{",
            "hookrelay_delivery_duration_seconds_count{",
        ] {
            let line = format!("{series}destination=\"{gone}\"");
            assert!(!m.contains(&line), "{line} in {m}");
        }
    }
    assert!(
        m.contains(r#"hookrelay_queue_depth{destination="calls"}"#),
        "{m}"
    );
}

#[tokio::test]
async fn a_request_in_flight_finishes_on_the_config_it_started_with() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let r = TestRelay::start(CONFIG).await;
    // Start a request: headers sent, body still coming.
    let mut s = tokio::net::TcpStream::connect(r.addr()).await.unwrap();
    s.write_all(
        b"POST /open HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{",
    )
    .await
    .unwrap();
    // Meanwhile the config drops the source.
    let file = r.dir.as_ref().unwrap().path().join("routes.toml");
    let without = CONFIG.replace(
        "name = \"open\"\npath = \"/open\"",
        "name = \"open\"\npath = \"/moved\"",
    );
    std::fs::write(&file, without).unwrap();
    let a = send(Method::POST, &r.admin_url("/api/reload"), &[], b"").await;
    assert_eq!(a.status, 200);
    s.write_all(b"}").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut answer))
        .await
        .expect("the answer in time")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // New requests see the new config.
    assert_eq!(r.post("/open", b"{}").await.status, 404);
}

// ---- the binary: SIGHUP, SIGTERM, secrets in logs ----

#[tokio::test]
async fn sighup_reloads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let mut p = RelayProcess::spawn_at(&cfg, &dir.path().join("relay.log"), "info").await;
    let ingress = p.ingress;
    let new = |path: &str| format!("http://{ingress}{path}");
    assert_eq!(
        send(Method::POST, &new("/hup"), &[], b"{}").await.status,
        404
    );
    std::fs::write(
        &cfg,
        format!("{CONFIG}\n[[sources]]\nname = \"hup\"\npath = \"/hup\"\n"),
    )
    .unwrap();
    p.signal("HUP");
    assert!(
        p.wait_log("config reloaded (SIGHUP)", Duration::from_secs(10))
            .await
    );
    assert_eq!(
        send(Method::POST, &new("/hup"), &[], b"{}").await.status,
        200
    );
}

#[tokio::test]
async fn sigterm_exits_0_and_keeps_pending_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("routes.toml");
    std::fs::write(
        &cfg,
        CONFIG.replace("[server]", "[server]\nshutdown_grace = \"1s\""),
    )
    .unwrap();
    let p = RelayProcess::spawn_at(&cfg, &dir.path().join("relay.log"), "info").await;
    let url = format!("http://{}/open", p.ingress);
    let id = send(
        Method::POST,
        &url,
        &[],
        br#"{"payload":{"eventId":"term-1"}}"#,
    )
    .await
    .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let status = p.sigterm(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));
    // The default store.
    let store = hookrelay::store::redb::RedbStore::open(&dir.path().join("data")).unwrap();
    use hookrelay::store::Store;
    let v = store.lookup(&id).await.unwrap();
    assert_eq!(
        v[0].deliveries[0].state,
        hookrelay::store::DeliveryState::Pending
    );
    store.close().await.unwrap();
}

/// A reload, a replay or a pause during the shutdown is refused; a second signal during the shutdown's waits (a
/// delivery holds it for its grace) ends them: the relay closes its store and exits 1 at once; the next start finds the store
/// closed cleanly (redb needs no repair) with the delivery still pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_cuts_the_shutdown_short_and_still_closes_the_store() {
    use support::{Action, FaultSink};
    let sink = FaultSink::start(|_| Action::Hang).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("routes.toml");
    std::fs::write(
        &cfg,
        CONFIG
            .replace("[server]", "[server]\nshutdown_grace = \"60s\"")
            .replace("http://127.0.0.1:9/calls", &sink.url("/calls")),
    )
    .unwrap();
    let p = RelayProcess::spawn_at(&cfg, &dir.path().join("relay.log"), "info").await;
    let url = format!("http://{}/open", p.ingress);
    let a = send(
        Method::POST,
        &url,
        &[],
        br#"{"payload":{"eventId":"held-1"}}"#,
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(sink.wait_count(1, WAIT).await, "the delivery is out");
    p.signal("TERM");
    // Stopping once /readyz says so.
    let ready = format!("http://{}/readyz", p.admin);
    let deadline = std::time::Instant::now() + WAIT;
    while send(Method::GET, &ready, &[], b"").await.status != 503 {
        assert!(std::time::Instant::now() < deadline, "never stopping");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A reload now has nothing to apply to: said, not answered "reloaded"; nor is a
    // replay or a pause made while the store closes.
    for change in [
        "/api/reload",
        "/api/dead/replay?destination=calls",
        "/api/destinations/calls/pause",
    ] {
        let admin = format!("http://{}{change}", p.admin);
        send(Method::POST, &admin, &[], b"")
            .await
            .error(503, "unavailable");
    }
    p.signal("INT");
    let status = p.exit_within(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(1));
    let repaired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let seen = repaired.clone();
        let db = redb::Builder::new()
            .set_repair_callback(move |_| seen.store(true, std::sync::atomic::Ordering::SeqCst))
            .open(dir.path().join("data").join("hookrelay.redb"))
            .unwrap();
        drop(db);
    }
    assert!(
        !repaired.load(std::sync::atomic::Ordering::SeqCst),
        "the store was left unclosed"
    );
    let store = hookrelay::store::redb::RedbStore::open(&dir.path().join("data")).unwrap();
    use hookrelay::store::Store;
    let v = store.lookup("held-1").await.unwrap();
    assert_eq!(
        v[0].deliveries[0].state,
        hookrelay::store::DeliveryState::Pending
    );
    store.close().await.unwrap();
    sink.stop().await;
}

/// CONTRACT §6: SIGTERM stops accepting (a new connection is refused) and finishes the
/// requests in flight: one whose body is still coming gets its 200, its event stored.
#[tokio::test]
async fn sigterm_refuses_new_connections_and_finishes_a_request_in_flight() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let p = RelayProcess::spawn_at(&cfg, &dir.path().join("relay.log"), "info").await;
    let body = br#"{"payload":{"eventId":"in-flight-1"}}"#;
    let mut s = tokio::net::TcpStream::connect(p.ingress).await.unwrap();
    // `Expect: 100-continue`: the relay says when it reads the body, so the request is in
    // progress (not still in the listen backlog) before the signal.
    let head = format!(
        "POST /open HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\n\
         expect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut go_on = Vec::new();
    while !go_on.ends_with(b"\r\n\r\n") && go_on.len() < 256 {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("100 Continue")
            .unwrap();
        assert_eq!(n, 1, "closed before 100 Continue: {go_on:?}");
        go_on.push(b[0]);
    }
    assert!(go_on.starts_with(b"HTTP/1.1 100"), "{go_on:?}");
    s.write_all(&body[..10]).await.unwrap();
    p.signal("TERM");
    // The listener closes (bounded wait): a new connection is refused.
    let deadline = std::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(p.ingress).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "still accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The request in flight is finished.
    s.write_all(&body[10..]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(r#""accepted":true"#), "{text}");
    assert_eq!(p.exit_within(Duration::from_secs(20)).await.code(), Some(0));
    let store = hookrelay::store::redb::RedbStore::open(&dir.path().join("data")).unwrap();
    use hookrelay::store::Store;
    let v = store.lookup("in-flight-1").await.unwrap();
    assert_eq!(v.len(), 1, "the event is stored");
    store.close().await.unwrap();
}

#[tokio::test]
async fn secrets_never_reach_logs_or_admin_answers() {
    let secrets = [
        "SECRETHDR8812",
        "SECRETCLIENT7731",
        "SECRETTOKSIGN5520SECRETTOKSIGN5520",
        "SECRETDESTKEY4410",
        "SECRETSIGN9906",
        "SECRETADMIN3307",
        "SECRETWHOOK6604",
    ];
    let cfg_text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
token_secret = "{}"
admin_token = "{}"
[delivery]
retry = {{ first = "1h" }}
[[sources]]
name = "voice"
path = "/voice"
auth = {{ kind = "header", header = "Authorization", value = "{}" }}
[[sources]]
name = "sms"
path = "/sms"
auth = {{ kind = "oauth2", clients = [{{ id = "c1", secret = "{}" }}] }}
[[sources]]
name = "dids"
path = "/dids"
auth = {{ kind = "standard-webhooks", secret = "{}" }}
[[destinations]]
name = "calls"
url = "http://127.0.0.1:9/calls"
headers = {{ "X-Api-Key" = "{}" }}
sign = {{ secret = "{}" }}
[[routes]]
name = "v"
source = "voice"
to = ["calls"]
[[routes]]
name = "s"
source = "sms"
to = ["calls"]
"#,
        secrets[2], secrets[5], secrets[0], secrets[1], secrets[6], secrets[3], secrets[4]
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("routes.toml");
    std::fs::write(&cfg, &cfg_text).unwrap();
    let mut p = RelayProcess::spawn_at(&cfg, &dir.path().join("relay.log"), "debug").await;
    let (ingress, admin) = (p.ingress, p.admin);
    let ing = |path: &str| format!("http://{ingress}{path}");
    let adm = |path: &str| format!("http://{admin}{path}");
    let mut answers = Vec::new();
    let a = send(
        Method::POST,
        &ing("/voice"),
        &[("authorization", secrets[0])],
        br#"{"n":1}"#,
    )
    .await;
    assert_eq!(a.status, 200);
    let id = a.json()["id"].as_str().unwrap().to_string();
    send(
        Method::POST,
        &ing("/voice"),
        &[("authorization", "wrong")],
        b"{}",
    )
    .await;
    let tok = send(
        Method::POST,
        &ing("/oauth/token"),
        &[("content-type", "application/x-www-form-urlencoded")],
        format!(
            "grant_type=client_credentials&client_id=c1&client_secret={}",
            secrets[1]
        )
        .as_bytes(),
    )
    .await;
    let token = tok.json()["access_token"].as_str().unwrap().to_string();
    let a = send(
        Method::POST,
        &ing("/sms"),
        &[("authorization", &format!("Bearer {token}"))],
        b"{}",
    )
    .await;
    assert_eq!(a.status, 200);
    // A signed event (the raw secret is the key), and one whose signature is wrong.
    let ts = (hookrelay::store::now_ms() / 1000).to_string();
    let body = br#"{"n":2}"#;
    let sig = {
        use base64::Engine;
        use hmac::{KeyInit, Mac};
        let mut m =
            <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secrets[6].as_bytes()).unwrap();
        m.update(format!("msg_1.{ts}.").as_bytes());
        m.update(body);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
        )
    };
    for (signature, status) in [(sig.as_str(), 200), ("v1,AAAA", 401)] {
        let h = [
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", ts.as_str()),
            ("webhook-signature", signature),
        ];
        let a = send(Method::POST, &ing("/dids"), &h, body).await;
        assert_eq!(a.status, status);
        answers.push(a.body);
    }
    let bearer = format!("Bearer {}", secrets[5]);
    let admin_auth = [("authorization", bearer.as_str())];
    for path in [
        "/metrics",
        "/readyz",
        &format!("/api/events/{id}"),
        "/api/events",
        "/api/dead",
        "/api/destinations",
        "/api/config",
    ] {
        let a = send(Method::GET, &adm(path), &admin_auth, b"").await;
        assert_eq!(a.status, 200, "{path}");
        answers.push(a.body);
    }
    // A wrong token is refused without echoing either.
    let wrong = send(
        Method::GET,
        &adm("/api/dead"),
        &[("authorization", "Bearer nope")],
        b"",
    )
    .await;
    assert_eq!(wrong.status, 401);
    answers.push(wrong.body);
    answers.push(
        send(Method::POST, &adm("/api/reload"), &admin_auth, b"")
            .await
            .body,
    );
    let check = Command::new(support::bin())
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    // The signed destination (with its header and signing secrets) was tried and failed:
    // its attempt's log lines are among those checked.
    assert!(
        p.wait_log("attempt failed; will retry", WAIT).await,
        "no failed attempt to the signed destination was logged"
    );
    let logs = p.finish().await;
    assert!(logs.contains("listening"), "logs were captured: {logs}");
    // Its stderr is a pipe, as under a supervisor or a collector: plain text, no colour codes.
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in piped logs: {logs}"
    );
    let mut seen = logs;
    seen.push_str(&String::from_utf8_lossy(&check.stdout));
    for a in &answers {
        seen.push_str(&String::from_utf8_lossy(a));
    }
    assert!(
        seen.contains("source voice"),
        "the reload answered with the table"
    );
    for s in secrets.iter().chain([token.as_str()].iter()) {
        assert!(
            !seen.contains(s),
            "secret {s} in an admin answer or check output"
        );
    }
}

/// The admin API refuses what another site's page sends through the operator's browser (a
/// form post, a fetch from another origin, a DNS-rebound host name), and changes nothing.
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
