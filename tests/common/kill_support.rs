//! Support for `tests/kill.rs` and `tests/faults.rs`: a destination that can misbehave on
//! purpose ([`FaultSink`]), the `hookrelay` binary as a child process ([`RelayProcess`]),
//! and a client call that reports failures instead of panicking ([`try_post`]).
//!
//! Everything binds to 127.0.0.1; every wait is bounded; a sink stops (closing its
//! connections) on [`FaultSink::stop`] or drop, and a child process is SIGKILLed on drop so
//! a failing assertion never leaves one behind.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// The built `hookrelay` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hookrelay"))
}

// ---------------------------------------------------------------------------------------
// FaultSink
// ---------------------------------------------------------------------------------------

/// What the sink does with one request, once it has read it whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Answers this status (empty body, connection kept alive).
    Answer(u16),
    /// Never answers; holds the connection until the client closes it (or the sink stops).
    Hang,
    /// Drops the connection with a TCP reset (SO_LINGER 0), no answer.
    Reset,
    /// Starts a 200 answer promising a 100-byte body, sends 10 bytes of it, then closes.
    Truncate,
    /// Answers this status after this many milliseconds.
    Later(u16, u64),
}

/// One request as the sink saw it.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// The `webhook-id` header.
    pub id: String,
    /// The `x-hookrelay-attempt` header (0 when absent).
    pub attempt: u32,
    pub action: Action,
    pub at: Instant,
}

impl Arrival {
    /// Answered 2xx: the relay counts this as delivered.
    pub fn delivered(&self) -> bool {
        matches!(self.action, Action::Answer(s) | Action::Later(s, _) if (200..300).contains(&s))
    }
}

/// Decides a request's fate from its arrival number (0-based) and its `webhook-id`.
type Behaviour = Arc<dyn Fn(usize, &str) -> Action + Send + Sync>;

struct SinkState {
    /// Decides each request's fate from its arrival number (0-based).
    behaviour: Mutex<Behaviour>,
    next: AtomicUsize,
    log: Mutex<Vec<Arrival>>,
    /// The number of arrivals logged so far.
    count: watch::Sender<usize>,
}

/// A fake destination on 127.0.0.1:0 speaking just enough HTTP/1.1 (keep-alive,
/// `content-length` bodies) to be a relay destination, and misbehaving on request.
pub struct FaultSink {
    pub addr: SocketAddr,
    state: Arc<SinkState>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl FaultSink {
    /// Starts a sink whose `behaviour(n)` decides what happens to the n-th request.
    pub async fn start(behaviour: impl Fn(usize) -> Action + Send + Sync + 'static) -> FaultSink {
        Self::by_request(move |n, _| behaviour(n)).await
    }

    /// Starts a sink whose `behaviour(n, id)` decides from the arrival number and the
    /// request's `webhook-id` (the event id).
    pub async fn by_request(
        behaviour: impl Fn(usize, &str) -> Action + Send + Sync + 'static,
    ) -> FaultSink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(SinkState {
            behaviour: Mutex::new(Arc::new(behaviour)),
            next: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
        });
        let stop = CancellationToken::new();
        let task = {
            let (state, stop) = (state.clone(), stop.clone());
            tokio::spawn(async move {
                // Dropping the set when the loop ends aborts every connection still open.
                let mut conns = JoinSet::new();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        r = listener.accept() => if let Ok((s, _)) = r {
                            let _ = s.set_nodelay(true);
                            conns.spawn(serve_conn(s, state.clone(), stop.clone()));
                        },
                        Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    }
                }
            })
        };
        FaultSink {
            addr,
            state,
            stop,
            task: Some(task),
        }
    }

    /// A sink that answers `status` to everything.
    pub async fn answering(status: u16) -> FaultSink {
        FaultSink::start(move |_| Action::Answer(status)).await
    }

    /// Changes what the sink does from the next request on.
    pub fn set_behaviour(&self, behaviour: impl Fn(usize) -> Action + Send + Sync + 'static) {
        *self.state.behaviour.lock().unwrap() = Arc::new(move |n, _| behaviour(n));
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.state.log.lock().unwrap().clone()
    }

    /// Requests seen so far.
    pub fn count(&self) -> usize {
        *self.state.count.borrow()
    }

    /// Waits until at least `n` requests arrived; false if `within` passed first.
    pub async fn wait_count(&self, n: usize, within: Duration) -> bool {
        let mut rx = self.state.count.subscribe();
        let reached = tokio::time::timeout(within, rx.wait_for(|c| *c >= n))
            .await
            .is_ok();
        reached
    }

    /// Waits until every id in `ids` was answered 2xx at least once. On timeout returns the
    /// ids still missing.
    pub async fn wait_delivered(
        &self,
        ids: &HashSet<String>,
        within: Duration,
    ) -> Result<(), HashSet<String>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut missing = ids.clone();
        let mut seen = 0;
        let mut rx = self.state.count.subscribe();
        loop {
            // Subscribed before reading the log: no arrival can slip between the two.
            rx.borrow_and_update();
            {
                let log = self.state.log.lock().unwrap();
                for a in &log[seen..] {
                    if a.delivered() {
                        missing.remove(&a.id);
                    }
                }
                seen = log.len();
            }
            if missing.is_empty() {
                return Ok(());
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return Err(missing),
            }
        }
    }

    /// Delivered (2xx) requests: how many, and how many distinct ids.
    pub fn delivered_counts(&self) -> (usize, usize) {
        let log = self.state.log.lock().unwrap();
        let mut ids = HashSet::new();
        let mut n = 0;
        for a in log.iter().filter(|a| a.delivered()) {
            n += 1;
            ids.insert(a.id.as_str());
        }
        (n, ids.len())
    }

    /// Ids answered 2xx at least once.
    pub fn delivered_ids(&self) -> HashSet<String> {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.delivered())
            .map(|a| a.id.clone())
            .collect()
    }

    /// Stops listening and closes every connection.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for FaultSink {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The most a request head may take before the sink gives up on the connection.
