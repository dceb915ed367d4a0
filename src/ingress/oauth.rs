//! `POST /oauth/token`: the OAuth2 client-credentials grant (RFC 6749 §4.4) that 8x8 calls
//! before each webhook of a source whose auth is `oauth2`.
//!
//! Client credentials come as HTTP Basic (id and secret form-urlencoded first, RFC 6749
//! §2.3.1) or as `client_id`/`client_secret` form fields, never both. Errors follow §5.2
//! (`invalid_request`, `invalid_client` with `WWW-Authenticate`, `unsupported_grant_type`),
//! every answer carries `Cache-Control: no-store`. The token is signed, not stored
//! (see `crate::token`). Secrets are compared in constant time.

use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use http::header::{AUTHORIZATION, CACHE_CONTROL, PRAGMA, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};

use hyper::body::Incoming;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::body_memory::BodyMemory;
use super::client_ip;
use crate::clock::now_ms;
use crate::config::{Auth, Config, Source};
use crate::token::{self, Claims};
use crate::web::response::{json_response, Body};

/// Token requests are small forms.
const MAX_FORM_BYTES: u64 = 8 * 1024;

fn answer(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    uncached(json_response(status, body.to_string()))
}

/// Every answer of the token endpoint is kept by no cache (RFC 6749 §5.1).
fn uncached(mut r: Response<Body>) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    let mut r = answer(
        status,
        json!({"error": kind, "error_description": message, "message": message}),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"hookrelay\""),
        );
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        r.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
    }
    r
}

fn invalid_client() -> Response<Body> {
    error(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "client authentication failed",
    )
}

/// `id:secret` from a Basic header, each part form-urlencoded (RFC 6749 §2.3.1).
/// Many clients skip that encoding, so the raw pair is returned too.
fn basic_credentials(value: &str) -> Option<[(String, String); 2]> {
    let b64 = crate::web::authorization::of_scheme(value, "Basic")?;
    let raw = STANDARD.decode(b64.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some([
        (form_decode(id), form_decode(secret)),
        (id.to_string(), secret.to_string()),
    ])
}

/// One form-urlencoded component: `+` is a space, `%XX` a byte.
fn form_decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// Finds the oauth2 source and checks the client's secret in constant time.
fn authenticate<'a>(config: &'a Config, id: &str, secret: &str) -> Option<&'a Source> {
    let mut found = None;
    for s in &config.sources {
        let Auth::OAuth2 { clients, .. } = &s.auth else {
            continue;
        };
        for c in clients {
            let id_ok = bool::from(c.id.as_bytes().ct_eq(id.as_bytes()));
            let secret_ok = c.secret.matches(secret.as_bytes());
            if id_ok & secret_ok {
                found = Some(s.as_ref());
            }
        }
    }
    found
}

/// The oauth2 source that has a client `id`.
fn owner<'a>(config: &'a Config, id: &str) -> Option<&'a Source> {
    config.sources.iter().map(AsRef::as_ref).find(
        |s| matches!(&s.auth, Auth::OAuth2 { clients, .. } if clients.iter().any(|c| c.id == id)),
    )
}

fn forbidden() -> Response<Body> {
    error(
        StatusCode::FORBIDDEN,
        "access_denied",
        "the client address is not allowed for this source",
    )
}

