//! Support for `tests/delivery.rs`: scripted sinks (small hyper servers that record every
//! request and answer from a script) and an in-process relay on a temporary directory.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// How long any wait in these tests may take before it fails.
pub const WAIT: Duration = Duration::from_secs(15);

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
                        Err(_) => continue,
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

/// Starts a relay on `toml`, written to `<dir>/routes.toml` (so the store is `<dir>/data`).
pub async fn start_relay(dir: &Path, toml: &str) -> hookrelay::Relay {
    let file = dir.join("routes.toml");
    std::fs::write(&file, toml).unwrap();
    let config =
        hookrelay::config::parse(toml, &file, &|_| None).unwrap_or_else(|e| panic!("config: {e}"));
    hookrelay::Relay::start(config).await.unwrap()
}

/// Stops a relay and waits until it has.
pub async fn stop_relay(relay: hookrelay::Relay) {
    relay.shutdown();
    tokio::time::timeout(WAIT, relay.stopped())
        .await
        .expect("relay stops in time")
        .unwrap();
}

/// POSTs `body` to the relay's ingress; returns the status and the JSON answer.
pub async fn post(
    relay: &hookrelay::Relay,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::post(format!("http://{}{}", relay.ingress, path))
        .header("content-type", content_type)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("ingress answers in time")
        .expect("ingress request");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// Waits (bounded, checking every 10 ms) until the delivery of event `id` to `dest` is in
/// `state`; returns it.
pub async fn wait_state(
    relay: &hookrelay::Relay,
    id: &str,
    dest: &str,
    state: hookrelay::store::DeliveryState,
) -> hookrelay::store::Delivery {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        let views = relay.app.store.lookup(id).await.unwrap();
        last = views
            .iter()
            .flat_map(|v| v.deliveries.iter())
            .find(|d| d.destination == dest)
            .cloned();
        if let Some(d) = &last {
            if d.state == state {
                return d.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("delivery of {id} to {dest} not {state:?} within {WAIT:?}: {last:?}");
}
