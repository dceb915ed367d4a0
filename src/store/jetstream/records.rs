//! What the jetstream backend keeps, as subjects of its one stream and message payloads.
//!
//! Subjects (`<p>` is the configured prefix; `<e>` = `<id hash>.<source hash>` names one
//! event; `<d>` is a subject-safe token of a destination name):
//! - `<p>.ev.<e>`: the event (meta, destinations + body); its existence is the dedup
//!   record, so it is written with "no message on this subject yet" as its condition and
//!   lives for `max(dedup window, retain, 1 day)`. A shared consumer fans it out.
//! - `<p>.q.<d>.<e>`: one delivery's current state (pending with the body; delivered,
//!   small, as long as its event; dead with the body, until replayed). The stream keeps one message
//!   per subject, so each write replaces the previous state; every write is conditional on
//!   the state it read, so two instances cannot both move a delivery on. When an earlier
//!   event with the same id and source still has a pending or dead state there (kept past
//!   its event), a new event's delivery is kept apart: `<p>.q.<d>.<e>.<event seq>`.
//! - `<p>.dl.<d>.<e>`: a dead letter's index entry (`dead` or `replayed`).
//! - `<p>.re.<e>`: a reply route's stored answer, for the dedup window.
//! - `<p>.o.<d>.<k>.<slot>`: an `order_by` delivery's place in its key's line (`<k>`
//!   hashes the key; `<slot>` is random, one per delivery, also in the event's record).
//!   Written by the accept before the event, so the stream's order of a key's entries is
//!   the accept order; the first entry is the line's head. See [`super::lines`].

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Delivery, StoreError, StoredEvent};

/// The names of everything under one prefix.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn stream(&self) -> String {
        self.prefix.clone()
    }
    pub fn pauses_bucket(&self) -> String {
        format!("{}_pauses", self.prefix)
    }
    pub fn members_bucket(&self) -> String {
        format!("{}_members", self.prefix)
    }
    pub fn consumer(&self, dest: &str) -> String {
        format!("{}-{}", self.prefix, token(dest))
    }
    pub fn all(&self) -> String {
        format!("{}.>", self.prefix)
    }
    pub fn event(&self, e: &str) -> String {
        format!("{}.ev.{e}", self.prefix)
    }
    pub fn events(&self) -> String {
        format!("{}.ev.>", self.prefix)
    }
    pub fn fanout_consumer(&self) -> String {
        format!("{}-fanout", self.prefix)
    }
    /// The last token of the events of `source` (`<p>.ev.<e>` ends with it).
    pub fn source_part(source: &str) -> String {
        hash(source)
    }
    pub fn events_of_id(&self, id: &str) -> String {
        format!("{}.ev.{}.*", self.prefix, hash(id))
    }
    pub fn delivery(&self, dest: &str, e: &str) -> String {
        format!("{}.q.{}.{e}", self.prefix, token(dest))
    }
    pub fn deliveries_of(&self, dest: &str) -> String {
        format!("{}.q.{}.>", self.prefix, token(dest))
    }
    pub fn dead(&self, dest: &str, e: &str) -> String {
        format!("{}.dl.{}.{e}", self.prefix, token(dest))
    }
    pub fn dead_of(&self, dest: Option<&str>) -> String {
        match dest {
            Some(d) => format!("{}.dl.{}.>", self.prefix, token(d)),
            None => format!("{}.dl.>", self.prefix),
        }
    }
    /// The dead-letter index entries of every event with this id (kept apart or not).
    pub fn dead_of_id(&self, id: &str) -> String {
        format!("{}.dl.*.{}.>", self.prefix, hash(id))
    }
    /// An ordered delivery's line entry.
    pub fn line_entry(&self, dest: &str, key: &str, slot: &str) -> String {
        format!("{}.o.{}.{}.{slot}", self.prefix, token(dest), hash(key))
    }
    /// Every entry of one key's line.
    pub fn line(&self, dest: &str, key: &str) -> String {
        format!("{}.o.{}.{}.*", self.prefix, token(dest), hash(key))
    }
    pub fn reply(&self, e: &str) -> String {
        format!("{}.re.{e}", self.prefix)
    }
    /// The event part (`<id hash>.<source hash>`) of any of its subjects.
    pub fn event_part<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix('.')?;
        let (kind, rest) = rest.split_once('.')?;
        match kind {
            "ev" | "re" => Some(rest),
            "q" | "dl" => rest.split_once('.').map(|(_, e)| e),
            _ => None,
        }
    }
    pub fn is_event(&self, subject: &str) -> bool {
        subject
            .strip_prefix(&self.prefix)
            .is_some_and(|r| r.starts_with(".ev."))
    }
}

