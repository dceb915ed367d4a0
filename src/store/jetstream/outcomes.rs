//! Writing a delivery's next state: an attempt's outcome (conditional on the state it was
//! read from), a replay of a dead letter, and a reply route's answer and attempt.

use bytes::Bytes;

use super::batch::{Write, Written};
use super::lines;
use super::records::*;
use super::*;

impl JetStreamStore {
    /// The writes that move a delivery (read at `state_seq`) to its new state.
    pub(super) fn state_writes(
        &self,
        state_seq: u64,
        rec: &DeliveryRecord,
        body: &[u8],
    ) -> Vec<Write> {
        let e = rec.part();
        let dest = &rec.delivery.destination;
        let subject = self.names.delivery(dest, &e);
        match rec.delivery.state {
            // Kept as long as its event (`EventMeta::keep_ms`).
            DeliveryState::Delivered => vec![Write::new(subject, encode_delivery(rec, &[]))
                .expect(state_seq)
                .ttl(self.keep(&rec.event))],
            DeliveryState::Pending => {
                vec![Write::new(subject, encode_delivery(rec, body)).expect(state_seq)]
            }
            DeliveryState::Dead => vec![
                Write::new(subject, encode_delivery(rec, body)).expect(state_seq),
                Write::new(self.names.dead(dest, &e), Bytes::from_static(b"dead")),
            ],
        }
    }

    /// The writes of `rec`'s new state; with `revived` (a delivered state over a dead one),
    /// its dead-letter index entry is marked replayed too, as a replay's is, so the dead
    /// list no longer shows it.
    fn settling_writes(
        &self,
        state_seq: u64,
        rec: &DeliveryRecord,
        body: &[u8],
        revived: bool,
    ) -> Vec<Write> {
        let mut writes = self.state_writes(state_seq, rec, body);
        if revived {
            writes.push(
                Write::new(
                    self.names.dead(&rec.delivery.destination, &rec.part()),
                    Bytes::from_static(b"replayed"),
                )
                .ttl(REPLAYED_TTL),
            );
        }
        writes
    }

    /// After a delivery made here met a state another instance wrote meanwhile (it took the
    /// delivery over when the hold here lapsed, and its own attempt failed, or gave up: a
    /// 4xx made it dead): the destination has the event, so that pending or dead state
    /// becomes delivered rather than sent again (or replayed by an operator). Not over a
    /// state a replay made since `window_base` (the operator asked for it again), nor over
    /// a delivered one. The state written, its sequence, and whether it was dead (it left
    /// its order line then), if it was written.
    pub(super) async fn delivered_over(
        &self,
        mine: &DeliveryRecord,
        window_base: u32,
        outcome: &Outcome,
    ) -> Result<Option<(u64, DeliveryRecord, bool)>, StoreError> {
        let (seq, dest) = (mine.delivery.seq, &mine.delivery.destination);
        let e = event_token(&mine.event.source, &mine.event.id);
        for _ in 0..3 {
            let Some((state_seq, mut rec, body)) = self.state_of(seq, dest, &e).await? else {
                return Ok(None);
            };
            let revived = rec.delivery.state == DeliveryState::Dead;
            if !(rec.delivery.state == DeliveryState::Pending || revived)
                || rec.waiting
                || rec.delivery.window_base != window_base
            {
                return Ok(None);
            }
            rec.delivery.apply(outcome, now_ms());
            let writes = self.settling_writes(state_seq, &rec, &body, revived);
            if let Written::Stored { .. } = self.write(&writes).await? {
                return Ok(Some((state_seq, rec, revived)));
            }
        }
        Ok(None)
    }

