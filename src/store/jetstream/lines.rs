//! `order_by` on JetStream: each key's line of deliveries to a destination, and its head.
//!
//! An ordered event's batch writes, with the event, one entry per ordered destination on
//! `<p>.o.<d>.<k>.<slot>` (one atomic write, so a key's entries stand in the stream in
//! accept order, whichever instance accepted each). The line's head is its first entry: the
//! server's lowest sequence on `<p>.o.<d>.<k>.*`. The fan-out writes the head's delivery
//! pending and every other one *waiting*: pending, but a puller that takes it hands it back
//! (a delayed nak) without sending it.
//!
//! When the head is delivered or dead, [`JetStreamStore::advance`] deletes its entry and
//! tells the next one to go: it rewrites that delivery's state without `waiting`,
//! conditional on the state it read, so two instances never both move it. Each step is
//! idempotent and whoever comes next does what is left: the outcome of a key's head, the
//! fan-out of its next event, and a waiting delivery handed to a puller again (after its
//! nak's delay). An instance that dies between two steps delays a line, never stops it.
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

/// The delay of a waiting delivery's nak, its `delivered`-th time at a puller.
pub(super) fn waiting_delay(delivered: i64) -> Duration {
    let doublings = (delivered.max(1) - 1).min(3) as u32;
    WAITING_RECHECK * 2u32.pow(doublings)
}

/// A replayed delivery's entry (its event's sequence known).
pub(super) fn end_entry(seq: u64, e: &str) -> Bytes {
    LineEntry {
        e: e.to_string(),
        seq,
        back: 0,
    }
    .encode()
}

impl JetStreamStore {
    /// The first entry of `key`'s line to `dest`: (entry sequence, event sequence, event
    /// part).
    pub(super) async fn head(
        &self,
        dest: &str,
        key: &str,
    ) -> Result<Option<(u64, u64, String)>, StoreError> {
        let line = self.names.line(dest, key);
        match self.stream.get_first_raw_message_by_subject(&line, 1).await {
            Ok(m) => {
                let entry = LineEntry::decode(&m.payload)?;
                Ok(Some((m.sequence, entry.event_seq(m.sequence), entry.e)))
            }
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(StoreError::Unavailable(format!(
                "reading the head of {line}: {e}"
            ))),
        }
    }

    /// The writes that put a replayed delivery (of the event at `seq`, its slot `slot`)
    /// back in its key's line by accept order, and the line's last sequence they were read
    /// at. Every entry is written again, each conditional on the one it replaces, in this
    /// order: the head (it stays first: it may be in flight), the entries of earlier events,
    /// the replayed one's, those of later events. The caller makes its batch conditional on
    /// the line's last sequence, so an entry added meanwhile fails it too. `None`: the line
    /// is longer than one batch may write.
    pub(super) async fn rejoin(
        &self,
        dest: &str,
        key: &str,
        slot: &str,
        seq: u64,
        e: &str,
    ) -> Result<Option<(u64, Vec<Write>)>, StoreError> {
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
                if subject != own {
                    line.push((entry_seq, subject, LineEntry::decode(&payload)?));
                }
            }
        }
        line.sort_by_key(|(entry_seq, _, _)| *entry_seq);
        let again = |(entry_seq, subject, entry): (u64, String, LineEntry)| {
            let moved = LineEntry {
                seq: entry.event_seq(entry_seq),
                back: 0,
                e: entry.e,
            };
            Write::new(subject, moved.encode()).expect(entry_seq)
        };
        let mut rest = line.into_iter();
        let mut writes: Vec<Write> = rest.next().into_iter().map(again).collect();
        let (earlier, later): (Vec<_>, Vec<_>) =
            rest.partition(|(entry_seq, _, entry)| entry.event_seq(*entry_seq) < seq);
        writes.extend(earlier.into_iter().map(again));
        writes.push(Write::new(own, end_entry(seq, e)));
        writes.extend(later.into_iter().map(again));
        Ok(Some((last, writes)))
    }

    /// Moves `key`'s line to `dest` on: deletes the entries of finished deliveries at its
    /// head, and tells the first one still pending to go if it waits.
    pub(super) async fn advance(&self, dest: &str, key: &str) -> Result<(), StoreError> {
        for _ in 0..ADVANCE_MAX {
            let Some((entry_seq, seq, e)) = self.head(dest, key).await? else {
                return Ok(());
            };
            match self.state_of(seq, dest, &e).await? {
                // Not fanned out yet: the fan-out moves the line on once it is.
                None if !self.fanned_out(seq).await? => return Ok(()),
                None => {
                    // Fanned out, which writes the state before it acks: the fan-out may have
                    // just finished, so read it again. Still none: it was delivered and its
                    // state expired.
                    if self.state_of(seq, dest, &e).await?.is_some() {
                        continue;
                    }
                    self.delete_entry(entry_seq).await?
                }
                Some((_, rec, _)) if rec.delivery.state != DeliveryState::Pending => {
                    self.delete_entry(entry_seq).await?
                }
                Some((_, rec, _)) if !rec.waiting => return Ok(()),
                Some((state_seq, mut rec, body)) => {
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
    fn an_entry_names_its_events_sequence() {
        let in_batch = LineEntry {
            e: "x".into(),
            seq: 0,
            back: 2,
        };
        assert_eq!(in_batch.event_seq(12), 10);
        let replayed = LineEntry {
            e: "x".into(),
            seq: 7,
            back: 0,
        };
        assert_eq!(replayed.event_seq(99), 7);
        let again = LineEntry::decode(&replayed.encode()).unwrap();
        assert_eq!((again.e.as_str(), again.seq), ("x", 7));
    }
}
