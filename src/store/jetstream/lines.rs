//! `order_by` on JetStream: each key's line of deliveries to a destination, and its head.
//!
//! An ordered event's accept first writes one entry per ordered destination on
//! `<p>.o.<d>.<k>.<slot>`, then the event (which names each entry's slot and sequence): so
//! a key's entries stand in the stream in accept order, whichever instance accepted each.
//! The line's head is its first entry: the server's lowest sequence on `<p>.o.<d>.<k>.*`.
//! The fan-out writes the head's delivery pending and every other one *waiting*: pending,
//! but a puller that takes it hands it back (a delayed nak) without sending it.
//!
//! When the head is delivered or dead, [`JetStreamStore::advance`] deletes its entry and
//! tells the next one to go: it rewrites that delivery's state without `waiting`,
//! conditional on the state it read, so two instances never both move it. Each step is
//! idempotent and whoever comes next does what is left: the outcome of a key's head, the
//! fan-out of its next event, and a waiting delivery handed to a puller again (after its
//! nak's delay). An instance that dies between two steps delays a line, never stops it.
//! An entry whose event never came (a duplicate's, if its removal failed, or an accept that
//! died before its event was stored) is let go once it is [`ORPHAN_AFTER`] old.
//!
//! A replayed dead letter rejoins its key's line by accept order, as on the embedded
//! stores: the whole line is written again in the replay's atomic batch, its own entry in
//! its place by accept order, the head still first (it may be in flight); each write is
//! conditional on the entry it replaces and the batch on the line's last sequence, so a line
//! that changed meanwhile fails it and the replay reads the line again.

use std::time::Duration;

use async_nats::jetstream::consumer::pull;

use super::batch::{Write, Written};
use super::records::*;
use super::*;

/// How often an entry is put back by accept order when the line changed meanwhile; the
/// last try puts it at the line's end.
pub(super) const REJOIN_TRIES: usize = 4;
/// The longest line a replay writes again in its batch (an atomic batch holds at most
/// 1,000 messages); a longer line takes the replayed one at its end.
const MOVE_MAX: usize = 990;
/// The most entries one [`JetStreamStore::advance`] deletes before it returns (the next
/// caller goes on).
const ADVANCE_MAX: usize = 1_000;
/// A waiting delivery comes back to a puller after this, doubled each time (to 8×, 40 s):
/// each return after the first checks its line (once per key per 5 s per instance), in case
/// an instance died while moving it on.
pub(super) const WAITING_RECHECK: Duration = Duration::from_secs(5);

/// A line entry that stands for nothing (its event not stored) is let go once an instance
/// has seen it so for this long, by its own clock: its accept stores the event within
/// [`ENTRIES_FRESH`] + [`WRITE_TIMEOUT`] of writing it, or answers an error. (If the server
/// stores that event later still, its fan-out finds the entry gone and puts it back.)
const ORPHAN_AFTER: Duration = Duration::from_secs(10);
/// The longest an accept may take to write its entries before it writes the event; slower,
/// it deletes them and answers 503.
const ENTRIES_FRESH: Duration = Duration::from_secs(4);
/// The most damaged entries one read of a line's head lets go before it gives up.
const DAMAGED_LET_GO: usize = 16;
/// Past this many entries seen standing for nothing, the ones seen long ago are forgotten.
const ORPHANS_KEPT: usize = 4_096;

/// What a line entry stands for.
enum Stands {
    /// Its delivery's current state: (its sequence, record, body).
    For(u64, Box<DeliveryRecord>, Bytes),
    /// Its event, not fanned out yet (as far as the fan-out's ack says).
    Unfanned,
    /// Nothing: its delivery was delivered and its state expired, or its event never came.
    Nothing,
}

/// The slot of a line entry's subject (its last token).
fn slot_of(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or_default()
}

