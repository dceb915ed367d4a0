//! The event and delivery records of the key-value store. Format 3 writes them in a compact
//! binary form (a tag byte, fixed-width integers big-endian, strings length-prefixed);
//! formats 1 and 2 wrote JSON, which is still read: a JSON delivery starts with `{`, a JSON
//! event with the 4-byte length of its metadata (a first byte of 0), a binary one with
//! [`TAG`]. JSON cost three encodes or decodes per delivered event on the writer thread and
//! the schedulers (docs/performance.md).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::keys::corrupt;
use crate::store::{Delivery, DeliveryState, StoreError, StoredEvent};

/// The first byte of a binary record.
const TAG: u8 = 0xb3;

/// An event record's metadata.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct EventMeta {
    pub id: String,
    pub source: String,
    pub received_ms: u64,
    pub content_type: Option<String>,
}

/// `[TAG][received_ms][id][source][content_type?][body…]`, in a buffer of exactly its size:
/// a kept body is a slice of it (see [`super::fresh`]), so slack would be kept too.
pub(super) fn encode_event(meta: &EventMeta, body: &[u8]) -> Vec<u8> {
    let content_type = meta.content_type.as_ref().map_or(0, |c| 4 + c.len());
    let size = 1 + 8 + (4 + meta.id.len()) + (4 + meta.source.len()) + 1 + content_type;
    let mut w = Out(Vec::with_capacity(size + body.len()));
    w.0.push(TAG);
    w.u64(meta.received_ms);
    w.str(&meta.id);
    w.str(&meta.source);
    w.opt_str(meta.content_type.as_deref());
    w.0.extend_from_slice(body);
    w.0
}

/// An event record's metadata, and where its body starts.
pub(super) fn decode_meta(raw: &[u8]) -> Result<(EventMeta, usize), StoreError> {
    if raw.first() == Some(&TAG) {
        let mut r = In { raw, at: 1 };
        let received_ms = r.u64()?;
        let meta = EventMeta {
            received_ms,
            id: r.string()?,
            source: r.string()?,
            content_type: r.opt_string()?,
        };
        return Ok((meta, r.at));
    }
    // Formats 1 and 2: [u32 length][JSON metadata][body…].
    if raw.len() < 4 {
        return Err(corrupt("short event record"));
    }
    let n = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
    let meta: EventMeta =
        serde_json::from_slice(raw.get(4..4 + n).ok_or_else(|| corrupt("short meta"))?)
            .map_err(corrupt)?;
    Ok((meta, 4 + n))
}

pub(super) fn decode_event(seq: u64, raw: &[u8]) -> Result<StoredEvent, StoreError> {
    let (mut event, body) = decode_head(seq, raw)?;
    event.body = Bytes::copy_from_slice(&raw[body..]);
    Ok(event)
}

/// An event record without its body (an empty one), for a list that shows none; and where
/// the body starts.
pub(super) fn decode_head(seq: u64, raw: &[u8]) -> Result<(StoredEvent, usize), StoreError> {
    let (meta, body) = decode_meta(raw)?;
    let event = StoredEvent {
        seq,
        id: meta.id,
        source: meta.source,
        received_ms: meta.received_ms,
        content_type: meta.content_type,
        body: Bytes::new(),
    };
    Ok((event, body))
}

pub(super) fn encode_delivery(d: &Delivery) -> Vec<u8> {
    let mut w = Out(Vec::with_capacity(64 + d.destination.len()));
    w.0.push(TAG);
    w.u64(d.seq);
    w.str(&d.destination);
    w.0.push(match d.state {
        DeliveryState::Pending => 0,
        DeliveryState::Delivered => 1,
        DeliveryState::Dead => 2,
    });
    w.u32(d.attempts);
    w.u32(d.window_base);
    w.opt_u64(d.first_attempt_ms);
    w.u64(d.next_due_ms);
    match d.last_status {
        Some(s) => {
            w.0.push(1);
            w.0.extend_from_slice(&s.to_be_bytes());
        }
        None => w.0.push(0),
    }
    w.opt_str(d.last_error.as_deref());
    w.u64(d.updated_ms);
    w.opt_str(d.order_key.as_deref());
    w.0
}

pub(super) fn decode_delivery(v: &[u8]) -> Result<Delivery, StoreError> {
    if v.first() != Some(&TAG) {
        return serde_json::from_slice(v).map_err(corrupt); // formats 1 and 2
    }
    let mut r = In { raw: v, at: 1 };
    let d = Delivery {
        seq: r.u64()?,
        destination: r.string()?,
        state: match r.u8()? {
            0 => DeliveryState::Pending,
            1 => DeliveryState::Delivered,
            2 => DeliveryState::Dead,
            n => return Err(corrupt(format!("delivery state {n}"))),
        },
        attempts: r.u32()?,
        window_base: r.u32()?,
        first_attempt_ms: r.opt_u64()?,
        next_due_ms: r.u64()?,
        last_status: match r.present()? {
            false => None,
            true => Some(u16::from_be_bytes(r.take(2)?.try_into().unwrap())),
        },
        last_error: r.opt_string()?,
        updated_ms: r.u64()?,
        order_key: r.opt_string()?,
        waiting: false,
    };
    if r.at != v.len() {
        return Err(corrupt("trailing bytes in a delivery record"));
    }
    Ok(d)
}

struct Out(Vec<u8>);

