//! The operator console: one page, its script and its style sheet, embedded in the binary
//! at build time (no CDN, no build step). The page holds no data; everything it shows comes
//! from the admin API with the token the operator types, sent as a Bearer header. The
//! Content-Security-Policy allows only these same-origin files: no inline script runs, so
//! an event body that holds markup stays text even if a view forgot to escape it.

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL};
use http::{Response, StatusCode};

use crate::web::response::{answer, Body};

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The asset at `path`, if the console has one there.
pub fn asset(path: &str) -> Option<Response<Body>> {
    let (body, kind) = match path {
        "/" | "/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/console.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut r = answer(
        StatusCode::OK,
        HeaderValue::from_static(kind),
        Bytes::from_static(body.as_bytes()),
    );
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(r)
}
