//! The operator console in a real headless Chromium (Debian's `chromium` driven through
//! `chromedriver` by fantoccini): the operator enters the token, finds an event by its id,
//! sees its deliveries, replays a dead one and watches it become delivered, pauses and
//! resumes a destination; an event whose body holds markup runs no script when shown;
//! filters the events by source, replays a destination's dead letters at once, and reloads
//! the config from the routing tab (a broken file's problems listed as text).
//!
//! `HOOKRELAY_SCREENSHOTS=docs` writes the screenshots the README links to.

mod support;

use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use support::{post, start_relay, stop_relay, wait_state, Reply, Sink};
use tokio::io::{AsyncBufReadExt, BufReader};

/// With a space: a header value may hold one, and the console must send it.
const TOKEN: &str = "console token 41d9";
/// The head of every test's routes.toml: loopback listeners, the admin token, and the
/// `voice` source (its `event_id` and the rest follow).
const VOICE: &str = "
[server]
listen = \"127.0.0.1:0\"
admin_listen = \"127.0.0.1:0\"
admin_token = \"console token 41d9\"

[[sources]]
name = \"voice\"
path = \"/8x8/voice\"";
/// The longest any one thing the page does may take.
const UI_WAIT: Duration = Duration::from_secs(15);

/// `chromedriver` on a loopback port it picks itself; it and every Chromium process of the
/// test's profile are killed when dropped.
struct Driver {
    child: tokio::process::Child,
    port: u16,
    profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver leads a process group of its own, which the browsers it starts
        // join: all of it, then whatever names the profile (in case one left the group).
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f"])
            .arg(self.profile.path())
            .status();
    }
}

impl Driver {
    async fn start() -> Driver {
        // Port 0: chromedriver binds a free port and says which ("... started successfully
        // on port N."); no port found free here can be taken by another process first.
        let mut child = tokio::process::Command::new("/usr/bin/chromedriver")
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("/usr/bin/chromedriver (Debian's chromium-driver): run scripts/test");
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = out.next_line().await.unwrap() {
                if line.contains("started successfully") {
                    let port = line
                        .rsplit("on port ")
                        .next()
                        .and_then(|p| p.trim().trim_end_matches('.').parse::<u16>().ok());
                    return port
                        .filter(|p| *p != 0)
                        .unwrap_or_else(|| panic!("no port in chromedriver's {line:?}"));
                }
            }
            panic!("chromedriver ended before it was ready");
        })
        .await
        .expect("chromedriver ready within 20 s");
        // Keep reading so chromedriver never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
        Driver {
            child,
            port,
            profile: tempfile::tempdir().unwrap(),
        }
    }

    async fn browser(&self) -> Client {
        let profile = self.profile.path();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(caps);
        let url = format!("http://127.0.0.1:{}", self.port);
        tokio::time::timeout(Duration::from_secs(60), builder.connect(&url))
            .await
            .expect("a Chromium session within 60 s")
            .expect("a Chromium session")
    }
}

/// Waits for the element at `xpath`.
async fn appears(c: &Client, xpath: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(UI_WAIT)
        .for_element(Locator::XPath(xpath))
        .await
        .unwrap_or_else(|e| panic!("{xpath} did not appear within {UI_WAIT:?}: {e}"))
}

/// A cell of the row of `table` for destination `dest` whose class holds `class` and
/// whose text is `text`.
fn cell(table: &str, dest: &str, class: &str, text: &str) -> String {
    format!(
        "//table[@id='{table}']//tr[@data-destination='{dest}']/td[contains(concat(' ', @class, ' '), ' {class} ') and normalize-space(.)='{text}']"
    )
}

/// The text of the element at `xpath`, once it appears.
async fn text_of(c: &Client, xpath: &str) -> String {
    appears(c, xpath).await.text().await.unwrap()
}

/// Clicks the element at `xpath` (it must be there).
async fn click(c: &Client, xpath: &str) {
    c.find(Locator::XPath(xpath))
        .await
        .unwrap_or_else(|e| panic!("{xpath}: {e}"))
        .click()
        .await
        .unwrap();
}

