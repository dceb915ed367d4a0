//! Fan-out: every accepted event becomes one pending delivery per destination.
//!
//! The event's message is the unit of durability: the ingress answers once it alone is
//! stored (one conditional publish, which is also the dedup check). A durable consumer
//! shared by every instance hands each event to one of them, which writes each delivery
//! with the condition "this subject is empty", then acks the event. If an instance dies
//! halfway, the event comes again after the ack wait and the deliveries already written
//! are found and kept: the fan-out is idempotent, so no accepted event ever lacks one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream;
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::batch::{Write, Written};
use super::pulls::{self, RETRY};
use super::records::*;
use super::JetStreamStore;
use crate::store::StoreError;

/// How long the server waits for an event's fan-out before giving it to another instance.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Events fanned out at once by one instance.
const CONCURRENT: usize = 64;
/// The fewest free slots a fetch waits for.
const FETCH_AT_LEAST: u32 = CONCURRENT as u32 / 4;

/// The fan-out consumer; every instance creates it with the same settings.
pub fn consumer_config(names: &Names) -> pull::Config {
    pull::Config {
        durable_name: Some(names.fanout_consumer()),
        description: Some("hookrelay: accepted events to fan out into deliveries".into()),
        filter_subject: names.events(),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        ack_wait: ACK_WAIT,
        max_deliver: -1,
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

/// The fan-out consumer's metadata key for the stream's last sequence when it was made:
/// a consumer made again reads every event kept up to there a second time
/// ([`unfanned_of`]).
pub const REPLAY_UNTIL: &str = "hookrelay_replay_until";

/// [`consumer_config`] marked with the stream's last sequence now, for a consumer about to be
/// made (an existing one keeps its own mark); `None` if the stream cannot be read.
async fn marked_config(stream: &stream::Stream, names: &Names) -> Option<pull::Config> {
    let info = stream.get_info().await.ok()?;
    let mut config = consumer_config(names);
    config
        .metadata
        .insert(REPLAY_UNTIL.into(), info.state.last_sequence.to_string());
    Some(config)
}

/// Accepted events not fanned out yet, from the fan-out consumer's count of the events it
/// has not handed out (`pending`), less those it is reading a second time: a consumer made
/// again (deleted by hand, lost with a server) reads every event kept, and all of them
/// counted against `max_queue` would refuse every accept until it is through. The stream
/// sequences between the last it handed out (`delivered`) and the stream's last when it was
/// made (`replay_until`, its [`REPLAY_UNTIL`] mark) are at least as many as those events.
/// They are usually many more (the stream holds deliveries and outcomes too), so until it is
/// past them the events accepted meanwhile, and the few the old one left unfanned, are
/// mostly not counted: `max_queue` holds back less for that while, rather than refusing
/// everything.
pub fn unfanned_of(pending: u64, delivered: u64, replay_until: u64) -> u64 {
    pending.saturating_sub(replay_until.saturating_sub(delivered))
}

impl JetStreamStore {
    /// Writes the deliveries of the event stored at `seq` that are not written yet.
    /// `again`: an earlier fan-out of it may have written some.
    pub(super) async fn fan_out(
        &self,
        seq: u64,
        payload: &bytes::Bytes,
        again: bool,
    ) -> Result<(), StoreError> {
        let (meta, event) = decode_event(seq, payload)?;
        let e = event_token(&meta.source, &meta.id);
        // A reply route's call may have written its held delivery already (apart, even, if
        // an earlier event's state was in the way then and has expired since): look first.
        let again = again || meta.held.is_some();
        for dest in &meta.destinations {
            self.ensure_delivery(seq, &meta, dest, &e, &event.body, again)
                .await?;
        }
        Ok(())
    }

    /// Makes sure the event at `seq` has its delivery to `dest`: written now, or found
    /// written by an earlier (interrupted) fan-out, which `again` says may have run.
    ///
    /// Its subject is `<p>.q.<d>.<e>`, unless that holds an earlier event's state (the same
    /// id and source, kept past its event's message): that one is kept, and this delivery
    /// goes apart, on `<p>.q.<d>.<e>.<seq>`. An earlier fan-out may have put it apart and the
    /// usual subject emptied since (a delivered state expires), hence the look first.
    pub(super) async fn ensure_delivery(
        &self,
        seq: u64,
        meta: &EventMeta,
        dest: &str,
        e: &str,
        body: &[u8],
        again: bool,
    ) -> Result<(), StoreError> {
        if again {
            if let Some((_, rec, _)) = self.state_of(seq, dest, e).await? {
                // Its line may not have moved on if the earlier fan-out stopped here.
                if let Some(key) = &rec.delivery.order_key {
                    self.advance_or_log(dest, key).await;
                }
                return Ok(());
            }
        }
        let mut rec = meta.first_delivery(seq, dest);
        if let (Some(key), Some(slot)) = (rec.delivery.order_key.clone(), rec.slot.clone()) {
            // Waiting unless it heads its key's line now.
            let head = self.head(dest, &key).await?;
            rec.waiting = head.as_ref().is_some_and(|(_, first, _)| *first != slot);
            let entry = self.names.line_entry(dest, &key, &slot);
            if (head.is_none() || rec.waiting) && self.last(&entry).await?.is_none() {
                // Its entry was let go as an orphan while this event was slow to be stored:
                // it goes back by accept order, behind the head, and waits its turn.
                warn!(destination = %dest, seq, "an ordered delivery's line entry was gone; it is put back");
                self.put_back(&rec, e).await?;
                rec.entry = None;
                rec.waiting = true;
            }
        }
        for _ in 0..CONFLICT_TRIES {
            let subject = self.names.delivery(dest, &rec.part());
            let w = Write::new(subject, encode_delivery(&rec, body)).expect(0);
            let written = match self.write(&[w]).await? {
                Written::Stored { .. } => true,
                Written::Conflict => match self.delivery_state(dest, &rec.part()).await? {
                    Some((_, r, _)) if r.delivery.seq == seq => false,
                    Some(_) => {
                        rec.apart = true;
                        continue;
                    }
                    // A conflict with nothing to read yet: another write to the subject is
                    // in flight (with replicas, not yet committed), most likely another
                    // instance's fan-out of this same event. Read again, not apart, or the
                    // event would have two deliveries to this destination.
                    None => {
                        tokio::time::sleep(CONFLICT_PAUSE).await;
                        continue;
                    }
                },
            };
            if written {
                self.wakeup_of(dest).notify_one();
            }
            // The head may have left between the look and the write.
            if let (Some(key), true) = (&rec.delivery.order_key, rec.waiting || !written) {
                self.advance_or_log(dest, key).await;
            }
            return Ok(());
        }
        Err(StoreError::Unavailable(format!(
            "the delivery of event {seq} to {dest} could not be written: its subjects hold \
             other events' states"
        )))
    }
}

/// How long an ack or nak of a fanned-out event may wait to be sent.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes of one delivery's state, when its subjects conflict, before the fan-out gives up
/// (and is offered again): the usual subject, apart, and a few looks at a write in flight.
const CONFLICT_TRIES: usize = 6;
/// How long a write in flight on the same subject is given before the next look.
const CONFLICT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// The consumer's [`REPLAY_UNTIL`] mark: the events up to it were kept before it was made,
/// and may have been fanned out by the one before it.
pub(super) fn replayed_until(info: &async_nats::jetstream::consumer::Info) -> u64 {
    info.config
        .metadata
        .get(REPLAY_UNTIL)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Takes accepted events from the shared consumer and fans them out, until `stop`.
pub async fn run(store: Weak<JetStreamStore>, stream: stream::Stream, stop: CancellationToken) {
    let Some(names) = store.upgrade().map(|s| s.names.clone()) else {
        return;
    };
    let what = "fan-out";
    let name = names.fanout_consumer();
    // Marked right before it is made, at each try.
    let make = || marked_config(&stream, &names);
    let Some(mut consumer) = pulls::consumer(&stream, &name, make, what, &stop).await else {
        return;
    };
    let mut replay_until = replayed_until(consumer.cached_info());
    // The last event handed out for the first time (first hand-outs come in stream order);
    // at first none, so the first one reads the mark afresh.
    let mut last_first = u64::MAX;
    let slots = Arc::new(Semaphore::new(CONCURRENT));
    while !stop.is_cancelled() {
        // No more than there are free slots, a quarter of them at least (fetching one at a
        // time would be a round trip an event): a fetched event does not queue for a slot
        // (its ack wait running, its body held), and at most CONCURRENT bodies are held.
        let free = tokio::select! {
            _ = stop.cancelled() => break,
            some = slots.clone().acquire_many_owned(FETCH_AT_LEAST) => {
                drop(some);
                slots.available_permits().max(1)
            }
        };
        let Some(mut batch) = pulls::batch(&consumer, free, what, &stop).await else {
            continue;
        };
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break,
                n = batch.next() => n,
            };
            let m = match next {
                None => break,
                Some(Err(e)) => {
                    if !pulls::pause_after(what, &e, &stop).await {
                        return;
                    }
                    let again = pulls::consumer(&stream, &name, make, what, &stop);
                    let Some(c) = again.await else { return };
                    consumer = c;
                    replay_until = replayed_until(consumer.cached_info());
                    break;
                }
                Some(Ok(m)) => m,
            };
            let Ok((seq, delivered)) = m.info().map(|i| (i.stream_sequence, i.delivered)) else {
                continue;
            };
            if delivered == 1 {
                // A first hand-out before the last: the consumer was made again, perhaps by
                // another instance (this one's pull did not fail), with a mark of its own.
                // (Or the first of this puller: the consumer may have been made again
                // since this one read it.)
                if seq < last_first {
                    if let Ok(info) = stream.consumer_info(&name).await {
                        replay_until = replayed_until(&info);
                    }
                }
                last_first = seq;
            }
            let Some(s) = store.upgrade() else { return };
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            let tasks = s.tasks.clone();
            tasks.spawn(async move {
                // Handed out before, or kept from before the consumer was made (made
                // again, it hands each out as if for the first time): look before writing.
                let again = seq <= replay_until || delivered > 1;
                // The answer is bounded (it waits while the client's outbound buffer is
                // full) so that the slot is freed; one not made is the server's to redo.
                match s.fan_out(seq, &m.payload, again).await {
                    Ok(()) => {
                        let _ = tokio::time::timeout(ANSWER_WAIT, m.ack()).await;
                    }
                    Err(e) => {
                        warn!(seq, error = %e, "fanning an event out failed; it comes again");
                        let nak = m.ack_with(AckKind::Nak(Some(RETRY)));
                        let _ = tokio::time::timeout(ANSWER_WAIT, nak).await;
                    }
                }
                drop(permit);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::unfanned_of;

    #[test]
    fn events_read_again_by_a_new_fan_out_consumer_are_not_counted_as_unfanned() {
        // Made again when the stream's last sequence was 1,000: 900 events to read again,
        // 100 of them read so far (up to sequence 150), 5 new ones since.
        assert_eq!(unfanned_of(805, 150, 1_000), 0);
        // Past the replay, new events count in full.
        assert_eq!(unfanned_of(5, 1_000, 1_000), 5);
        assert_eq!(unfanned_of(5, 1_020, 1_000), 5);
        // Nearly through: only what lies past the replay's end counts.
        assert_eq!(unfanned_of(30, 990, 1_000), 20);
    }
}
