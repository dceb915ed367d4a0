//! Requests to the relay: [`send`] (any method, body read whole, panics on failure),
//! [`post`] (JSON to an in-process relay's ingress), and [`try_post`] (reports failures
//! instead of panicking: for tests that kill the relay under load).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::WAIT;

/// An HTTP answer, body read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts the contract's error shape and kind; returns the message.
    pub fn error(&self, status: u16, kind: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "body: {:?}", self.body);
        let v = self.json();
        assert_eq!(v["error"], kind, "{v}");
        let msg = v["message"].as_str().expect("message").to_string();
        assert!(!msg.is_empty());
        assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
        msg
    }
}

pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
    // The head and the body within one limit.
    let (parts, body) = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let (parts, body) = client.request(req).await.expect("request").into_parts();
        (parts, body.collect().await.unwrap().to_bytes())
    })
    .await
    .expect("answer within 20s");
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// POSTs `body` to the relay's ingress; returns the status and the JSON answer.
pub async fn post(
    relay: &hookrelay::Relay,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::post(format!("http://{}{}", relay.ingress, path))
        .header("content-type", content_type)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    let (status, body) = tokio::time::timeout(WAIT, async {
        let resp = client.request(req).await.expect("ingress request");
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    })
    .await
    .expect("ingress answers in time");
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled HTTP/1.1 client (keep-alive).
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>()
}

/// A status, headers and body, or why there was none.
#[derive(Debug)]
pub struct Posted {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Posted {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// POSTs `body` to `url` with a JSON content type; errors (refused, reset, timed out) are
/// returned, not raised.
pub async fn try_post(
    client: &HttpClient,
    url: &str,
    body: Vec<u8>,
    within: Duration,
) -> Result<Posted, String> {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let call = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok(Posted {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    match tokio::time::timeout(within, call).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

/// The value of the first line of a metrics text that starts with `line_start`.
pub fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