/// The delay of a waiting delivery's nak, its `delivered`-th time at a puller.
pub(super) fn waiting_delay(delivered: i64) -> Duration {
    let doublings = (delivered.max(1) - 1).min(3) as u32;
    WAITING_RECHECK * 2u32.pow(doublings)
}

/// A replayed delivery's entry, in its place `pos` by accept order.
pub(super) fn end_entry(pos: u64, e: &str) -> Bytes {
    LineEntry {
        e: e.to_string(),
        pos,
        ms: now_ms(),
    }
    .encode()
}

impl JetStreamStore {
    /// The first entry of `key`'s line to `dest`: (its sequence, slot, payload). A damaged
    /// entry is let go (as one standing for nothing is, and its delivery, if any, rejoins
    /// at the end): it would hold the key's line, and every fan-out of its events, forever.
    pub(super) async fn head(
        &self,
        dest: &str,
        key: &str,
    ) -> Result<Option<(u64, String, LineEntry)>, StoreError> {
        let line = self.names.line(dest, key);
        for _ in 0..DAMAGED_LET_GO {
            match self.stream.get_first_raw_message_by_subject(&line, 1).await {
                Ok(m) => match LineEntry::decode(&m.payload) {
                    Ok(entry) => {
                        return Ok(Some((m.sequence, slot_of(&m.subject).to_string(), entry)))
                    }
                    Err(e) => {
                        warn!(destination = %dest, seq = m.sequence, error = %e, "a damaged order line entry; let go");
                        self.delete_entry(m.sequence).await?;
                    }
                },
                Err(e) if not_found(&e) => return Ok(None),
                Err(e) => {
                    return Err(StoreError::Unavailable(format!(
                        "reading the head of {line}: {e}"
                    )))
                }
            }
        }
        Err(StoreError::Corrupt(format!(
            "the first {DAMAGED_LET_GO} entries of {line} were damaged"
        )))
    }

    /// What the entry `slot` of a line to `dest` (its event part `e`) stands for.
    async fn stands_for(&self, dest: &str, slot: &str, e: &str) -> Result<Stands, StoreError> {
        let ours = |r: &DeliveryRecord| r.slot.as_deref() == Some(slot);
        // On its usual subject, as nearly always.
        if let Some((seq, rec, body)) = self.delivery_state(dest, e).await? {
            if ours(&rec) {
                return Ok(Stands::For(seq, Box::new(rec), body));
            }
        }
        // Kept apart, or not fanned out yet: its event says its sequence.
        if let Some((event_seq, payload)) = self.last(&self.names.event(e)).await? {
            let (meta, _) = decode_event(event_seq, &payload)?;
            if meta.lines.iter().flatten().any(|l| l.slot == slot) {
                if let Some((seq, rec, body)) = self.state_of(event_seq, dest, e).await? {
                    return Ok(Stands::For(seq, Box::new(rec), body));
                }
                if !self.fanned_out(event_seq).await? {
                    return Ok(Stands::Unfanned);
                }
                // Fanned out, which writes the state before it acks: the fan-out may have
                // just finished, so read it again.
                return Ok(match self.state_of(event_seq, dest, e).await? {
                    Some((seq, rec, body)) => Stands::For(seq, Box::new(rec), body),
                    None => Stands::Nothing,
                });
            }
        }
        // Kept apart, its event gone (replaced by a later one with the same id).
        let apart = format!("{}.*", self.names.delivery(dest, e));
        for subject in self.subjects(&apart, MOVE_MAX).await? {
            if let Some((seq, payload)) = self.last(&subject).await? {
                let (rec, body) = decode_delivery(&payload)?;
                if ours(&rec) {
                    return Ok(Stands::For(seq, Box::new(rec), body));
                }
            }
        }
        Ok(Stands::Nothing)
    }