/// 16 hex digits of SHA-256: a subject token for any string.
fn hash(s: &str) -> String {
    let d = Sha256::digest(s.as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The event part of its subjects.
pub fn event_token(source: &str, id: &str) -> String {
    format!("{}.{}", hash(id), hash(source))
}

/// A destination name as one subject token: as it is when it holds only letters, digits,
/// `-` and `_`; else hex (a config name may hold `.`; a name an admin query gives may hold
/// anything, a space or a wildcard `*` or `>` included, and must still name one token).
pub fn token(name: &str) -> String {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if !name.bytes().all(plain) {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        format!("h-{hex}")
    } else {
        format!("n-{name}")
    }
}

/// The name a destination token stands for.
pub fn untoken(t: &str) -> Option<String> {
    if let Some(n) = t.strip_prefix("n-") {
        return Some(n.to_string());
    }
    let hex = t.strip_prefix("h-")?;
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The format of the records this build writes: the stream is marked with it
/// ([`super::setup::FORMAT_KEY`]) and every event and delivery record carries it, so that a
/// build reading a newer one's record refuses it instead of misreading it (serde would drop
/// the fields it does not know, and a rewrite would lose them). Records and streams without
/// one (builds before 2026-12-07) read as 0 and 1 alike: their layout is format 2's.
pub const FORMAT: u32 = 2;

/// The event's facts kept with it and with each delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventMeta {
    /// The record's format ([`FORMAT`]; 0 in records of builds before it).
    #[serde(default)]
    pub v: u32,
    pub id: String,
    pub source: String,
    pub received_ms: u64,
    pub content_type: Option<String>,
    /// How long its event record is kept (`max(dedup window, retain, 1 day)` when it was accepted),
    /// ms; 0 in records of earlier builds. A delivered state and a kept reply live as long,
    /// whatever the window is by then: a fan-out consumer made again reads every event kept,
    /// and one whose delivered state had gone would be sent again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub keep_ms: u64,
    /// The destinations it was accepted for (on the event record only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<String>,
    /// A reply route's destination and when its stored delivery is due (on the event
    /// record only): the call is made at once, the stored delivery is the fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<(String, u64)>,
    /// Each destination's place in an `order_by` line, in the order of `destinations`
    /// (on the event record only; empty when none is ordered).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<Option<Line>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An ordered delivery's order key, the slot naming its line entry, and the entry's
/// sequence (written before the event, so known to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub key: String,
    pub slot: String,
    #[serde(default)]
    pub entry: u64,
}

impl Line {
    pub fn new(key: String) -> Self {
        Line {
            key,
            slot: format!("{:016x}", rand::random::<u64>()),
            entry: 0,
        }
    }
}

/// A line entry's payload: the event part of the delivery it stands for, its place in
/// accept order (`pos`; 0: the entry's own sequence, as written by the accept), and when
/// the accept wrote it (`ms`, by the writer's clock: shown, never compared across
/// instances).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LineEntry {
    pub e: String,
    #[serde(default)]
    pub pos: u64,
    #[serde(default)]
    pub ms: u64,
}

impl LineEntry {
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("entries serialize"))
    }
    pub fn decode(payload: &[u8]) -> Result<Self, StoreError> {
        serde_json::from_slice(payload)
            .map_err(|e| StoreError::Corrupt(format!("a line entry: {e}")))
    }
    /// Its place in accept order, given its own sequence.
    pub fn pos(&self, entry_seq: u64) -> u64 {
        if self.pos > 0 {
            self.pos
        } else {
            entry_seq
        }
    }
}

impl EventMeta {
    /// The pending delivery to `destination` an accepted event starts with (waiting, if
    /// ordered: its line's head is told to go when it is first).
    pub fn first_delivery(&self, seq: u64, destination: &str) -> DeliveryRecord {
        let i = self.destinations.iter().position(|d| d == destination);
        let line = i.and_then(|i| self.lines.get(i).cloned().flatten());
        let key = line.as_ref().map(|l| l.key.clone());
        let entry = line.as_ref().map(|l| l.entry).filter(|e| *e > 0);
        DeliveryRecord {
            delivery: Delivery::first(seq, destination, self.received_ms, self.held.as_ref(), key),
            event: EventMeta {
                destinations: Vec::new(),
                held: None,
                lines: Vec::new(),
                ..self.clone()
            },
            apart: false,
            waiting: line.is_some(),
            slot: line.map(|l| l.slot),
            entry,
            pos: entry,
        }
    }
}