    /// Makes one dead delivery pending again; whether it was. An ordered one rejoins its
    /// key's line by accept order, waiting (the line moves it on when it is first); if the
    /// line changes while it is read, the replay reads it again, and the last try puts it
    /// at the line's end (still one at a time, but behind the key's later events).
    pub(super) async fn reopen(
        &self,
        mut state_seq: u64,
        mut rec: DeliveryRecord,
        mut body: Bytes,
    ) -> Result<bool, StoreError> {
        let seq = rec.delivery.seq;
        let dest = rec.delivery.destination.clone();
        let e = event_token(&rec.event.source, &rec.event.id);
        for attempt in 0..lines::REJOIN_TRIES {
            let line = rec.delivery.order_key.clone().zip(rec.slot.clone());
            rec.delivery.reopen(now_ms());
            rec.waiting = line.is_some();
            rec.entry = None;
            let part = rec.part();
            let index = Write::new(
                self.names.dead(&dest, &part),
                Bytes::from_static(b"replayed"),
            )
            .ttl(REPLAYED_TTL);
            let by_order = attempt + 1 < lines::REJOIN_TRIES;
            let entries = self.rejoin_writes(&rec, &e, by_order, false).await?;
            let mut writes = vec![
                Write::new(
                    self.names.delivery(&dest, &part),
                    encode_delivery(&rec, &body),
                )
                .expect(state_seq),
                index,
            ];
            writes.extend(entries);
            if let Written::Stored { .. } = self.write(&writes).await? {
                self.wakeup_of(&dest).notify_one();
                if let Some((key, _)) = &line {
                    self.advance_or_log(&dest, key).await;
                }
                return Ok(true);
            }
            // Moved on meanwhile: replayed by another, or (ordered) its line changed.
            match self.state_of(seq, &dest, &e).await? {
                Some((s, r, b)) if r.delivery.state == DeliveryState::Dead => {
                    (state_seq, rec, body) = (s, r, b);
                }
                _ => return Ok(false),
            }
        }
        Ok(false)
    }

    /// After a reply route's call, in the background: the answer, then the attempt. A
    /// failure to keep the answer is only logged (a duplicate calls again); one to record
    /// the attempt is returned, for the caller to try again.
    pub(super) async fn store_reply(
        &self,
        seq: u64,
        reply: Option<StoredReply>,
        attempt: &mut Option<(DeliveryKey, Outcome)>,
        fresh: bool,
    ) -> Result<(), StoreError> {
        let m = self
            .stream
            .get_raw_message(seq)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let Some(e) = self.names.event_part(&m.subject).map(str::to_string) else {
            return Ok(());
        };
        let (meta, event) = decode_event(seq, &m.payload)?;
        // Not kept (larger than the server takes, say), the reply is only called for again
        // by a duplicate: the attempt is still recorded, or the destination gets the event
        // once more from the scheduler.
        if let Some(r) = reply {
            let w = Write::new(self.names.reply(&e), Bytes::from(r.encode()));
            if let Err(e) = self.write(&[w.ttl(self.keep(&meta))]).await {
                warn!(error = %e, "keeping a reply route's answer failed; a duplicate calls again");
            }
        }
        if let Some((key, outcome)) = attempt {
            // The call may come before the fan-out wrote the held delivery: write it first.
            // Not for a duplicate's call: its delivery, if gone, was settled and expired.
            if fresh {
                self.ensure_delivery(seq, &meta, &key.destination, &e, &event.body, true)
                    .await?;
            }
            for _ in 0..3 {
                let Some((state_seq, mut rec, body)) =
                    self.state_of(seq, &key.destination, &e).await?
                else {
                    break;
                };
                // A duplicate's call delivered what the first call left dead (a 4xx): the
                // delivered state takes it off the dead list (which lists dead states only).
                // It left its line when it died.
                let revived = rec.delivery.state == DeliveryState::Dead
                    && matches!(outcome, Outcome::Delivered { .. });
                if rec.delivery.state != DeliveryState::Pending && !revived {
                    break;
                }
                // Which attempt this is, once known: tried again after a write that
                // landed though its answer never came, it is not counted twice.
                if let Outcome::Retry { attempt: n, .. } = outcome {
                    let n = *n.get_or_insert(rec.delivery.attempts.saturating_add(1));
                    if rec.delivery.attempts >= n {
                        break;
                    }
                }
                rec.delivery.apply(outcome, now_ms());
                let writes = self.settling_writes(state_seq, &rec, &body, revived);
                if let Written::Stored { .. } = self.write(&writes).await? {
                    if !revived {
                        self.advance_after(&rec, true).await;
                    }
                    break;
                }
            }
        }
        Ok(())
    }
}