async fn open_event(c: &Client, id: &str) {
    appears(c, "//button[@id='tab-events']")
        .await
        .click()
        .await
        .unwrap();
    let search = appears(c, "//input[@id='search-id']").await;
    search.clear().await.unwrap();
    search.send_keys(id).await.unwrap();
    click(c, "//*[@id='search-button']").await;
    appears(
        c,
        &format!("//*[@id='event-id' and normalize-space(.)='{id}']"),
    )
    .await;
}

/// Waits (bounded) until the events list has `n` rows.
async fn rows_become(c: &Client, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = c
            .execute(
                "return document.querySelectorAll('#events tbody tr').length;",
                vec![],
            )
            .await
            .unwrap();
        if got == json!(n) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the events list has {got} rows, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `scenario` in a browser of its own, bounded: whatever happens (a failed assertion
/// too), the browser and its driver go.
async fn in_browser<F, Fut>(scenario: F)
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let driver = Driver::start().await;
    let c = driver.browser().await;
    let outcome = tokio::time::timeout(
        Duration::from_secs(120),
        std::panic::AssertUnwindSafe(scenario(c.clone())).catch_unwind(),
    )
    .await;
    // Bounded: a stuck browser must not keep the driver (and Chromium) from being killed.
    let _ = tokio::time::timeout(Duration::from_secs(10), c.close()).await;
    drop(driver);
    match outcome {
        Err(_) => panic!("the console scenario did not finish within 120 s"),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Ok(Ok(())) => {}
    }
}

/// Opens the console at `admin` and signs in; the token goes into the Authorization
/// header only.
async fn sign_in(c: &Client, admin: std::net::SocketAddr) {
    c.goto(&format!("http://{admin}/")).await.unwrap();
    let token = appears(c, "//input[@id='token']").await;
    token.send_keys(TOKEN).await.unwrap();
    click(c, "//*[@id='login-button']").await;
    appears(c, "//nav[@id='nav' and not(contains(@class,'hidden'))]").await;
}

async fn screenshot(c: &Client, dir: &std::path::Path, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(dir.join(format!("console-{name}.png")), png).unwrap();
}

#[tokio::test]
async fn the_console_finds_replays_and_pauses_and_shows_bodies_as_text() {
    // The first delivery is refused for good (400): dead. Everything after is taken.
    let sink = Sink::start(vec![Reply::status(400)], Reply::status(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"{VOICE}
event_id = ["$.payload.eventId"]

[[destinations]]
name = "calls"
url = "{}"

[[routes]]
name = "all"
source = "voice"
to = ["calls"]
"#,
        sink.url("/calls")
    );
    let relay = start_relay(dir.path(), &toml).await;
    let status = |id: &str, extra: &str| {
        format!(
            r#"{{"namespace":"VOICE","eventType":"CALL_STATUS","payload":{{"eventId":"{id}"{extra}}}}}"#
        )
    };
    let (s, _) = post(
        &relay,
        "/8x8/voice",
        "application/json",
        status("ev-dead", "").as_bytes(),
    )
    .await;
    assert_eq!(s, 200);
    wait_state(
        &relay,
        "ev-dead",
        "calls",
        hookrelay::store::DeliveryState::Dead,
    )
    .await;
    // Markup, a number past a double's precision, an integer-like key after another.
    let hostile = status(
        "ev-xss",
        r#","note":"<script>window.__xss=1</script><img src=x onerror=\"window.__xss=2\">","n":12345678901234567890123,"z":{},"10":[1, "a\",b"]"#,
    );
    let (s, _) = post(&relay, "/8x8/voice", "application/json", hostile.as_bytes()).await;
    assert_eq!(s, 200);
    // JSON shaped like the form a body that is not JSON is shown in: shown as the JSON it is.
    let lookalike = br#"{"base64":"SGVsbG8="}"#;
    let (s, _) = post(&relay, "/8x8/voice", "application/json", lookalike).await;
    assert_eq!(s, 200);
    let lookalike_id = hookrelay::event_id::body_hash(lookalike);
    // Deeply nested: indented, its lines go no deeper than 16 levels.
    let deep = format!(
        r#"{{"namespace":"VOICE","eventType":"CALL_STATUS","payload":{{"eventId":"ev-deep"}},"deep":{}1,2{}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    let (s, _) = post(&relay, "/8x8/voice", "application/json", deep.as_bytes()).await;
    assert_eq!(s, 200);

    let shots = match std::env::var("HOOKRELAY_SCREENSHOTS") {
        Ok(d) => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(d),
        Err(_) => dir.path().to_path_buf(),
    };
    let running = &relay;
    in_browser(|c| async move {
        let relay = running;
        sign_in(&c, relay.admin).await;
        appears(&c, "//table[@id='events']//tr[@data-event-id='ev-dead']").await;
        screenshot(&c, &shots, "events").await;

        // Find the dead event, see its delivery, replay it, watch it become delivered.
        open_event(&c, "ev-dead").await;
        appears(&c, &cell("deliveries", "calls", "state", "dead")).await;
        appears(&c, &cell("deliveries", "calls", "last-status", "400")).await;
        screenshot(&c, &shots, "event-dead").await;
        click(&c, "//table[@id='deliveries']//tr[@data-destination='calls']//button[contains(@class,'replay')]").await;
        appears(&c, &cell("deliveries", "calls", "state", "delivered")).await;
        appears(&c, &cell("deliveries", "calls", "attempts", "2")).await;

        // A body full of markup is shown as text and runs nothing.
        open_event(&c, "ev-xss").await;
        let body = text_of(&c, "//pre[@id='event-body']").await;
        assert!(body.contains("<script>window.__xss=1</script>"), "{body}");
        assert!(body.contains("<img src=x onerror="), "{body}");
        // As received, indented: the number exact, the keys in their order.
        assert!(body.contains("\"n\": 12345678901234567890123,"), "{body}");
        assert!(body.contains("\"z\": {},\n"), "{body}");
        assert!(body.find("\"z\"") < body.find("\"10\""), "{body}");
        assert!(body.contains("\"10\": [\n"), "{body}");
        assert!(
            body.contains("\"a\\\",b\""),
            "a string's comma and quote: {body}"
        );
        let probe = c
            .execute(
                "return [typeof window.__xss, document.querySelectorAll('#event-body *').length, document.querySelectorAll('script').length];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            probe,
            json!(["undefined", 0, 1]),
            "no script ran, no element was made"
        );
        screenshot(&c, &shots, "event-body").await;
        open_event(&c, "ev-deep").await;
        let body = text_of(&c, "//pre[@id='event-body']").await;
        assert!(body.contains("1,\n"), "{body}");
        let deepest = body
            .lines()
            .map(|l| l.len() - l.trim_start().len())
            .max()
            .unwrap();
        assert_eq!(deepest, 32, "indented to 16 levels at most");
        open_event(&c, &lookalike_id).await;
        let body = text_of(&c, "//pre[@id='event-body']").await;
        assert!(body.contains("SGVsbG8="), "{body}");
        let decoded_shown = c
            .execute(
                "return [document.getElementById('event-body-decoded').classList.contains('hidden'), document.getElementById('event-body-decoded').textContent];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            decoded_shown,
            json!([true, ""]),
            "a JSON body is not shown decoded as well"
        );

        // Pause and resume the destination.
        click(&c, "//*[@id='tab-destinations']").await;
        appears(&c, &cell("destinations", "calls", "state", "ok")).await;
        // For a screen reader: which tab is shown, and what each action acts on.
        appears(&c, "//*[@id='tab-destinations' and @aria-current='page']").await;
        appears(&c, "//*[@id='tab-events' and @aria-current='false']").await;
        appears(
            &c,
            "//table[@id='destinations']//button[@aria-label='Pause calls']",
        )
        .await;
        click(&c, "//table[@id='destinations']//tr[@data-destination='calls']//button[contains(@class,'pause')]").await;
        appears(&c, &cell("destinations", "calls", "state", "paused")).await;
        assert!(relay.app.store.paused("calls"));
        // The button now resumes, and says so to a screen reader too.
        appears(
            &c,
            "//table[@id='destinations']//button[contains(@class,'resume') and @aria-label='Resume calls']",
        )
        .await;
        screenshot(&c, &shots, "destinations").await;
        click(&c, "//table[@id='destinations']//tr[@data-destination='calls']//button[contains(@class,'resume')]").await;
        appears(&c, &cell("destinations", "calls", "state", "ok")).await;
        assert!(!relay.app.store.paused("calls"));

        // "Load more" goes on with the filter its list was loaded with, whatever the boxes
        // say meanwhile: 59 delivered events, 50 a page.
        for i in 0..55 {
            let id = format!("ev-p-{i}");
            let (s, _) = post(
                relay,
                "/8x8/voice",
                "application/json",
                status(&id, "").as_bytes(),
            )
            .await;
            assert_eq!(s, 200);
            wait_state(
                relay,
                &id,
                "calls",
                hookrelay::store::DeliveryState::Delivered,
            )
            .await;
        }
        click(&c, "//*[@id='tab-events']").await;
        click(
            &c,
            "//select[@id='filter-state']/option[@value='delivered']",
        )
        .await;
        click(&c, "//*[@id='apply-filters']").await;
        rows_become(&c, 50).await;
        click(&c, "//select[@id='filter-state']/option[@value='pending']").await;
        click(&c, "//*[@id='more']").await;
        rows_become(&c, 59).await;
        let states = c
            .execute(
                "return Array.from(document.querySelectorAll('#events tbody .badge'), (b) => b.textContent);",
                vec![],
            )
            .await
            .unwrap();
        let states = states.as_array().unwrap();
        assert_eq!(states.len(), 59);
        assert!(states.iter().all(|s| s == "calls: delivered"), "{states:?}");

        // Signed out, the page keeps no event, body or list.
        open_event(&c, "ev-xss").await;
        click(&c, "//*[@id='logout']").await;
        appears(&c, "//*[@id='login' and not(contains(@class,'hidden'))]").await;
        let kept = c
            .execute(
                "return [document.getElementById('event-body').textContent, document.querySelectorAll('#events tbody tr, #deliveries tbody tr, #dead tbody tr, #destinations tbody tr').length, document.getElementById('routing-table').textContent];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(kept, json!(["", 0, ""]), "nothing stays once signed out");
    })
    .await;
    stop_relay(relay).await;
    sink.stop().await;
}

#[tokio::test]
async fn the_console_replays_a_destinations_dead_letters_filters_by_source_and_reloads() {
    // `bad` refuses the first three deliveries for good (400): three dead letters.
    let bad = Sink::start(vec![Reply::status(400); 3], Reply::status(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"{VOICE}
event_id = ["$.id"]

[[sources]]
name = "sms"
path = "/8x8/sms"
event_id = ["$.id"]

[[destinations]]
name = "bad"
url = "{}"

[[routes]]
name = "voice-to-bad"
source = "voice"
to = ["bad"]
"#,
        bad.url("/bad")
    );
    let relay = start_relay(dir.path(), &toml).await;
    for i in 0..3 {
        let id = format!("dl-{i}");
        let body = format!(r#"{{"id":"{id}"}}"#);
        assert_eq!(
            post(&relay, "/8x8/voice", "application/json", body.as_bytes())
                .await
                .0,
            200
        );
        wait_state(&relay, &id, "bad", hookrelay::store::DeliveryState::Dead).await;
    }
    let (s, _) = post(&relay, "/8x8/sms", "application/json", br#"{"id":"sms-1"}"#).await;
    assert_eq!(s, 200);
    let file = dir.path().join("routes.toml");
    let running = &relay;
    in_browser(|c| async move {
        let relay = running;
        sign_in(&c, relay.admin).await;

        // The events of one source only.
        appears(&c, "//table[@id='events']//tr[@data-event-id='sms-1']").await;
        rows_become(&c, 4).await;
        click(&c, "//select[@id='filter-source']/option[@value='voice']").await;
        click(&c, "//*[@id='apply-filters']").await;
        rows_become(&c, 3).await;
        let sources = c
            .execute(
                "return Array.from(document.querySelectorAll('#events tbody tr'), (r) => r.cells[1].textContent);",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(sources, json!(["voice", "voice", "voice"]));

        // A destination's dead letters, replayed at once.
        click(&c, "//*[@id='tab-dead']").await;
        appears(&c, "//button[@id='replay-all' and @disabled]").await;
        click(&c, "//select[@id='dead-destination']/option[@value='bad']").await;
        for i in 0..3 {
            appears(&c, &format!("//table[@id='dead']//tr[@data-event-id='dl-{i}']")).await;
        }
        click(&c, "//button[@id='replay-all' and not(@disabled)]").await;
        appears(&c, "//p[@id='dead-empty' and not(contains(@class,'hidden'))]").await;
        for i in 0..3 {
            let id = format!("dl-{i}");
            wait_state(relay, &id, "bad", hookrelay::store::DeliveryState::Delivered).await;
        }

        // The routing table, and a reload that takes a new route.
        click(&c, "//*[@id='tab-routing']").await;
        appears(&c, "//pre[@id='routing-table' and contains(., 'voice-to-bad')]").await;
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str("\n[[routes]]\nname = \"sms-to-bad\"\nsource = \"sms\"\nto = [\"bad\"]\n");
        std::fs::write(&file, &text).unwrap();
        click(&c, "//*[@id='reload']").await;
        appears(&c, "//*[@id='reload-result' and normalize-space(.)='reloaded']").await;
        appears(&c, "//pre[@id='routing-table' and contains(., 'sms-to-bad')]").await;

        // A broken file: its problems listed as text, the routes in force kept.
        text.push_str("\n[[routes]]\nname = \"<b>x</b>\"\nsource = \"nowhere\"\nto = [\"bad\"]\n");
        std::fs::write(&file, &text).unwrap();
        click(&c, "//*[@id='reload']").await;
        let problem = text_of(&c, "//ul[@id='reload-problems']/li[contains(., 'nowhere')]").await;
        assert!(problem.contains("routes[2].source"), "{problem}");
        let made = c
            .execute("return document.querySelectorAll('#reload-problems b').length;", vec![])
            .await
            .unwrap();
        assert_eq!(made, json!(0), "markup in a problem is shown as text");
        appears(&c, "//pre[@id='routing-table' and contains(., 'sms-to-bad')]").await;
        assert_eq!(relay.app.config().routes.len(), 2, "the old config stays");
    })
    .await;
    stop_relay(relay).await;
    bad.stop().await;
}

/// How many rows the dead-letter table shows.
async fn dead_rows(c: &Client) -> serde_json::Value {
    c.execute(
        "return document.querySelectorAll('#dead tbody tr').length;",
        vec![],
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn the_console_pages_through_more_dead_letters_than_one_answer_holds() {
    // 501 dead letters: one more than the console asks for at once.
    let bad = Sink::start(Vec::new(), Reply::status(400)).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"{VOICE}
event_id = ["$.id"]

[[destinations]]
name = "bad"
url = "{}"
rate = {{ per_second = 100000, burst = 1000 }}

[[routes]]
name = "voice-to-bad"
source = "voice"
to = ["bad"]
"#,
        bad.url("/bad")
    );
    let relay = start_relay(dir.path(), &toml).await;
    const N: usize = 501;
    for i in 0..N {
        let body = format!(r#"{{"id":"many-{i:03}"}}"#);
        let (status, _) = post(&relay, "/8x8/voice", "application/json", body.as_bytes()).await;
        assert_eq!(status, 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while relay.app.store.dead(Some("bad"), 1000).await.unwrap().len() < N {
        assert!(std::time::Instant::now() < deadline, "not all dead in 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let running = &relay;
    in_browser(|c| async move {
        sign_in(&c, running.admin).await;
        click(&c, "//*[@id='tab-dead']").await;
        click(&c, "//select[@id='dead-destination']/option[@value='bad']").await;
        // The oldest 500, and a button for the rest.
        appears(&c, "//table[@id='dead']//tr[@data-event-id='many-499']").await;
        assert_eq!(dead_rows(&c).await, json!(500));
        click(
            &c,
            "//button[@id='dead-more' and not(contains(@class,'hidden'))]",
        )
        .await;
        appears(&c, "//table[@id='dead']//tr[@data-event-id='many-500']").await;
        assert_eq!(dead_rows(&c).await, json!(N));
        appears(
            &c,
            "//button[@id='dead-more' and contains(@class,'hidden')]",
        )
        .await;
    })
    .await;
    stop_relay(relay).await;
    bad.stop().await;
}
