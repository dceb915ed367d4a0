//! The store's operations as the writer thread runs them inside a group: accept (dedup,
//! max_queue, the event and its deliveries), record an attempt's outcome, replay, purge.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use super::keys::*;
use super::records::*;
use super::writer::Writer;
use crate::store::*;

/// Events one purge operation looks at. A purge is as many operations as it takes, so the
/// writer serves other work between them and holds at most this many events' metadata.
pub(super) const PURGE_BATCH: usize = 1024;
/// How far past now an event's arrival may be before the purge takes the clock for set
/// back since (and passes over it) rather than for the first young event.
const CLOCK_SET_BACK_MS: u64 = 60 * 60 * 1000;
/// Dead letters one operation of a destination's replay reopens at most.
pub(super) const REPLAY_CHUNK: usize = 1024;

/// What one chunk of a destination's replay did ([`Writer::replay_dead`]).
pub(super) struct ReplayChunk {
    pub replayed: usize,
    /// Where the next chunk starts; `None`: none left.
    pub next: Option<u64>,
    /// The replay's end: the first event sequence it does not take.
    pub until: u64,
}

/// Damaged records one step over at most while looking for a key's next delivery.
const MAX_DAMAGED_SKIPPED: usize = 64;

impl Writer<'_> {
    pub(super) fn committed_depth(&self, dest: &str) -> u64 {
        self.committed
            .read()
            .unwrap()
            .get(dest)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    pub(super) fn delivery(
        &mut self,
        seq: u64,
        dest: &str,
    ) -> Result<Option<Delivery>, StoreError> {
        self.txn
            .get(&delivery_key(seq, dest))?
            .map(|v| decode_delivery(&v))
            .transpose()
    }

    pub(super) fn deliveries_of(&mut self, seq: u64) -> Result<Vec<Delivery>, StoreError> {
        let mut out = Vec::new();
        self.txn
            .scan_prefix(&key(&[b"l/", &be(seq)]), &mut |_, v| {
                out.push(decode_delivery(v)?);
                Ok(true)
            })?;
        Ok(out)
    }

    pub(super) fn accept(&mut self, ev: NewEvent) -> Result<Admission, StoreError> {
        let dk = dedup_key(&ev.source, &ev.id);
        let legacy = ev.received_ms < self.legacy_until;
        let txn = &mut *self.txn;
        // Past its window, the id's earlier events stay reachable by id (a dead one must be
        // found and replayed by it): the new record names those still stored.
        let mut earlier = Vec::new();
        if let Some(v) = read_dedup(&dk, &ev.source, &ev.id, legacy, |k| txn.get(k))? {
            let (seq, expires) = (read_u64(&v), read_u64(&v[8..]));
            if expires > ev.received_ms {
                let reply = match self.txn.get(&reply_key(seq))? {
                    Some(r) => Some(StoredReply::decode(&r)?),
                    None => None,
                };
                return Ok(Admission::Duplicate { seq, reply });
            }
            // The newest still stored, whatever number of those named were purged.
            for s in event_seqs(&v) {
                if earlier.len() == EARLIER_KEPT {
                    break;
                }
                if self.txn.get(&event_key(s))?.is_some() {
                    earlier.push(s);
                }
            }
        }
        for (i, dest) in ev.destinations.iter().enumerate() {
            let Some(&max) = ev.max_queue.get(i) else {
                continue;
            };
            let committed = self.committed_depth(dest) as i64;
            if committed + self.depth.get(dest).copied().unwrap_or(0) >= max as i64 {
                return Ok(Admission::QueueFull {
                    destination: dest.clone(),
                });
            }
        }
        let seq = *self.next_seq;
        *self.next_seq += 1;
        let expires = ev.received_ms + ev.dedup_window.as_millis() as u64;
        let meta = EventMeta {
            id: ev.id,
            source: ev.source,
            received_ms: ev.received_ms,
            content_type: ev.content_type,
        };
        // One buffer serves the record and, sliced, the body kept for the first attempts: a
        // body of its own, not a slice of the connection's read buffer (which it would keep
        // allocated, whole).
        let record = Bytes::from(encode_event(&meta, &ev.body));
        self.txn.put(&event_key(seq), &record)?;
        self.txn.put(&dk, &dedup_value(seq, expires, &earlier))?;
        // Deliveries a scheduler will attempt at once: not held for a reply route, not
        // waiting behind an earlier one of their order key.
        let mut due_now = 0;
        for (i, dest) in ev.destinations.iter().enumerate() {
            let order_key = ev.order_keys.get(i).cloned().flatten();
            let d = Delivery::first(seq, dest, ev.received_ms, ev.held.as_ref(), order_key);
            self.txn
                .put(&delivery_key(seq, dest), &encode_delivery(&d))?;
            if self.join_order(&d)? {
                self.queue(dest, d.next_due_ms, seq)?;
                due_now += usize::from(d.next_due_ms <= ev.received_ms);
            }
        }
        for dest in &ev.destinations {
            self.count(dest, 1);
        }
        if due_now > 0 {
            let event = StoredEvent {
                seq,
                id: meta.id,
                source: meta.source,
                received_ms: meta.received_ms,
                content_type: meta.content_type,
                body: record.slice(record.len() - ev.body.len()..),
            };
            self.accepted.push((event, due_now));
        }
        Ok(Admission::Accepted { seq })
    }

    /// Enters an ordered delivery in its key's line; whether it is the head (then it goes in
    /// the due queue now) or waits behind others. An unordered one is always its own head.
    fn join_order(&mut self, d: &Delivery) -> Result<bool, StoreError> {
        let Some(order) = &d.order_key else {
            return Ok(true);
        };
        let prefix = order_prefix(&d.destination, order);
        let mut waiting = false;
        self.txn.scan_prefix(&prefix, &mut |_, _| {
            waiting = true;
            Ok(false)
        })?;
        self.txn
            .put(&order_key(&d.destination, order, d.seq), &[])?;
        Ok(!waiting)
    }

    /// Whether `d` is first in its key's line (an unordered one always is).
    fn heads_line(&mut self, d: &Delivery) -> Result<bool, StoreError> {
        let Some(order) = &d.order_key else {
            return Ok(true);
        };
        let mut first = None;
        self.txn
            .scan_prefix(&order_prefix(&d.destination, order), &mut |k, _| {
                first = Some(read_u64(&k[k.len() - 8..]));
                Ok(false)
            })?;
        Ok(first.is_none_or(|seq| seq == d.seq))
    }

    /// An ordered delivery leaves its key's line (delivered or dead). If it held the key's
    /// place in the due queue (`queued`), the first still in the line becomes the head and
    /// goes in the due queue (again, if it already was: the same key, so nothing changes).
    fn leave_order(&mut self, d: &Delivery, queued: bool) -> Result<(), StoreError> {
        let Some(order) = &d.order_key else {
            return Ok(());
        };
        self.txn.delete(&order_key(&d.destination, order, d.seq))?;
        if !queued {
            return Ok(());
        }
        self.promote_first(&d.destination, order)
    }

    /// Puts the first of `order`'s line in the due queue (again, if it already was: the
    /// same key, so nothing changes). One whose record cannot be read cannot be sent: it
    /// leaves the line (with a warning), so the key's next goes instead of none.
    fn promote_first(&mut self, dest: &str, order: &str) -> Result<(), StoreError> {
        let prefix = order_prefix(dest, order);
        // Bounded: each turn takes a damaged entry out of the line.
        for _ in 0..MAX_DAMAGED_SKIPPED {
            let mut next = None;
            self.txn.scan_prefix(&prefix, &mut |k, _| {
                next = Some(read_u64(&k[k.len() - 8..]));
                Ok(false)
            })?;
            let Some(seq) = next else {
                return Ok(());
            };
            match self.delivery(seq, dest) {
                Ok(Some(n)) if n.state == DeliveryState::Pending => {
                    return self.queue(dest, n.next_due_ms, seq);
                }
                Ok(_) => return Ok(()),
                Err(StoreError::Corrupt(e)) => {
                    tracing::warn!(seq, destination = dest, error = %e, "a delivery record cannot be read; it leaves its key's line, the next goes");
                    self.txn.delete(&order_key(dest, order, seq))?;
                    // A line holds pending deliveries only: this one no longer counts.
                    self.count(dest, -1);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(super) fn record(&mut self, k: &DeliveryKey, outcome: Outcome) -> Result<(), StoreError> {
        let Some(mut d) = self.delivery(k.seq, &k.destination)? else {
            return Ok(()); // purged meanwhile: nothing to record
        };
        if d.state == DeliveryState::Dead && matches!(outcome, Outcome::Delivered { .. }) {
            // A reply route's call for a duplicate delivered what the first call left dead
            // (a 4xx): off the dead list, so no replay sends it again. It left its queue
            // and its line when it died.
            self.txn.delete(&dead_key(&k.destination, k.seq))?;
            d.apply(&outcome, now_ms());
            return self
                .txn
                .put(&delivery_key(k.seq, &k.destination), &encode_delivery(&d));
        }
        if d.state != DeliveryState::Pending {
            return Ok(());
        }
        if let Outcome::Retry {
            attempt: Some(n), ..
        } = &outcome
        {
            if d.attempts >= *n {
                return Ok(()); // counted already: its group's flush failed after the write
            }
        }
        let now = now_ms();
        let qk = queue_key(&k.destination, d.next_due_ms, k.seq);
        // Whether it held its key's place in the due queue: a reply route's call is made at
        // once, whatever the key, for a delivery that may wait in its line behind the one
        // queued. Only the one queued hands the place on.
        let queued = d.order_key.is_none() || self.txn.get(&qk)?.is_some();
        self.txn.delete(&qk)?;
        d.apply(&outcome, now);
        let leaves_queue = match d.state {
            DeliveryState::Pending => {
                // Back in the due queue if it heads its key's line. If an earlier one is
                // ahead of it (replayed meanwhile), it waits and that one goes first.
                if self.heads_line(&d)? {
                    self.queue(&k.destination, d.next_due_ms, k.seq)?;
                } else if let (Some(order), true) = (&d.order_key, queued) {
                    self.promote_first(&k.destination, order)?;
                }
                false
            }
            DeliveryState::Dead => {
                self.txn.put(&dead_key(&k.destination, k.seq), &[])?;
                true
            }
            DeliveryState::Delivered => true,
        };
        self.txn
            .put(&delivery_key(k.seq, &k.destination), &encode_delivery(&d))?;
        if leaves_queue {
            self.count(&k.destination, -1);
            self.leave_order(&d, queued)?;
        }
        Ok(())
    }

    /// Makes the delivery of `seq` to `dest` pending again if it is dead. One whose record
    /// cannot be read is left, before anything is written for it: an error would end every
    /// replay that reaches it.
    pub(super) fn replay_one(&mut self, seq: u64, dest: &str) -> Result<bool, StoreError> {
        let mut d = match self.delivery(seq, dest) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(false),
            Err(StoreError::Corrupt(e)) => {
                tracing::warn!(seq, destination = dest, error = %e, "a dead delivery's record cannot be read; the replay leaves it");
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        if d.state != DeliveryState::Dead {
            return Ok(false);
        }
        let now = now_ms();
        d.reopen(now);
        self.txn.delete(&dead_key(dest, seq))?;
        // An ordered one takes its place in its key's line again, by accept order.
        if self.join_order(&d)? {
            self.queue(dest, now, seq)?;
        }
        self.txn
            .put(&delivery_key(seq, dest), &encode_delivery(&d))?;
        self.count(dest, 1);
        Ok(true)
    }

    /// Replays the dead deliveries of `dest` of the events from `from` up to (not including)
    /// `until`, [`REPLAY_CHUNK`] at most: one operation of a replay of a whole destination,
    /// so that accepts are committed between its chunks. `None`: up to the next event's
    /// sequence, so dead letters of events accepted later are not this replay's. One
    /// replayed that dies again is behind the next chunk's start: not replayed twice.
    pub(super) fn replay_dead(
        &mut self,
        dest: &str,
        from: u64,
        until: Option<u64>,
    ) -> Result<ReplayChunk, StoreError> {
        let until = until.unwrap_or(*self.next_seq);
        let prefix = key(&[b"z/", dest.as_bytes(), b"\0"]);
        let mut seqs = Vec::new();
        let mut more = false;
        self.txn
            .scan_from(&prefix, &dead_key(dest, from), &mut |k, _| {
                let seq = read_u64(&k[k.len() - 8..]);
                if seq >= until {
                    return Ok(false);
                }
                if seqs.len() == REPLAY_CHUNK {
                    more = true;
                    return Ok(false);
                }
                seqs.push(seq);
                Ok(true)
            })?;
        let mut n = 0;
        for &seq in &seqs {
            n += usize::from(self.replay_one(seq, dest)?);
        }
        Ok(ReplayChunk {
            replayed: n,
            next: more.then(|| seqs.last().map_or(from, |s| s + 1)),
            until,
        })
    }

    /// Replays the dead deliveries of the events with `id` (of event `seq` only, when
    /// given), to `destination` only, when given.
    pub(super) fn replay_of_id(
        &mut self,
        id: &str,
        destination: Option<&str>,
        seq: Option<u64>,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for (seq, dest) in self.deliveries_of_id(id, destination, seq)? {
            n += usize::from(self.replay_one(seq, &dest)?);
        }
        Ok(n)
    }

    /// The deliveries of the events with `id` (of event `seq` only, when given), to
    /// `destination` only, when given: (event, destination).
    fn deliveries_of_id(
        &mut self,
        id: &str,
        destination: Option<&str>,
        seq: Option<u64>,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let txn = &mut *self.txn;
        let mut seqs = events_of_id(id, self.legacy_until, |p, visit| txn.scan_prefix(p, visit))?;
        seqs.retain(|s| seq.is_none_or(|e| e == *s));
        let mut out = Vec::new();
        for s in seqs {
            for d in self.deliveries_of(s)? {
                if destination.is_none_or(|o| o == d.destination) {
                    out.push((s, d.destination));
                }
            }
        }
        Ok(out)
    }

    /// Purges among the events from `from` on, looking at [`PURGE_BATCH`] at most. Events
    /// go, with their dedup record, once older than both `retain` and their dedup window and
    /// every delivery is delivered. Events are scanned in sequence (= arrival) order,
    /// stopping at the first one too young (one stamped well ahead of now, since the clock
    /// was set back, is passed over). Returns how many went and where the next batch
    /// starts (`None`: no older event left).
    pub(super) fn purge_batch(
        &mut self,
        retain: Duration,
        from: u64,
    ) -> Result<(usize, Option<u64>), StoreError> {
        let now = now_ms();
        let cutoff = now.saturating_sub(retain.as_millis() as u64);
        let mut old = Vec::new();
        let mut next = None;
        let mut looked = 0;
        self.txn.scan_from(b"e/", &event_key(from), &mut |k, raw| {
            let seq = read_u64(&k[2..10]);
            if looked == PURGE_BATCH {
                next = Some(seq);
                return Ok(false);
            }
            looked += 1;
            let meta = match decode_meta(raw) {
                Ok((meta, _)) => meta,
                Err(e) => {
                    // A damaged event does not stop the purge of the ones after it.
                    tracing::warn!(seq, error = %e, "a stored event cannot be read; the purge leaves it");
                    return Ok(true);
                }
            };
            // Stamped well ahead of now (the clock was set back since): left for when its
            // time comes, not taken for the first of the young events, which would stop
            // the purge of every event after it for as long.
            if meta.received_ms > now.saturating_add(CLOCK_SET_BACK_MS) {
                return Ok(true);
            }
            if meta.received_ms >= cutoff {
                return Ok(false);
            }
            old.push((seq, meta));
            Ok(true)
        })?;
        let mut removed = 0;
        for (seq, meta) in old {
            let mut dk = dedup_key(&meta.source, &meta.id);
            let mut dedup = self.txn.get(&dk)?;
            let is_ours = |d: &Option<Vec<u8>>| {
                d.as_ref()
                    .is_some_and(|v| v.len() >= 16 && read_u64(v) == seq)
            };
            if !is_ours(&dedup) && self.legacy_until > 0 {
                if let Some(old) = legacy_dedup_key(&meta.source, &meta.id) {
                    dedup = self.txn.get(&old)?;
                    dk = old;
                }
            }
            let ours = is_ours(&dedup);
            if ours && dedup.as_ref().is_some_and(|v| read_u64(&v[8..]) > now) {
                continue; // still inside its dedup window
            }
            let deliveries = match self.deliveries_of(seq) {
                Ok(d) => d,
                Err(StoreError::Corrupt(e)) => {
                    // A damaged delivery does not stop the purge of the other events.
                    tracing::warn!(seq, error = %e, "a stored delivery cannot be read; the purge leaves its event");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if deliveries
                .iter()
                .any(|d| d.state != DeliveryState::Delivered)
            {
                continue;
            }
            if let (true, Some(v)) = (ours, &dedup) {
                // The record goes with its event, unless it still names earlier events
                // with the id (a dead one stays until replayed): then the newest of those
                // heads it, its window long past.
                let mut kept = Vec::new();
                for s in event_seqs(v).skip(1) {
                    if self.txn.get(&event_key(s))?.is_some() {
                        kept.push(s);
                    }
                }
                match kept.split_first() {
                    Some((head, rest)) => self.txn.put(&dk, &dedup_value(*head, 0, rest))?,
                    None => self.txn.delete(&dk)?,
                }
            }
            for d in deliveries {
                self.txn.delete(&delivery_key(seq, &d.destination))?;
            }
            self.txn.delete(&event_key(seq))?;
            self.fresh.remove(seq);
            self.txn.delete(&reply_key(seq))?;
            removed += 1;
        }
        if removed > 0 {
            self.txn.put(NEXT_SEQ_KEY, &be(*self.next_seq))?;
        }
        Ok((removed, next))
    }
}
