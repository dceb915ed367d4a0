//! What the admin API reads from the stream, on any instance: events by id, the event list
//! (walking the stream back from a cursor), an event's deliveries, the dead letters.

use bytes::Bytes;
use futures_util::StreamExt;

use super::records::*;
use super::*;
use crate::store::unreadable::{Unreadable, UNKNOWN_SEQ};

/// Messages one event-list call examines.
const RECENT_EXAMINED: u64 = 10_000;
/// Bytes of messages one event-list call reads: the stream's messages hold bodies (events,
/// delivery states), so a page filtered down to few events could otherwise read gigabytes.
/// A page that stops here has a cursor to go on from.
const RECENT_READ: usize = 64 << 20;

/// A delivery as the admin API shows it: marked `waiting` while pending behind another of
/// its key's line.
fn shown(rec: DeliveryRecord) -> Delivery {
    let mut d = rec.delivery;
    d.waiting = rec.waiting && d.state == DeliveryState::Pending;
    d
}

impl JetStreamStore {
    /// An event and its deliveries, from the event's message.
    pub(super) async fn view(&self, seq: u64, payload: &Bytes) -> Result<EventView, StoreError> {
        let (meta, event) = decode_event(seq, payload)?;
        self.deliveries_view(meta, event).await
    }

    /// An event and its deliveries, from its decoded message.
    async fn deliveries_view(
        &self,
        meta: EventMeta,
        event: StoredEvent,
    ) -> Result<EventView, StoreError> {
        let seq = event.seq;
        let e = event_token(&meta.source, &meta.id);
        let mut deliveries = Vec::new();
        // A delivery whose state cannot be read is left out; the event and the rest shown.
        let mut unreadable = Unreadable::default();
        for d in &meta.destinations {
            match unreadable.skip(seq, self.state_of(seq, d, &e).await)? {
                Some(Some((_, rec, _))) => deliveries.push(shown(rec)),
                // Not fanned out yet: pending, as it will be written (whether it will wait
                // is the fan-out's to find).
                Some(None) => deliveries.push(meta.first_delivery(seq, d).delivery),
                None => {}
            }
        }
        unreadable.warn("deliveries");
        Ok(EventView { event, deliveries })
    }

    /// Dead deliveries as (index entry's sequence, state sequence, record, body), oldest
    /// first, from index entry `from` up to `until`: the index walked in stream order, one
    /// read per entry, so no listing of its subjects (capped, and in no order) and as many
    /// reads as `limit` takes.
    pub(super) async fn dead_letters(
        &self,
        destination: Option<&str>,
        (from, until): (u64, u64),
        limit: usize,
    ) -> Result<Vec<(u64, u64, DeliveryRecord, Bytes)>, StoreError> {
        let filter = self.names.dead_of(destination);
        let mut out = Vec::new();
        let mut unreadable = Unreadable::default();
        let mut next = from.max(1);
        while out.len() < limit {
            let m = match self
                .stream
                .get_first_raw_message_by_subject(&filter, next)
                .await
            {
                Ok(m) => m,
                Err(e) if not_found(&e) => break,
                Err(e) => return Err(StoreError::Unavailable(e.to_string())),
            };
            if m.sequence > until {
                break;
            }
            next = m.sequence + 1;
            if &m.payload[..] != b"dead" {
                continue;
            }
            let Some((dest, e)) = self.dead_subject_parts(&m.subject) else {
                continue;
            };
            let state = unreadable.skip(m.sequence, self.delivery_state(&dest, e).await)?;
            if let Some((state_seq, rec, body)) = state.flatten() {
                if rec.delivery.state == DeliveryState::Dead {
                    out.push((m.sequence, state_seq, rec, body));
                }
            }
        }
        unreadable.warn("dead letters");
        Ok(out)
    }

