//! The operator's admin API (CONTRACT §5): the admin token on every path but health and
//! readiness, dead letters that name their event and replay by its id, the event list with
//! its filters and cursor, and pause/resume across a restart.

mod support;

use std::collections::HashSet;

use hookrelay::store::{DeliveryKey, DeliveryState, Outcome};
use http::Method;
use support::{post, start_relay, stop_relay, wait_state, Reply, Sink};
use support::{send, Answer};

const TOKEN: &str = "op-token-7f3a9c";

/// One `open` source (id from `$.id`), `other` (id from `$.id` too), and `dests` as
/// `(name, url)`; `open` routes to the first destination, `other` to the last.
fn config(dests: &[(&str, &str)]) -> String {
    let mut t = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
admin_token = "{TOKEN}"

[delivery]
retry = {{ first = "50ms", max_delay = "100ms" }}

[[sources]]
name = "open"
path = "/open"
event_id = ["$.id"]

[[sources]]
name = "other"
path = "/other"
event_id = ["$.id"]
"#
    );
    for (name, url) in dests {
        t += &format!("\n[[destinations]]\nname = \"{name}\"\nurl = \"{url}\"\n");
    }
    let all: Vec<String> = dests.iter().map(|(n, _)| format!("\"{n}\"")).collect();
    t += &format!(
        "\n[[routes]]\nname = \"open\"\nsource = \"open\"\nto = [{}]\n",
        all[..all.len().saturating_sub(1).max(1)].join(", ")
    );
    t += &format!(
        "\n[[routes]]\nname = \"other\"\nsource = \"other\"\nto = [{}]\n",
        all[all.len() - 1]
    );
    t
}

async fn admin(relay: &hookrelay::Relay, method: Method, path: &str) -> Answer {
    let auth = format!("Bearer {TOKEN}");
    send(
        method,
        &format!("http://{}{path}", relay.admin),
        &[("authorization", &auth)],
        b"",
    )
    .await
}

#[tokio::test]
async fn every_admin_path_but_health_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &config(&[("a", "http://127.0.0.1:9/")])).await;
    let (status, _) = post(&relay, "/open", "application/json", br#"{"id":"ev-1"}"#).await;
    assert_eq!(status, 200);
    let url = |p: &str| format!("http://{}{p}", relay.admin);
    let paths = [
        (Method::GET, "/metrics"),
        (Method::GET, "/api/events"),
        (Method::GET, "/api/events/ev-1"),
        (Method::GET, "/api/dead"),
        (Method::POST, "/api/dead/replay?destination=a"),
        (Method::GET, "/api/destinations"),
        (Method::POST, "/api/destinations/a/pause"),
        (Method::POST, "/api/destinations/a/resume"),
        (Method::GET, "/api/config"),
        (Method::POST, "/api/reload"),
    ];
    let wrong = format!("Bearer {TOKEN}x");
    let right = format!("Bearer {TOKEN}");
    for (m, p) in &paths {
        let a = send(m.clone(), &url(p), &[], b"").await;
        a.error(401, "unauthorized");
        assert_eq!(a.headers["www-authenticate"], "Bearer", "{p}");
        let a = send(m.clone(), &url(p), &[("authorization", &wrong)], b"").await;
        a.error(401, "unauthorized");
        let a = send(m.clone(), &url(p), &[("authorization", TOKEN)], b"").await;
        a.error(401, "unauthorized");
        let a = send(m.clone(), &url(p), &[("authorization", &right)], b"").await;
        assert_eq!(a.status, 200, "{m} {p}: {:?}", a.body);
    }
    // The scheme is case-insensitive.
    let lower = format!("bearer {TOKEN}");
    let a = send(
        Method::GET,
        &url("/api/dead"),
        &[("authorization", &lower)],
        b"",
    )
    .await;
    assert_eq!(a.status, 200);
    for p in ["/healthz", "/readyz"] {
        assert_eq!(
            send(Method::GET, &url(p), &[], b"").await.status,
            200,
            "{p}"
        );
    }
    // The console's page holds no data: it loads without the token and asks for it.
    let page = send(Method::GET, &url("/"), &[], b"").await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    assert!(String::from_utf8_lossy(&page.body).contains("id=\"token\""));
    stop_relay(relay).await;
}