/// A delivery's state message: the delivery, its event's facts, and the body when it may
/// still be sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub delivery: Delivery,
    pub event: EventMeta,
    /// On subjects of its own (`...<e>.<event seq>`): when it was fanned out, its usual
    /// subject still held the pending or dead delivery of an earlier event with the same id
    /// and source (kept past that event's message), which must not be replaced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub apart: bool,
    /// An ordered delivery's line entry slot (its key is `delivery.order_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// An ordered delivery not at the head of its key's line: pending, not to be sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waiting: bool,
    /// Its line entry's sequence, when known (not after a replay: the new entry's is known
    /// only once written; nor after another of its key's replays rewrote the line: then it is
    /// stale, deleting it finds nothing, and the line's head is read instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<u64>,
    /// Its place in its key's line by accept order: its first entry's sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos: Option<u64>,
}

impl DeliveryRecord {
    /// The event part of its subjects (`<p>.q.<d>.<part>`, `<p>.dl.<d>.<part>`).
    pub fn part(&self) -> String {
        let e = event_token(&self.event.source, &self.event.id);
        if self.apart {
            apart(&e, self.delivery.seq)
        } else {
            e
        }
    }
}

/// The event part of a delivery kept apart: the event's, then its sequence.
pub fn apart(e: &str, seq: u64) -> String {
    format!("{e}.{seq}")
}

/// `json` + newline + `body`: serde_json never writes a raw newline.
fn frame<T: Serialize>(head: &T, body: &[u8]) -> Bytes {
    let json = serde_json::to_vec(head).expect("records serialize");
    let mut out = BytesMut::with_capacity(json.len() + 1 + body.len());
    out.extend_from_slice(&json);
    out.extend_from_slice(b"\n");
    out.extend_from_slice(body);
    out.freeze()
}

/// An error when a record's format is newer than [`FORMAT`].
fn readable(v: u32) -> Result<(), StoreError> {
    if v > FORMAT {
        return Err(StoreError::Format(format!(
            "a record in format {v}, written by a newer hookrelay (this build reads formats up to {FORMAT}): run the newer build on every instance"
        )));
    }
    Ok(())
}

fn unframe<T: for<'de> Deserialize<'de>>(payload: &Bytes) -> Result<(T, Bytes), StoreError> {
    let cut = payload
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| StoreError::Corrupt("a record without its header line".into()))?;
    let head = serde_json::from_slice(&payload[..cut])
        .map_err(|e| StoreError::Corrupt(format!("a record's header: {e}")))?;
    Ok((head, payload.slice(cut + 1..)))
}

pub fn encode_event(meta: &EventMeta, body: &[u8]) -> Bytes {
    frame(meta, body)
}

pub fn decode_event(seq: u64, payload: &Bytes) -> Result<(EventMeta, StoredEvent), StoreError> {
    let (mut meta, body): (EventMeta, Bytes) = unframe(payload)?;
    readable(meta.v)?;
    // Read, it is in this build's layout: what is written from it (a delivery's record)
    // carries this build's format, not the older one it was read in.
    meta.v = FORMAT;
    let ev = StoredEvent {
        seq,
        id: meta.id.clone(),
        source: meta.source.clone(),
        received_ms: meta.received_ms,
        content_type: meta.content_type.clone(),
        body,
    };
    Ok((meta, ev))
}

pub fn encode_delivery(rec: &DeliveryRecord, body: &[u8]) -> Bytes {
    frame(rec, body)
}

pub fn decode_delivery(payload: &Bytes) -> Result<(DeliveryRecord, Bytes), StoreError> {
    let (mut rec, body): (DeliveryRecord, Bytes) = unframe(payload)?;
    readable(rec.event.v)?;
    // As for an event: written back, it carries this build's format.
    rec.event.v = FORMAT;
    Ok((rec, body))
}