    /// `<p>.dl.<d>.<part>` → (destination, part): the index entry's delivery is on
    /// `<p>.q.<d>.<part>`.
    pub(super) fn dead_subject_parts<'a>(&self, s: &'a str) -> Option<(String, &'a str)> {
        let rest = s.strip_prefix(&self.names.prefix)?.strip_prefix(".dl.")?;
        let (d, e) = rest.split_once('.')?;
        Some((untoken(d)?, e))
    }

    /// Every kept event with this id (one per source), with its deliveries. A dead letter
    /// outlives its event's message (kept `max(dedup window, retain, 1 day)`): an event gone while
    /// a delivery is still dead is shown from its dead deliveries' records.
    pub(super) async fn events_with_id(&self, id: &str) -> Result<Vec<EventView>, StoreError> {
        let mut out = Vec::new();
        let mut unreadable = Unreadable::default();
        for s in self
            .subjects(&self.names.events_of_id(id), usize::MAX)
            .await?
        {
            if let Some((seq, p)) = self.last(&s).await? {
                let Some(v) = unreadable.skip(seq, self.view(seq, &p).await)? else {
                    continue;
                };
                if v.event.id == id {
                    out.push(v);
                }
            }
        }
        unreadable.warn("events");
        let kept = out.len();
        for (_, rec, body) in self.dead_with_id(id).await? {
            let seq = rec.delivery.seq;
            if out[..kept].iter().any(|v| v.event.seq == seq) {
                continue;
            }
            match out.iter_mut().find(|v| v.event.seq == seq) {
                Some(v) => v.deliveries.push(rec.delivery),
                None => out.push(EventView {
                    event: stored_event(&rec, body),
                    deliveries: vec![rec.delivery],
                }),
            }
        }
        out.sort_by_key(|v| v.event.seq);
        Ok(out)
    }

    /// The dead deliveries of every event with this id, kept or expired, as (state
    /// sequence, record, body).
    pub(super) async fn dead_with_id(
        &self,
        id: &str,
    ) -> Result<Vec<(u64, DeliveryRecord, Bytes)>, StoreError> {
        let mut out = Vec::new();
        let mut unreadable = Unreadable::default();
        for s in self
            .subjects(&self.names.dead_of_id(id), usize::MAX)
            .await?
        {
            let Some((dest, part)) = self.dead_subject_parts(&s) else {
                continue;
            };
            let state = unreadable.skip(UNKNOWN_SEQ, self.delivery_state(&dest, part).await)?;
            if let Some(t) = state.flatten() {
                if t.1.event.id == id && t.1.delivery.state == DeliveryState::Dead {
                    out.push(t);
                }
            }
        }
        unreadable.warn("dead letters");
        Ok(out)
    }

    /// The subjects in the stream that match `filter`, at most `max` of them.
    pub(super) async fn subjects(
        &self,
        filter: &str,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut it = self
            .stream
            .info_with_subjects(filter)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        // The listing is paged by offset over the sorted subjects, and async-nats asks for
        // a page more than the first even when it held them all: a subject written between
        // the two requests shifts the set, and one already listed comes again.
        let mut seen = std::collections::HashSet::new();
        let mut subjects = Vec::new();
        while subjects.len() < max {
            let Some(s) = it.next().await else { break };
            let s = s.map_err(|e| StoreError::Unavailable(e.to_string()))?.0;
            if seen.insert(s.clone()) {
                subjects.push(s);
            }
        }
        Ok(subjects)
    }

    /// The newest events matching `query`: the stream walked back from its cursor, at most
    /// `RECENT_EXAMINED` messages per call.
    pub(super) async fn walk_back(&self, query: &EventQuery) -> Result<EventPage, StoreError> {
        let state = {
            let mut s = self.stream.clone();
            let info = s.info().await;
            info.map_err(|e| StoreError::Unavailable(e.to_string()))?
                .state
                .clone()
        };
        let last = match query.before {
            Some(b) => b.saturating_sub(1).min(state.last_sequence),
            None => state.last_sequence,
        };
        // Below the first message kept, nothing is: no page walks the expired ones.
        let oldest = state.first_sequence.max(1) - 1;
        let mut events = Vec::new();
        let mut unreadable = Unreadable::default();
        let mut read = 0;
        let of_source = query.source.as_deref().map(Names::source_part);
        let mut seq = last;
        let floor = last.saturating_sub(RECENT_EXAMINED).max(oldest);
        while seq > floor && events.len() < query.limit && read < RECENT_READ {
            let m = match self.stream.get_raw_message(seq).await {
                Ok(m) => m,
                Err(e) if not_found(&e) => {
                    seq -= 1;
                    continue;
                }
                Err(e) => return Err(StoreError::Unavailable(e.to_string())),
            };
            seq -= 1;
            read += m.payload.len();
            if !self.names.is_event(&m.subject) {
                continue;
            }
            // Another source's event is passed over by its subject, unread.
            if of_source
                .as_ref()
                .is_some_and(|p| m.subject.rsplit('.').next() != Some(p.as_str()))
            {
                continue;
            }
            let decoded = unreadable.skip(m.sequence, decode_event(m.sequence, &m.payload))?;
            let Some((meta, mut event)) = decoded else {
                continue;
            };
            if query.source.as_ref().is_some_and(|s| *s != event.source) {
                continue;
            }
            // Nor are the states of an event not sent to the destination asked for read.
            if let Some(d) = &query.destination {
                if !meta.destinations.contains(d) {
                    continue;
                }
            }
            // No body: a list shows none, and a page may hold thousands.
            event.body = Bytes::new();
            // (A delivery state it cannot read leaves only that delivery out.)
            let v = self.deliveries_view(meta, event).await?;
            let fits = |d: &Delivery| {
                query
                    .destination
                    .as_ref()
                    .is_none_or(|want| *want == d.destination)
                    && query.state.is_none_or(|st| st == d.state)
            };
            if (query.destination.is_some() || query.state.is_some())
                && !v.deliveries.iter().any(fits)
            {
                continue;
            }
            events.push(v);
        }
        unreadable.warn("events");
        let next = (seq > oldest).then_some(seq + 1);
        Ok(EventPage { events, next })
    }
}
