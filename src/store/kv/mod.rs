//! The store's logic over any [`Engine`]: key layout, dedup, the delivery queue, and group
//! commit.
//!
//! One writer thread applies every mutation ([`writer`]); operations ([`ops`]) that queue up
//! while a group commits form the next group: one write transaction, one durable commit,
//! then every caller of the group is answered. So 64 concurrent accepts cost one commit, not
//! 64, and committing never blocks the async workers. Because one thread writes, dedup
//! checks and state changes need no locks. Reads go straight to the engine.
//!
//! Keys (integers big-endian so they sort):
//! - `e/<seq>` event: its metadata (binary, [`records`]), then the body bytes
//! - `d/<id>\0<source>` dedup record: seq, expiry, then the sequences of earlier events
//!   with this id still stored (the id used again past its window; [`keys::event_seqs`])
//!   (id first: lookups by id scan a prefix);
//!   expiry is checked when read, and the record goes when its event is purged. The id of
//!   a v1 UUID is keyed `u/<its digits in time order>\0<source>` instead
//!   ([`keys::time_ordered`]); those that formats 1 to 3 keyed under `d/` stay there
//!   ([`keys::LEGACY_UNTIL_KEY`])
//! - `l/<seq><dest>` delivery record (binary, [`records`])
//! - `q/<dest>\0<due><seq>` pending deliveries in due order; the value names the group that
//!   wrote it, and a scheduler is handed it only once that group is durable ([`writer`])
//! - `o/<dest>\0<len><order key><seq>` pending deliveries of an `order_by` key, in accept
//!   order. Only the first of a key (its head) is in `q/`: the others wait here, out of the
//!   due queue, so a key that waits holds back nothing else; when the head is delivered or
//!   dead, the next one is put in `q/`
//! - `z/<dest>\0<seq>` dead deliveries
//! - `r/<seq>` the stored answer of a reply route
//! - `p/<dest>` present while the destination is paused
//! - `m/format` the format version; a start refuses a store written in a newer format
//! - `m/depth/<dest>` pending deliveries per destination, updated with every group;
//!   `m/clean` marks a clean close, `m/recount` a failed count update, `m/probe` is
//!   rewritten by readiness after a failed write (as large as the largest event). A start reads the
//!   counts instead of scanning the queue, unless they may disagree with it: after a crash
//!   on an engine whose groups are not atomic (sled), or after a failed update.

mod depth;
mod format;
mod fresh;
mod keys;
mod ops;
mod records;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, Notify};

use super::engine::Engine;
use super::unreadable::Unreadable;
use super::*;
use depth::load_depths;
use format::check_format;
use fresh::FreshEvents;
use keys::*;
use records::*;
use writer::{writer_loop, Job, Urgency, Writer};

/// Events one `recent` call looks at most: a filter that few events match still answers
/// promptly, with a cursor to go on from.
const RECENT_EXAMINE: usize = 10_000;

struct Shared<E> {
    engine: Arc<E>,
    depth: RwLock<HashMap<String, Arc<AtomicU64>>>,
    wakeups: RwLock<HashMap<String, Arc<Notify>>>,
    /// Paused destinations (`p/` keys), as of the last commit.
    paused: RwLock<HashSet<String>>,
    /// This process's mark on its due-queue entries (see [`writer`]).
    epoch: u64,
    /// The last group known durable.
    flushed: AtomicU64,
    /// Set when neither the kept counts nor the word to rebuild them could be written: the
    /// close then does not mark the store clean, so the next start counts the queues.
    recount: std::sync::atomic::AtomicBool,
    /// Events just accepted, for their first attempts.
    fresh: FreshEvents,
    /// The store's [`keys::LEGACY_UNTIL_KEY`] (0: none).
    legacy_until: u64,
    /// Where the search for each destination's oldest pending delivery starts: no
    /// delivery of it below is pending. Forgotten by a replay ([`Oldest`]).
    oldest: Mutex<Oldest>,
}

/// The oldest pending delivery's search marks, and how many replays forgot them: a
/// search that began before a replay does not set its mark.
#[derive(Default)]
struct Oldest {
    marks: HashMap<String, u64>,
    replays: u64,
}

