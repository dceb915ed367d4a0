//! Standard Webhooks signatures: `v1,` + base64(HMAC-SHA256(secret, "id.timestamp.body")).
//!
//! Used both ways: to sign deliveries (`sign` on a destination) and to verify inbound
//! requests (`standard-webhooks` auth). A secret is given either as `whsec_<base64>` (the
//! Standard Webhooks form) or as raw text. Verification is constant-time.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::Sha256;

pub(crate) type HmacSha256 = hmac::Hmac<Sha256>;

/// An HMAC-SHA256 keyed with `key` (any size): the one MAC of the relay (signatures and
/// self-issued tokens).
pub(crate) fn keyed(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key size")
}

/// Decodes a configured secret: `whsec_` + base64, or the raw bytes of the text.
pub fn decode_secret(text: &str) -> Result<Vec<u8>, String> {
    match text.strip_prefix("whsec_") {
        Some(b64) => match STANDARD.decode(b64) {
            // An empty key is one anybody can sign with.
            Ok(key) if key.is_empty() => Err("the secret is empty after whsec_".into()),
            Ok(key) => Ok(key),
            // Not the decoder's message: it names a byte of the secret and where it is.
            Err(_) => Err("the part after whsec_ is not base64".into()),
        },
        None if text.is_empty() => Err("the secret is empty".into()),
        None => Ok(text.as_bytes().to_vec()),
    }
}

fn mac(secret: &[u8], id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
    let mut m = keyed(secret);
    m.update(id.as_bytes());
    m.update(b".");
    m.update(timestamp.as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// The `webhook-signature` header value for one message.
pub fn sign(secret: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    let tag = mac(secret, id, timestamp, body).finalize().into_bytes();
    format!("v1,{}", STANDARD.encode(tag))
}

/// Whether any of the space-separated `v1,<base64>` signatures in `header` matches.
pub fn verify(secret: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let expected = mac(secret, id, timestamp, body);
    let mut ok = false;
    for part in header.split(' ') {
        let Some(b64) = part.strip_prefix("v1,") else {
            continue;
        };
        let Ok(tag) = STANDARD.decode(b64) else {
            continue;
        };
        // Check every candidate so the time taken does not depend on which one matched.
        ok |= expected.clone().verify_slice(&tag).is_ok();
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_reference_vector() {
        // The Standard Webhooks specification's example.
        let secret = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let header = format!("v1,bm90IGl0 {sig}");
        assert!(verify(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            body,
            &header
        ));
        assert!(!verify(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265331",
            body,
            &header
        ));
    }

    #[test]
    fn raw_secret_and_bad_base64() {
        assert_eq!(decode_secret("plain").unwrap(), b"plain");
        assert!(decode_secret("whsec_!!!").is_err());
        // An empty key would let anybody sign.
        assert!(decode_secret("whsec_").is_err());
        assert!(decode_secret("").is_err());
    }
}
