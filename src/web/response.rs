//! The contract's JSON answers: errors as `{"error":"<kind>","message":"<sentence>"}` with the
//! status and headers (`Allow`, `WWW-Authenticate`, `Retry-After`) each case needs.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

pub type Body = Full<Bytes>;

/// An error answer of the ingress.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Serialize)]
struct Wire<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: &'static str) -> Self {
        self.headers.push((name, HeaderValue::from_static(value)));
        self
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no source is configured at {path}"),
        )
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "webhooks must be sent with POST",
        )
        .with_header(http::header::ALLOW, "POST")
    }

    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the client address is not allowed for this source",
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than the limit of {limit} bytes"),
        )
    }

    /// The event's records, with its id, order keys and content type, are larger than the
    /// store takes, though the body alone is within `max_body_bytes`.
    pub fn record_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the event with its id, order keys and content type is larger than the store's \
                 limit of {limit} bytes per record; shorten them or send a smaller body"
            ),
        )
    }

    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }

    pub fn unavailable(message: impl Into<String>, retry_after: &'static str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            .with_header(http::header::RETRY_AFTER, retry_after)
    }

    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::to_vec(&Wire {
            error: self.kind,
            message: &self.message,
        })
        .expect("error serializes");
        let mut resp = json_response(self.status, body);
        let h = resp.headers_mut();
        for (k, v) in self.headers {
            h.append(k, v);
        }
        resp
    }
}

/// A JSON answer.
pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    answer(status, HeaderValue::from_static("application/json"), body)
}

/// An answer with `status`, `content_type` and `body`: every response the relay builds
/// starts here.
pub fn answer(
    status: StatusCode,
    content_type: HeaderValue,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, content_type);
    resp
}