/// The store over engine `E`.
pub struct KvStore<E: Engine> {
    shared: Arc<Shared<E>>,
    jobs: Mutex<Option<mpsc::Sender<(Job, Urgency)>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// One pause or resume at a time, so the set in memory ends as the last one written.
    pausing: tokio::sync::Mutex<()>,
}

impl<E: Engine> Shared<E> {
    fn depth_counter(&self, dest: &str) -> Arc<AtomicU64> {
        if let Some(c) = self.depth.read().unwrap().get(dest) {
            return c.clone();
        }
        self.depth
            .write()
            .unwrap()
            .entry(dest.to_string())
            .or_default()
            .clone()
    }

    fn delivery(&self, seq: u64, dest: &str) -> Result<Option<Delivery>, StoreError> {
        self.engine
            .get(&delivery_key(seq, dest))?
            .map(|v| decode_delivery(&v))
            .transpose()
    }

    /// The event as stored.
    fn event(&self, seq: u64) -> Result<Option<StoredEvent>, StoreError> {
        self.engine
            .get(&event_key(seq))?
            .map(|raw| decode_event(seq, &raw))
            .transpose()
    }

    /// The event's id and source, without its body.
    fn meta(&self, seq: u64) -> Result<Option<EventMeta>, StoreError> {
        self.engine
            .get(&event_key(seq))?
            .map(|raw| decode_meta(&raw).map(|(m, _)| m))
            .transpose()
    }

    fn deliveries_of(&self, seq: u64) -> Result<Vec<Delivery>, StoreError> {
        let mut out = Vec::new();
        self.engine
            .scan_prefix(&key(&[b"l/", &be(seq)]), &mut |_, v| {
                out.push(decode_delivery(v)?);
                Ok(true)
            })?;
        Ok(out)
    }

    /// The event's deliveries as the admin API shows them: a pending ordered one not in
    /// the due queue (behind another of its key's line) is marked `waiting`. The one of a
    /// key's line that may go holds the key's place in the due queue (not always the
    /// line's first: a replayed one rejoins ahead of the one in flight).
    fn shown(&self, mut deliveries: Vec<Delivery>) -> Result<Vec<Delivery>, StoreError> {
        for d in &mut deliveries {
            if d.state == DeliveryState::Pending && d.order_key.is_some() {
                let queued = queue_key(&d.destination, d.next_due_ms, d.seq);
                d.waiting = self.engine.get(&queued)?.is_none();
            }
        }
        Ok(deliveries)
    }
}

