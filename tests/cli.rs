//! The command line as a user runs it: `hookrelay sink` with each of its options (and its
//! body limit), and
//! `hookrelay serve` found through `HOOKRELAY_CONFIG`, logging JSON lines with
//! `--log-format json`, counting an event no route takes, and stopping on Ctrl-C (SIGINT);
//! an event id that cannot break a log line; running out of file descriptors.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use http::Method;
use support::{bin, metric, send};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

/// The next line of `lines`, within 15 s.
async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut Lines<R>) -> String {
    tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .expect("a line within 15 s")
        .unwrap()
        .expect("a line before the end")
}

/// The ingress and admin addresses from `serve`'s first line on stdout.
async fn listening(out: &mut Lines<BufReader<ChildStdout>>) -> (String, String) {
    let said = next_line(out).await;
    let word = |p: &str| {
        said.split_whitespace()
            .find_map(|w| w.strip_prefix(p))
            .unwrap_or_else(|| panic!("no {p} in {said:?}"))
            .to_string()
    };
    (word("ingress="), word("admin="))
}

/// Sends SIGINT (Ctrl-C) and waits (bounded) for the exit; true when it exited 0.
async fn interrupt(child: Child) -> bool {
    signalled(child, "-INT").await
}

/// Sends `signal` (`-INT`, `-TERM`) to `child`; whether it then exits 0 (within 15 s).
async fn signalled(mut child: Child, signal: &str) -> bool {
    let pid = child.id().expect("still running").to_string();
    let sent = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits within 15 s of the signal")
        .unwrap();
    status.success()
}

fn piped(
    command: &mut Command,
) -> (
    Child,
    Lines<BufReader<ChildStdout>>,
    Lines<BufReader<ChildStderr>>,
) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap()).lines();
    let err = BufReader::new(child.stderr.take().unwrap()).lines();
    (child, out, err)
}

