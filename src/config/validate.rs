//! `routes.toml` text → [`Config`], collecting every problem.
//!
//! A syntax or type error stops serde at its first problem; everything after that (values,
//! references between sections, `${VAR}` expansion) is checked in one pass that keeps going,
//! so one `check` run lists every problem. Each problem reads
//! `routes.toml:LINE:COL: <key path>: <reason>`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use toml::Spanned;

use super::raw::*;
use super::*;
use crate::event_id::IdPath;
use crate::rules::{Filter, Matcher};
use crate::signature::decode_secret;

/// One thing wrong with the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based line and column, when the problem has a place in the file.
    pub at: Option<(usize, usize)>,
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((l, c)) => write!(f, "{}:{l}:{c}: {}: {}", self.file, self.key, self.reason),
            None => write!(f, "{}: {}: {}", self.file, self.key, self.reason),
        }
    }
}

/// Every problem found in one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates the file, expanding `${VAR}` from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Problem {
            file: path.display().to_string(),
            at: None,
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        }])
    })?;
    parse(&text, path, &|name| std::env::var(name).ok())
}

/// Validates `text` as the contents of `file`; `env` looks up `${VAR}`s.
pub fn parse(
    text: &str,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut cx = Cx {
        file: file.display().to_string(),
        dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        text,
        env,
        problems: Vec::new(),
        client_ids: HashSet::new(),
    };
    let raw = match deserialize(text) {
        Ok(raw) => raw,
        Err((key, span, reason)) => {
            cx.err(span, &key, reason);
            return Err(ConfigErrors(cx.problems));
        }
    };
    let config = cx.build(raw);
    if cx.problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(cx.problems))
    }
}

type SerdeProblem = (String, Option<Range<usize>>, String);

fn deserialize(text: &str) -> Result<RawConfig, SerdeProblem> {
    toml::from_str(text).map_err(|e| {
        let key = e
            .span()
            .map(|s| key_path_at(text, s.start))
            .unwrap_or_else(|| "(top level)".into());
        (key, e.span(), e.message().to_string())
    })
}

/// The key path (`sources[1].auth`) of the line holding byte `offset`, for serde's errors,
/// which carry a span but no path (serde_path_to_error cannot see through `Spanned`).
fn key_path_at(text: &str, offset: usize) -> String {
    let mut table = String::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        let end = line_start + line.len();
        let t = line.trim();
        // A header line belongs to the table it opens (serde points a missing field there).
        let header = if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
            true
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
            true
        } else {
            false
        };
        if offset < end {
            let key = if header {
                ""
            } else {
                t.split('=').next().unwrap_or("").trim().trim_matches('"')
            };
            return match (table.is_empty(), key.is_empty()) {
                (true, true) => "(top level)".into(),
                (true, false) => key.to_string(),
                (false, true) => table,
                (false, false) => format!("{table}.{key}"),
            };
        }
        line_start = end;
    }
    "(end of file)".into()
}

struct Cx<'a> {
    file: String,
    dir: PathBuf,
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<Problem>,
    /// OAuth2 client ids seen so far: unique across sources, since a token names one.
    client_ids: HashSet<String>,
}

/// Defaults of `[delivery]`, after the file's own `[delivery]` is applied.
struct DeliveryDefaults {
    timeout: Duration,
    max_in_flight: usize,
    max_queue: u64,
    retry: RetryPolicy,
    rate: Rate,
    breaker: Breaker,
}

