//! The relay in this process on a temporary store ([`TestRelay`], [`start_relay`]), waits
//! on its store, and the sample payloads and binary the tests use.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::Method;
use tempfile::TempDir;

use super::{send, Answer, WAIT};

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
        // Tests run in parallel: every relay gets its own admin port, in the file, so a
        // reload of it keeps the address.
        let toml = &with_own_admin_port(toml);
        std::fs::write(&file, toml).unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let config = hookrelay::config::parse(toml, &file, &lookup)
            .unwrap_or_else(|e| panic!("config: {e}"));
        let relay = started(config).await;
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
        tokio::time::timeout(WAIT, relay.stopped())
            .await
            .expect("the relay stopped in time")
            .unwrap();
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

/// The path of the built binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hookrelay"))
}

/// A relay started in this process, shut down when dropped (a test that fails midway
/// stops its relay too); [`stop_relay`] stops it and waits. Derefs to the relay.
pub struct RunningRelay(Option<hookrelay::Relay>);

impl RunningRelay {
    pub fn new(relay: hookrelay::Relay) -> RunningRelay {
        RunningRelay(Some(relay))
    }
}

impl std::ops::Deref for RunningRelay {
    type Target = hookrelay::Relay;
    fn deref(&self) -> &hookrelay::Relay {
        self.0.as_ref().expect("the relay")
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        if let Some(r) = &self.0 {
            r.shutdown();
        }
    }
}

/// Starts a relay on `toml`, written to `<dir>/routes.toml` (so the store is `<dir>/data`).
pub async fn start_relay(dir: &Path, toml: &str) -> RunningRelay {
    let file = dir.join("routes.toml");
    std::fs::write(&file, toml).unwrap();
    let config =
        hookrelay::config::parse(toml, &file, &|_| None).unwrap_or_else(|e| panic!("config: {e}"));
    RunningRelay::new(started(config).await)
}

/// The relay on `config`, started within two minutes (its start waits for its store for
/// as long as it takes: a JetStream that never answers would hold the test until CI's
/// deadline, naming nothing).
async fn started(config: hookrelay::config::Config) -> hookrelay::Relay {
    tokio::time::timeout(Duration::from_secs(120), hookrelay::Relay::start(config))
        .await
        .expect("the relay started within 2 minutes")
        .unwrap()
}

/// Stops a relay and waits (bounded) until it has.
pub async fn stop_relay(mut relay: RunningRelay) {
    let relay = relay.0.take().expect("the relay");
    relay.shutdown();
    tokio::time::timeout(WAIT, relay.stopped())
        .await
        .expect("relay stops in time")
        .unwrap();
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

/// `toml` with `admin_listen = "127.0.0.1:0"` (replacing the one it has, if any).
pub fn with_own_admin_port(toml: &str) -> String {
    const OWN: &str = "admin_listen = \"127.0.0.1:0\"";
    let mut lines: Vec<String> = toml
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("admin_listen") {
                OWN.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    if !lines.iter().any(|l| l == OWN) {
        match lines.iter().position(|l| l.trim() == "[server]") {
            Some(i) => lines.insert(i + 1, OWN.to_string()),
            None => lines.insert(0, format!("[server]\n{OWN}")),
        }
    }
    lines.join("\n") + "\n"
}