    /// The writes that put a delivery (its slot `slot`, its place in accept order `pos`)
    /// back in its key's line by accept order. Every entry is written again, each
    /// conditional on the one it replaces, in this order: the head (it stays first: it may
    /// be in flight), the entries of earlier events, this one's, those of later events. This
    /// one's is conditional on the line's last sequence as read, so an entry added meanwhile
    /// fails the batch too. `None`: the line is longer than one batch may write.
    /// `missing_only`: no writes (empty) if its entry is in the line already (another
    /// instance put it back meanwhile: moving it again could put it behind the entry after
    /// it, while it is in flight).
    async fn rejoin(
        &self,
        dest: &str,
        key: &str,
        slot: &str,
        pos: u64,
        e: &str,
        missing_only: bool,
    ) -> Result<Option<Vec<Write>>, StoreError> {
        let own = self.names.line_entry(dest, key, slot);
        let subjects = self
            .subjects(&self.names.line(dest, key), MOVE_MAX + 2)
            .await?;
        if subjects.len() > MOVE_MAX {
            return Ok(None);
        }
        let mut line = Vec::new();
        let mut last = 0;
        for subject in subjects {
            if let Some((entry_seq, payload)) = self.last(&subject).await? {
                last = last.max(entry_seq);
                if subject == own && missing_only {
                    return Ok(Some(Vec::new()));
                }
                if subject != own {
                    line.push((entry_seq, subject, LineEntry::decode(&payload)?));
                }
            }
        }
        line.sort_by_key(|(entry_seq, _, _)| *entry_seq);
        let again = |(entry_seq, subject, entry): (u64, String, LineEntry)| {
            let moved = LineEntry {
                pos: entry.pos(entry_seq),
                ..entry
            };
            Write::new(subject, moved.encode()).expect(entry_seq)
        };
        let mut rest = line.into_iter();
        let mut writes: Vec<Write> = rest.next().into_iter().map(again).collect();
        let (earlier, later): (Vec<_>, Vec<_>) =
            rest.partition(|(entry_seq, _, entry)| entry.pos(*entry_seq) < pos);
        writes.extend(earlier.into_iter().map(again));
        writes.push(Write::new(own, end_entry(pos, e)).expect_on(self.names.line(dest, key), last));
        writes.extend(later.into_iter().map(again));
        Ok(Some(writes))
    }

    /// The writes that put an ordered delivery's entry (its event part `e`) back in its
    /// key's line: by accept order ([`rejoin`](Self::rejoin)) when `by_order` and its place
    /// is known, else (or for a line too long) at the line's end, unconditionally. None for
    /// an unordered delivery, nor when `missing_only` and its entry is in the line.
    pub(super) async fn rejoin_writes(
        &self,
        rec: &DeliveryRecord,
        e: &str,
        by_order: bool,
        missing_only: bool,
    ) -> Result<Vec<Write>, StoreError> {
        let (Some(key), Some(slot)) = (&rec.delivery.order_key, &rec.slot) else {
            return Ok(Vec::new());
        };
        let dest = &rec.delivery.destination;
        if let (true, Some(pos)) = (by_order, rec.pos) {
            if let Some(writes) = self.rejoin(dest, key, slot, pos, e, missing_only).await? {
                return Ok(writes);
            }
        }
        let own = self.names.line_entry(dest, key, slot);
        if missing_only && self.last(&own).await?.is_some() {
            return Ok(Vec::new());
        }
        Ok(vec![Write::new(own, end_entry(rec.pos.unwrap_or(0), e))])
    }