impl Out {
    fn u32(&mut self, n: u32) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }
    fn u64(&mut self, n: u64) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }
    fn opt_u64(&mut self, n: Option<u64>) {
        match n {
            Some(n) => {
                self.0.push(1);
                self.u64(n);
            }
            None => self.0.push(0),
        }
    }
    fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.0.push(1);
                self.str(s);
            }
            None => self.0.push(0),
        }
    }
}

struct In<'a> {
    raw: &'a [u8],
    at: usize,
}

impl In<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], StoreError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.raw.len());
        let end = end.ok_or_else(|| corrupt("short record"))?;
        let out = &self.raw[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    /// An optional field's flag: 0 absent, 1 present; any other byte is damage, not
    /// "present" (which would misread what follows).
    fn present(&mut self) -> Result<bool, StoreError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(corrupt(format!("optional field flag {n}"))),
        }
    }
    fn opt_u64(&mut self) -> Result<Option<u64>, StoreError> {
        Ok(match self.present()? {
            false => None,
            true => Some(self.u64()?),
        })
    }
    fn string(&mut self) -> Result<String, StoreError> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(corrupt)
    }
    fn opt_string(&mut self) -> Result<Option<String>, StoreError> {
        Ok(match self.present()? {
            false => None,
            true => Some(self.string()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn delivery() -> impl Strategy<Value = Delivery> {
        (
            (any::<u64>(), ".{0,20}", 0u8..3, any::<u32>(), any::<u32>()),
            (
                any::<Option<u64>>(),
                any::<u64>(),
                any::<Option<u16>>(),
                proptest::option::of(".{0,40}"),
                any::<u64>(),
                proptest::option::of(".{0,20}"),
            ),
        )
            .prop_map(|((seq, destination, state, attempts, window_base), rest)| {
                Delivery {
                    seq,
                    destination,
                    state: [
                        DeliveryState::Pending,
                        DeliveryState::Delivered,
                        DeliveryState::Dead,
                    ][state as usize],
                    attempts,
                    window_base,
                    first_attempt_ms: rest.0,
                    next_due_ms: rest.1,
                    last_status: rest.2,
                    last_error: rest.3,
                    updated_ms: rest.4,
                    order_key: rest.5,
                    waiting: false,
                }
            })
    }

    #[test]
    fn a_damaged_optional_field_flag_is_an_error_not_a_present_field() {
        let d = Delivery {
            seq: 2,
            destination: "d".into(),
            state: DeliveryState::Pending,
            attempts: 3,
            window_base: 4,
            first_attempt_ms: Some(7),
            next_due_ms: 8,
            last_status: Some(500),
            last_error: Some("e".into()),
            updated_ms: 9,
            order_key: Some("k".into()),
            waiting: false,
        };
        let v = encode_delivery(&d);
        // The flags of first_attempt_ms, last_status, last_error and order_key.
        for at in [23, 40, 43, 57] {
            assert_eq!(v[at], 1, "a flag at {at}");
            for n in 2..=255u8 {
                let mut bad = v.clone();
                bad[at] = n;
                assert!(decode_delivery(&bad).is_err(), "flag {n} at {at}");
            }
        }
        // An event without a content type whose body starts like one: a damaged flag must
        // not turn the body's first bytes into a content type.
        let meta = EventMeta {
            id: "i".into(),
            source: "s".into(),
            received_ms: 1,
            content_type: None,
        };
        let v = encode_event(&meta, b"\0\0\0\x01x{}");
        assert_eq!(v[19], 0, "the content type's flag");
        for n in 2..=255u8 {
            let mut bad = v.clone();
            bad[19] = n;
            assert!(decode_meta(&bad).is_err(), "flag {n}");
        }
    }

    proptest! {
        #[test]
        fn a_delivery_reads_back_as_written(d in delivery()) {
            let v = encode_delivery(&d);
            prop_assert_eq!(decode_delivery(&v).unwrap(), d.clone());
            // The JSON of formats 1 and 2 still reads.
            prop_assert_eq!(decode_delivery(&serde_json::to_vec(&d).unwrap()).unwrap(), d);
            // Cut short anywhere: an error, never a wrong record.
            for cut in 0..v.len() {
                prop_assert!(decode_delivery(&v[..cut]).is_err());
            }
        }

        #[test]
        fn an_event_reads_back_as_written(
            id in ".{0,30}", source in "[a-z]{1,10}", received_ms in any::<u64>(),
            content_type in proptest::option::of("[a-z/]{0,20}"),
            body in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let meta = EventMeta { id, source, received_ms, content_type };
            let v = encode_event(&meta, &body);
            // Exactly its size: kept bodies are slices of it and would keep any slack.
            prop_assert_eq!(v.capacity(), v.len());
            let e = decode_event(7, &v).unwrap();
            prop_assert_eq!(
                (&e.id, &e.source, e.received_ms, &e.content_type, &e.body[..]),
                (&meta.id, &meta.source, meta.received_ms, &meta.content_type, &body[..])
            );
            // Format 2's layout: [u32 length][JSON metadata][body].
            let m = serde_json::to_vec(&meta).unwrap();
            let mut old = (m.len() as u32).to_be_bytes().to_vec();
            old.extend_from_slice(&m);
            old.extend_from_slice(&body);
            let (read, at) = decode_meta(&old).unwrap();
            prop_assert_eq!(read, meta);
            prop_assert_eq!(&old[at..], &body[..]);
        }
    }
}
