//! The store: the one narrow interface between the relay and its durable state.
//!
//! Ingress calls [`Store::accept`] and answers 200 only after it returns: the event, its
//! dedup record and one pending delivery per destination are then durable. Delivery reads
//! [`Store::pending`] in due order and writes each attempt's outcome with [`Store::record`];
//! an `order_by` key's later deliveries are not due until the one before is delivered or
//! dead. The admin API looks events up, lists recent events, lists and replays dead
//! deliveries, and pauses destinations. Everything else (keys, batching, flushing) is the
//! backend's business: redb and sled, and JetStream shared by several instances (there
//! `pending` returns the deliveries this instance holds a lease on, all due; `record` writes
//! the outcome and acks), behind the same trait. Memory holds no queue: the store is the
//! truth.

pub mod engine;
pub mod jetstream;
pub mod kv;
pub mod redb;
pub mod sled;
pub mod unreadable;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

pub use crate::clock::now_ms;

/// Other instances' breaker changes: destination, and whether it opened (else closed).
pub type BreakerNews = tokio::sync::mpsc::Receiver<(String, bool)>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store is closed")]
    Closed,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Format(String),
    /// Another process holds the store's files (a relay this one replaces, still stopping).
    #[error("{0}: in use by another process (a relay still stopping?)")]
    InUse(String),
}

/// An event as ingress hands it to the store.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub source: String,
    pub id: String,
    pub body: Bytes,
    pub content_type: Option<String>,
    pub received_ms: u64,
    /// Destination names, each once.
    pub destinations: Vec<String>,
    /// The `max_queue` of each destination, in the same order (checked by the writer, so
    /// concurrent requests cannot push a queue past it).
    pub max_queue: Vec<u64>,
    /// The `order_by` key of each destination's delivery, in the same order (`None`: not
    /// ordered; the list may be shorter than `destinations`).
    pub order_keys: Vec<Option<String>>,
    /// A destination whose delivery is due only later (ms): a reply route calls it
    /// synchronously first, and the stored delivery is the fallback if that call fails.
    pub held: Option<(String, u64)>,
    /// How long the id is remembered for deduplication.
    pub dedup_window: Duration,
}

/// What `accept` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Accepted {
        seq: u64,
    },
    /// The id was seen within the window: nothing was written.
    Duplicate {
        seq: u64,
        reply: Option<StoredReply>,
    },
    /// A destination already has `max_queue` pending deliveries: nothing was written.
    QueueFull {
        destination: String,
    },
    /// The event's records would be larger than the store takes (its id, order keys or
    /// content type are too long for the room left beside the body): nothing was written.
    TooLarge {
        limit: u64,
    },
    /// Another id's event, kept within the dedup window, has the same subject token
    /// (JetStream's 64-bit hashes): nothing was written; the provider is told to come
    /// back (the store itself is healthy).
    IdCollides,
}

/// A reply route's answer, kept so a duplicate gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StoredReply {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// The first byte of a reply record in its binary form; the JSON that earlier builds wrote
/// begins with `{`.
const REPLY_RECORD: u8 = 1;
/// The content type's length in a reply record that has none.
const NO_CONTENT_TYPE: u16 = u16::MAX;

impl StoredReply {
    /// The record kept for the reply: a tag, the status, the content type's length and the
    /// content type, then the body as it came (a body kept as JSON numbers took 3.5 bytes a
    /// byte, past JetStream's message size well before the answer's limit).
    pub fn encode(&self) -> Vec<u8> {
        let ct = self
            .content_type
            .as_deref()
            .filter(|c| c.len() < usize::from(NO_CONTENT_TYPE));
        let mut v = Vec::with_capacity(5 + ct.map_or(0, str::len) + self.body.len());
        v.push(REPLY_RECORD);
        v.extend_from_slice(&self.status.to_be_bytes());
        match ct {
            Some(c) => {
                v.extend_from_slice(&(c.len() as u16).to_be_bytes());
                v.extend_from_slice(c.as_bytes());
            }
            None => v.extend_from_slice(&NO_CONTENT_TYPE.to_be_bytes()),
        }
        v.extend_from_slice(&self.body);
        v
    }

