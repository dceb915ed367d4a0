//! The background work each instance does for the others: a membership heartbeat (the
//! share count), the pause watch, and the queue depths read from the consumers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};

use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::records::{decode_delivery, untoken};
use super::{fanout, JetStreamStore, DEPTH_EVERY, HEARTBEAT};
use crate::store::DeliveryState;

/// The most messages read to find a destination's first unacknowledged pending delivery.
const FIRST_PENDING_LOOKS: usize = 16;

/// The live members as this instance last counted them, and its place among them.
pub(super) struct Membership {
    count: AtomicUsize,
    rank: AtomicUsize,
}

impl Membership {
    /// Uncounted: no sender of any destination until a count, so that it never sends
    /// beside the members it has not seen ([`beat`] runs once before the store is used;
    /// if that fails, the heartbeat counts again every [`HEARTBEAT`]).
    pub fn new() -> Self {
        Membership {
            count: AtomicUsize::new(1),
            rank: AtomicUsize::new(usize::MAX),
        }
    }
    /// How many instances share the stream (at least this one).
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
    /// This instance's place among the live members by id, from 0.
    pub fn rank(&self) -> usize {
        self.rank.load(Ordering::Relaxed)
    }
}

/// Renews this instance's membership once and counts the live members.
pub(super) async fn beat(members: &kv::Store, membership: &Membership, me: &str) {
    if members.put(me, Bytes::from_static(b"1")).await.is_err() {
        return;
    }
    let Ok(mut keys) = members.keys().await else {
        return;
    };
    let mut ids = Vec::new();
    while let Some(id) = keys.next().await {
        match id {
            Ok(id) => ids.push(id),
            // A list cut short would count too few: each would take too large a share of
            // every destination's rate and requests at once. The last count stands.
            Err(_) => return,
        }
    }
    ids.sort();
    // Its own key was just written; missing, it counts last.
    let rank = ids.iter().position(|id| id == me).unwrap_or(ids.len());
    membership.count.store(ids.len().max(1), Ordering::Relaxed);
    membership.rank.store(rank, Ordering::Relaxed);
}

