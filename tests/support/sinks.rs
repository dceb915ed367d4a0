//! Fake destinations on 127.0.0.1:0: [`Sink`] answers from a script (a hyper server that
//! records every request), [`FaultSink`] speaks just enough HTTP/1.1 to misbehave on purpose
//! (hang, reset, truncate, answer late) by arrival number or event id. Both stop on `stop`
//! or drop, closing their connections.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::WAIT;

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// How long the sink takes before answering.
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    pub fn body(mut self, b: &[u8]) -> Reply {
        self.body = b.to_vec();
        self
    }
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

/// A request as the sink saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// When its body had been read.
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn attempt(&self) -> u32 {
        self.header("x-hookrelay-attempt")
            .expect("x-hookrelay-attempt")
            .parse()
            .expect("attempt is a number")
    }
}

struct State {
    script: Mutex<VecDeque<Reply>>,
    default: Reply,
    seen: Mutex<Vec<Seen>>,
    count: watch::Sender<usize>,
    current: AtomicUsize,
    max: AtomicUsize,
}

/// A fake destination on 127.0.0.1:0. Answers the scripted replies in order, then
/// `default`. Stopped by [`Sink::stop`] (or, less tidily, on drop).
pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Sink {
    pub async fn start(script: Vec<Reply>, default: Reply) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            script: Mutex::new(script.into()),
            default,
            seen: Mutex::new(Vec::new()),
            count: watch::channel(0).0,
            current: AtomicUsize::new(0),
            max: AtomicUsize::new(0),
        });
        let (stop, mut stopped) = oneshot::channel::<()>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            // Dropping the set at the end aborts every connection still open.
            let mut conns = JoinSet::new();
            loop {
                let stream = tokio::select! {
                    _ = &mut stopped => break,
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        // Out of descriptors, say: not a hot loop meanwhile.
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                };
                let st = st.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&st, req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Sink {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A sink that answers `status` to everything.
    pub async fn always(status: u16) -> Sink {
        Sink::start(Vec::new(), Reply::status(status)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits until at least `n` requests arrived; returns all seen so far.
    pub async fn wait_for(&self, n: usize) -> Vec<Seen> {
        let mut rx = self.state.count.subscribe();
        let r = tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n)).await;
        let seen = self.seen();
        assert!(
            r.is_ok(),
            "{} requests arrived within {WAIT:?}, wanted {n}",
            seen.len()
        );
        seen
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The most requests that were being answered at once.
    pub fn max_concurrent(&self) -> usize {
        self.state.max.load(Ordering::SeqCst)
    }

    /// Stops listening and closes every connection.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn answer(st: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let now = st.current.fetch_add(1, Ordering::SeqCst) + 1;
    st.max.fetch_max(now, Ordering::SeqCst);
    let reply = st
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| st.default.clone());
    st.seen.lock().unwrap().push(Seen {
        at: Instant::now(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        headers: parts.headers,
        body,
    });
    st.count.send_modify(|c| *c += 1);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    st.current.fetch_sub(1, Ordering::SeqCst);
    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
    *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap();
    for (k, v) in reply.headers {
        resp.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(&v).unwrap(),
        );
    }
    resp
}

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
    /// Starts a 200 answer promising a 100-byte body, sends 10 bytes of it, then holds the
    /// connection, sending nothing more (until the sink stops).
    Stall,
    /// Answers this status after this many milliseconds.
    Later(u16, u64),
    /// Answers this status once the sink is released ([`FaultSink::release`]); holds the
    /// answer until then (or until the sink stops). Released, it answers at once.
    Held(u16),
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
    /// Answered 2xx (a body cut off or stalled after the status too): the relay counts this
    /// as delivered.
    pub fn delivered(&self) -> bool {
        matches!(
            self.action,
            Action::Answer(s) | Action::Later(s, _) | Action::Held(s) if (200..300).contains(&s)
        ) || matches!(self.action, Action::Truncate | Action::Stall)
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
    /// Whether [`Action::Held`] answers may go.
    released: watch::Sender<bool>,
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
            released: watch::channel(false).0,
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

    /// Waits until `done` holds for the arrivals so far (checked now and at each arrival);
    /// false if `within` passed first.
    pub async fn wait_until(&self, done: impl Fn(&[Arrival]) -> bool, within: Duration) -> bool {
        let mut rx = self.state.count.subscribe();
        let state = self.state.clone();
        // An arrival is logged before the count moves: the check sees it.
        let reached = rx.wait_for(|_| done(&state.log.lock().unwrap()));
        let r = tokio::time::timeout(within, reached).await;
        r.is_ok_and(|r| r.is_ok())
    }

    /// Lets every [`Action::Held`] answer go, those waiting and those to come.
    pub fn release(&self) {
        self.state.released.send_replace(true);
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
            Action::Answer(status) | Action::Later(status, _) | Action::Held(status) => {
                if let Action::Later(_, ms) = action {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if let Action::Held(_) = action {
                    let mut released = state.released.subscribe();
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = released.wait_for(|r| *r) => {}
                    }
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
            Action::Truncate | Action::Stall => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"ok\":tru")
                    .await;
                let _ = s.flush().await;
                if action == Action::Stall {
                    stop.cancelled().await;
                }
                // A plain close (FIN): the partial answer reaches the client, then EOF.
                return;
            }
        }
    }
}