#[tokio::test]
async fn the_sink_prints_each_request_and_answers_as_told() {
    let dir = tempfile::tempdir().unwrap();
    let reply = dir.path().join("reply.json");
    std::fs::write(&reply, br#"{"next":"hangup"}"#).unwrap();
    let (child, mut out, mut err) = piped(
        Command::new(bin())
            .args(["sink", "--listen", "127.0.0.1:0", "--status", "202"])
            .args(["--delay", "150ms", "--fail-first", "1", "--reply"])
            .arg(&reply),
    );
    let said = next_line(&mut err).await;
    let addr = said
        .strip_prefix("hookrelay sink listening on ")
        .unwrap_or_else(|| panic!("{said}"));
    let url = format!("http://{addr}/calls/status?x=1");
    let headers = [("content-type", "application/json"), ("x-test", "one")];

    // A body past 64 MiB is refused, not read, not printed, not counted.
    let mut big = tokio::net::TcpStream::connect(addr).await.unwrap();
    big.write_all(b"POST /big HTTP/1.1\r\nhost: x\r\ncontent-length: 67108865\r\n\r\n{")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(15), big.read_exact(&mut head))
        .await
        .expect("an answer within 15 s")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    drop(big);

    let first = send(Method::POST, &url, &headers, br#"{"n":1}"#).await;
    assert_eq!(first.status, 503, "the first of --fail-first 1");
    let started = Instant::now();
    let second = send(Method::POST, &url, &headers, br#"{"n":2}"#).await;
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "--delay 150ms"
    );
    assert_eq!(second.status, 202, "--status 202");
    assert_eq!(&second.body[..], br#"{"next":"hangup"}"#, "--reply FILE");
    assert_eq!(second.headers["content-type"], "application/json");

    for n in 1..=2 {
        let line: serde_json::Value = serde_json::from_str(&next_line(&mut out).await).unwrap();
        assert_eq!(line["method"], "POST");
        assert_eq!(line["path"], "/calls/status");
        assert_eq!(line["headers"]["x-test"], "one");
        assert_eq!(line["body"], format!(r#"{{"n":{n}}}"#));
    }
    assert!(interrupt(child).await, "the sink exits 0 on Ctrl-C");
}

/// `--status 400` without `--reply` is answered as told: the status, no body. (The relay's
/// listeners give hyper's own bodiless 400s a JSON body; an answer the sink made is not one.)
#[tokio::test]
async fn the_sinks_bodiless_400_goes_out_as_told() {
    let (child, _out, mut err) =
        piped(Command::new(bin()).args(["sink", "--listen", "127.0.0.1:0", "--status", "400"]));
    let said = next_line(&mut err).await;
    let addr = said
        .strip_prefix("hookrelay sink listening on ")
        .unwrap_or_else(|| panic!("{said}"));
    let a = send(Method::POST, &format!("http://{addr}/x"), &[], b"{}").await;
    assert_eq!(a.status, 400);
    assert!(a.body.is_empty(), "{:?}", a.body);
    assert!(!a.headers.contains_key("content-type"), "{:?}", a.headers);
    // A request it cannot read still gets hyper's 400, with the contract's JSON body.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(b"NOT HTTP\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), raw.read_to_end(&mut answer))
        .await
        .expect("an answer within 15 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""error":"bad_request""#), "{answer}");
    assert!(
        signalled(child, "-TERM").await,
        "the sink exits 0 on SIGTERM"
    );
}

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[[sources]]
name = "calls"
path = "/calls"
event_id = ["$.id"]

[[destinations]]
name = "ivr"
url = "http://127.0.0.1:9/ivr"

[[routes]]
name = "answered"
source = "calls"
match = { type = "ANSWERED" }
to = ["ivr"]
"#;

#[tokio::test]
async fn serve_finds_its_config_in_the_environment_logs_json_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, CONFIG).unwrap();
    // No routes.toml where it runs (another directory): only HOOKRELAY_CONFIG names the file.
    let cwd = tempfile::tempdir().unwrap();
    let (child, mut out, mut err) = piped(
        Command::new(bin())
            .args(["--log-format", "json", "serve"])
            .current_dir(cwd.path())
            .env("HOOKRELAY_CONFIG", &config)
            .env("HOOKRELAY_LOG", "info"),
    );
    let (ingress, admin) = listening(&mut out).await;
    // Every log line is a JSON object; one of them says it listens.
    let mut listening = false;
    for _ in 0..50 {
        let line = next_line(&mut err).await;
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.is_object(), "{line}");
        if line.contains("listening") {
            listening = true;
            break;
        }
    }
    assert!(listening, "no JSON log line said it was listening");

    // An event that no route takes is answered and counted, once: its resend is not.
    let ingress_url = format!("http://{ingress}/calls");
    for duplicate in [false, true] {
        let a = send(
            Method::POST,
            &ingress_url,
            &[("content-type", "application/json")],
            br#"{"id":"c-1","type":"RINGING"}"#,
        )
        .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(a.json()["duplicate"], duplicate);
    }
    let metrics = send(Method::GET, &format!("http://{admin}/metrics"), &[], b"").await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert_eq!(
        metric(&text, r#"hookrelay_events_unrouted_total{source="calls"}"#),
        1.0,
        "{text}"
    );
    assert!(interrupt(child).await, "serve exits 0 on Ctrl-C");
    // The store went where the config file is, not where the relay ran.
    assert!(dir.path().join("data").exists());
    assert!(!cwd.path().join("data").exists());
}

#[tokio::test]
async fn an_event_id_cannot_break_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, CONFIG).unwrap();
    // Plain text logs: the shape a newline in a field would break.
    let (child, mut out, mut err) = piped(
        Command::new(bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("HOOKRELAY_LOG", "info"),
    );
    let (ingress, _) = listening(&mut out).await;
    // The id comes from the body; its destination is down, so its attempt is logged.
    let a = send(
        Method::POST,
        &format!("http://{ingress}/calls"),
        &[("content-type", "application/json")],
        br#"{"id":"x\nFORGED ERROR line","type":"ANSWERED"}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let mut seen = Vec::new();
    loop {
        assert!(
            seen.len() < 200,
            "no attempt was logged:\n{}",
            seen.join("\n")
        );
        let line = next_line(&mut err).await;
        assert!(!line.starts_with("FORGED"), "{line}");
        let attempt = line.contains("attempt failed");
        seen.push(line);
        if attempt {
            break;
        }
    }
    let attempt = seen.last().unwrap();
    assert!(attempt.contains("x%0AFORGED%20ERROR%20line"), "{attempt}");
    assert!(interrupt(child).await, "serve exits 0 on Ctrl-C");
}

/// A soft open-file limit below the hard one (often 1,024, below `max_connections`) is
/// raised to the hard one at start; none is said then, with room for the connections.
#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    let text = CONFIG.replace("[server]\n", "[server]\nmax_connections = 10\n");
    std::fs::write(&config, text).unwrap();
    let (child, mut out, mut err) = piped(
        Command::new("sh")
            .arg("-c")
            .arg(r#"ulimit -S -n 128 && exec "$0" serve --config "$1""#)
            .arg(bin())
            .arg(&config)
            .env("HOOKRELAY_LOG", "warn"),
    );
    listening(&mut out).await;
    let pid = child.id().expect("running");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    // "Max open files <soft> <hard> files"
    assert_ne!(words[3], "128", "{line}");
    assert_eq!(words[3], words[4], "{line}");
    assert!(interrupt(child).await, "serve exits 0 on Ctrl-C");
    let mut said = Vec::new();
    while let Ok(Some(l)) = err.next_line().await {
        said.push(l);
    }
    assert!(
        said.iter().all(|l| !l.contains("open-file limit")),
        "{said:?}"
    );
}

#[tokio::test]
async fn out_of_file_descriptors_the_relay_says_so_once_a_second_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, CONFIG).unwrap();
    // 64 descriptors: the relay's own files and listeners take some, a few clients the rest.
    let (child, mut out, mut err) = piped(
        Command::new("sh")
            .arg("-c")
            .arg(r#"ulimit -n 64 && exec "$0" serve --config "$1""#)
            .arg(bin())
            .arg(&config)
            .env("HOOKRELAY_LOG", "warn"),
    );
    let (ingress, _) = listening(&mut out).await;
    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(tokio::net::TcpStream::connect(&ingress).await.unwrap());
    }
    // The limit, far below what max_connections needs, is said at start.
    let said = next_line(&mut err).await;
    assert!(said.contains("open-file limit"), "{said}");
    // Accepts fail for as long as the clients stay: said at most once a second, with how
    // many were held back (10 ms apart, they were 100 lines a second before).
    let first = next_line(&mut err).await;
    assert!(first.contains("accept failed"), "{first}");
    let watched = Instant::now();
    let mut lines = 1;
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout_at((watched + Duration::from_secs(3)).into(), err.next_line()).await
    {
        assert!(line.contains("accept failed"), "{line}");
        assert!(line.contains("held_back"), "{line}");
        lines += 1;
    }
    assert!(lines <= 5, "{lines} lines in 3 s");
    // Once the clients go, the relay serves again.
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(15);
    let client = support::client();
    loop {
        // A connection refused or reset while descriptors come back is tried again.
        let a = support::try_post(
            &client,
            &format!("http://{ingress}/calls"),
            br#"{"id":"after","type":"RINGING"}"#.to_vec(),
            Duration::from_secs(5),
        )
        .await;
        if matches!(&a, Ok(a) if a.status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not serve again: {:?}",
            a.err()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(interrupt(child).await, "serve exits 0 on Ctrl-C");
}