#[tokio::test]
async fn a_dead_letter_to_a_destination_that_left_the_config_stays_dead_until_it_is_back() {
    // Replayed while its destination is out of the config, it would leave the dead list
    // and wait, unsent, where no scheduler looks.
    let sink = Sink::start(vec![Reply::status(400)], Reply::status(200)).await;
    let other = Sink::always(200).await;
    let dir = tempfile::tempdir().unwrap();
    let both = config(&[("d", &sink.url("/d")), ("e", &other.url("/e"))]);
    let relay = start_relay(dir.path(), &both).await;
    let (status, _) = post(&relay, "/open", "application/json", br#"{"id":"ev-gone"}"#).await;
    assert_eq!(status, 200);
    wait_state(&relay, "ev-gone", "d", DeliveryState::Dead).await;
    let reload = |text: String| {
        std::fs::write(dir.path().join("routes.toml"), text).unwrap();
        admin(&relay, Method::POST, "/api/reload")
    };
    assert_eq!(reload(config(&[("e", &other.url("/e"))])).await.status, 200);

    let a = admin(&relay, Method::POST, "/api/dead/replay?id=ev-gone").await;
    assert_eq!(
        a.json()["replayed"],
        0,
        "not to a destination out of the config"
    );
    for q in ["destination=d", "destination=d&id=ev-gone"] {
        let a = admin(&relay, Method::POST, &format!("/api/dead/replay?{q}")).await;
        let msg = a.error(404, "not_found");
        assert!(msg.contains("no longer in the config"), "{q}: {msg}");
    }
    let dead = admin(&relay, Method::GET, "/api/dead").await.json();
    assert_eq!(dead.as_array().unwrap().len(), 1, "still dead: {dead}");

    // Back in the config, the same replay sends it.
    assert_eq!(reload(both).await.status, 200);
    let a = admin(&relay, Method::POST, "/api/dead/replay?id=ev-gone").await;
    assert_eq!(a.json()["replayed"], 1);
    wait_state(&relay, "ev-gone", "d", DeliveryState::Delivered).await;
    assert_eq!(sink.seen().len(), 2);
    stop_relay(relay).await;
}

#[tokio::test]
async fn a_dead_letter_names_its_event_and_is_replayed_by_that_id() {
    let sink = Sink::start(vec![Reply::status(400)], Reply::status(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &config(&[("d", &sink.url("/d"))])).await;
    let (status, answer) = post(&relay, "/open", "application/json", br#"{"id":"ev-400"}"#).await;
    assert_eq!((status, answer["id"].as_str()), (200, Some("ev-400")));
    sink.wait_for(1).await;
    wait_state(&relay, "ev-400", "d", DeliveryState::Dead).await;

    let dead = admin(&relay, Method::GET, "/api/dead?destination=d")
        .await
        .json();
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(d["event_id"], "ev-400");
    assert_eq!(d["source"], "open");
    assert_eq!(d["destination"], "d");
    assert_eq!(d["state"], "dead");
    assert_eq!(d["attempts"], 1);
    assert_eq!(d["last_status"], 400);
    assert!(d["last_error"].as_str().unwrap().contains("400"), "{d}");
    assert!(d.get("next_attempt_at").is_none(), "{d}");

    let id = d["event_id"].as_str().unwrap();
    let a = admin(&relay, Method::POST, &format!("/api/dead/replay?id={id}")).await;
    assert_eq!(a.json()["replayed"], 1);
    let seen = sink.wait_for(2).await;
    assert_eq!(seen[1].body, seen[0].body);
    wait_state(&relay, "ev-400", "d", DeliveryState::Delivered).await;
    let ev = admin(&relay, Method::GET, "/api/events/ev-400")
        .await
        .json();
    let d = &ev["deliveries"][0];
    assert_eq!(
        (d["state"].as_str(), d["attempts"].as_u64()),
        (Some("delivered"), Some(2))
    );
    assert_eq!(d["event_id"], "ev-400");
    assert!(d.get("next_attempt_at").is_none(), "{d}");
    assert!(admin(&relay, Method::GET, "/api/dead")
        .await
        .json()
        .as_array()
        .unwrap()
        .is_empty());
    stop_relay(relay).await;
    sink.stop().await;
}

/// Every page of `query` through the `next` cursor, 50 at a time: the ids in order.
async fn all_pages(relay: &hookrelay::Relay, query: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut before = String::new();
    for _ in 0..100 {
        let v = admin(
            relay,
            Method::GET,
            &format!("/api/events?limit=50{query}{before}"),
        )
        .await
        .json();
        let page = v["events"].as_array().unwrap();
        assert!(page.len() <= 50);
        ids.extend(page.iter().map(|e| e["id"].as_str().unwrap().to_string()));
        match v["next"].as_str() {
            Some(n) => before = format!("&before={n}"),
            None => return ids,
        }
    }
    panic!("more than 100 pages");
}

#[tokio::test]
async fn the_event_list_pages_through_everything_once_and_filters_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(
        dir.path(),
        &config(&[("a", "http://127.0.0.1:9/"), ("b", "http://127.0.0.1:9/")]),
    )
    .await;
    // Nothing is sent while the list is checked: both destinations paused.
    for d in ["a", "b"] {
        assert_eq!(
            admin(
                &relay,
                Method::POST,
                &format!("/api/destinations/{d}/pause")
            )
            .await
            .status,
            200
        );
    }
    let mut posted = Vec::new();
    for i in 0..250 {
        let (path, src) = if i % 5 == 0 {
            ("/other", "other")
        } else {
            ("/open", "open")
        };
        let id = format!("ev-{i:03}");
        let (status, _) = post(
            &relay,
            path,
            "application/json",
            format!(r#"{{"id":"{id}"}}"#).as_bytes(),
        )
        .await;
        assert_eq!(status, 200);
        posted.push((id, src));
    }
    // Ten of `a`'s deliveries dead.
    for (id, _) in posted.iter().filter(|(_, s)| *s == "open").take(10) {
        let seq = relay.app.store.lookup(id).await.unwrap()[0].event.seq;
        let key = DeliveryKey {
            seq,
            destination: "a".into(),
        };
        let dead = Outcome::Dead {
            status: Some(400),
            error: "HTTP 400".into(),
        };
        relay.app.store.record(&key, dead).await.unwrap();
    }
    let ids = |pred: &dyn Fn(usize, &str) -> bool| -> Vec<String> {
        posted
            .iter()
            .enumerate()
            .rev()
            .filter(|(i, (_, s))| pred(*i, s))
            .map(|(_, (id, _))| id.clone())
            .collect()
    };

    let every = all_pages(&relay, "").await;
    assert_eq!(every, ids(&|_, _| true), "newest first, each once");
    // Without a limit, a page holds 50.
    let first = admin(&relay, Method::GET, "/api/events").await.json();
    assert_eq!(first["events"].as_array().unwrap().len(), 50);
    assert_eq!(first["events"][0]["id"], every[0]);
    assert!(first["next"].is_string(), "{first}");
    assert_eq!(every.iter().collect::<HashSet<_>>().len(), 250);
    assert_eq!(
        all_pages(&relay, "&source=other").await,
        ids(&|_, s| s == "other")
    );
    assert_eq!(
        all_pages(&relay, "&destination=a").await,
        ids(&|_, s| s == "open")
    );
    assert_eq!(
        all_pages(&relay, "&destination=b").await,
        ids(&|_, s| s == "other")
    );
    let mut dead: Vec<String> = posted
        .iter()
        .filter(|(_, s)| *s == "open")
        .take(10)
        .map(|(id, _)| id.clone())
        .collect();
    dead.reverse();
    assert_eq!(all_pages(&relay, "&state=dead").await, dead);
    assert_eq!(
        all_pages(&relay, "&state=dead&destination=a&source=open").await,
        dead
    );
    assert!(all_pages(&relay, "&state=dead&destination=b")
        .await
        .is_empty());
    assert_eq!(
        all_pages(&relay, "&state=pending&source=other").await,
        ids(&|_, s| s == "other")
    );
    admin(&relay, Method::GET, "/api/events?state=lost")
        .await
        .error(400, "bad_request");
    admin(&relay, Method::GET, "/api/events?before=x")
        .await
        .error(400, "bad_request");
    stop_relay(relay).await;
}

/// Posts events `a<i>` for `ids` to `/open`; each must be accepted.
async fn post_ids(relay: &hookrelay::Relay, ids: std::ops::Range<usize>) {
    for i in ids {
        let body = format!(r#"{{"id":"a{i}"}}"#);
        let (s, _) = post(relay, "/open", "application/json", body.as_bytes()).await;
        assert_eq!(s, 200);
    }
}

fn gauge(metrics: &str, dest: &str, state: &str) -> String {
    let start = format!("hookrelay_destination_state{{destination=\"{dest}\",state=\"{state}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&start))
        .unwrap_or_else(|| panic!("no {start} in\n{metrics}"))
        .to_string()
}

#[tokio::test]
async fn a_paused_destination_gets_nothing_across_a_restart_and_resume_delivers_the_backlog() {
    let paused = Sink::always(200).await;
    let witness = Sink::always(200).await;
    let toml = config(&[("p", &paused.url("/p")), ("w", &witness.url("/w"))])
        // Both destinations get the `open` events.
        .replace("to = [\"p\"]", "to = [\"p\", \"w\"]");
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &toml).await;
    let p = admin(&relay, Method::POST, "/api/destinations/p/pause")
        .await
        .json();
    assert_eq!(p["state"], "paused");
    post_ids(&relay, 0..5).await;
    // The witness shares every event: once it has them all, `p` had every chance.
    witness.wait_for(5).await;
    let text =
        String::from_utf8(admin(&relay, Method::GET, "/metrics").await.body.to_vec()).unwrap();
    assert_eq!(gauge(&text, "p", "paused"), "1");
    assert_eq!(gauge(&text, "p", "ok"), "0");
    assert_eq!(gauge(&text, "w", "ok"), "1");
    stop_relay(relay).await;

    let relay = start_relay(dir.path(), &toml).await;
    let list = admin(&relay, Method::GET, "/api/destinations").await.json();
    let p = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "p")
        .unwrap()
        .clone();
    assert_eq!(p["state"], "paused", "{p}");
    assert_eq!(p["queue_depth"], 5, "{p}");
    post_ids(&relay, 5..10).await;
    witness.wait_for(10).await;
    assert!(
        paused.seen().is_empty(),
        "a paused destination got {} requests",
        paused.seen().len()
    );

    let p = admin(&relay, Method::POST, "/api/destinations/p/resume")
        .await
        .json();
    assert_eq!(p["state"], "ok");
    let seen = paused.wait_for(10).await;
    let got: HashSet<String> = seen
        .iter()
        .map(|s| s.header("webhook-id").unwrap().to_string())
        .collect();
    assert_eq!(got.len(), 10);
    admin(&relay, Method::POST, "/api/destinations/nope/pause")
        .await
        .error(404, "not_found");
    stop_relay(relay).await;
    paused.stop().await;
    witness.stop().await;
}

#[tokio::test]
async fn destinations_show_their_live_state() {
    let sink = Sink::always(503).await;
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay(dir.path(), &config(&[("d", &sink.url("/d?key=secret"))])).await;
    let (s, _) = post(&relay, "/open", "application/json", br#"{"id":"x1"}"#).await;
    assert_eq!(s, 200);
    sink.wait_for(2).await;
    let list = admin(&relay, Method::GET, "/api/destinations").await.json();
    let d = &list[0];
    assert_eq!(d["name"], "d");
    assert_eq!(d["state"], "ok");
    assert_eq!(d["queue_depth"], 1);
    assert!(d["consecutive_failures"].as_u64().unwrap() >= 1, "{d}");
    assert!(d["last_error"].as_str().unwrap().contains("503"), "{d}");
    let url = d["url"].as_str().unwrap();
    assert!(!url.contains("secret"), "{url}");
    stop_relay(relay).await;
    sink.stop().await;
}
