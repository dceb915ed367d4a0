//! Inbound credentials of a source: a static header, an OAuth2 bearer token issued by this
//! relay, or a Standard Webhooks signature. Every comparison of a secret is constant-time.
//!
//! The contract checks auth before size and JSON, so everything that can be judged from the
//! headers is judged first; a Standard Webhooks signature covers the body and is verified
//! once the body is read ([`BodyCheck`]).

use http::header::WWW_AUTHENTICATE;
use http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::config::{Auth, Config, Source};
use crate::web::response::ApiError;
use crate::{signature, token};

/// How far a token's expiry may pass now + `token_ttl` (clocks of the instances that
/// issue and check it may differ).
const TOKEN_CLOCK_SKEW_SECS: u64 = 60;

/// A check that still needs the body.
pub struct BodyCheck {
    id: String,
    timestamp: String,
    signatures: String,
}

impl BodyCheck {
    /// The message's `webhook-id`: the sender's id of it, the same on a resend (Standard
    /// Webhooks); trusted once [`verify`](Self::verify) passed, as the signature covers it.
    pub fn into_id(self) -> String {
        self.id
    }

    pub fn verify(&self, source: &Source, body: &[u8]) -> Result<(), ApiError> {
        let Auth::StandardWebhooks { secret, .. } = &source.auth else {
            return Ok(());
        };
        if signature::verify(
            secret.expose(),
            &self.id,
            &self.timestamp,
            body,
            &self.signatures,
        ) {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "webhook-signature does not match the body",
            ))
        }
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Checks what the headers alone can prove. `now` is unix seconds.
pub fn check_headers(
    config: &Config,
    source: &Source,
    headers: &HeaderMap,
    now: u64,
) -> Result<Option<BodyCheck>, ApiError> {
    match &source.auth {
        Auth::None => Ok(None),
        Auth::Header {
            header: name,
            value,
        } => {
            let got = headers.get(name).map(|v| v.as_bytes()).unwrap_or_default();
            if value.matches(got) {
                Ok(None)
            } else {
                Err(ApiError::unauthorized(format!(
                    "missing or wrong {name} header"
                )))
            }
        }
        Auth::OAuth2 { clients, token_ttl } => {
            let bearer = crate::web::authorization::credentials(headers, "Bearer");
            let Some(tok) = bearer else {
                return Err(ApiError::unauthorized(
                    "a Bearer token from POST /oauth/token is required",
                )
                .with_header(WWW_AUTHENTICATE, "Bearer"));
            };
            // A token was presented and refused: RFC 6750 §3.1 says so, for a client that
            // fetches a new token on this signal.
            let unauthorized = |m: &str| {
                ApiError::unauthorized(m.to_string())
                    .with_header(WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#)
            };
            let Some(key) = &config.server.token_secret else {
                return Err(unauthorized("no token secret is configured"));
            };
            match token::verify(key.expose(), tok.trim(), now) {
                // A client removed from the config (or renamed), or given another secret,
                // loses its tokens at the reload, not when they expire.
                // No token outlives the `token_ttl` in force (a lowered one included),
                // counted from its issue time.
                Ok(claims)
                    if now
                        > claims.iat.saturating_add(
                            token_ttl.as_secs().saturating_add(TOKEN_CLOCK_SKEW_SECS),
                        ) =>
                {
                    Err(unauthorized("the token outlives the source's token_ttl"))
                }
                Ok(claims) if claims.source == source.name => {
                    match clients.iter().find(|c| c.id == claims.client) {
                        Some(c) => {
                            let mark = token::secret_mark(key.expose(), c.secret.expose());
                            if bool::from(mark.as_bytes().ct_eq(claims.secret.as_bytes())) {
                                Ok(None)
                            } else {
                                Err(unauthorized(
                                    "the token was issued before its client's secret changed",
                                ))
                            }
                        }
                        None => Err(unauthorized("the token's client is no longer configured")),
                    }
                }
                Ok(_) => Err(unauthorized("the token was issued for another source")),
                Err(e) => Err(unauthorized(&format!("invalid token: {e}"))),
            }
        }
        Auth::StandardWebhooks { tolerance, .. } => {
            // Signatures on several header lines (a sender rotating its key may write each
            // on its own) are one list, as if written on one line space-separated.
            let lines: Vec<&str> = headers
                .get_all("webhook-signature")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let sig = (!lines.is_empty()).then(|| lines.join(" "));
            let (Some(id), Some(ts), Some(sig)) = (
                header(headers, "webhook-id"),
                header(headers, "webhook-timestamp"),
                sig,
            ) else {
                return Err(ApiError::unauthorized(
                    "webhook-id, webhook-timestamp and webhook-signature are required",
                ));
            };
            let Ok(t) = ts.trim().parse::<u64>() else {
                return Err(ApiError::unauthorized(
                    "webhook-timestamp is not unix seconds",
                ));
            };
            if now.abs_diff(t) > tolerance.as_secs() {
                return Err(ApiError::unauthorized(
                    "webhook-timestamp is outside the allowed tolerance",
                ));
            }
            Ok(Some(BodyCheck {
                id: id.to_string(),
                timestamp: ts.trim().to_string(),
                signatures: sig,
            }))
        }
    }
}
