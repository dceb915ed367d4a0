//! `[[sources]]` and their `auth`.

use std::collections::{HashMap, HashSet};

use http::HeaderName;
use toml::Spanned;

use super::defaults;
use super::Cx;
use crate::config::raw::*;
use crate::config::*;
use crate::event_id::IdPath;

impl Cx<'_> {
    pub(super) fn source(
        &mut self,
        i: usize,
        s: &Spanned<RawSource>,
        names: &mut HashSet<String>,
        paths: &mut HashMap<String, usize>,
    ) -> Source {
        let key = format!("sources[{i}]");
        let r = s.get_ref();
        let name = self.name(&r.name, &format!("{key}.name"), names, "source");
        // `None`: its problem (an unset variable) is said already.
        let path = self.string(&r.path, &format!("{key}.path"));
        // A path may hold a secret (a token in the URL a provider is given).
        self.expanded_a_secret();
        let problem = match path.as_deref() {
            None => None,
            Some(p) if !p.starts_with('/') || p.contains(['?', '#', ' ']) => Some(format!(
                "invalid path {p:?}: must start with '/' and have no query"
            )),
            Some(TOKEN_PATH) => Some(format!(
                "{TOKEN_PATH} is reserved for the OAuth2 token endpoint"
            )),
            Some(p) => paths
                .insert(p.to_string(), i)
                .map(|_| format!("duplicate path {p:?}: another source already uses it")),
        };
        if let Some(problem) = problem {
            self.err(Some(r.path.span()), &format!("{key}.path"), problem);
        }
        let path = path.unwrap_or_default();
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
            let k = format!("{key}.decode_json[{j}]");
            let Some(text) = self.string(f, &k) else {
                continue;
            };
            // A JSONPath here would silently never decode anything.
            if text.is_empty() || text == "$" || text.starts_with("$.") || text.starts_with("$[") {
                self.err(
                    Some(f.span()),
                    &k,
                    format!(
                        "{text:?} is not a top-level field name (write \"data\", not \"$.data\")"
                    ),
                );
                continue;
            }
            decode_json.push(text);
        }
        Source {
            name,
            path,
            shown_path: r.path.get_ref().clone(),
            allow_ips,
            auth,
            event_id,
            decode_json,
            routes: Vec::new(),
            needs: crate::needed::Needed::nothing(),
            descends: false,
        }
    }

    pub(super) fn auth(&mut self, key: &str, a: &Spanned<RawAuth>) -> Auth {
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
                    Some(t) => self.duration_at_nonzero(
                        t,
                        span,
                        &format!("{key}.token_ttl"),
                        defaults::TOKEN_TTL,
                    ),
                    None => defaults::TOKEN_TTL,
                };
                Auth::OAuth2 {
                    clients: out,
                    token_ttl,
                }
            }
            RawAuth::StandardWebhooks { secret, tolerance } => {
                let s = self.secret_at(secret, span.clone(), &format!("{key}.secret"), true);
                let tolerance = match tolerance {
                    Some(t) => self.duration_at_nonzero(
                        t,
                        span,
                        &format!("{key}.tolerance"),
                        defaults::SIGNATURE_TOLERANCE,
                    ),
                    None => defaults::SIGNATURE_TOLERANCE,
                };
                match s {
                    Some(secret) => Auth::StandardWebhooks { secret, tolerance },
                    None => Auth::None,
                }
            }
        }
    }
}
