//! Connections that send nothing, half a preface, or sit idle over HTTP/2 are closed once
//! they have had no request in progress for the read timeout, so silent clients cannot hold
//! every connection slot; a connection in use is kept. Bodies received slowly cannot take
//! more than the ingress's memory budget for bodies.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::TestRelay;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The relay's read timeout in these tests.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// The most a test waits for the relay to close a connection.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

fn config(max_connections: usize) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
read_timeout = "1s"
max_connections = {max_connections}
max_body_bytes = 4194304

[delivery]
retry = {{ first = "1h" }}

[[sources]]
name = "open"
path = "/open"

[[destinations]]
name = "down"
url = "http://127.0.0.1:9/"

[[routes]]
name = "all"
source = "open"
to = ["down"]
"#
    )
}

/// Reads until the relay closes `s`; how long that took. Panics if it keeps the connection
/// past [`CLOSE_WITHIN`].
async fn closed_after(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Duration {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + CLOSE_WITHIN;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("the relay kept a silent connection for {CLOSE_WITHIN:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            // An HTTP/2 GOAWAY (or a 408) before the close is fine; keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_read_timeout() {
    let r = TestRelay::start(&config(100)).await;
    let mut s = TcpStream::connect(r.addr()).await.unwrap();
    let after = closed_after(&mut s).await;
    assert!(
        after >= READ_TIMEOUT - Duration::from_millis(200),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn half_an_http2_preface_does_not_hold_a_connection() {
    let r = TestRelay::start(&config(100)).await;
    let mut s = TcpStream::connect(r.addr()).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let after = closed_after(&mut s).await;
    assert!(
        after >= READ_TIMEOUT - Duration::from_millis(200),
        "closed after {after:?}"
    );
}

/// An HTTP/2 client that sends no request but PINGs again and again is closed all the same
/// (the relay's PING acknowledgements counted as activity, and kept it open for ever).
#[tokio::test]
async fn an_http2_connection_that_only_pings_is_closed() {
    let r = TestRelay::start(&config(100)).await;
    let s = TcpStream::connect(r.addr()).await.unwrap();
    let (mut read, mut write) = s.into_split();
    // The preface, an empty SETTINGS frame, then a PING every 300 ms.
    write
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let pinging = tokio::spawn(async move {
        let ping = b"\0\0\x08\x06\0\0\0\0\0pingping";
        for _ in 0..100 {
            if write.write_all(ping).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    // SETTINGS, PING acknowledgements, a GOAWAY, then the close: after about the read
    // timeout (not at once, as for a broken preface; half of it, as this clock starts
    // after the relay's), and not much later.
    let after = closed_after(&mut read).await;
    assert!(
        after >= READ_TIMEOUT / 2 && after < 5 * READ_TIMEOUT,
        "closed after {after:?}"
    );
    pinging.abort();
}

#[tokio::test]
async fn silent_connections_do_not_hold_every_slot() {
    let r = TestRelay::start(&config(4)).await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(r.addr()).await.unwrap());
    }
    // Every slot is held by a client that says nothing; a provider's event still gets in
    // once they are closed.
    let started = Instant::now();
    let a = tokio::time::timeout(CLOSE_WITHIN, r.post("/open", b"{\"n\":1}"))
        .await
        .expect("an event waited for a slot as long as silent clients held them all");
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert!(started.elapsed() >= READ_TIMEOUT - Duration::from_millis(200));
    for mut s in silent {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(CLOSE_WITHIN, s.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
    }
}

/// An HTTP/2 connection with prior knowledge, its connection task, and a request on it.
async fn h2_connection(
    r: &TestRelay,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let s = TcpStream::connect(r.addr()).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

async fn h2_post(send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>, n: u32) -> u16 {
    let req = http::Request::post("http://relay/open")
        .body(Full::new(Bytes::from(format!("{{\"n\":{n}}}"))))
        .unwrap();
    tokio::time::timeout(CLOSE_WITHIN, async {
        let resp = send
            .send_request(req)
            .await
            .expect("the connection was open");
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        status
    })
    .await
    .expect("an answer")
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_read_timeout() {
    let r = TestRelay::start(&config(100)).await;
    let (mut send, task) = h2_connection(&r).await;
    assert_eq!(h2_post(&mut send, 1).await, 200);
    let idle_from = Instant::now();
    tokio::time::timeout(CLOSE_WITHIN, task)
        .await
        .expect("the relay kept an idle HTTP/2 connection")
        .unwrap();
    let after = idle_from.elapsed();
    assert!(
        after >= READ_TIMEOUT - Duration::from_millis(200),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn a_connection_in_use_is_kept() {
    let r = TestRelay::start(&config(100)).await;
    let (mut send, task) = h2_connection(&r).await;
    // Requests every 100 ms for 2.5 s, over a 1 s read timeout: one connection serves all
    // (the gaps leave room for a stall of the loaded machine).
    for n in 0..25 {
        assert_eq!(h2_post(&mut send, n).await, 200, "request {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!task.is_finished(), "the connection closed while in use");
    task.abort();
}

#[tokio::test]
async fn slow_bodies_cannot_take_more_than_the_memory_budget() {
    // A read timeout long enough for all of them to be sending at once on a busy machine.
    let r =
        TestRelay::start(&config(100).replace("read_timeout = \"1s\"", "read_timeout = \"5s\""))
            .await;
    const ANNOUNCE: &[u8] = b"POST /open HTTP/1.1\r\nhost: x\r\ncontent-length: 4194304\r\n\r\n{";
    // Announcing a large body holds only 1 KiB until its data comes: 64 clients announcing
    // 4 MiB (max_body_bytes; 4 times the 64 MiB budget in all) and sending one byte leave
    // room for others.
    let mut idle = Vec::new();
    for _ in 0..64 {
        let mut s = TcpStream::connect(r.addr()).await.unwrap();
        s.write_all(ANNOUNCE).await.unwrap();
        idle.push(s);
    }
    assert_eq!(r.post("/open", b"{\"n\":0}").await.status, 200);
    // Each of these sends 2 MiB of its 4 and holds at least that while it waits for the
    // rest: 33 of them need more than the budget, so at least one is refused, at once,
    // whatever the order they are read in.
    let mut slow = Vec::new();
    for _ in 0..hookrelay::ingress::body_memory::BUDGET / (2 << 20) + 1 {
        let mut s = TcpStream::connect(r.addr()).await.unwrap();
        s.write_all(ANNOUNCE).await.unwrap();
        // One refused is answered and closed while this still writes: judged by its answer.
        let _ = s.write_all(&vec![b' '; 2 << 20]).await;
        slow.push(s);
    }
    // The rest time out (408) and give their room back; the clients that sent one byte
    // all do (none was refused for what it only announced).
    let answer = |mut s: TcpStream| async move {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(CLOSE_WITHIN, s.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    };
    let mut refused = 0;
    for s in slow {
        let text = answer(s).await;
        if text.starts_with("HTTP/1.1 503") {
            refused += 1;
            assert!(text.contains("retry-after: 1\r\n"), "{text}");
            assert!(text.contains(r#""error":"unavailable""#), "{text}");
        } else {
            assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        }
    }
    assert!(refused >= 1, "bodies past the budget were all taken");
    for s in idle {
        let text = answer(s).await;
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert_eq!(r.post("/open", b"{\"n\":2}").await.status, 200);
}

/// The token endpoint's form counts in the bodies held at once: once slow bodies have taken
/// the budget, a token request is answered 503 too, not read into memory the budget does
/// not see.
#[tokio::test]
async fn token_requests_share_the_body_memory_budget() {
    let text = config(100).replace(
        "read_timeout = \"1s\"",
        "read_timeout = \"10s\"\ntoken_secret = \"tok-secret-for-tests-0123456789abcdef\"",
    ) + "\n[[sources]]\nname = \"sms\"\npath = \"/sms\"\n\
           auth = { kind = \"oauth2\", clients = [{ id = \"c\", secret = \"s\" }] }\n";
    let r = TestRelay::start(&text).await;
    // 2 MiB announced, all but its last byte sent: each holds 2 MiB (never more than it
    // announced), so 32 of them hold the whole budget, and the 33rd is refused.
    const ANNOUNCE: &[u8] = b"POST /open HTTP/1.1\r\nhost: x\r\ncontent-length: 2097152\r\n\r\n{";
    let mut slow = Vec::new();
    for _ in 0..hookrelay::ingress::body_memory::BUDGET / (2 << 20) + 1 {
        let mut s = TcpStream::connect(r.addr()).await.unwrap();
        s.write_all(ANNOUNCE).await.unwrap();
        // One refused is answered and closed while this still writes.
        let _ = s.write_all(&vec![b' '; (2 << 20) - 2]).await;
        slow.push(s);
    }
    let form = b"grant_type=client_credentials&client_id=c&client_secret=s";
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let a = r
            .post_with(
                "/oauth/token",
                &[("content-type", "application/x-www-form-urlencoded")],
                form,
            )
            .await;
        if a.status == 503 {
            assert_eq!(a.headers["retry-after"], "1");
            break;
        }
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert!(
            Instant::now() < deadline,
            "token requests were read past the budget"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(slow);
}
