//! The compiled configuration: what `routes.toml` means once validated.
//!
//! Everything a request needs is compiled here once, at load: match values, CIDRs, URLs,
//! JSONPaths, header names. The request path never parses configuration text. Secrets are
//! held in [`Secret`], whose `Debug` never shows the value.
//!
//! `raw` mirrors the file for serde, `validate` turns it into a [`Config`] collecting every
//! problem, `table` prints the routing table for `check` and reload answers.

mod live;
mod raw;
mod restart;
mod table;
mod validate;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;

use crate::rules::{Filter, Matcher};

pub use live::Live;
pub use restart::needs_restart;
pub use table::{routing_table, shown_url, shown_url_text};
pub use validate::{load, parse, ConfigErrors, Problem};

/// Where OAuth2 clients fetch tokens (on the ingress port); no source may use it.
pub const TOKEN_PATH: &str = "/oauth/token";

/// A secret string (auth value, client secret, signing key). `Debug`/`Display` print `***`.
/// Its SHA-256 is kept beside it, for [`Secret::matches`] on every request.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    bytes: Arc<[u8]>,
    digest: [u8; 32],
}

impl Secret {
    pub fn new(v: impl AsRef<[u8]>) -> Self {
        use sha2::{Digest, Sha256};
        Secret {
            bytes: Arc::from(v.as_ref()),
            digest: Sha256::digest(v.as_ref()).into(),
        }
    }
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }
    /// Whether `given` is this secret, in constant time, its length included: the SHA-256
    /// digests of both are compared (comparing the bytes stops at once when the lengths
    /// differ, which tells a prober the secret's length).
    pub fn matches(&self, given: &[u8]) -> bool {
        use sha2::{Digest, Sha256};
        use subtle::ConstantTimeEq;
        bool::from(self.digest.ct_eq(Sha256::digest(given).as_slice()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug)]
pub struct Config {
    /// The file this was loaded from (for reload and messages).
    pub file: PathBuf,
    pub server: Server,
    pub store: StoreSettings,
    pub dedup_window: Duration,
    pub sources: Vec<Arc<Source>>,
    pub destinations: Vec<Arc<Destination>>,
    pub routes: Vec<Arc<Route>>,
    /// Source index by ingress path.
    pub by_path: HashMap<String, usize>,
}

impl Config {
    pub fn destination(&self, name: &str) -> Option<&Arc<Destination>> {
        self.destinations.iter().find(|d| d.name == name)
    }
    /// Whether a source uses oauth2: only then is `POST /oauth/token` served.
    pub fn issues_tokens(&self) -> bool {
        self.sources
            .iter()
            .any(|s| matches!(s.auth, Auth::OAuth2 { .. }))
    }
    pub fn source_for_path(&self, path: &str) -> Option<&Arc<Source>> {
        self.by_path.get(path).map(|&i| &self.sources[i])
    }
}

#[derive(Debug)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: u64,
    pub trusted_proxies: Vec<IpNet>,
    pub tls: Option<TlsFiles>,
    pub token_secret: Option<Secret>,
    /// Bearer token of the admin API and console; `None` (unset or empty) = open.
    pub admin_token: Option<Secret>,
    pub shutdown_grace: Duration,
    /// How long a client may take to send its headers, and then its body.
    pub read_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Built (files read and checked) at load.
    pub server_config: Arc<rustls::ServerConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Sled,
    Redb,
    Jetstream,
}

/// `Debug` shows the NATS addresses without their credentials.
pub struct StoreSettings {
    pub backend: Backend,
    pub path: PathBuf,
    pub retain: Duration,
    /// JetStream only: the NATS servers to connect to (any of them).
    pub url: Vec<String>,
    /// JetStream only: what the names of its stream, consumers and buckets start with.
    pub prefix: String,
    /// JetStream only: stream replicas.
    pub replicas: usize,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url: Vec<String> = self.url.iter().map(|u| shown_url_text(u)).collect();
        f.debug_struct("StoreSettings")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("retain", &self.retain)
            .field("url", &url)
            .field("prefix", &self.prefix)
            .field("replicas", &self.replicas)
            .finish()
    }
}

#[derive(Debug)]
pub struct Source {
    pub name: String,
    pub path: String,
    /// `path` as the file writes it: what the routing table shows (a `${VAR}` in it may
    /// hold a secret, as in a secret URL).
    pub shown_path: String,
    /// Empty = any address.
    pub allow_ips: Vec<IpNet>,
    pub auth: Auth,
    pub event_id: Vec<crate::event_id::IdPath>,
    pub decode_json: Vec<String>,
    /// Indexes into `Config::routes` of the routes whose source this is, in file order.
    pub routes: Vec<usize>,
    /// What of an event those routes and this source's own rules read.
    pub needs: crate::needed::Needed,
    /// Whether one of those rules searches descendants (`..`), or has a wildcard (`*`) or
    /// a filter selector (`?`) that may: its events are checked against the cost of that
    /// search first.
    pub descends: bool,
}

#[derive(Debug)]
pub enum Auth {
    None,
    Header {
        header: HeaderName,
        value: Secret,
    },
    OAuth2 {
        clients: Vec<Client>,
        token_ttl: Duration,
    },
    StandardWebhooks {
        secret: Secret,
        tolerance: Duration,
    },
}

#[derive(Debug)]
pub struct Client {
    pub id: String,
    pub secret: Secret,
}

#[derive(Debug)]
pub struct Destination {
    pub name: String,
    pub url: Uri,
    /// The URL as the routing table and the admin API show it: without user info or query,
    /// and as the file writes it when it has `${VAR}`s (a chat service's incoming webhook
    /// holds its credential in the path).
    pub shown_url: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub sign: Option<Secret>,
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub max_queue: u64,
    pub retry: RetryPolicy,
    pub rate: Rate,
    pub breaker: Breaker,
}

/// `breaker`: after `failures` consecutive failed attempts nothing is sent for `cool_down`,
/// then one attempt probes. `failures = 0`: off.
#[derive(Debug, Clone, PartialEq)]
pub struct Breaker {
    pub failures: u32,
    pub cool_down: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub first: Duration,
    pub factor: f64,
    pub max_delay: Duration,
    pub give_up_after: Duration,
    /// 0 = no count limit.
    pub max_attempts: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub source: usize,
    pub matchers: Vec<Matcher>,
    pub filter: Option<Filter>,
    /// `match` and `filter` as the file writes them (`${VAR}`s not filled in), or "every
    /// event": what the routing table shows.
    pub shown_when: String,
    /// Indexes into `Config::destinations`.
    pub to: Vec<usize>,
    pub reply: Option<Reply>,
    /// `order_by`: deliveries sharing the joined values go one at a time, in accept order.
    pub order_by: Vec<crate::event_id::IdPath>,
}

#[derive(Debug)]
pub struct Reply {
    /// Index into `Config::destinations`.
    pub from: usize,
    pub timeout: Duration,
    pub fallback_status: u16,
    pub fallback_body: String,
    pub fallback_content_type: String,
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn a_secret_matches_only_itself() {
        let s = Secret::new("s3cret-value");
        assert!(s.matches(b"s3cret-value"));
        assert!(!s.matches(b"s3cret-valuE"));
        assert!(!s.matches(b"s3cret"), "a prefix");
        assert!(!s.matches(b"s3cret-value-and-more"), "longer");
        assert!(!s.matches(b""));
        assert!(Secret::new("").matches(b""));
    }
}
