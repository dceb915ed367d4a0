//! Writes to the stream: one message, or several as one atomic batch (all or none are
//! stored, nats-server ≥ 2.12), each with an optional condition on its subject's last
//! sequence number and an optional time to live.

use std::time::Duration;

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use serde::Deserialize;

use crate::store::StoreError;

/// One message to write.
#[derive(Debug, Clone)]
pub struct Write {
    pub subject: String,
    pub payload: Bytes,
    /// Stored only if the subject's last message has this sequence number (0: none).
    pub expect_last: Option<u64>,
    /// The subject (or wildcard) `expect_last` is about, when not the message's own.
    pub expect_subject: Option<String>,
    /// The server removes the message after this long.
    pub ttl: Option<Duration>,
}

impl Write {
    pub fn new(subject: String, payload: Bytes) -> Self {
        Write {
            subject,
            payload,
            expect_last: None,
            expect_subject: None,
            ttl: None,
        }
    }
    pub fn expect(mut self, last: u64) -> Self {
        self.expect_last = Some(last);
        self
    }
    /// Stored only if the last message on `subject` (a wildcard: on any subject it matches)
    /// has the sequence number `last` (0: none).
    pub fn expect_on(mut self, subject: String, last: u64) -> Self {
        self.expect_last = Some(last);
        self.expect_subject = Some(subject);
        self
    }
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// What the server did with a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Stored; the sequence number of the first message written.
    Stored { first: u64 },
    /// A condition did not hold: nothing was stored.
    Conflict,
}

/// An answer as an error shows it: its first 200 bytes (a stray responder's could echo an
/// event's body).
fn shown(payload: &[u8]) -> String {
    let cut = payload.len().min(200);
    let more = if payload.len() > cut { "…" } else { "" };
    format!("{}{more}", String::from_utf8_lossy(&payload[..cut]))
}

#[derive(Deserialize)]
struct Ack {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    error: Option<AckError>,
}

#[derive(Deserialize)]
struct AckError {
    #[serde(default)]
    err_code: u32,
    #[serde(default)]
    description: String,
}

/// The server's error for a subject whose last sequence is not the expected one.
const WRONG_LAST_SEQUENCE: u32 = 10071;

fn headers(w: &Write, stream: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Expected-Stream", stream);
    if let Some(last) = w.expect_last {
        h.insert(
            "Nats-Expected-Last-Subject-Sequence",
            last.to_string().as_str(),
        );
        if let Some(subject) = &w.expect_subject {
            h.insert(
                "Nats-Expected-Last-Subject-Sequence-Subject",
                subject.as_str(),
            );
        }
    }
    if let Some(ttl) = w.ttl {
        h.insert("Nats-TTL", format!("{}s", ttl.as_secs().max(1)).as_str());
    }
    h
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

/// Writes `writes` (one message, or an atomic batch) and waits for the server's answer.
/// A timeout is `Unavailable`, though the write may have been stored: the caller's
/// conditions make a retry safe.
pub async fn write(
    client: &Client,
    stream: &str,
    writes: &[Write],
    timeout: Duration,
) -> Result<Written, StoreError> {
    let Some((last, rest)) = writes.split_last() else {
        return Ok(Written::Stored { first: 0 });
    };
    let batch_id = (!rest.is_empty()).then(|| format!("{:032x}", rand::random::<u128>()));
    // The whole batch within `timeout`: a publish waits while the client's outbound buffer
    // is full (the server out of reach), and must not hold its caller past it.
    let started = tokio::time::Instant::now();
    for (i, w) in rest.iter().enumerate() {
        let mut h = headers(w, stream);
        let id = batch_id.as_deref().unwrap_or_default();
        h.insert("Nats-Batch-Id", id);
        h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
        let publish = client.publish_with_headers(w.subject.clone(), h, w.payload.clone());
        match tokio::time::timeout_at(started + timeout, publish).await {
            Ok(r) => r.map_err(|e| unavailable("publishing to JetStream", e))?,
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "JetStream took no batch within {timeout:?}"
                )))
            }
        }
    }
    let timeout = timeout.saturating_sub(started.elapsed());
    let mut h = headers(last, stream);
    if let Some(id) = &batch_id {
        h.insert("Nats-Batch-Id", id.as_str());
        h.insert("Nats-Batch-Sequence", writes.len().to_string().as_str());
        h.insert("Nats-Batch-Commit", "1");
    }
    let request = client.request_with_headers(last.subject.clone(), h, last.payload.clone());
    let answer = match tokio::time::timeout(timeout, request).await {
        Err(_) => {
            return Err(StoreError::Unavailable(format!(
                "JetStream did not acknowledge within {timeout:?}"
            )))
        }
        Ok(Err(e)) => return Err(unavailable("writing to JetStream", e)),
        Ok(Ok(m)) => m,
    };
    let ack: Ack = serde_json::from_slice(&answer.payload).map_err(|e| {
        unavailable(
            "JetStream's acknowledgement",
            format!("{e}: {:?}", shown(&answer.payload)),
        )
    })?;
    if let Some(e) = ack.error {
        if e.err_code == WRONG_LAST_SEQUENCE || e.description.contains("wrong last sequence") {
            return Ok(Written::Conflict);
        }
        return Err(StoreError::Unavailable(format!(
            "JetStream refused the write: {} (error {})",
            e.description, e.err_code
        )));
    }
    let count = ack.count.unwrap_or(1).max(1);
    // An answer naming no stored message (another responder on the subject, say) is no
    // acknowledgement: the event would be answered 200 unstored.
    if ack.seq < count {
        return Err(StoreError::Unavailable(format!(
            "JetStream's acknowledgement names no stored message: {:?}",
            shown(&answer.payload)
        )));
    }
    if batch_id.is_some() && ack.count != Some(writes.len() as u64) {
        return Err(StoreError::Unavailable(format!(
            "JetStream committed {count} of a batch of {}",
            writes.len()
        )));
    }
    Ok(Written::Stored {
        first: ack.seq + 1 - count,
    })
}
