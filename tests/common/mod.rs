//! Shared test support: fixtures, an in-process relay on 127.0.0.1:0, and a small client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tempfile::TempDir;

/// A payload from `examples/payloads/`, e.g. `fixture("8x8/voice-call-status.json")`.
pub fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/payloads")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A relay started in this process on a temporary store; stopped by `stop` or on drop.
pub struct TestRelay {
    pub relay: Option<hookrelay::Relay>,
    pub dir: Option<TempDir>,
}

impl TestRelay {
    /// Starts the relay on `toml` (written to `<tmp>/routes.toml`), with `env` for `${VAR}`.
    pub async fn start_env(toml: &str, env: &[(&str, &str)]) -> TestRelay {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, toml, env).await
    }

    pub async fn start(toml: &str) -> TestRelay {
        Self::start_env(toml, &[]).await
    }

    pub async fn start_in(dir: TempDir, toml: &str, env: &[(&str, &str)]) -> TestRelay {
        let file = dir.path().join("routes.toml");
        std::fs::write(&file, toml).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let mut config = hookrelay::config::parse(toml, &file, &lookup)
            .unwrap_or_else(|e| panic!("config: {e}"));
        // Tests run in parallel: every relay gets its own admin port.
        config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
        let relay = hookrelay::Relay::start(config).await.unwrap();
        TestRelay {
            relay: Some(relay),
            dir: Some(dir),
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.relay.as_ref().unwrap().ingress
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.relay.as_ref().unwrap().admin, path)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    pub fn app(&self) -> &std::sync::Arc<hookrelay::app::App> {
        &self.relay.as_ref().unwrap().app
    }

    /// Stops the relay and waits for it; returns the directory for a restart.
    pub async fn stop(mut self) -> TempDir {
        let relay = self.relay.take().unwrap();
        relay.shutdown();
        relay.stopped().await.unwrap();
        self.dir.take().unwrap()
    }

    pub async fn post(&self, path: &str, body: &[u8]) -> Answer {
        send(Method::POST, &self.url(path), &[], body).await
    }

    pub async fn post_with(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        send(Method::POST, &self.url(path), headers, body).await
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(r) = &self.relay {
            r.shutdown();
        }
    }
}

/// An HTTP answer, body read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts the contract's error shape and kind; returns the message.
    pub fn error(&self, status: u16, kind: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "body: {:?}", self.body);
        let v = self.json();
        assert_eq!(v["error"], kind, "{v}");
        let msg = v["message"].as_str().expect("message").to_string();
        assert!(!msg.is_empty());
        assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
        msg
    }
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
    let resp = tokio::time::timeout(std::time::Duration::from_secs(20), client.request(req))
        .await
        .expect("answer within 20s")
        .expect("request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The path of the built binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hookrelay"))
}