    /// Reads a reply record: the binary form of [`StoredReply::encode`], or the JSON one
    /// of earlier builds.
    pub fn decode(v: &[u8]) -> Result<Self, StoreError> {
        let bad = || StoreError::Corrupt("a reply record".into());
        match v.first() {
            Some(b'{') => serde_json::from_slice(v).map_err(|_| bad()),
            Some(&REPLY_RECORD) if v.len() >= 5 => {
                let status = u16::from_be_bytes([v[1], v[2]]);
                let len = u16::from_be_bytes([v[3], v[4]]);
                let (content_type, body) = if len == NO_CONTENT_TYPE {
                    (None, &v[5..])
                } else {
                    let end = 5 + usize::from(len);
                    let ct = v.get(5..end).ok_or_else(bad)?;
                    let ct = String::from_utf8(ct.to_vec()).map_err(|_| bad())?;
                    (Some(ct), &v[end..])
                };
                Ok(StoredReply {
                    status,
                    content_type,
                    body: body.to_vec(),
                })
            }
            _ => Err(bad()),
        }
    }
}

/// One event as stored.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub id: String,
    pub source: String,
    pub received_ms: u64,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// Identifies one delivery: an event (by its store sequence number) × a destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    pub seq: u64,
    pub destination: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    Pending,
    Delivered,
    Dead,
}

/// The state of one delivery, as stored and as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub seq: u64,
    pub destination: String,
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// `attempts` when the current retry window started (0, or the count at the last
    /// replay): backoff and `max_attempts` count from here, so a replay starts afresh.
    #[serde(default)]
    pub window_base: u32,
    /// When the current retry window started (first attempt, or the last replay).
    pub first_attempt_ms: Option<u64>,
    pub next_due_ms: u64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub updated_ms: u64,
    /// The `order_by` key: deliveries of one destination sharing it go one at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_key: Option<String>,
    /// Pending behind an earlier delivery of its order key (not sent before that one is
    /// delivered or dead): worked out for the admin API when read, never stored.
    #[serde(skip)]
    pub waiting: bool,
}

impl Delivery {
    /// The pending delivery an event received at `received_ms` starts with: no attempt yet,
    /// due at once, or when `held` (a reply route's destination, and until when its call
    /// holds it) says if it names this destination.
    pub fn first(
        seq: u64,
        destination: &str,
        received_ms: u64,
        held: Option<&(String, u64)>,
        order_key: Option<String>,
    ) -> Self {
        let due_ms = match held {
            Some((held, until)) if held == destination => *until,
            _ => received_ms,
        };
        Delivery {
            seq,
            destination: destination.to_string(),
            state: DeliveryState::Pending,
            attempts: 0,
            window_base: 0,
            first_attempt_ms: None,
            next_due_ms: due_ms,
            last_status: None,
            last_error: None,
            updated_ms: received_ms,
            order_key,
            waiting: false,
        }
    }

    /// One more attempt, with this outcome (what every backend writes for it).
    pub fn apply(&mut self, outcome: &Outcome, now: u64) {
        self.attempts += 1;
        self.first_attempt_ms.get_or_insert(now);
        self.updated_ms = now;
        match outcome {
            Outcome::Delivered { status } => {
                self.state = DeliveryState::Delivered;
                self.last_status = Some(*status);
                self.last_error = None;
            }
            Outcome::Retry {
                due_ms,
                status,
                error,
                ..
            } => {
                self.next_due_ms = *due_ms;
                self.last_status = *status;
                self.last_error = Some(error.clone());
            }
            Outcome::Dead { status, error } => {
                self.state = DeliveryState::Dead;
                self.last_status = *status;
                self.last_error = Some(error.clone());
            }
        }
    }

