//! Self-issued OAuth2 access tokens: `base64url(claims JSON) "." base64url(HMAC-SHA256)`.
//!
//! Signed with `[server] token_secret`, they carry source, client, scope and expiry, so they
//! survive restarts and need no store. A token is valid only for the source it was issued
//! for (checked by the caller against `Claims::source`), and only while its client keeps
//! the secret it was issued against (`Claims::secret`, a MAC of that secret: a rotated or
//! removed secret revokes its tokens at the reload). The MAC checks are constant-time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::Mac;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    #[serde(rename = "src")]
    pub source: String,
    #[serde(rename = "cid")]
    pub client: String,
    #[serde(rename = "scp", default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Issue time, unix seconds: no token outlives the `token_ttl` in force from it.
    pub iat: u64,
    /// [`secret_mark`] of the client secret the token was issued against. Required: a
    /// token without it would not need the client's secret, only the token key.
    #[serde(rename = "sk")]
    pub secret: String,
}

/// What a token carries of its client's secret: a MAC under the token key, so the token
/// tells nothing about the secret, yet a token issued against another secret is told apart.
pub fn secret_mark(key: &[u8], client_secret: &[u8]) -> String {
    let mut m = mac(key);
    m.update(b"hookrelay client secret\0");
    m.update(client_secret);
    URL_SAFE_NO_PAD.encode(&m.finalize().into_bytes()[..16])
}

use crate::signature::keyed as mac;

pub fn issue(key: &[u8], claims: &Claims) -> String {
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let mut m = mac(key);
    m.update(payload.as_bytes());
    let tag = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    format!("{payload}.{tag}")
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
}

/// Checks signature and expiry (`now` in unix seconds).
pub fn verify(key: &[u8], token: &str, now: u64) -> Result<Claims, TokenError> {
    let (payload, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| TokenError::Malformed)?;
    let mut m = mac(key);
    m.update(payload.as_bytes());
    m.verify_slice(&tag).map_err(|_| TokenError::BadSignature)?;
    let raw = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&raw).map_err(|_| TokenError::Malformed)?;
    if claims.exp <= now {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            source: "sms".into(),
            client: "8x8-sms".into(),
            scope: None,
            exp,
            iat: 0,
            secret: secret_mark(b"k", b"s"),
        }
    }

    #[test]
    fn round_trip_expiry_and_tamper() {
        let t = issue(b"k", &claims(100));
        assert_eq!(verify(b"k", &t, 99).unwrap(), claims(100));
        assert_eq!(verify(b"k", &t, 100), Err(TokenError::Expired));
        assert_eq!(verify(b"other", &t, 1), Err(TokenError::BadSignature));
        let forged = issue(b"k", &claims(999));
        let (p, _) = forged.split_once('.').unwrap();
        let (_, tag) = t.split_once('.').unwrap();
        assert_eq!(
            verify(b"k", &format!("{p}.{tag}"), 1),
            Err(TokenError::BadSignature)
        );
        assert_eq!(verify(b"k", "nodot", 1), Err(TokenError::Malformed));
        // Signed, but without the issue time or the mark of the client's secret (as a
        // build before them wrote it): not a token.
        for unmarked in [
            r#"{"src":"sms","cid":"8x8-sms","exp":999}"#,
            r#"{"src":"sms","cid":"8x8-sms","exp":999,"iat":0}"#,
        ] {
            let payload = URL_SAFE_NO_PAD.encode(unmarked);
            let mut m = mac(b"k");
            m.update(payload.as_bytes());
            let tag = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
            assert_eq!(
                verify(b"k", &format!("{payload}.{tag}"), 1),
                Err(TokenError::Malformed)
            );
        }
    }
}