    /// Moves `key`'s line to `dest` on: deletes the entries of finished deliveries at its
    /// head, and tells the first one still pending to go if it waits.
    pub(super) async fn advance(&self, dest: &str, key: &str) -> Result<(), StoreError> {
        for _ in 0..ADVANCE_MAX {
            let Some((entry_seq, slot, entry)) = self.head(dest, key).await? else {
                return Ok(());
            };
            let stands = match self.stands_for(dest, &slot, &entry.e).await {
                // Its delivery's state or event cannot be read: it can never be sent (the
                // puller sets such a state aside), so it holds nothing back.
                Err(StoreError::Corrupt(e)) => {
                    warn!(destination = %dest, seq = entry_seq, error = %e, "an order line entry whose delivery is damaged; let go");
                    self.delete_entry(entry_seq).await?;
                    continue;
                }
                other => other?,
            };
            match stands {
                // Not fanned out yet: the fan-out moves the line on once it is.
                Stands::Unfanned => return Ok(()),
                Stands::Nothing => {
                    // Its accept may still be writing its event: let it go only once this
                    // instance has seen it stand for nothing long enough.
                    if !self.orphaned(entry_seq) {
                        return Ok(());
                    }
                    self.delete_entry(entry_seq).await?
                }
                Stands::For(_, rec, _) if rec.delivery.state != DeliveryState::Pending => {
                    self.delete_entry(entry_seq).await?
                }
                Stands::For(_, rec, _) if !rec.waiting => return Ok(()),
                Stands::For(state_seq, mut rec, body) => {
                    rec.waiting = false;
                    let subject = self.names.delivery(dest, &rec.part());
                    let w = Write::new(subject, encode_delivery(&rec, &body)).expect(state_seq);
                    if let Written::Stored { .. } = self.write(&[w]).await? {
                        self.wakeup_of(dest).notify_one();
                        return Ok(());
                    }
                    // Moved meanwhile (by another instance): read it again.
                }
            }
        }
        Ok(())
    }

    /// Writes an ordered event's line entries (its part `e`), before its event and in
    /// parallel, and notes each one's sequence in `lines` (one per destination); the
    /// sequences written. A failed write, or writing that took over [`ENTRIES_FRESH`],
    /// deletes those written and fails the accept: a line lets an entry go once it has
    /// stood for nothing for [`ORPHAN_AFTER`], so the event must follow well within that.
    pub(super) async fn write_entries(
        &self,
        e: &str,
        destinations: &[String],
        lines: &mut [Option<Line>],
    ) -> Result<Entries, StoreError> {
        let started = std::time::Instant::now();
        let writes = destinations
            .iter()
            .zip(lines.iter_mut())
            .filter_map(|(dest, line)| line.as_mut().map(|l| (dest, l)))
            .map(|(dest, l)| {
                let entry = LineEntry {
                    e: e.to_string(),
                    pos: 0,
                    ms: now_ms(),
                };
                let subject = self.names.line_entry(dest, &l.key, &l.slot);
                async move {
                    let w = self.write(&[Write::new(subject, entry.encode())]).await;
                    ((dest, l), w)
                }
            });
        let mut entries = Entries {
            store: self.me.clone(),
            seqs: Vec::new(),
            lines: Vec::new(),
        };
        let mut failed = None;
        for ((dest, l), w) in futures_util::future::join_all(writes).await {
            match w {
                Ok(Written::Stored { first }) => {
                    l.entry = first;
                    entries.seqs.push(first);
                    entries.lines.push((dest.clone(), l.key.clone()));
                }
                Ok(Written::Conflict) => {}
                Err(e) => failed = Some(e),
            }
        }
        if failed.is_none() && started.elapsed() <= ENTRIES_FRESH {
            return Ok(entries);
        }
        // The event is not written yet: its entries stand for nothing.
        entries.forget().await;
        Err(failed.unwrap_or_else(|| {
            StoreError::Unavailable("JetStream was too slow to take the event; try again".into())
        }))
    }

    /// Whether the entry at `seq`, standing for nothing now, has been seen so by this
    /// instance for [`ORPHAN_AFTER`] (its first sighting is noted).
    fn orphaned(&self, seq: u64) -> bool {
        let now = std::time::Instant::now();
        let mut seen = self.orphans.lock().unwrap();
        if seen.len() >= ORPHANS_KEPT {
            seen.retain(|_, at| now.duration_since(*at) < ORPHAN_AFTER * 10);
        }
        let first = *seen.entry(seq).or_insert(now);
        let old = now.duration_since(first) >= ORPHAN_AFTER;
        if old {
            seen.remove(&seq);
        }
        old
    }

