//! The credentials an `Authorization` header carries for one scheme. The scheme is compared
//! case-insensitively (RFC 9110 §11.1: `BEARER x` is `Bearer x`), the credentials trimmed.

use http::header::AUTHORIZATION;
use http::HeaderMap;

/// The credentials after `scheme` in the request's `Authorization` header, if that is its
/// scheme.
pub fn credentials<'a>(headers: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    of_scheme(value, scheme)
}

/// The credentials after `scheme` in the header value `value`, if that is its scheme.
pub fn of_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, rest) = value.trim_start().split_once(' ')?;
    given.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_case_insensitive() {
        for v in ["Bearer t", "bearer t", "BEARER t", "BeArEr  t "] {
            assert_eq!(of_scheme(v, "Bearer"), Some("t"), "{v}");
        }
        assert_eq!(of_scheme("Basic t", "Bearer"), None);
        assert_eq!(of_scheme("Bearert", "Bearer"), None);
        assert_eq!(of_scheme("Bearer", "Bearer"), None);
    }
}