impl<E: Engine> KvStore<E> {
    /// Starts the store over an opened engine: counts pending deliveries per destination
    /// and starts the writer thread.
    pub fn start(engine: E) -> Result<Arc<Self>, StoreError> {
        let engine = Arc::new(engine);
        let legacy_until = check_format(engine.as_ref())?;
        let depth: HashMap<String, Arc<AtomicU64>> = load_depths(engine.as_ref())?
            .into_iter()
            .map(|(d, n)| (d, Arc::new(AtomicU64::new(n))))
            .collect();
        // After the newest stored event, and never below what a purge saw given.
        let next_seq = match engine.last_with_prefix(b"e/")? {
            Some(k) if k.len() >= 10 => read_u64(&k[2..10]) + 1,
            _ => 1,
        }
        .max(match engine.get(NEXT_SEQ_KEY)? {
            None => 1,
            Some(v) => stored_u64(&v).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "the store's next-sequence record holds {} bytes, not 8",
                    v.len()
                ))
            })?,
        });
        let mut paused = HashSet::new();
        engine.scan_prefix(PAUSED_PREFIX, &mut |k, _| {
            paused.insert(String::from_utf8_lossy(&k[PAUSED_PREFIX.len()..]).into_owned());
            Ok(true)
        })?;
        let shared = Arc::new(Shared {
            engine,
            depth: RwLock::new(depth),
            wakeups: RwLock::new(HashMap::new()),
            paused: RwLock::new(paused),
            epoch: rand::random(),
            flushed: AtomicU64::new(0),
            recount: Default::default(),
            fresh: FreshEvents::default(),
            legacy_until,
            oldest: Mutex::default(),
        });
        let (tx, rx) = mpsc::channel::<(Job, Urgency)>();
        let s2 = shared.clone();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(s2, next_seq, rx))
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Arc::new(KvStore {
            shared,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            pausing: tokio::sync::Mutex::new(()),
        }))
    }

    /// Replays every dead delivery of `dest` a chunk at a time, each chunk its own writer
    /// operation ([`Writer::replay_dead`]): a destination's whole dead-letter list is not
    /// one write that holds accepts back until it is through, nor in memory at once.
    async fn replay_destination(&self, dest: String) -> Result<usize, StoreError> {
        let (mut n, mut from, mut until) = (0, 0, None);
        loop {
            let d = dest.clone();
            let chunk = self.submit(move |w| w.replay_dead(&d, from, until)).await?;
            n += chunk.replayed;
            match chunk.next {
                Some(f) => (from, until) = (f, Some(chunk.until)),
                None => return Ok(n),
            }
        }
    }

    /// Runs `f` on the writer thread as one atomic operation and waits until its group is
    /// committed.
    async fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.submit_with(Urgency::Now, f).await
    }

    async fn submit_with<T: Send + 'static>(
        &self,
        urgency: Urgency,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |w: &mut Writer<'_>| {
            let kept = w.accepted.len();
            let r = match f(w) {
                Ok(v) => w.end_op().map(|_| v),
                Err(e) => {
                    w.abort_op();
                    Err(e)
                }
            };
            if r.is_err() {
                w.accepted.truncate(kept);
            }
            Box::new(move |commit_err: Option<StoreError>| {
                let _ = tx.send(match commit_err {
                    Some(e) => Err(e),
                    None => r,
                });
            })
        });
        {
            let guard = self.jobs.lock().unwrap();
            let sender = guard.as_ref().ok_or(StoreError::Closed)?;
            sender
                .send((job, urgency))
                .map_err(|_| StoreError::Closed)?;
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

impl<E: Engine> Drop for KvStore<E> {
    /// Stops the writer after what is queued (without the clean mark `close` writes), so
    /// the engine's files are released when the store is.
    fn drop(&mut self) {
        drop(self.jobs.lock().unwrap().take());
        if let Some(h) = self.writer.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

/// The destination of the first dead-letter key from `from` on.
fn first_dead_destination<E: Engine>(
    engine: &E,
    from: &[u8],
) -> Result<Option<String>, StoreError> {
    let mut dest = None;
    engine.scan_from(b"z/", from, &mut |k, _| {
        dest = Some(dest_of(k));
        Ok(false)
    })?;
    Ok(dest)
}

#[async_trait]
impl<E: Engine> Store for KvStore<E> {
    async fn accept(&self, ev: NewEvent) -> Result<Admission, StoreError> {
        self.submit(move |w| w.accept(ev)).await
    }

    async fn pending(
        &self,
        destination: &str,
        limit: usize,
        skip: &(dyn Fn(u64) -> bool + Send + Sync),
    ) -> Result<Vec<Delivery>, StoreError> {
        let prefix = queue_prefix(destination);
        let (epoch, flushed) = (
            self.shared.epoch,
            self.shared.flushed.load(Ordering::Acquire),
        );
        let mut out = Vec::new();
        let mut unreadable = Unreadable::default();
        let mut from = prefix.clone();
        // More than once only past unreadable records: those do not count toward `limit`,
        // so a run of them at the head does not hide what is due behind it.
        loop {
            let want = limit - out.len();
            let (mut found, mut resume) = (Vec::new(), None);
            self.shared.engine.scan_from(&prefix, &from, &mut |k, v| {
                if found.len() >= want {
                    resume = Some(k.to_vec());
                    return Ok(false);
                }
                let seq = read_u64(&k[k.len() - 8..]);
                if !skip(seq) && writer::durable(v, epoch, flushed) {
                    found.push((seq, read_u64(&k[prefix.len()..])));
                }
                Ok(true)
            })?;
            // The window's delivery records in one read (one transaction on redb, not one each).
            let keys: Vec<Vec<u8>> = found
                .iter()
                .map(|&(seq, _)| delivery_key(seq, destination))
                .collect();
            self.shared.engine.get_each(&keys, &mut |i, raw| {
                let Some(raw) = raw else { return Ok(()) };
                // A damaged record holds back its own delivery, not the destination's queue.
                let Some(mut d) = unreadable.skip(found[i].0, decode_delivery(raw))? else {
                    return Ok(());
                };
                if d.state == DeliveryState::Pending {
                    // The later of the two: the queue was read before the records, so an
                    // outcome written in between (a retry's backoff) shows in the record only.
                    d.next_due_ms = d.next_due_ms.max(found[i].1);
                    out.push(d);
                }
                Ok(())
            })?;
            match resume {
                Some(k) if out.len() < limit => from = k,
                _ => {
                    // Every pass meets one again: said at most once a second.
                    unreadable.warn("due deliveries");
                    return Ok(out);
                }
            }
        }
    }

    /// A kept event's uses are the first attempts of its deliveries due at once: only they
    /// take them.
    async fn event(&self, seq: u64) -> Result<Option<StoredEvent>, StoreError> {
        match self.shared.fresh.take(seq) {
            Some(event) => Ok(Some(event)),
            None => self.shared.event(seq),
        }
    }

    async fn record(&self, key: &DeliveryKey, outcome: Outcome) -> Result<(), StoreError> {
        let k = key.clone();
        self.submit_with(Urgency::CanWait, move |w| w.record(&k, outcome))
            .await
    }

    fn after_reply(
        &self,
        seq: u64,
        reply: Option<StoredReply>,
        attempt: Option<(DeliveryKey, Outcome)>,
        _fresh: bool,
    ) -> Result<(), StoreError> {
        let job: Job = Box::new(move |w: &mut Writer<'_>| {
            // The outcome first: it reads before it writes, so one that fails (a damaged
            // delivery record) has written nothing, and its group (other requests' accepts)
            // still commits, where a reply written before it would doom the whole group.
            let mut r = Ok(());
            if let Some((key, outcome)) = attempt {
                r = w.record(&key, outcome);
            }
            if let (Ok(()), Some(reply)) = (&r, reply) {
                r = w.txn.put(&reply_key(seq), &reply.encode());
            }
            r = match r {
                Ok(()) => w.end_op(),
                Err(e) => {
                    w.abort_op();
                    Err(e)
                }
            };
            Box::new(move |commit_err: Option<StoreError>| {
                if let Some(e) = commit_err.or(r.err()) {
                    tracing::warn!(seq, error = %e, "keeping a reply route's answer failed");
                }
            })
        });
        let guard = self.jobs.lock().unwrap();
        let sender = guard.as_ref().ok_or(StoreError::Closed)?;
        sender
            .send((job, Urgency::CanWait))
            .map_err(|_| StoreError::Closed)
    }

    async fn dead_after(
        &self,
        destination: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<NamedDelivery>, StoreError> {
        // Dead letters are keyed by destination, then sequence: the oldest of all are the
        // oldest `limit` of each destination, merged. The cursor is the sequence.
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let engine = &*self.shared.engine;
        let mut found = Vec::new();
        let mut next_dest = match destination {
            Some(d) => Some(d.to_string()),
            None => first_dead_destination(engine, b"z/")?,
        };
        while let Some(dest) = next_dest {
            let prefix = key(&[b"z/", dest.as_bytes(), b"\0"]);
            let mut taken = 0;
            engine.scan_from(&prefix, &dead_key(&dest, from), &mut |k, _| {
                if taken >= limit {
                    return Ok(false);
                }
                taken += 1;
                found.push((read_u64(&k[k.len() - 8..]), dest.clone()));
                Ok(true)
            })?;
            next_dest = match destination {
                Some(_) => None,
                // Past every key of `dest` (its name, then NUL): the next destination's.
                None => first_dead_destination(engine, &key(&[b"z/", dest.as_bytes(), b"\x01"]))?,
            };
        }
        found.sort_unstable();
        // An event dead to several destinations shares one cursor (its sequence): a page
        // ends with all of them, or the next page (after it) would leave some out. Each
        // destination's first `limit` hold all of them if the merged first `limit` hold one.
        if let Some(&(last, _)) = found.get(limit.max(1) - 1) {
            found.retain(|(seq, _)| *seq <= last);
        }
        let mut out = Vec::new();
        let mut unreadable = Unreadable::default();
        for (seq, dest) in found {
            let read = self.shared.delivery(seq, &dest).and_then(|d| {
                let meta = self.shared.meta(seq)?;
                Ok(d.zip(meta))
            });
            let Some((delivery, meta)) = unreadable.skip(seq, read)?.flatten() else {
                continue;
            };
            out.push(NamedDelivery {
                event_id: meta.id,
                source: meta.source,
                delivery,
                cursor: seq,
            });
        }
        unreadable.warn("dead letters");
        Ok(out)
    }

    async fn recent(&self, q: &EventQuery) -> Result<EventPage, StoreError> {
        let below = event_key(q.before.unwrap_or(u64::MAX));
        let limit = q.limit.max(1);
        let mut events = Vec::new();
        let mut next = None;
        let mut examined = 0;
        let shared = &self.shared;
        let mut unreadable = Unreadable::default();
        shared.engine.scan_back(b"e/", &below, &mut |k, raw| {
            let seq = read_u64(&k[2..10]);
            if events.len() == limit || examined == RECENT_EXAMINE {
                next = Some(seq + 1);
                return Ok(false);
            }
            examined += 1;
            // No body: a list shows none, and a page may hold thousands.
            let Some((event, _)) = unreadable.skip(seq, decode_head(seq, raw))? else {
                return Ok(true);
            };
            if q.source.as_ref().is_some_and(|s| &event.source != s) {
                return Ok(true);
            }
            let Some(deliveries) = unreadable.skip(seq, shared.deliveries_of(seq))? else {
                return Ok(true);
            };
            let wanted = |d: &Delivery| {
                q.destination.as_ref().is_none_or(|n| &d.destination == n)
                    && q.state.is_none_or(|s| d.state == s)
            };
            if (q.destination.is_some() || q.state.is_some()) && !deliveries.iter().any(wanted) {
                return Ok(true);
            }
            let Some(deliveries) = unreadable.skip(seq, shared.shown(deliveries))? else {
                return Ok(true);
            };
            events.push(EventView { event, deliveries });
            Ok(true)
        })?;
        unreadable.warn("events");
        Ok(EventPage { events, next })
    }

    async fn set_paused(&self, destination: &str, paused: bool) -> Result<(), StoreError> {
        let _one_at_a_time = self.pausing.lock().await;
        let dest = destination.to_string();
        let written = self
            .submit(move |w| {
                if paused {
                    w.txn.put(&paused_key(&dest), b"1")
                } else {
                    w.txn.delete(&paused_key(&dest))
                }
            })
            .await;
        // A failed write may still have been made (sled applies it before the flush that
        // failed): the set in memory follows what the store holds, whichever it is.
        let paused = match &written {
            Ok(()) => paused,
            Err(_) => match self.shared.engine.get(&paused_key(destination)) {
                Ok(v) => v.is_some(),
                Err(_) => return written,
            },
        };
        let mut set = self.shared.paused.write().unwrap();
        if paused {
            set.insert(destination.to_string());
        } else {
            set.remove(destination);
            drop(set);
            self.wakeup(destination).notify_one();
        }
        written
    }

    fn paused(&self, destination: &str) -> bool {
        self.shared.paused.read().unwrap().contains(destination)
    }

    async fn replay(&self, which: ReplaySelector) -> Result<usize, StoreError> {
        let replayed = match which {
            ReplaySelector::Destination(dest) => self.replay_destination(dest).await,
            ReplaySelector::EventId(id) => {
                self.submit(move |w| w.replay_of_id(&id, None, None)).await
            }
            ReplaySelector::Delivery {
                id,
                destination,
                seq,
            } => {
                self.submit(move |w| w.replay_of_id(&id, Some(&destination), seq))
                    .await
            }
        };
        // A dead delivery below a mark is pending again: search from the start. Also after
        // a failed replay, which may still have been made (sled).
        if !matches!(replayed, Ok(0)) {
            let mut oldest = self.shared.oldest.lock().unwrap();
            oldest.marks.clear();
            oldest.replays += 1;
        }
        replayed
    }

    /// The delivery records in sequence order from the destination's mark: the first one
    /// pending is the oldest, and the mark moves up to it. Each record is passed once
    /// (until a replay), so the reads cost about one record per delivery.
    async fn oldest_pending(&self, destination: &str) -> Result<Option<u64>, StoreError> {
        let (replays, mark) = {
            let oldest = self.shared.oldest.lock().unwrap();
            (
                oldest.replays,
                oldest.marks.get(destination).copied().unwrap_or(0),
            )
        };
        let (mut found, mut last) = (None, None);
        self.shared
            .engine
            .scan_from(b"l/", &key(&[b"l/", &be(mark)]), &mut |k, v| {
                let seq = read_u64(&k[2..10]);
                last = Some(seq);
                let pending = &k[10..] == destination.as_bytes()
                    && decode_delivery(v).is_ok_and(|d| d.state == DeliveryState::Pending);
                if pending {
                    found = Some(seq);
                }
                Ok(!pending)
            })?;
        // Sequence numbers only grow: none of this destination up to `last` was pending.
        let next = found.or(last.map(|l| l + 1)).unwrap_or(mark);
        {
            let mut oldest = self.shared.oldest.lock().unwrap();
            if oldest.replays == replays {
                oldest.marks.insert(destination.to_string(), next);
            }
        }
        match found {
            Some(seq) => Ok(self.shared.meta(seq)?.map(|m| m.received_ms)),
            None => Ok(None),
        }
    }

    async fn lookup(&self, id: &str) -> Result<Vec<EventView>, StoreError> {
        let engine = &self.shared.engine;
        let seqs = events_of_id(id, self.shared.legacy_until, |p, visit| {
            engine.scan_prefix(p, visit)
        })?;
        let mut out = Vec::new();
        for seq in seqs {
            if let Some(event) = self.shared.event(seq)? {
                out.push(EventView {
                    event,
                    deliveries: self.shared.shown(self.shared.deliveries_of(seq)?)?,
                });
            }
        }
        Ok(out)
    }

    async fn kept(&self, source: &str, id: &str) -> Result<bool, StoreError> {
        let legacy = now_ms() < self.shared.legacy_until;
        let engine = &*self.shared.engine;
        let found = read_dedup(&dedup_key(source, id), source, id, legacy, |k| {
            engine.get(k)
        })?;
        Ok(found.is_some())
    }

    async fn purge(&self, retain: Duration) -> Result<usize, StoreError> {
        let (mut removed, mut from) = (0, 0);
        loop {
            let (n, next) = self.submit(move |w| w.purge_batch(retain, from)).await?;
            removed += n;
            match next {
                Some(seq) if seq > from => from = seq,
                _ => return Ok(removed),
            }
        }
    }

    fn queue_depth(&self, destination: &str) -> u64 {
        self.shared
            .depth
            .read()
            .unwrap()
            .get(destination)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn queue_depths(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .shared
            .depth
            .read()
            .unwrap()
            .iter()
            .map(|(k, c)| (k.clone(), c.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        v.sort();
        v
    }

    fn wakeup(&self, destination: &str) -> Arc<Notify> {
        if let Some(n) = self.shared.wakeups.read().unwrap().get(destination) {
            return n.clone();
        }
        self.shared
            .wakeups
            .write()
            .unwrap()
            .entry(destination.to_string())
            .or_default()
            .clone()
    }

    async fn probe(&self, bytes: usize) -> Result<(), StoreError> {
        self.submit(move |w| w.txn.put(PROBE_KEY, &vec![0; bytes.max(1)]))
            .await
    }

    async fn close(&self) -> Result<(), StoreError> {
        let Some(sender) = self.jobs.lock().unwrap().take() else {
            return Ok(()); // closed already
        };
        drop(sender);
        let handle = self.writer.lock().unwrap().take();
        if let Some(h) = handle {
            tokio::task::spawn_blocking(move || h.join())
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
                .map_err(|_| StoreError::Unavailable("writer thread panicked".into()))?;
        }
        // Every write is done: the kept counts are exact (unless keeping them failed); say
        // so for the next start.
        let engine = self.shared.engine.clone();
        let recount = self.shared.recount.load(Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            if !recount {
                let mut marked = Ok(());
                engine.group(&mut |txn| {
                    marked = txn.put(CLEAN_KEY, b"1").and_then(|_| txn.end_op());
                })?;
                marked?;
            }
            engine.sync()?;
            engine.release()
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }
}