    /// A waiting delivery back for its recheck: moves its key's line on, and puts its entry
    /// back if the entry is gone. A waiting delivery without an entry would never be told
    /// to go: that happens when an accept that gave up (its ack late) deletes its entries
    /// after another instance has fanned the event out, finding its entry still there.
    pub(super) async fn recheck_waiting(&self, rec: &DeliveryRecord) -> Result<(), StoreError> {
        let (Some(key), Some(slot)) = (&rec.delivery.order_key, &rec.slot) else {
            return Ok(());
        };
        let dest = &rec.delivery.destination;
        self.advance(dest, key).await?;
        if self
            .last(&self.names.line_entry(dest, key, slot))
            .await?
            .is_some()
        {
            return Ok(());
        }
        // Still waiting, as it was (not told to go, finished or replayed meanwhile)?
        let current = self.delivery_state(dest, &rec.part()).await?;
        let Some((_, now, _)) = current.filter(|(_, r, _)| {
            r.waiting && r.slot == rec.slot && r.delivery.state == DeliveryState::Pending
        }) else {
            return Ok(());
        };
        warn!(destination = %dest, seq = rec.delivery.seq, "a waiting delivery's line entry was gone; it is put back");
        let e = event_token(&now.event.source, &now.event.id);
        self.put_back(&now, &e).await?;
        self.advance(dest, key).await
    }

    /// Puts back the entry of a delivery whose entry was let go (its event stored later
    /// than the orphan wait): by accept order, behind the line's head, as a replay does;
    /// at the line's end if the line keeps changing.
    /// Nothing is written if its entry is back already (put back by another instance).
    pub(super) async fn put_back(&self, rec: &DeliveryRecord, e: &str) -> Result<(), StoreError> {
        for attempt in 0..REJOIN_TRIES {
            let writes = self
                .rejoin_writes(rec, e, attempt + 1 < REJOIN_TRIES, true)
                .await?;
            if writes.is_empty() {
                return Ok(());
            }
            if let Written::Stored { .. } = self.write(&writes).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Deletes line entries that stand for nothing (a duplicate's, a refused accept's),
    /// then moves their lines on: a delivery may be waiting behind one of them. A failure
    /// is logged (the entry is let go once old).
    async fn forget_entries(&self, seqs: Vec<u64>, lines: Vec<(String, String)>) {
        for seq in seqs {
            if let Err(e) = self.delete_entry(seq).await {
                warn!(seq, error = %e, "deleting a line entry that stands for nothing failed; it holds its key back until it is let go, once old");
            }
        }
        for (dest, key) in lines {
            self.advance_or_log(&dest, &key).await;
        }
    }

    /// [`advance`](Self::advance), a failure logged: the line's next step does it (a
    /// waiting delivery that comes back checks its line).
    pub(super) async fn advance_or_log(&self, dest: &str, key: &str) {
        if let Err(e) = self.advance(dest, key).await {
            warn!(destination = %dest, error = %e, "moving an order key's line on failed; its next step does it");
        }
    }

    /// Moves an ordered delivery's line on once it is delivered or dead (its outcome
    /// written; `written`: by this call, so its entry is known to be done with). A failure
    /// is logged (the line's next step does it).
    pub(super) async fn advance_after(&self, rec: &DeliveryRecord, written: bool) {
        let Some(key) = &rec.delivery.order_key else {
            return;
        };
        if rec.delivery.state == DeliveryState::Pending {
            return;
        }
        let dest = &rec.delivery.destination;
        let done = match (written && !rec.waiting, rec.entry) {
            // It headed its line (it was sent): its own entry goes, by its sequence (a
            // replay's new entry has another), then the line goes on. (The next is found
            // from the line's start: the server's subject index answers that at once, where
            // a search from this entry on reads the stream's blocks.)
            (true, Some(entry)) => match self.delete_entry(entry).await {
                Ok(()) => self.advance(dest, key).await,
                Err(e) => Err(e),
            },
            _ => self.advance(dest, key).await,
        };
        if let Err(e) = done {
            warn!(destination = %dest, error = %e, "moving an order key's line on failed; its next step does it");
        }
    }

    /// Whether the event at `seq` was fanned out (or is gone, so it was long ago).
    async fn fanned_out(&self, seq: u64) -> Result<bool, StoreError> {
        match self.stream.get_raw_message(seq).await {
            Ok(m) if self.names.is_event(&m.subject) => {}
            Ok(_) => return Ok(true),
            Err(e) if not_found(&e) => return Ok(true),
            Err(e) => return Err(StoreError::Unavailable(e.to_string())),
        }
        let mut c = self
            .stream
            .get_consumer::<pull::Config>(&self.names.fanout_consumer())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let info = c
            .info()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(info.ack_floor.stream_sequence >= seq)
    }

    /// Deletes a line entry (gone already is fine: another instance did it). Without
    /// erasing it on disk: a secure erase rewrites it in place, and costs the server ten
    /// times as much.
    async fn delete_entry(&self, seq: u64) -> Result<(), StoreError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(default)]
            error: Option<serde_json::Value>,
        }
        let subject = format!("$JS.API.STREAM.MSG.DELETE.{}", self.names.stream());
        let request = format!(r#"{{"seq":{seq},"no_erase":true}}"#);
        let unavailable = |e: &dyn std::fmt::Display| {
            StoreError::Unavailable(format!("deleting line entry {seq}: {e}"))
        };
        let m = self
            .client
            .request(subject, request.into())
            .await
            .map_err(|e| unavailable(&e))?;
        let a: Answer = serde_json::from_slice(&m.payload).map_err(|e| unavailable(&e))?;
        match a.error {
            Some(e) if !not_found(&e) => Err(unavailable(&e)),
            _ => Ok(()),
        }
    }
}

