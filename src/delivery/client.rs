//! The one call every delivery attempt makes: [`send_once`], over the pooled outbound
//! client of [`crate::web::client`]. A request carries the stored body byte-for-byte, the
//! received Content-Type, the contract's headers (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature` when the destination signs, `x-hookrelay-source`,
//! `x-hookrelay-attempt`) and the destination's own `headers`. Redirects are not followed.
//! The answer's status decides the attempt; its body is read (so the connection can be
//! reused, and so a reply route can forward it) up to [`MAX_ANSWER_BYTES`]. The engine and
//! the reply route share this code path; the engine adds rate, concurrency and retry
//! around it.

use std::error::Error as _;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};

use crate::config::Destination;
use crate::signature;
use crate::store::StoredEvent;
pub use crate::web::client::HttpClient;

/// The most of an answer's body that is kept; the rest is dropped (`Answer::truncated`).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");
const X_SOURCE: HeaderName = HeaderName::from_static("x-hookrelay-source");
const X_ATTEMPT: HeaderName = HeaderName::from_static("x-hookrelay-attempt");

/// A destination's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The answer's Content-Type, if it had a readable one.
    pub content_type: Option<String>,
    pub headers: HeaderMap,
    /// At most [`MAX_ANSWER_BYTES`].
    pub body: Bytes,
    /// The body was longer than [`MAX_ANSWER_BYTES`], broke off, or had not all come by the
    /// timeout; `body` holds what came.
    pub truncated: bool,
}

/// Why an attempt got no answer. All of these are retried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Request(String),
}

/// One attempt's result: an answer (any status), or no answer.
pub type AttemptResult = Result<Answer, SendError>;

/// The request for one attempt. `timestamp` is unix seconds.
pub fn build_request(
    dest: &Destination,
    event: &StoredEvent,
    attempt: u32,
    timestamp: u64,
) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(event.body.clone()));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = dest.url.clone();
    let h = req.headers_mut();
    // Room for all of them at once (growing the map is a reallocation each time).
    h.reserve(dest.headers.len() + 8);
    // The destination's headers first: the protocol's own below replace any of the same name.
    for (k, v) in &dest.headers {
        h.append(k.clone(), v.clone());
    }
    // The destination's own User-Agent, if it sets one, is sent instead of ours.
    if !h.contains_key(USER_AGENT) {
        h.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("hookrelay/", env!("CARGO_PKG_VERSION"))),
        );
    }
    match event
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        Some(ct) => {
            h.insert(CONTENT_TYPE, ct);
        }
        None => {
            h.remove(CONTENT_TYPE);
        }
    }
    // Ids come from the body: sent (and signed) in a form a header can carry.
    let id = header_id(&event.id);
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert(WEBHOOK_ID, v);
    }
    h.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
    if let Some(secret) = &dest.sign {
        let sig = signature::sign(secret.expose(), &id, &timestamp.to_string(), &event.body);
        if let Ok(mut v) = HeaderValue::from_str(&sig) {
            v.set_sensitive(true);
            h.insert(WEBHOOK_SIGNATURE, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&event.source) {
        h.insert(X_SOURCE, v);
    }
    h.insert(X_ATTEMPT, HeaderValue::from(attempt));
    req
}

/// The longest `webhook-id` sent as the id itself.
const MAX_HEADER_ID: usize = 256;
/// How a `webhook-id` made of the id's hash starts.
const HASHED: &str = "sha256:";

/// The event id as its `webhook-id` header (and the signature's message id): as it is when
/// a header carries it unchanged (visible ASCII but `%`, at most [`MAX_HEADER_ID`] bytes);
/// else percent-encoded (non-ASCII, spaces, controls, `%`), or, still longer, `sha256:` and
/// the hex SHA-256 of the id. The same id always gives the same header, and two ids two
/// headers: only an encoded one holds a `%` (`a b` is `a%20b`, `a%20b` is `a%2520b`), and
/// only a hashed one starts `sha256:` (an id that does so is encoded: `sha256%3A…`).
pub fn header_id(id: &str) -> std::borrow::Cow<'_, str> {
    use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
    let plain = |b: u8| b.is_ascii_graphic() && b != b'%';
    let like_hashed = id.starts_with(HASHED);
    if !like_hashed && !id.is_empty() && id.len() <= MAX_HEADER_ID && id.bytes().all(plain) {
        return id.into();
    }
    const NOT_PLAIN: &AsciiSet = &CONTROLS.add(b' ').add(b'%');
    const NOT_PLAIN_NOR_COLON: &AsciiSet = &NOT_PLAIN.add(b':');
    let set = if like_hashed {
        NOT_PLAIN_NOR_COLON
    } else {
        NOT_PLAIN
    };
    let encoded = utf8_percent_encode(id, set).to_string();
    if !encoded.is_empty() && encoded.len() <= MAX_HEADER_ID {
        return encoded.into();
    }
    format!("{HASHED}{}", crate::event_id::body_hash(id.as_bytes())).into()
}