    /// A dead delivery made pending again by a replay: due now, with a fresh retry window.
    pub fn reopen(&mut self, now: u64) {
        self.state = DeliveryState::Pending;
        self.first_attempt_ms = None;
        self.window_base = self.attempts;
        self.next_due_ms = now;
        self.updated_ms = now;
    }
}

/// The outcome of one attempt, written by delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        status: u16,
    },
    Retry {
        due_ms: u64,
        status: Option<u16>,
        error: String,
        /// Which attempt of the delivery failed (1 for the first), when known: a store that
        /// already counts it (its write made, though reported failed) keeps what it has.
        /// A reply route's call, made from the event alone, does not know.
        attempt: Option<u32>,
    },
    Dead {
        status: Option<u16>,
        error: String,
    },
}

impl Outcome {
    /// The words metrics and logs use for outcomes.
    pub const WORDS: [&'static str; 3] = ["delivered", "retried", "dead"];

    /// This outcome's word: `delivered`, `retried` or `dead`.
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => Self::WORDS[0],
            Outcome::Retry { .. } => Self::WORDS[1],
            Outcome::Dead { .. } => Self::WORDS[2],
        }
    }

    /// The error of a failed attempt; `None` when delivered.
    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Delivered { .. } => None,
            Outcome::Retry { error, .. } | Outcome::Dead { error, .. } => Some(error),
        }
    }
}

/// Which dead deliveries to replay.
#[derive(Debug, Clone)]
pub enum ReplaySelector {
    Destination(String),
    EventId(String),
    /// The dead delivery to one destination of the events with this id; of the one with
    /// sequence `seq` only, when given (several sources, or an id used again).
    Delivery {
        id: String,
        destination: String,
        seq: Option<u64>,
    },
}

/// A delivery with the event it belongs to, as the admin API lists dead letters.
#[derive(Debug, Clone)]
pub struct NamedDelivery {
    pub event_id: String,
    pub source: String,
    pub delivery: Delivery,
    /// Its place in the dead-letter list ([`Store::dead_after`] goes on past it): its
    /// event's sequence on the embedded stores, its dead-letter index entry's on JetStream.
    pub cursor: u64,
}

/// Which events `recent` lists: newest first, all filters must hold.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub source: Option<String>,
    /// Events with a delivery to this destination.
    pub destination: Option<String>,
    /// Events with a delivery in this state (to `destination`, when given).
    pub state: Option<DeliveryState>,
    pub limit: usize,
    /// Only events stored before this sequence number (the cursor of the previous page).
    pub before: Option<u64>,
}

/// One page of `recent`.
#[derive(Debug, Clone)]
pub struct EventPage {
    pub events: Vec<EventView>,
    /// The cursor for the next page (`before`), when there may be more.
    pub next: Option<u64>,
}

/// An event and its deliveries, for the admin API.
#[derive(Debug, Clone)]
pub struct EventView {
    pub event: StoredEvent,
    pub deliveries: Vec<Delivery>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Dedup check, then event + dedup record + one pending delivery per destination,
    /// atomically and durably. Returns only once flushed.
    async fn accept(&self, ev: NewEvent) -> Result<Admission, StoreError>;

    /// Up to `limit` pending deliveries of `destination` in due order (earliest first),
    /// whether due yet or not, skipping those for which `skip` is true (in flight).
    async fn pending(
        &self,
        destination: &str,
        limit: usize,
        skip: &(dyn Fn(u64) -> bool + Send + Sync),
    ) -> Result<Vec<Delivery>, StoreError>;