impl Cx<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
        (line, col)
    }

    fn err(&mut self, span: Option<Range<usize>>, key: &str, reason: impl Into<String>) {
        let at = span.map(|s| self.line_col(s.start));
        self.problems.push(Problem {
            file: self.file.clone(),
            at,
            key: key.to_string(),
            reason: reason.into(),
        });
    }

    /// Expands `${VAR}` in a string value.
    fn string(&mut self, s: &Str, key: &str) -> Option<String> {
        self.expand(s.get_ref(), s.span(), key)
    }

    /// Expands `${VAR}` (or `${VAR:-default}`) in `v`, found at `span`.
    fn expand(&mut self, v: &str, span: Range<usize>, key: &str) -> Option<String> {
        let mut out = String::with_capacity(v.len());
        let mut rest = v;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let Some(end) = after.find('}') else {
                self.err(Some(span.clone()), key, "unterminated ${ in value");
                return None;
            };
            // `${NAME:-default}` falls back to `default` when NAME is unset.
            let (name, default) = match after[..end].split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (&after[..end], None),
            };
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                self.err(
                    Some(span.clone()),
                    key,
                    format!("${{{name}}} is not a valid environment variable name"),
                );
                return None;
            }
            match (self.env)(name) {
                Some(val) => out.push_str(&val),
                None if default.is_some() => out.push_str(default.unwrap_or_default()),
                None => {
                    self.err(
                        Some(span.clone()),
                        key,
                        format!("environment variable {name} is not set"),
                    );
                    return None;
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Some(out)
    }

    fn duration(&mut self, s: &Option<Str>, key: &str, default: Duration) -> Duration {
        match s {
            Some(s) => self.duration_at(s.get_ref(), s.span(), key, default),
            None => default,
        }
    }

    fn duration_at(
        &mut self,
        v: &str,
        span: Range<usize>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(text) = self.expand(v, span.clone(), key) else {
            return default;
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) => d,
            Err(e) => {
                self.err(
                    Some(span),
                    key,
                    format!("invalid duration {text:?} ({e}); write e.g. \"250ms\", \"5s\", \"10m\", \"24h\""),
                );
                default
            }
        }
    }

    fn positive(&mut self, v: &Option<Spanned<i64>>, key: &str, default: u64) -> u64 {
        match v {
            None => default,
            Some(n) if *n.get_ref() > 0 => *n.get_ref() as u64,
            Some(n) => {
                self.err(Some(n.span()), key, "must be greater than 0");
                default
            }
        }
    }

    fn addr(&mut self, s: &Option<Str>, key: &str, default: &str) -> SocketAddr {
        let fallback: SocketAddr = default.parse().expect("default address");
        let Some(s) = s else { return fallback };
        let Some(text) = self.string(s, key) else {
            return fallback;
        };
        match text.parse() {
            Ok(a) => a,
            Err(_) => {
                self.err(
                    Some(s.span()),
                    key,
                    format!("invalid address {text:?}; write IP:PORT, e.g. \"0.0.0.0:8080\""),
                );
                fallback
            }
        }
    }

    fn cidrs(&mut self, list: &Option<Vec<Str>>, key: &str) -> Vec<IpNet> {
        let mut out = Vec::new();
        for (i, s) in list.iter().flatten().enumerate() {
            let k = format!("{key}[{i}]");
            let Some(text) = self.string(s, &k) else {
                continue;
            };
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => out.push(n.trunc()),
                Err(_) => self.err(
                    Some(s.span()),
                    &k,
                    format!("invalid CIDR {text:?}; write e.g. \"203.0.113.0/24\" or \"10.0.0.1\""),
                ),
            }
        }
        out
    }

    fn secret(&mut self, s: &Str, key: &str, signing: bool) -> Option<Secret> {
        self.secret_at(s.get_ref(), s.span(), key, signing)
    }

    /// A secret value; `signing` secrets may be `whsec_<base64>`.
    fn secret_at(
        &mut self,
        v: &str,
        span: Range<usize>,
        key: &str,
        signing: bool,
    ) -> Option<Secret> {
        let text = self.expand(v, span.clone(), key)?;
        let decoded = if signing {
            decode_secret(&text)
        } else if text.is_empty() {
            Err("the secret is empty".to_string())
        } else {
            Ok(text.into_bytes())
        };
        match decoded {
            Ok(b) => Some(Secret::new(b)),
            Err(e) => {
                self.err(Some(span), key, e);
                None
            }
        }
    }

    fn name(&mut self, s: &Str, key: &str, seen: &mut HashSet<String>, what: &str) -> String {
        let Some(name) = self.string(s, key) else {
            return String::new();
        };
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.err(
                Some(s.span()),
                key,
                format!("invalid {what} name {name:?}: use letters, digits, '-', '_' or '.'"),
            );
        } else if !seen.insert(name.clone()) {
            self.err(
                Some(s.span()),
                key,
                format!("duplicate {what} name {name:?}"),
            );
        }
        name
    }

    fn build(&mut self, raw: RawConfig) -> Config {
        let server = self.server(raw.server.as_ref());
        let store = self.store(raw.store.as_ref());
        let dedup_window = self.duration(
            &raw.dedup.as_ref().and_then(|d| d.get_ref().window.clone()),
            "dedup.window",
            Duration::from_secs(24 * 3600),
        );
        let defaults = self.delivery_defaults(raw.delivery.as_ref().map(|d| d.get_ref()));

        let mut names = HashSet::new();
        let mut destinations = Vec::new();
        for (i, d) in raw.destinations.iter().enumerate() {
            let dest = self.destination(i, d, &defaults, &mut names);
            destinations.push(Arc::new(dest));
        }
        let dest_index: HashMap<String, usize> = destinations
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.clone(), i))
            .collect();

        let mut names = HashSet::new();
        let mut paths = HashMap::new();
        let mut sources = Vec::new();
        let mut any_oauth = None;
        for (i, s) in raw.sources.iter().enumerate() {
            let src = self.source(i, s, &mut names, &mut paths);
            if matches!(src.auth, Auth::OAuth2 { .. }) && any_oauth.is_none() {
                any_oauth = Some(s.span());
            }
            sources.push(src);
        }
        if let (Some(span), None) = (any_oauth, &server.token_secret) {
            self.err(
                Some(span),
                "server.token_secret",
                "required because a source uses oauth2 auth (it signs the access tokens)",
            );
        }
        let src_index: HashMap<String, usize> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();

        let mut names = HashSet::new();
        let mut routes = Vec::new();
        for (i, r) in raw.routes.iter().enumerate() {
            if let Some(route) =
                self.route(i, r, &src_index, &dest_index, &destinations, &mut names)
            {
                sources[route.source].routes.push(routes.len());
                routes.push(Arc::new(route));
            }
        }

        Config {
            file: PathBuf::from(&self.file),
            server,
            store,
            dedup_window,
            sources: sources.into_iter().map(Arc::new).collect(),
            destinations,
            routes,
            by_path: paths,
        }
    }

    fn server(&mut self, raw: Option<&Spanned<RawServer>>) -> Server {
        let empty = RawServer {
            listen: None,
            admin_listen: None,
            max_body_bytes: None,
            trusted_proxies: None,
            tls: None,
            token_secret: None,
            admin_token: None,
            shutdown_grace: None,
            read_timeout: None,
            max_connections: None,
        };
        let r = raw.map(|s| s.get_ref()).unwrap_or(&empty);
        let tls = r.tls.as_ref().and_then(|t| {
            let t = t.get_ref();
            let cert = self.string(&t.cert, "server.tls.cert")?;
            let key = self.string(&t.key, "server.tls.key")?;
            let (cert, key) = (self.dir.join(cert), self.dir.join(key));
            match crate::tls::server_config(&cert, &key) {
                Ok(server_config) => Some(TlsFiles {
                    cert,
                    key,
                    server_config,
                }),
                Err(crate::tls::TlsProblem::Cert(m)) => {
                    self.err(Some(t.cert.span()), "server.tls.cert", m);
                    None
                }
                Err(crate::tls::TlsProblem::Key(m)) => {
                    self.err(Some(t.key.span()), "server.tls.key", m);
                    None
                }
            }
        });
        let admin_listen = self.addr(&r.admin_listen, "server.admin_listen", "127.0.0.1:9090");
        let admin_token = r
            .admin_token
            .as_ref()
            .and_then(|t| self.string(t, "server.admin_token"))
            .filter(|t| !t.is_empty())
            .map(Secret::new);
        if admin_token.is_none() && !admin_listen.ip().is_loopback() {
            self.err(
                r.admin_listen.as_ref().map(|a| a.span()),
                "server.admin_listen",
                format!(
                    "{admin_listen} is reachable from other hosts: set server.admin_token \
                     (e.g. \"${{HOOKRELAY_ADMIN_TOKEN}}\") or listen on a loopback address"
                ),
            );
        }
        Server {
            listen: self.addr(&r.listen, "server.listen", "0.0.0.0:8080"),
            admin_listen,
            admin_token,
            max_body_bytes: self.positive(&r.max_body_bytes, "server.max_body_bytes", 1 << 20),
            trusted_proxies: self.cidrs(&r.trusted_proxies, "server.trusted_proxies"),
            tls,
            token_secret: r
                .token_secret
                .as_ref()
                .and_then(|s| self.secret(s, "server.token_secret", false)),
            shutdown_grace: self.duration(
                &r.shutdown_grace,
                "server.shutdown_grace",
                Duration::from_secs(10),
            ),
            read_timeout: self.duration(
                &r.read_timeout,
                "server.read_timeout",
                Duration::from_secs(10),
            ),
            max_connections: self.positive(&r.max_connections, "server.max_connections", 10_000)
                as usize,
        }
    }

    fn store(&mut self, raw: Option<&Spanned<RawStore>>) -> StoreSettings {
        let mut out = StoreSettings {
            backend: Backend::Redb,
            path: self.dir.join("data"),
            retain: Duration::from_secs(7 * 24 * 3600),
            url: None,
        };
        let Some(r) = raw.map(|s| s.get_ref()) else {
            return out;
        };
        if let Some(b) = &r.backend {
            match self.string(b, "store.backend").as_deref() {
                Some("sled") => out.backend = Backend::Sled,
                Some("redb") => out.backend = Backend::Redb,
                Some("jetstream") => {
                    out.backend = Backend::Jetstream;
                    self.err(
                        Some(b.span()),
                        "store.backend",
                        "\"jetstream\" is not available in this build yet; use \"sled\" or \"redb\"",
                    );
                }
                Some(other) => self.err(
                    Some(b.span()),
                    "store.backend",
                    format!(
                        "unknown backend {other:?}; expected \"sled\", \"redb\" or \"jetstream\""
                    ),
                ),
                None => {}
            }
        }
        if let Some(p) = &r.path {
            if let Some(p) = self.string(p, "store.path") {
                out.path = self.dir.join(p);
            }
        }
        out.retain = self.duration(&r.retain, "store.retain", out.retain);
        if let Some(u) = &r.url {
            out.url = self.string(u, "store.url");
        }
        out
    }

    fn retry(&mut self, r: &RawRetry, key: &str, base: &RetryPolicy) -> RetryPolicy {
        let mut p = base.clone();
        p.first = self.duration(&r.first, &format!("{key}.first"), p.first);
        p.max_delay = self.duration(&r.max_delay, &format!("{key}.max_delay"), p.max_delay);
        p.give_up_after = self.duration(
            &r.give_up_after,
            &format!("{key}.give_up_after"),
            p.give_up_after,
        );
        if let Some(f) = &r.factor {
            if *f.get_ref() >= 1.0 && f.get_ref().is_finite() {
                p.factor = *f.get_ref();
            } else {
                self.err(
                    Some(f.span()),
                    &format!("{key}.factor"),
                    "must be a number >= 1.0",
                );
            }
        }
        if let Some(m) = &r.max_attempts {
            match u32::try_from(*m.get_ref()) {
                Ok(n) => p.max_attempts = n,
                Err(_) => self.err(
                    Some(m.span()),
                    &format!("{key}.max_attempts"),
                    "must be 0 (no limit) or a positive count",
                ),
            }
        }
        if p.first.is_zero() {
            self.err(
                r.first.as_ref().map(|s| s.span()),
                &format!("{key}.first"),
                "must be greater than 0",
            );
        }
        p
    }

    fn breaker(&mut self, r: &RawBreaker, key: &str, base: &Breaker) -> Breaker {
        let mut out = base.clone();
        if let Some(f) = &r.failures {
            match u32::try_from(*f.get_ref()) {
                Ok(n) => out.failures = n,
                Err(_) => self.err(
                    Some(f.span()),
                    &format!("{key}.failures"),
                    format!("must be a whole number from 0 (off) to {}", u32::MAX),
                ),
            }
        }
        out.cool_down = self.duration(&r.cool_down, &format!("{key}.cool_down"), out.cool_down);
        if out.cool_down.is_zero() {
            self.err(
                r.cool_down.as_ref().map(|s| s.span()),
                &format!("{key}.cool_down"),
                "must be greater than 0",
            );
        }
        out
    }

    fn rate(&mut self, r: &RawRate, key: &str, base: &Rate) -> Rate {
        let mut out = base.clone();
        if let Some(ps) = &r.per_second {
            if *ps.get_ref() > 0.0 && ps.get_ref().is_finite() {
                out.per_second = *ps.get_ref();
            } else {
                self.err(
                    Some(ps.span()),
                    &format!("{key}.per_second"),
                    "must be greater than 0",
                );
            }
        }
        if let Some(b) = &r.burst {
            let n = self.positive(&Some(b.clone()), &format!("{key}.burst"), 1);
            out.burst = u32::try_from(n).unwrap_or_else(|_| {
                self.err(
                    Some(b.span()),
                    &format!("{key}.burst"),
                    format!("must be at most {}", u32::MAX),
                );
                1
            });
        }
        out
    }

    fn delivery_defaults(&mut self, raw: Option<&RawDelivery>) -> DeliveryDefaults {
        let mut d = DeliveryDefaults {
            timeout: Duration::from_secs(10),
            max_in_flight: 32,
            max_queue: 100_000,
            retry: RetryPolicy {
                first: Duration::from_secs(1),
                factor: 2.0,
                max_delay: Duration::from_secs(600),
                give_up_after: Duration::from_secs(24 * 3600),
                max_attempts: 0,
            },
            rate: Rate {
                per_second: 100.0,
                burst: 100,
            },
            breaker: Breaker {
                failures: 0,
                cool_down: Duration::from_secs(30),
            },
        };
        let Some(r) = raw else { return d };
        if let Some(b) = &r.breaker {
            d.breaker = self.breaker(b.get_ref(), "delivery.breaker", &d.breaker);
        }
        d.timeout = self.duration(&r.timeout, "delivery.timeout", d.timeout);
        d.max_in_flight = self.positive(&r.max_in_flight, "delivery.max_in_flight", 32) as usize;
        d.max_queue = self.positive(&r.max_queue, "delivery.max_queue", d.max_queue);
        if let Some(rt) = &r.retry {
            d.retry = self.retry(rt.get_ref(), "delivery.retry", &d.retry);
        }
        if let Some(rate) = &r.rate {
            d.rate = self.rate(rate.get_ref(), "delivery.rate", &d.rate);
        }
        d
    }

    fn destination(
        &mut self,
        i: usize,
        d: &Spanned<RawDestination>,
        defaults: &DeliveryDefaults,
        names: &mut HashSet<String>,
    ) -> Destination {
        let key = format!("destinations[{i}]");
        let r = d.get_ref();
        let name = self.name(&r.name, &format!("{key}.name"), names, "destination");
        let url = match self.string(&r.url, &format!("{key}.url")) {
            Some(text) => match text.parse::<Uri>() {
                Ok(u)
                    if matches!(u.scheme_str(), Some("http") | Some("https"))
                        && u.host().is_some_and(|h| !h.is_empty()) =>
                {
                    u
                }
                _ => {
                    self.err(
                        Some(r.url.span()),
                        &format!("{key}.url"),
                        // The text as written: an expanded ${VAR} may hold a credential.
                        format!(
                            "invalid URL {:?}: need http:// or https:// with a host",
                            r.url.get_ref()
                        ),
                    );
                    Uri::from_static("http://invalid.invalid/")
                }
            },
            None => Uri::from_static("http://invalid.invalid/"),
        };
        let mut headers = Vec::new();
        for (h, v) in r.headers.iter().flatten() {
            let k = format!("{key}.headers.{h}");
            let Some(h) = self.expand(h, v.span(), &k) else {
                continue;
            };
            let Ok(hn) = HeaderName::from_bytes(h.as_bytes()) else {
                self.err(Some(v.span()), &k, format!("invalid header name {h:?}"));
                continue;
            };
            let Some(val) = self.string(v, &k) else {
                continue;
            };
            match HeaderValue::from_str(&val) {
                Ok(mut hv) => {
                    hv.set_sensitive(true);
                    headers.push((hn, hv));
                }
                Err(_) => self.err(
                    Some(v.span()),
                    &k,
                    "invalid header value (control characters?)",
                ),
            }
        }
        let sign = r
            .sign
            .as_ref()
            .and_then(|s| self.secret(&s.get_ref().secret, &format!("{key}.sign.secret"), true));
        let retry = match &r.retry {
            Some(rt) => self.retry(rt.get_ref(), &format!("{key}.retry"), &defaults.retry),
            None => defaults.retry.clone(),
        };
        let rate = match &r.rate {
            Some(rt) => self.rate(rt.get_ref(), &format!("{key}.rate"), &defaults.rate),
            None => defaults.rate.clone(),
        };
        let breaker = match &r.breaker {
            Some(b) => self.breaker(b.get_ref(), &format!("{key}.breaker"), &defaults.breaker),
            None => defaults.breaker.clone(),
        };
        Destination {
            name,
            url,
            headers,
            sign,
            timeout: self.duration(&r.timeout, &format!("{key}.timeout"), defaults.timeout),
            max_in_flight: self.positive(
                &r.max_in_flight,
                &format!("{key}.max_in_flight"),
                defaults.max_in_flight as u64,
            ) as usize,
            max_queue: self.positive(
                &r.max_queue,
                &format!("{key}.max_queue"),
                defaults.max_queue,
            ),
            retry,
            rate,
            breaker,
        }
    }

    fn source(
        &mut self,
        i: usize,
        s: &Spanned<RawSource>,
        names: &mut HashSet<String>,
        paths: &mut HashMap<String, usize>,
    ) -> Source {
        let key = format!("sources[{i}]");
        let r = s.get_ref();
        let name = self.name(&r.name, &format!("{key}.name"), names, "source");
        let path = self
            .string(&r.path, &format!("{key}.path"))
            .unwrap_or_default();
        if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
            self.err(
                Some(r.path.span()),
                &format!("{key}.path"),
                format!("invalid path {path:?}: must start with '/' and have no query"),
            );
        } else if path == TOKEN_PATH {
            self.err(
                Some(r.path.span()),
                &format!("{key}.path"),
                format!("{path} is reserved for the OAuth2 token endpoint"),
            );
        } else if paths.insert(path.clone(), i).is_some() {
            self.err(
                Some(r.path.span()),
                &format!("{key}.path"),
                format!("duplicate path {path:?}: another source already uses it"),
            );
        }
        let allow_ips = self.cidrs(&r.allow_ips, &format!("{key}.allow_ips"));
        let auth = match &r.auth {
            None => Auth::None,
            Some(a) => self.auth(&format!("{key}.auth"), a),
        };
        let mut event_id = Vec::new();
        for (j, p) in r.event_id.iter().flatten().enumerate() {
            let k = format!("{key}.event_id[{j}]");
            let Some(text) = self.string(p, &k) else {
                continue;
            };
            match IdPath::compile(&text) {
                Ok(ip) => event_id.push(ip),
                Err(e) => self.err(
                    Some(p.span()),
                    &k,
                    format!("invalid JSONPath {text:?}: {e}"),
                ),
            }
        }
        let mut decode_json = Vec::new();
        for (j, f) in r.decode_json.iter().flatten().enumerate() {
            if let Some(text) = self.string(f, &format!("{key}.decode_json[{j}]")) {
                decode_json.push(text);
            }
        }
        Source {
            name,
            path,
            allow_ips,
            auth,
            event_id,
            decode_json,
            routes: Vec::new(),
        }
    }

    fn auth(&mut self, key: &str, a: &Spanned<RawAuth>) -> Auth {
        let span = a.span();
        match a.get_ref() {
            RawAuth::Header { header, value } => {
                let hk = format!("{key}.header");
                let name = self.expand(header, span.clone(), &hk).and_then(|h| {
                    HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| {
                            self.err(
                                Some(span.clone()),
                                &hk,
                                format!("invalid header name {h:?}"),
                            )
                        })
                        .ok()
                });
                let value = self.secret_at(value, span.clone(), &format!("{key}.value"), false);
                match (name, value) {
                    (Some(header), Some(value)) => Auth::Header { header, value },
                    _ => Auth::None,
                }
            }
            RawAuth::Oauth2 { clients, token_ttl } => {
                let mut out = Vec::new();
                for (i, c) in clients.iter().enumerate() {
                    let ck = format!("{key}.clients[{i}]");
                    let Some(id) = self.expand(&c.id, span.clone(), &format!("{ck}.id")) else {
                        continue;
                    };
                    if id.is_empty() || !self.client_ids.insert(id.clone()) {
                        self.err(
                            Some(span.clone()),
                            &format!("{ck}.id"),
                            format!("client id {id:?} is empty or used twice (ids are unique across sources)"),
                        );
                    }
                    let secret =
                        self.secret_at(&c.secret, span.clone(), &format!("{ck}.secret"), false);
                    if let Some(secret) = secret {
                        out.push(Client { id, secret });
                    }
                }
                if clients.is_empty() {
                    self.err(
                        Some(span.clone()),
                        &format!("{key}.clients"),
                        "list at least one client",
                    );
                }
                let token_ttl = match token_ttl {
                    Some(t) => self.duration_at(
                        t,
                        span,
                        &format!("{key}.token_ttl"),
                        Duration::from_secs(3600),
                    ),
                    None => Duration::from_secs(3600),
                };
                Auth::OAuth2 {
                    clients: out,
                    token_ttl,
                }
            }
            RawAuth::StandardWebhooks { secret, tolerance } => {
                let s = self.secret_at(secret, span.clone(), &format!("{key}.secret"), true);
                let tolerance = match tolerance {
                    Some(t) => self.duration_at(
                        t,
                        span,
                        &format!("{key}.tolerance"),
                        Duration::from_secs(300),
                    ),
                    None => Duration::from_secs(300),
                };
                match s {
                    Some(secret) => Auth::StandardWebhooks { secret, tolerance },
                    None => Auth::None,
                }
            }
        }
    }

    fn route(
        &mut self,
        i: usize,
        r: &Spanned<RawRoute>,
        src_index: &HashMap<String, usize>,
        dest_index: &HashMap<String, usize>,
        destinations: &[Arc<Destination>],
        names: &mut HashSet<String>,
    ) -> Option<Route> {
        let key = format!("routes[{i}]");
        let raw = r.get_ref();
        let name = self.name(&raw.name, &format!("{key}.name"), names, "route");
        let source_name = self
            .string(&raw.source, &format!("{key}.source"))
            .unwrap_or_default();
        let source = src_index.get(&source_name).copied();
        if source.is_none() {
            let known: Vec<&str> = src_index.keys().map(String::as_str).collect();
            self.err(
                Some(raw.source.span()),
                &format!("{key}.source"),
                format!("unknown source {source_name:?} (known: {})", sorted(known)),
            );
        }
        let mut matchers = Vec::new();
        for (field, v) in raw.match_.iter().flatten() {
            let mk = format!("{key}.match.{field}");
            let Some(field) = self.expand(field, v.span(), &mk) else {
                continue;
            };
            let listed = match v.get_ref() {
                RawMatchValue::One(s) => std::slice::from_ref(s),
                RawMatchValue::Many(list) => list.as_slice(),
            };
            let values: Vec<String> = listed
                .iter()
                .filter_map(|x| self.expand(x, v.span(), &mk))
                .collect();
            if values.is_empty() {
                self.err(
                    Some(v.span()),
                    &mk,
                    "an empty list matches nothing; list values or use \"*\"",
                );
            }
            matchers.push(Matcher::new(field, values));
        }
        let filter = raw.filter.as_ref().and_then(|f| {
            let k = format!("{key}.filter");
            let text = self.string(f, &k)?;
            Filter::compile(&text)
                .map_err(|e| {
                    self.err(
                        Some(f.span()),
                        &k,
                        format!("invalid filter expression {text:?}: {e}"),
                    )
                })
                .ok()
        });
        let mut to = Vec::new();
        let mut to_names = Vec::new();
        for (j, d) in raw.to.get_ref().iter().enumerate() {
            let Some(dname) = self.string(d, &format!("{key}.to[{j}]")) else {
                continue;
            };
            to_names.push(dname.clone());
            match dest_index.get(&dname) {
                Some(&di) if !to.contains(&di) => to.push(di),
                Some(_) => {}
                None => {
                    let known: Vec<&str> = dest_index.keys().map(String::as_str).collect();
                    self.err(
                        Some(d.span()),
                        &format!("{key}.to[{j}]"),
                        format!("unknown destination {dname:?} (known: {})", sorted(known)),
                    );
                }
            }
        }
        if raw.to.get_ref().is_empty() {
            self.err(
                Some(raw.to.span()),
                &format!("{key}.to"),
                "name at least one destination",
            );
        }
        let reply = raw.reply.as_ref().and_then(|rp| {
            let rk = format!("{key}.reply");
            let rp = rp.get_ref();
            let from = self.string(&rp.from, &format!("{rk}.from"))?;
            let Some(&di) = dest_index.get(&from) else {
                self.err(
                    Some(rp.from.span()),
                    &format!("{rk}.from"),
                    format!("unknown destination {from:?}"),
                );
                return None;
            };
            if !to_names.contains(&from) {
                self.err(
                    Some(rp.from.span()),
                    &format!("{rk}.from"),
                    format!("{from:?} must also be listed in {key}.to"),
                );
            }
            let timeout = self.duration(
                &rp.timeout,
                &format!("{rk}.timeout"),
                destinations[di].timeout,
            );
            let fb = rp.fallback.as_ref().map(|f| f.get_ref());
            let status = match fb.and_then(|f| f.status.as_ref()) {
                None => 502,
                Some(s) => match u16::try_from(*s.get_ref()) {
                    Ok(c) if (200..=599).contains(&c) => c,
                    _ => {
                        self.err(
                            Some(s.span()),
                            &format!("{rk}.fallback.status"),
                            "must be an HTTP status from 200 to 599",
                        );
                        502
                    }
                },
            };
            let body = match fb.and_then(|f| f.body.as_ref()) {
                Some(b) => self
                    .string(b, &format!("{rk}.fallback.body"))
                    .unwrap_or_default(),
                None => r#"{"error":"reply_unavailable","message":"the reply destination did not answer"}"#.into(),
            };
            let content_type = match fb.and_then(|f| f.content_type.as_ref()) {
                Some(c) => self
                    .string(c, &format!("{rk}.fallback.content_type"))
                    .unwrap_or_default(),
                None => "application/json".into(),
            };
            Some(Reply {
                from: di,
                timeout,
                fallback_status: status,
                fallback_body: body,
                fallback_content_type: content_type,
            })
        });
        let mut order_by = Vec::new();
        for (j, p) in raw.order_by.iter().flatten().enumerate() {
            let k = format!("{key}.order_by[{j}]");
            let Some(text) = self.string(p, &k) else {
                continue;
            };
            match IdPath::compile(&text) {
                Ok(ip) => order_by.push(ip),
                Err(e) => self.err(
                    Some(p.span()),
                    &k,
                    format!("invalid JSONPath {text:?}: {e}"),
                ),
            }
        }
        Some(Route {
            name,
            source: source?,
            matchers,
            filter,
            to,
            reply,
            order_by,
        })
    }
}

fn sorted(mut v: Vec<&str>) -> String {
    v.sort_unstable();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