const MAX_HEAD: usize = 64 * 1024;

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads more bytes into `buf`; false at EOF or on an error.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

async fn serve_conn(mut s: TcpStream, state: Arc<SinkState>, stop: CancellationToken) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // The head.
        let head_end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            if buf.len() > MAX_HEAD || !fill(&mut s, &mut buf).await {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut len = 0usize;
        let mut id = String::new();
        let mut attempt = 0u32;
        for line in head.split("\r\n").skip(1) {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.parse().unwrap_or(0),
                "webhook-id" => id = v.to_string(),
                "x-hookrelay-attempt" => attempt = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        // The body.
        while buf.len() < head_end + len {
            if !fill(&mut s, &mut buf).await {
                return;
            }
        }
        buf.drain(..head_end + len);
        let n = state.next.fetch_add(1, Ordering::SeqCst);
        let behaviour = state.behaviour.lock().unwrap().clone();
        let action = behaviour(n, &id);
        state.log.lock().unwrap().push(Arrival {
            id,
            attempt,
            action,
            at: Instant::now(),
        });
        state.count.send_modify(|c| *c += 1);
        match action {
            Action::Answer(status) | Action::Later(status, _) => {
                if let Action::Later(_, ms) = action {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let resp = format!(
                    "HTTP/1.1 {status} {}\r\ncontent-length: 0\r\n\r\n",
                    reason(status)
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
            Action::Hang => {
                // Read (and ignore) until the client gives up and closes.
                let mut sink = Vec::new();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = async { while fill(&mut s, &mut sink).await { sink.clear(); } } => {}
                }
                return;
            }
            Action::Reset => {
                let _ = s.set_zero_linger();
                return;
            }
            Action::Truncate => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"ok\":tru")
                    .await;
                // A plain close (FIN): the partial answer reaches the client, then EOF.
                let _ = s.flush().await;
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled HTTP/1.1 client (keep-alive).
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>()
}

/// A status, headers and body, or why there was none.
#[derive(Debug)]
pub struct Posted {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Posted {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// POSTs `body` to `url` with a JSON content type; errors (refused, reset, timed out) are
/// returned, not raised.
pub async fn try_post(
    client: &HttpClient,
    url: &str,
    body: Vec<u8>,
    within: Duration,
) -> Result<Posted, String> {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let call = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok(Posted {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    match tokio::time::timeout(within, call).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

// ---------------------------------------------------------------------------------------
// The binary as a child process
// ---------------------------------------------------------------------------------------

/// `hookrelay serve` running as a child process. SIGKILLed when dropped.
pub struct RelayProcess {
    child: tokio::process::Child,
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    /// Kept open: the child must never write to a closed pipe.
    _stdout: BufReader<tokio::process::ChildStdout>,
}

impl RelayProcess {
    /// Starts `hookrelay serve --config <config>` with its stderr appended to `log`, and
    /// waits (bounded) for its `hookrelay listening ingress=ADDR admin=ADDR` line.
    pub async fn spawn(config: &Path, log: &Path) -> RelayProcess {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = tokio::process::Command::new(bin())
            .args(["serve", "--config"])
            .arg(config)
            .env("HOOKRELAY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line)).await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            let _ = child.kill().await;
            panic!(
                "the relay did not say it was listening within 30s ({read:?}); its log:\n{}",
                tail(log)
            );
        }
        let word = |p: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(p))
                .unwrap_or_else(|| panic!("no {p} in {line:?}"))
                .parse()
                .unwrap()
        };
        let (ingress, admin) = (word("ingress="), word("admin="));
        RelayProcess {
            child,
            ingress,
            admin,
            _stdout: stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the child is running")
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn sigkill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// SIGTERM, and waits (bounded by `within`) for the exit status.
    pub async fn sigterm(self, within: Duration) -> ExitStatus {
        self.sigterm_or_kill(within)
            .await
            .unwrap_or_else(|| panic!("the relay did not exit within {within:?} of SIGTERM"))
    }

    /// SIGTERM; if the process has not exited within `within`, SIGKILL and `None`.
    pub async fn sigterm_or_kill(mut self, within: Duration) -> Option<ExitStatus> {
        let ok = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -TERM failed");
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(s) => Some(s.unwrap()),
            Err(_) => {
                let _ = self.child.kill().await;
                None
            }
        }
    }

    /// The process's resident set size in KiB (`VmRSS` in /proc/<pid>/status).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// The most the resident set has been, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
    }
}

/// The last lines of a log file, for failure messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
