//! The serde mirror of `routes.toml`: every key the contract names, nothing more.
//!
//! Unknown keys are rejected (`deny_unknown_fields`) so a typo can never silently disable a
//! check. String values keep their byte span (`Spanned`) so that `validate` can point at the
//! line and column of a bad value after `${VAR}` expansion. Nothing here interprets a value:
//! durations, CIDRs, URLs and JSONPaths are compiled in `validate`. No `Debug`: secrets are
//! plain strings here, and must never be printed.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A string value with its byte range in the file.
pub type Str = Spanned<String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: Option<Spanned<RawServer>>,
    pub store: Option<Spanned<RawStore>>,
    pub dedup: Option<Spanned<RawDedup>>,
    pub delivery: Option<Spanned<RawDelivery>>,
    #[serde(default)]
    pub sources: Vec<Spanned<RawSource>>,
    #[serde(default)]
    pub destinations: Vec<Spanned<RawDestination>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Str>,
    pub admin_listen: Option<Str>,
    pub max_body_bytes: Option<Spanned<i64>>,
    pub trusted_proxies: Option<Vec<Str>>,
    pub tls: Option<Spanned<RawTls>>,
    pub token_secret: Option<Str>,
    pub admin_token: Option<Str>,
    pub shutdown_grace: Option<Str>,
    pub read_timeout: Option<Str>,
    pub max_connections: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Str,
    pub key: Str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<Str>,
    pub path: Option<Str>,
    pub retain: Option<Str>,
    /// A string or a list of strings.
    pub url: Option<Spanned<toml::Value>>,
    pub prefix: Option<Str>,
    pub replicas: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDedup {
    pub window: Option<Str>,
}

/// `[delivery]` defaults; every key may be overridden per destination.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDelivery {
    pub timeout: Option<Str>,
    pub max_in_flight: Option<Spanned<i64>>,
    pub max_queue: Option<Spanned<i64>>,
    pub retry: Option<Spanned<RawRetry>>,
    pub rate: Option<Spanned<RawRate>>,
    pub breaker: Option<Spanned<RawBreaker>>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub failures: Option<Spanned<i64>>,
    pub cool_down: Option<Str>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub first: Option<Str>,
    pub factor: Option<Spanned<f64>>,
    pub max_delay: Option<Str>,
    pub give_up_after: Option<Str>,
    pub max_attempts: Option<Spanned<i64>>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    pub per_second: Option<Spanned<f64>>,
    pub burst: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub name: Str,
    pub path: Str,
    pub allow_ips: Option<Vec<Str>>,
    pub auth: Option<Spanned<RawAuth>>,
    pub event_id: Option<Vec<Str>>,
    pub decode_json: Option<Vec<Str>>,
}

/// Auth of a source. Internally tagged, so serde buffers it and its fields cannot carry
/// spans: problems inside point at the `auth` table.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum RawAuth {
    Header {
        header: String,
        value: String,
    },
    Oauth2 {
        clients: Vec<RawClient>,
        token_ttl: Option<String>,
    },
    StandardWebhooks {
        secret: String,
        tolerance: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    pub id: String,
    pub secret: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestination {
    pub name: Str,
    pub url: Str,
    pub headers: Option<BTreeMap<String, Str>>,
    pub sign: Option<Spanned<RawSign>>,
    pub timeout: Option<Str>,
    pub max_in_flight: Option<Spanned<i64>>,
    pub max_queue: Option<Spanned<i64>>,
    pub retry: Option<Spanned<RawRetry>>,
    pub rate: Option<Spanned<RawRate>>,
    pub breaker: Option<Spanned<RawBreaker>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSign {
    pub secret: Str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Str,
    pub source: Str,
    #[serde(rename = "match")]
    pub match_: Option<BTreeMap<String, Spanned<RawMatchValue>>>,
    pub filter: Option<Str>,
    pub to: Spanned<Vec<Str>>,
    pub reply: Option<Spanned<RawReply>>,
    pub order_by: Option<Vec<Str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum RawMatchValue {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReply {
    pub from: Str,
    pub timeout: Option<Str>,
    pub fallback: Option<Spanned<RawFallback>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    pub status: Option<Spanned<i64>>,
    pub body: Option<Str>,
    pub content_type: Option<Str>,
}