/// The event a delivery record carries, as `event()` returns it.
pub fn stored_event(rec: &DeliveryRecord, body: Bytes) -> StoredEvent {
    StoredEvent {
        seq: rec.delivery.seq,
        id: rec.event.id.clone(),
        source: rec.event.source.clone(),
        received_ms: rec.event.received_ms,
        content_type: rec.event.content_type.clone(),
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event's facts: `id` from source `s`, for destination `d`.
    fn meta(id: &str) -> EventMeta {
        EventMeta {
            v: FORMAT,
            id: id.into(),
            source: "s".into(),
            received_ms: 5,
            content_type: None,
            keep_ms: 0,
            destinations: vec!["d".into()],
            held: None,
            lines: Vec::new(),
        }
    }

    #[test]
    fn subjects_name_their_event_and_tokens_stay_one_token() {
        let n = Names {
            prefix: "hr".into(),
        };
        let e = event_token("voice", "a.b c>*");
        assert_eq!(e.split('.').count(), 2);
        assert!(!e.contains(['*', '>', ' ']));
        for name in ["a b", "*", ">", "a.b", "a\tb", "ü"] {
            let t = token(name);
            assert!(t.starts_with("h-"), "{t}");
            assert!(t[2..].bytes().all(|b| b.is_ascii_hexdigit()), "{t}");
            assert_eq!(untoken(&t).as_deref(), Some(name));
        }
        assert_eq!(token("crm_eu-1"), "n-crm_eu-1");
        assert_eq!(n.event_part(&n.event(&e)), Some(e.as_str()));
        assert_eq!(n.event_part(&n.delivery("crm.eu", &e)), Some(e.as_str()));
        assert_eq!(n.event_part(&n.dead("crm", &e)), Some(e.as_str()));
        assert_eq!(token("crm.eu").split('.').count(), 1);
        assert_ne!(token("a.b"), token("a_b"));
        assert!(n.is_event(&n.event(&e)));
        assert!(!n.is_event(&n.reply(&e)));
    }

    #[test]
    fn a_delivery_kept_apart_has_its_event_sequence_in_its_subjects() {
        let n = Names {
            prefix: "hr".into(),
        };
        let meta = EventMeta {
            destinations: Vec::new(),
            ..meta("i")
        };
        let mut rec = meta.first_delivery(42, "d");
        let e = event_token("s", "i");
        assert_eq!(rec.part(), e);
        rec.apart = true;
        assert_eq!(rec.part(), format!("{e}.42"));
        assert_eq!(n.delivery("d", &rec.part()), format!("hr.q.n-d.{e}.42"));
        // The index filter by id matches both forms (NATS wildcards: `*` one token, `>` one
        // or more).
        let matches = |filter: &str, subject: &str| {
            let f: Vec<&str> = filter.split('.').collect();
            let s: Vec<&str> = subject.split('.').collect();
            let tail = f.last() == Some(&">");
            (if tail {
                s.len() >= f.len()
            } else {
                s.len() == f.len()
            }) && f
                .iter()
                .zip(&s)
                .all(|(f, s)| *f == "*" || *f == ">" || f == s)
        };
        let by_id = n.dead_of_id("i");
        assert!(matches(&by_id, &n.dead("d", &rec.part())), "{by_id}");
        assert!(matches(&by_id, &n.dead("d", &e)), "{by_id}");
        assert!(!matches(&by_id, &n.dead("d", &event_token("s", "j"))));
        // A record written before the flag existed reads as not apart.
        let (old, _) =
            decode_delivery(&encode_delivery(&meta.first_delivery(1, "d"), b"")).unwrap();
        assert!(!old.apart);
        let json = String::from_utf8(encode_delivery(&rec, b"").to_vec()).unwrap();
        assert!(json.contains("\"apart\":true"), "{json}");
    }

    #[test]
    fn a_body_with_newlines_survives_its_frame() {
        let meta = meta("x\ny");
        let p = encode_event(&meta, b"{\n\"a\":1}\n");
        let (m, ev) = decode_event(9, &p).unwrap();
        assert_eq!(m.id, "x\ny");
        assert_eq!(&ev.body[..], b"{\n\"a\":1}\n");
        assert_eq!(ev.seq, 9);
    }

    #[test]
    fn a_newer_builds_record_is_refused_and_an_unmarked_one_read() {
        let meta = EventMeta {
            v: FORMAT + 1,
            ..meta("i")
        };
        let newer = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Format(m)) if m.contains("newer hookrelay"));
        assert!(newer(
            decode_event(1, &encode_event(&meta, b"{}")).map(drop)
        ));
        let rec = meta.first_delivery(1, "d");
        assert!(newer(
            decode_delivery(&encode_delivery(&rec, b"{}")).map(drop)
        ));
        // Written before records carried a format.
        let json = String::from_utf8(encode_event(&meta, b"{}").to_vec()).unwrap();
        let unmarked = json.replacen(&format!("\"v\":{},", FORMAT + 1), "", 1);
        assert_ne!(unmarked, json);
        let (m, _) = decode_event(1, &Bytes::from(unmarked)).unwrap();
        assert_eq!(
            m.v, FORMAT,
            "read, it is this build's: written again, marked so"
        );
    }

    /// A delivery read from an older format's record is written back in this build's
    /// format (an older build must not take this build's layout for its own).
    #[test]
    fn a_record_read_in_an_older_format_is_written_back_in_this_one() {
        let older = EventMeta {
            v: FORMAT - 1,
            ..meta("i")
        };
        let rec = older.first_delivery(1, "d");
        let (read, _) = decode_delivery(&encode_delivery(&rec, b"{}")).unwrap();
        let json = String::from_utf8(encode_delivery(&read, b"{}").to_vec()).unwrap();
        assert!(json.contains(&format!("\"v\":{FORMAT}")), "{json}");
        let (event, _) = decode_event(1, &encode_event(&older, b"{}")).unwrap();
        assert_eq!(event.first_delivery(1, "d").event.v, FORMAT);
    }
}