    /// When the event of `destination`'s oldest pending delivery was received, unix ms;
    /// `None` with nothing pending. A read for the admin API and metrics (the oldest
    /// pending age): it changes nothing. Jetstream answers from the deliveries this
    /// instance holds and the first its destination's consumer has not had acknowledged
    /// (a lower bound: a retry rewrites its delivery's state further on in the stream).
    async fn oldest_pending(&self, destination: &str) -> Result<Option<u64>, StoreError>;

    /// The stored event with this sequence number, for a delivery attempt (the embedded
    /// stores hand over an event kept in memory since its accept, once per destination).
    async fn event(&self, seq: u64) -> Result<Option<StoredEvent>, StoreError>;

    /// Writes the outcome of an attempt on a pending delivery (one more attempt counted).
    async fn record(&self, key: &DeliveryKey, outcome: Outcome) -> Result<(), StoreError>;

    /// After a reply route's call: keeps the answer (so duplicates get it too) and records
    /// the attempt on the held delivery. Queued in order behind everything submitted before
    /// and committed with the next group, but not waited for: the provider's answer need
    /// not wait for a second commit. If it is lost in a crash, a duplicate calls again and
    /// the held delivery goes out later (at least once). `fresh`: the call was made for the
    /// request that stored the event (else for a duplicate, whose outcome only settles a
    /// delivery still there to settle).
    fn after_reply(
        &self,
        seq: u64,
        reply: Option<StoredReply>,
        attempt: Option<(DeliveryKey, Outcome)>,
        fresh: bool,
    ) -> Result<(), StoreError>;