/// Renews this instance's membership and counts the live members, every [`HEARTBEAT`].
pub(super) async fn heartbeat(
    members: kv::Store,
    membership: Arc<Membership>,
    me: String,
    stop: CancellationToken,
) {
    loop {
        beat(&members, &membership, &me).await;
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
    let _ = members.purge(&me).await;
}

/// Which destinations are paused, as the pauses bucket last said. Each change carries the
/// bucket's revision and an older one never undoes a newer: this instance's own write and
/// the watch's report of another instance's later one can arrive in either order.
#[derive(Default)]
pub struct Pauses(RwLock<HashMap<String, (bool, u64)>>);

impl Pauses {
    pub fn contains(&self, destination: &str) -> bool {
        matches!(self.0.read().unwrap().get(destination), Some((true, _)))
    }

    /// Takes the state written at `revision` unless a later one is known; whether the
    /// destination went from running to paused or back.
    pub fn apply(&self, destination: &str, paused: bool, revision: u64) -> bool {
        let mut all = self.0.write().unwrap();
        let was = match all.get(destination) {
            Some(&(_, known)) if known > revision => return false,
            Some(&(was, _)) => was,
            None => false,
        };
        all.insert(destination.to_string(), (paused, revision));
        was != paused
    }
}

/// Follows the pauses bucket: a pause or resume through any instance holds on all.
pub(super) async fn watch_pauses(
    store: Weak<JetStreamStore>,
    first: kv::Watch,
    stop: CancellationToken,
) {
    let mut first = Some(first);
    loop {
        let watch = match first.take() {
            Some(w) => Ok(w),
            None => {
                let Some(s) = store.upgrade() else { return };
                // Every key's current value first, then each change: no gap.
                let w = s.pauses.watch_with_history(">").await;
                drop(s);
                w
            }
        };
        if let Ok(mut w) = watch {
            loop {
                let entry = tokio::select! {
                    _ = stop.cancelled() => return,
                    e = w.next() => e,
                };
                let Some(Ok(entry)) = entry else { break };
                let Some(s) = store.upgrade() else { return };
                if let Some(name) = untoken(&entry.key) {
                    let on = entry.operation == Operation::Put && &entry.value[..] == b"1";
                    if s.paused.apply(&name, on, entry.revision) {
                        s.wakeup_of(&name).notify_one();
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}

/// Reads each known destination's queue depth (pending + held) from its consumer, when the
/// event of its first pending delivery not acknowledged was received, and the accepted events no
/// instance has taken to fan out yet from the fan-out's.
///
/// The fan-out's is read first: an event fanned out between the two reads counts twice
/// (until the next count), never not at all. This instance's own accepts (and outcomes)
/// during the reads are kept on top of what the consumers said. Events being fanned out
/// at the moment (taken, not acked: a few hundred at most) are not counted.
pub(super) async fn count_depths(store: Weak<JetStreamStore>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(DEPTH_EVERY) => {}
        }
        let Some(s) = store.upgrade() else { return };
        let before = s.depths.lock().unwrap().clone();
        let unfanned = consumer_info(&s, &s.names.fanout_consumer()).await;
        let known: Vec<String> = s.wakeups.lock().unwrap().keys().cloned().collect();
        let mut counted = Vec::new();
        // A read that fails keeps the last figure: the oldest pending does not seem to
        // drop to nothing (and an alert on it clear) while JetStream is slow to answer.
        let mut backlog = s.backlog_oldest.lock().unwrap().clone();
        backlog.retain(|d, _| known.contains(d));
        for d in known {
            if let Some(info) = consumer_info(&s, &s.names.consumer(&d)).await {
                let depth = info.num_pending + info.num_ack_pending as u64;
                counted.push((d.clone(), depth));
                if depth == 0 {
                    backlog.remove(&d);
                    continue;
                }
                // From the first not acknowledged: handed out or not, held, waiting out a
                // backoff or behind its key's head.
                let after = info.ack_floor.stream_sequence + 1;
                match first_pending(&s, &d, after).await {
                    Ok(Some(received)) => {
                        backlog.insert(d, received);
                    }
                    Ok(None) => {
                        backlog.remove(&d);
                    }
                    Err(()) => {}
                }
            }
        }
        *s.backlog_oldest.lock().unwrap() = backlog;
        // The unfanned count before the depths: whoever sees the new depths sees it too.
        if let Some(info) = unfanned {
            let until = fanout::replayed_until(&info);
            let n = fanout::unfanned_of(info.num_pending, info.delivered.stream_sequence, until);
            s.unfanned.store(n, Ordering::Relaxed);
        }
        let mut depths = s.depths.lock().unwrap();
        for (d, n) in counted {
            let meanwhile = depths.get(&d).copied().unwrap_or(0) as i64
                - before.get(&d).copied().unwrap_or(0) as i64;
            depths.insert(d, n.saturating_add_signed(meanwhile.max(0)));
        }
    }
}

/// When the event of the first pending delivery to `dest` at or after the stream sequence
/// `start` (its consumer's first not acknowledged) was received: the first of a few
/// messages (the others are outcomes, which the consumer hands out too, or damaged).
/// `Ok(None)` when none is found; `Err` when a read failed.
async fn first_pending(s: &JetStreamStore, dest: &str, mut start: u64) -> Result<Option<u64>, ()> {
    let filter = s.names.deliveries_of(dest);
    for _ in 0..FIRST_PENDING_LOOKS {
        let m = match s
            .stream
            .get_first_raw_message_by_subject(&filter, start)
            .await
        {
            Ok(m) => m,
            Err(e) if super::not_found(&e) => {
                return Ok(None);
            }
            Err(_) => return Err(()),
        };
        if let Ok((rec, _)) = decode_delivery(&m.payload) {
            if rec.delivery.state == DeliveryState::Pending {
                return Ok(Some(rec.event.received_ms));
            }
        }
        start = m.sequence + 1;
    }
    Ok(None)
}

async fn consumer_info(s: &JetStreamStore, name: &str) -> Option<consumer::Info> {
    let mut c = s.stream.get_consumer::<pull::Config>(name).await.ok()?;
    c.info().await.ok().cloned()
}

#[cfg(test)]
mod tests {
    use super::Pauses;

    #[test]
    fn an_older_pause_or_resume_never_undoes_a_newer() {
        let p = Pauses::default();
        assert!(!p.contains("a"));
        assert!(p.apply("a", true, 5), "paused");
        assert!(p.contains("a"));
        // This instance's own resume, written before the pause at 5, answered after it.
        assert!(!p.apply("a", false, 3));
        assert!(p.contains("a"), "the later pause stands");
        assert!(
            !p.apply("a", true, 5),
            "the same report again changes nothing"
        );
        assert!(p.apply("a", false, 6), "resumed");
        assert!(!p.contains("a"));
        assert!(
            !p.apply("b", false, 1),
            "a resume of one never paused changes nothing"
        );
        assert!(!p.contains("b"));
    }
}
