//! Events just accepted, kept in memory for their first delivery attempts: a scheduler is
//! woken by the commit that accepted an event and usually attempts it within milliseconds,
//! so it takes the event from here instead of reading it back from the store.
//!
//! An event enters once its group is durable, before the group's due entries are visible
//! to the schedulers, with one use per delivery due at once (not held for a reply route,
//! not waiting behind an earlier one of its order key). It goes when its last use is taken,
//! when newer ones push it out (at most [`MAX_EVENTS`] events, [`MAX_BYTES`] of bodies,
//! each a slice of its own stored record), or when it is purged. Events never change once
//! stored, so what is taken here is what the store holds; a miss (a slow destination, a
//! retry, a restart) reads the store. The last use hands the event itself over, so in the common case it is
//! freed on the worker that sent it, not on the store's writer thread.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::store::StoredEvent;

/// Events kept at most: at 15,000 events/s, the last quarter of a second.
pub(super) const MAX_EVENTS: usize = 4096;
/// Body bytes kept at most.
pub(super) const MAX_BYTES: usize = 4 << 20;

pub(super) struct FreshEvents {
    inner: Mutex<Kept>,
}

struct Kept {
    by_seq: HashMap<u64, (StoredEvent, usize)>,
    /// Sequence numbers in the order they came (some may have gone since).
    order: VecDeque<u64>,
    bytes: usize,
}

impl Default for FreshEvents {
    fn default() -> Self {
        FreshEvents {
            inner: Mutex::new(Kept {
                by_seq: HashMap::with_capacity(MAX_EVENTS),
                order: VecDeque::with_capacity(MAX_EVENTS + 1),
                bytes: 0,
            }),
        }
    }
}

impl FreshEvents {
    /// Keeps `event` for `uses` takes, pushing out the oldest kept while over the bounds.
    /// A body larger than all of [`MAX_BYTES`] is not kept.
    pub(super) fn insert(&self, event: StoredEvent, uses: usize) {
        if event.body.len() > MAX_BYTES || uses == 0 {
            return;
        }
        let mut kept = self.inner.lock().unwrap();
        kept.bytes += event.body.len();
        kept.order.push_back(event.seq);
        if let Some((old, _)) = kept.by_seq.insert(event.seq, (event, uses)) {
            kept.bytes -= old.body.len();
        }
        while kept.order.len() > MAX_EVENTS || kept.bytes > MAX_BYTES {
            let Some(seq) = kept.order.pop_front() else {
                break;
            };
            kept.remove(seq);
        }
    }

    /// One use of the event `seq`, if kept (its body is shared, not copied); the last use
    /// takes the event out.
    pub(super) fn take(&self, seq: u64) -> Option<StoredEvent> {
        let mut kept = self.inner.lock().unwrap();
        let (event, uses) = kept.by_seq.get_mut(&seq)?;
        if *uses > 1 {
            *uses -= 1;
            return Some(event.clone());
        }
        kept.remove(seq)
    }

    /// The uses left of the event `seq`, and its body (tests).
    #[cfg(test)]
    pub(super) fn peek(&self, seq: u64) -> Option<(usize, bytes::Bytes)> {
        let kept = self.inner.lock().unwrap();
        kept.by_seq.get(&seq).map(|(e, n)| (*n, e.body.clone()))
    }

    pub(super) fn remove(&self, seq: u64) {
        self.inner.lock().unwrap().remove(seq);
    }
}

impl Kept {
    fn remove(&mut self, seq: u64) -> Option<StoredEvent> {
        let (event, _) = self.by_seq.remove(&seq)?;
        self.bytes -= event.body.len();
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn event(seq: u64, body: usize) -> StoredEvent {
        StoredEvent {
            seq,
            id: format!("id-{seq}"),
            source: "s".into(),
            received_ms: 1,
            content_type: None,
            body: Bytes::from(vec![b'x'; body]),
        }
    }

    fn bytes_agree(fresh: &FreshEvents) {
        let kept = fresh.inner.lock().unwrap();
        assert!(kept.bytes <= MAX_BYTES);
        let sum: usize = kept.by_seq.values().map(|(e, _)| e.body.len()).sum();
        assert_eq!(kept.bytes, sum);
        assert!(kept.order.len() <= MAX_EVENTS);
    }

    #[test]
    fn keeps_the_newest_within_both_bounds() {
        let fresh = FreshEvents::default();
        for seq in 1..=MAX_EVENTS as u64 + 10 {
            fresh.insert(event(seq, 10), 1);
        }
        assert!(fresh.take(10).is_none(), "the oldest went");
        assert_eq!(fresh.take(11).unwrap().id, "id-11");
        assert_eq!(fresh.take(MAX_EVENTS as u64 + 10).unwrap().body.len(), 10);

        let big = MAX_BYTES / 3;
        for seq in 20_000..20_004 {
            fresh.insert(event(seq, big), 1);
        }
        assert!(fresh.take(20_000).is_none(), "pushed out by bytes");
        assert!(fresh.take(20_003).is_some());
        bytes_agree(&fresh);
    }

    #[test]
    fn one_use_per_destination_then_gone() {
        let fresh = FreshEvents::default();
        fresh.insert(event(1, 5), 2);
        assert_eq!(fresh.take(1).unwrap().id, "id-1");
        assert_eq!(fresh.take(1).unwrap().body.len(), 5);
        assert!(fresh.take(1).is_none());
        bytes_agree(&fresh);
    }

    #[test]
    fn a_removed_or_oversized_event_is_not_kept() {
        let fresh = FreshEvents::default();
        fresh.insert(event(1, 5), 1);
        fresh.remove(1);
        assert!(fresh.take(1).is_none());
        fresh.insert(event(2, MAX_BYTES + 1), 1);
        assert!(fresh.take(2).is_none());
        assert_eq!(fresh.inner.lock().unwrap().bytes, 0);
    }
}