    /// Dead deliveries, oldest first, optionally of one destination: the first `limit`.
    async fn dead(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> Result<Vec<NamedDelivery>, StoreError> {
        self.dead_after(destination, 0, limit).await
    }

    /// [`Store::dead`] past the one whose [`NamedDelivery::cursor`] is `after` (0: from
    /// the first): the next page of a long dead-letter list. A page may hold a few more
    /// than `limit`: it ends with all the dead letters sharing its last cursor (on the
    /// embedded stores, an event's to several destinations).
    async fn dead_after(
        &self,
        destination: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<NamedDelivery>, StoreError>;

    /// Makes dead deliveries pending again, due now; returns how many.
    async fn replay(&self, which: ReplaySelector) -> Result<usize, StoreError>;

    /// Every stored event with this id (one per source that used it), with deliveries.
    async fn lookup(&self, id: &str) -> Result<Vec<EventView>, StoreError>;

    /// Whether an event with this id from `source` is kept: read-only, so that the ingress,
    /// shedding load without a write, still lets a possible duplicate reach [`Store::accept`].
    async fn kept(&self, source: &str, id: &str) -> Result<bool, StoreError>;

    /// The newest events matching `query`, walking back from its cursor, without their
    /// bodies (empty). A selective filter looks at a bounded number of events per call and
    /// returns a cursor to go on from; none once nothing older is kept.
    async fn recent(&self, query: &EventQuery) -> Result<EventPage, StoreError>;

    /// Pauses (nothing is sent) or resumes a destination; kept across restarts.
    async fn set_paused(&self, destination: &str, paused: bool) -> Result<(), StoreError>;

    /// Whether `destination` is paused.
    fn paused(&self, destination: &str) -> bool;

    /// Drops dedup records past their window, and events older than `retain` whose
    /// deliveries are all delivered. Returns how many records went.
    async fn purge(&self, retain: Duration) -> Result<usize, StoreError>;

    /// Pending deliveries of `destination` (the `max_queue` measure).
    fn queue_depth(&self, destination: &str) -> u64;

    /// Every destination that has pending deliveries, with their count (also those no
    /// longer configured: their deliveries stay on disk).
    fn queue_depths(&self) -> Vec<(String, u64)>;

    /// Woken whenever a delivery of `destination` becomes pending (accept, replay).
    fn wakeup(&self, destination: &str) -> Arc<Notify>;

    /// Tells the other instances sharing the store that this one's breaker for
    /// `destination` opened (`open`) or closed, in order, at most once (a change missed
    /// leaves that instance on its own breaker). Nothing on an embedded store: one
    /// instance owns it.
    fn share_breaker(&self, _destination: &str, _open: bool) {}

    /// The breaker changes other instances share ([`Store::share_breaker`]). Taken once,
    /// by the delivery engine; `None` on an embedded store.
    fn breaker_news(&self) -> Option<BreakerNews> {
        None
    }

    /// How many relay instances share this store's deliveries (each takes `1/n` of a
    /// destination's `rate` and `max_in_flight`); 1 for an embedded store.
    fn share(&self) -> usize {
        1
    }

    /// Whether this instance sends to a destination whose limits (`max_in_flight`, the
    /// rate's `burst`) allow `senders` instances at most. With fewer than
    /// [`Store::share`], only that many (the first live members by id) send; the others
    /// take none of its deliveries.
    fn delivers(&self, senders: usize) -> bool {
        let _ = senders;
        true
    }

    /// Whether this instance may still send `destination`'s delivery `seq`, listed by
    /// [`Store::pending`] a while ago: on a shared store its hold may have lapsed meanwhile
    /// (waiting for a slot or a rate token through an outage), and another instance may be
    /// sending it. Checked right before each send; always true on an embedded store.
    fn still_held(&self, destination: &str, seq: u64) -> bool {
        let _ = (destination, seq);
        true
    }

    /// For an instance that does not send to `destination` ([`Store::delivers`]): hands
    /// back what it holds of it and is not sending (`in_flight` names what it is), and
    /// takes no more until the next [`Store::pending`]. Nothing to do on an embedded store.
    async fn hand_back(&self, destination: &str, in_flight: &(dyn Fn(u64) -> bool + Send + Sync)) {
        let _ = (destination, in_flight);
    }

    /// The largest event body the store can keep, when it has a limit of its own (a NATS
    /// server's `max_payload`): a reload may not raise `server.max_body_bytes` past it.
    fn largest_body(&self) -> Option<u64> {
        None
    }

    /// Whether the store can be written now; the reason when not (readiness says it).
    fn available(&self) -> Result<(), String> {
        Ok(())
    }

    /// Shows whether the store takes writes now: a durable write of `bytes` (the largest
    /// event the ingress accepts), or the nearest thing. Readiness runs it after an accept
    /// failed, so that it says ready again once the store recovers even if no traffic
    /// comes meanwhile, and not while only small writes fit.
    async fn probe(&self, bytes: usize) -> Result<(), StoreError> {
        let _ = bytes;
        self.available().map_err(StoreError::Unavailable)
    }

    /// Flushes everything and stops accepting writes.
    async fn close(&self) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::StoredReply;

    #[test]
    fn a_reply_record_reads_back_as_it_was_kept() {
        for (content_type, body) in [
            (Some("application/json"), &br#"[{"action":"say"}]"#[..]),
            (None, &b"\x00\xff{"[..]),
            (Some(""), &b""[..]),
        ] {
            let r = StoredReply {
                status: 200,
                content_type: content_type.map(str::to_string),
                body: body.to_vec(),
            };
            let v = r.encode();
            assert_eq!(v.len(), 5 + content_type.map_or(0, str::len) + body.len());
            assert_eq!(StoredReply::decode(&v).unwrap(), r);
        }
        // Earlier builds' JSON still reads; anything else is corrupt, never misread.
        let old = br#"{"status":404,"content_type":null,"body":[104,105]}"#;
        let r = StoredReply::decode(old).unwrap();
        assert_eq!(
            (r.status, r.content_type, r.body),
            (404, None, b"hi".to_vec())
        );
        for bad in [
            &b""[..],
            b"\x01\x00",
            b"\x01\x00\xc8\x00\x09text",
            b"\x02\x00\xc8\xff\xff",
        ] {
            assert!(StoredReply::decode(bad).is_err(), "{bad:?}");
        }
    }
}