/// The error and its causes, joined (hyper's own message alone says little).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}

/// Sends `event` to `dest` once, as attempt number `attempt` (1-based), and reads the
/// answer; all within `timeout`. No rate limit, concurrency limit or retry here: the engine
/// adds those; a reply route calls this directly.
pub async fn send_once(
    client: &HttpClient,
    dest: &Destination,
    event: &StoredEvent,
    attempt: u32,
    timeout: Duration,
) -> AttemptResult {
    let req = build_request(dest, event, attempt, crate::clock::now_ms() / 1000);
    let deadline = tokio::time::Instant::now() + timeout;
    let resp = match tokio::time::timeout_at(deadline, client.request(req)).await {
        Err(_) => return Err(SendError::Timeout(timeout)),
        Ok(Err(e)) => {
            let text = match e.source() {
                Some(s) => chain(s),
                None => e.to_string(),
            };
            return Err(if e.is_connect() {
                SendError::Connect(text)
            } else {
                SendError::Request(text)
            });
        }
        Ok(Ok(resp)) => resp,
    };
    // The status is the answer: a body that breaks off or stalls after it leaves the
    // answer `truncated` (a 2xx is delivered; sending it again would only duplicate it),
    // and dropping the rest closes the connection.
    let (parts, mut body) = resp.into_parts();
    let mut buf = BytesMut::new();
    let mut truncated = false;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(_))) | Err(_) => {
                truncated = true;
                break;
            }
        };
        if let Ok(data) = frame.into_data() {
            let room = MAX_ANSWER_BYTES - buf.len();
            if data.len() > room {
                buf.extend_from_slice(&data[..room]);
                truncated = true;
                break;
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Answer {
        status: parts.status.as_u16(),
        content_type: parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        headers: parts.headers,
        body: buf.freeze(),
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::header_id;

    #[test]
    fn a_header_id_is_the_id_when_a_header_carries_it() {
        assert_eq!(
            header_id("eb0fc709-9693-11ea-454d-1705dde98182"),
            "eb0fc709-9693-11ea-454d-1705dde98182"
        );
        assert_eq!(header_id("dids:update:48213"), "dids:update:48213");
        assert_eq!(header_id("évt 1"), "%C3%A9vt%201");
        assert_eq!(header_id(" a\n"), "%20a%0A");
        let long = "x".repeat(300);
        let h = header_id(&long);
        assert!(h.starts_with("sha256:") && h.len() == 71, "{h}");
        assert_eq!(header_id(&long), h, "always the same");
        assert_eq!(header_id(&"x".repeat(256)), "x".repeat(256));
        // Two ids, two headers: a `%` of the id is encoded too.
        assert_eq!(header_id("a b"), "a%20b");
        assert_eq!(header_id("a%20b"), "a%2520b");
        assert_eq!(header_id("100%"), "100%25");
        // An id that looks hashed is not taken for a hashed one.
        let hashed = header_id(&long).into_owned();
        assert_eq!(header_id(&hashed), hashed.replacen(':', "%3A", 1));
    }
}