pub async fn token_endpoint(
    config: &Config,
    bodies: &BodyMemory,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    // The address first, as for an event (path, address, method, ...): one that no token
    // source allows learns nothing, and has no form read.
    let ip = client_ip::client_ip(peer.ip(), req.headers(), &config.server.trusted_proxies);
    let allowed_somewhere = config
        .sources
        .iter()
        .any(|s| matches!(s.auth, Auth::OAuth2 { .. }) && client_ip::allowed(ip, &s.allow_ips));
    if !allowed_somewhere {
        return forbidden();
    }
    if req.method() != Method::POST {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the token endpoint takes POST",
        );
    }
    // Only HTTP Basic authenticates a client here: another scheme (a client library that
    // sends its last token along) is not a second way of authenticating.
    let basic = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::web::authorization::of_scheme(v, "Basic").is_some())
        .map(str::to_string);
    // Its form counts in the bodies held at once like an event's: stalled token requests
    // must not hold memory the budget does not see.
    let announced = super::announced_length(&req).map(|n| n.min(MAX_FORM_BYTES));
    let mut room = match bodies.reserve(announced) {
        Ok(room) => room,
        Err(e) => return uncached(e.into_response()),
    };
    let body = match super::read_body(
        req.into_body(),
        MAX_FORM_BYTES,
        config.server.read_timeout,
        Some(&mut room),
    )
    .await
    {
        Ok(b) => b,
        // Past the body budget: the 503 as it is, with its Retry-After.
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
            return uncached(e.into_response())
        }
        Err(e) => return error(e.status, "invalid_request", &e.message),
    };
    let mut grant = None;
    let mut form_id = None;
    let mut form_secret = None;
    let mut scope = None;
    for (k, v) in form_urlencoded::parse(&body) {
        let slot = match k.as_ref() {
            "grant_type" => &mut grant,
            "client_id" => &mut form_id,
            "client_secret" => &mut form_secret,
            "scope" => &mut scope,
            _ => continue,
        };
        if slot.is_some() {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("parameter {k} is repeated"),
            );
        }
        *slot = Some(v.into_owned());
    }
    let candidates = match (basic, form_id, form_secret) {
        // A client may also name itself in the form (RFC 6749 §3.2.1); then as the client
        // its Basic header authenticates.
        (Some(h), named, None) => match basic_credentials(&h) {
            Some(c) => {
                let c: Vec<_> = c
                    .into_iter()
                    .filter(|(id, _)| named.as_ref().is_none_or(|n| n == id))
                    .collect();
                if c.is_empty() {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "client_id is not the client of the HTTP Basic credentials",
                    );
                }
                c
            }
            None => return invalid_client(),
        },
        (Some(_), _, _) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "send client credentials either as HTTP Basic or in the form, not both",
            )
        }
        (None, Some(id), Some(secret)) => vec![(id, secret)],
        (None, _, _) => return invalid_client(),
    };
    match grant.as_deref() {
        Some("client_credentials") => {}
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only grant_type=client_credentials is supported",
            )
        }
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is required",
            )
        }
    }
    // The address is checked against the source of the client named (ids are not secret,
    // and unique across sources) before its secret: a right secret and a wrong one get the
    // same answer from an address that source does not allow.
    let refused_here = candidates
        .iter()
        .any(|(id, _)| owner(config, id).is_some_and(|s| !client_ip::allowed(ip, &s.allow_ips)));
    if refused_here {
        return forbidden();
    }
    let Some((source, id, secret)) = candidates
        .into_iter()
        .find_map(|(id, secret)| authenticate(config, &id, &secret).map(|s| (s, id, secret)))
    else {
        return invalid_client();
    };
    let (Auth::OAuth2 { token_ttl, .. }, Some(key)) = (&source.auth, &config.server.token_secret)
    else {
        return invalid_client();
    };
    let ttl = token_ttl.as_secs().max(1);
    let now = now_ms() / 1000;
    let claims = Claims {
        source: source.name.clone(),
        client: id,
        scope: scope.clone(),
        exp: now.saturating_add(ttl),
        iat: now,
        secret: token::secret_mark(key.expose(), secret.as_bytes()),
    };
    let mut body = json!({
        "access_token": token::issue(key.expose(), &claims),
        "token_type": "Bearer",
        "expires_in": ttl,
    });
    if let Some(s) = scope {
        body["scope"] = json!(s);
    }
    answer(StatusCode::OK, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_decoded() {
        let h = format!("Basic {}", STANDARD.encode("my%20id:p%3Ass+word"));
        let c = basic_credentials(&h).unwrap();
        assert_eq!(c[0], ("my id".to_string(), "p:ss word".to_string()));
        assert_eq!(c[1], ("my%20id".to_string(), "p%3Ass+word".to_string()));
        assert_eq!(basic_credentials("Bearer x"), None);
        assert_eq!(basic_credentials("Basic !!!"), None);
    }
}
