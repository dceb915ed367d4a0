//! `[server]` and `[store]`.

use toml::Spanned;

use super::defaults;
use super::Cx;
use crate::config::raw::*;
use crate::config::*;

/// The shortest `server.token_secret`, in bytes.
const TOKEN_SECRET_MIN: usize = 32;

impl Cx<'_> {
    pub(super) fn server(&mut self, raw: Option<&Spanned<RawServer>>) -> Server {
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
            // PEM text where a path goes (a platform's variable holding the key itself):
            // said without quoting it, as a path is quoted below.
            for (text, value, name) in [
                (&cert, &t.cert, "server.tls.cert"),
                (&key, &t.key, "server.tls.key"),
            ] {
                if text.trim_start().starts_with("-----BEGIN") {
                    self.err(
                        Some(value.span()),
                        name,
                        "holds PEM text, not the path of a PEM file",
                    );
                    return None;
                }
            }
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
        let admin_listen = self.addr(
            &r.admin_listen,
            "server.admin_listen",
            defaults::ADMIN_LISTEN,
        );
        let admin_token = r
            .admin_token
            .as_ref()
            .and_then(|t| {
                let token = self.string(t, "server.admin_token");
                self.expanded_a_secret();
                // A default written in the file is for anyone who reads it: fine on this
                // host, not once the admin API is reachable from others. (An empty one
                // leaves the API open: refused below, for the same reason.)
                let vars = std::mem::take(&mut self.defaulted);
                let published = token.as_ref().is_some_and(|t| !t.is_empty());
                if published && !vars.is_empty() && !admin_listen.ip().is_loopback() {
                    self.err(
                        Some(t.span()),
                        "server.admin_token",
                        format!(
                            "{} not set, so the admin token is the default written in the file, \
                             while server.admin_listen {admin_listen} is reachable from other \
                             hosts: set {}",
                            vars.join(", "),
                            vars.join(" and ")
                        ),
                    );
                }
                token
            })
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
        let listen = self.addr(&r.listen, "server.listen", defaults::LISTEN);
        // One port for both (a wildcard address covers every other): serve would fail to
        // bind the second, "address in use", as if another process held it.
        let overlap = |a: std::net::IpAddr, b: std::net::IpAddr| {
            a == b || a.is_unspecified() || b.is_unspecified()
        };
        if listen.port() != 0
            && listen.port() == admin_listen.port()
            && overlap(listen.ip(), admin_listen.ip())
        {
            self.err(
                r.admin_listen.as_ref().map(|a| a.span()),
                "server.admin_listen",
                format!("{admin_listen} takes the port of server.listen {listen}: give the admin API a port of its own"),
            );
        }
        Server {
            listen,
            admin_listen,
            admin_token,
            max_body_bytes: self.body_limit(&r.max_body_bytes),
            trusted_proxies: self.cidrs(&r.trusted_proxies, "server.trusted_proxies"),
            tls,
            token_secret: r.token_secret.as_ref().and_then(|s| self.token_secret(s)),
            shutdown_grace: self.duration(
                &r.shutdown_grace,
                "server.shutdown_grace",
                defaults::SHUTDOWN_GRACE,
            ),
            read_timeout: self.duration_nonzero(
                &r.read_timeout,
                "server.read_timeout",
                defaults::READ_TIMEOUT,
            ),
            max_connections: self.at_once(
                &r.max_connections,
                "server.max_connections",
                defaults::MAX_CONNECTIONS,
            ),
        }
    }

    /// `server.max_body_bytes`: at most the memory all bodies being read may take at once
    /// (a larger body could never be read whole beside any other).
    fn body_limit(&mut self, v: &Option<Spanned<i64>>) -> u64 {
        let key = "server.max_body_bytes";
        let n = self.positive(v, key, defaults::MAX_BODY_BYTES);
        let most = crate::ingress::body_memory::BUDGET;
        if n > most {
            let span = v.as_ref().map(|n| n.span());
            self.err(
                span,
                key,
                format!("must be at most {most} (64 MiB, what all bodies being read may take)"),
            );
            return defaults::MAX_BODY_BYTES;
        }
        n
    }

    pub(super) fn store(&mut self, raw: Option<&Spanned<RawStore>>) -> StoreSettings {
        let mut out = StoreSettings {
            backend: defaults::BACKEND,
            path: self.dir.join(defaults::STORE_PATH),
            retain: defaults::RETAIN,
            url: Vec::new(),
            prefix: defaults::JETSTREAM_PREFIX.to_string(),
            replicas: defaults::JETSTREAM_REPLICAS,
        };
        let Some(r) = raw.map(|s| s.get_ref()) else {
            return out;
        };
        if let Some(b) = &r.backend {
            match self.string(b, "store.backend").as_deref() {
                Some("sled") => out.backend = Backend::Sled,
                Some("redb") => out.backend = Backend::Redb,
                Some("jetstream") => out.backend = Backend::Jetstream,
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
            match self.string(p, "store.path") {
                // Joined to the config's directory, it would put the store's files loose
                // beside routes.toml.
                Some(text) if text.is_empty() => self.err(
                    Some(p.span()),
                    "store.path",
                    "is empty; name the store's directory (default \"data\")",
                ),
                Some(text) => out.path = self.dir.join(text),
                None => {}
            }
        }
        out.retain = self.duration(&r.retain, "store.retain", out.retain);
        self.jetstream(r, &mut out);
        out
    }

    /// `url`, `prefix` and `replicas`: required / allowed only with `backend = "jetstream"`.
    fn jetstream(&mut self, r: &RawStore, out: &mut StoreSettings) {
        let js = out.backend == Backend::Jetstream;
        let only = "allowed only with backend = \"jetstream\"";
        let mut urls: Vec<(String, Str)> = Vec::new();
        if let Some(u) = &r.url {
            let span = u.span();
            let at = |v: &str| Spanned::new(span.clone(), v.to_string());
            match u.get_ref() {
                toml::Value::String(v) => urls.push(("store.url".into(), at(v))),
                toml::Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        match item {
                            toml::Value::String(v) => urls.push((format!("store.url[{i}]"), at(v))),
                            _ => self.err(
                                Some(span.clone()),
                                &format!("store.url[{i}]"),
                                "must be a string",
                            ),
                        }
                    }
                }
                _ => self.err(
                    Some(span),
                    "store.url",
                    "must be a string or a list of strings",
                ),
            }
        }
        for (key, u) in &urls {
            if !js {
                self.err(Some(u.span()), key, only);
                continue;
            }
            let Some(v) = self.string(u, key) else {
                continue;
            };
            // User info (`user:password@`) is a credential.
            if v.contains('@') {
                self.expanded_a_secret();
            }
            let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|s| v.starts_with(s))
                || !v.contains("://");
            if v.trim().is_empty() || !scheme_ok {
                self.err(
                    Some(u.span()),
                    key,
                    format!(
                        "{:?} is not a NATS server address (expected nats://host:port)",
                        crate::config::shown_url_text(u.get_ref())
                    ),
                );
                continue;
            }
            out.url.push(v);
        }
        if js && urls.is_empty() {
            let span = r.backend.as_ref().map(|b| b.span());
            self.err(
                span,
                "store.url",
                "required with backend = \"jetstream\": the NATS server(s) to use, e.g. url = \"nats://127.0.0.1:4222\"",
            );
        }
        if let Some(p) = &r.prefix {
            if !js {
                self.err(Some(p.span()), "store.prefix", only);
            } else if let Some(v) = self.string(p, "store.prefix") {
                if v.is_empty()
                    || v.len() > 32
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    self.err(
                        Some(p.span()),
                        "store.prefix",
                        "must be 1 to 32 letters, digits, '_' or '-' (it starts stream and consumer names)",
                    );
                } else {
                    out.prefix = v;
                }
            }
        }
        if let Some(n) = &r.replicas {
            if !js {
                self.err(Some(n.span()), "store.replicas", only);
            } else if !(1..=5).contains(n.get_ref()) {
                self.err(
                    Some(n.span()),
                    "store.replicas",
                    "must be 1 to 5 (JetStream's limit); 3 in a 3-server cluster",
                );
            } else {
                out.replicas = *n.get_ref() as usize;
            }
        }
    }

    /// `server.token_secret`: at least [`TOKEN_SECRET_MIN`] bytes. A token shows what it
    /// signs, so from one token a short key can be found by trying keys (RFC 7518 §3.2
    /// asks for a key as long as the hash, 32 bytes for HMAC-SHA256).
    fn token_secret(&mut self, s: &Str) -> Option<Secret> {
        let secret = self.secret(s, "server.token_secret", false)?;
        let len = secret.expose().len();
        if len < TOKEN_SECRET_MIN {
            self.err(
                Some(s.span()),
                "server.token_secret",
                format!(
                    "is {len} bytes: a token shows what it signs, so a key this short can be \
                     found from one token by trying keys; give it {TOKEN_SECRET_MIN} random \
                     bytes or more (e.g. `openssl rand -hex 32`)"
                ),
            );
            return None;
        }
        Some(secret)
    }
}