/// An accept's line entries, written before its event. Once the event is stored they stand
/// for it; when it certainly is not (a duplicate, too large) they are deleted at once
/// ([`forget`](Self::forget)). When that is not known (a write that failed unanswered, an
/// accept dropped at the ingress's timeout) they are left: the line lets them go once they
/// have stood for nothing for [`ORPHAN_AFTER`] (it checks that their event is not
/// stored); deleting them at once could take an entry from an event stored after all,
/// whose delivery may already be going out as its key's head.
pub(super) struct Entries {
    store: std::sync::Weak<JetStreamStore>,
    seqs: Vec<u64>,
    /// Each entry's destination and order key.
    lines: Vec<(String, String)>,
}

impl Entries {
    /// No entries (an event with no order key).
    pub(super) fn none() -> Self {
        Entries {
            store: std::sync::Weak::new(),
            seqs: Vec::new(),
            lines: Vec::new(),
        }
    }

    /// The event is certainly not stored: its entries are deleted now.
    pub(super) async fn forget(self) {
        if let Some(store) = self.store.upgrade() {
            store.forget_entries(self.seqs, self.lines).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_delivery_comes_back_less_often_each_time() {
        assert_eq!(waiting_delay(1), WAITING_RECHECK);
        assert_eq!(waiting_delay(2), WAITING_RECHECK * 2);
        assert_eq!(waiting_delay(4), WAITING_RECHECK * 8);
        assert_eq!(waiting_delay(1_000), WAITING_RECHECK * 8);
        assert_eq!(waiting_delay(0), WAITING_RECHECK);
    }

    #[test]
    fn an_entry_knows_its_place_and_its_slot() {
        let written = LineEntry {
            e: "x".into(),
            pos: 0,
            ms: 1,
        };
        assert_eq!(written.pos(12), 12);
        let moved = LineEntry::decode(&end_entry(7, "x")).unwrap();
        assert_eq!((moved.e.as_str(), moved.pos(99)), ("x", 7));
        assert_eq!(slot_of("p.o.n-d.0123.abcd"), "abcd");
    }
}
