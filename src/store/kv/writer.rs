//! The writer thread and group commit: one thread applies every mutation; operations that
//! queue up while a group commits form the next group (one transaction, one durable
//! commit), and then every caller of the group is answered.
//!
//! Each group has a number, and what it puts in a due queue carries it (with the process's
//! epoch): sled lets readers see an operation's writes before its group's flush, so the
//! schedulers leave a due entry alone until [`Shared::flushed`] says its group is durable —
//! nothing is sent on the strength of a write a crash can take back (a promoted order-key
//! head sent before its predecessor's outcome was on disk, then the predecessor again).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::time::{Duration, Instant};

use super::depth::persist_depth;
use super::fresh::FreshEvents;
use super::keys::*;
use super::Shared;
use crate::store::engine::{self, Engine, Txn};
use crate::store::{StoreError, StoredEvent};

/// Operations one commit may cover at most.
pub(super) const MAX_GROUP: usize = 4096;

pub(super) type Done = Box<dyn FnOnce(Option<StoreError>) + Send>;
pub(super) type Job = Box<dyn FnOnce(&mut Writer<'_>) -> Done + Send>;

/// Whether a job's caller is waiting on its commit to answer somebody (an accept: the
/// provider waits for its 200) or only bookkeeping that may ride with a later commit
/// (a delivery outcome: lost in a crash, the delivery is made again).
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Urgency {
    Now,
    CanWait,
}

/// How long a group made only of jobs that can wait stays open for company. Outcomes then
/// share the commit of the next accept instead of paying for one of their own: at 2,000
/// events/s that halves the commits (docs/performance.md).
pub(super) const COMPANY_WAIT: Duration = Duration::from_millis(2);

/// The writer thread's view of one group.
pub(super) struct Writer<'a> {
    pub(super) txn: &'a mut dyn Txn,
    /// Pending counts as of the last commit.
    pub(super) committed: &'a RwLock<HashMap<String, Arc<AtomicU64>>>,
    pub(super) next_seq: &'a mut u64,
    /// Queue depth changes of the group's ended operations, applied once it is committed.
    pub(super) depth: HashMap<String, i64>,
    /// Queue depth changes of the operation under way: they join `depth` when it ends and
    /// are dropped if it fails, as its writes are.
    op_depth: HashMap<String, i64>,
    /// Destinations to wake once the group is committed.
    pub(super) wakes: HashSet<String>,
    /// The value of this group's due-queue entries: the epoch and the group's number.
    pub(super) stamp: [u8; 16],
    /// Events kept in memory for their first attempts: a purged one must leave them.
    pub(super) fresh: &'a FreshEvents,
    /// Events this group accepted, with their deliveries due at once: kept in `fresh` once
    /// the group is durable.
    pub(super) accepted: Vec<(StoredEvent, usize)>,
    /// Until when an accept also looks for v1 UUID dedup records under their old key.
    pub(super) legacy_until: u64,
}

impl<'a> Writer<'a> {
    /// The view of group `group` over `txn`, with nothing written yet.
    fn new<E: Engine>(
        txn: &'a mut dyn Txn,
        shared: &'a Shared<E>,
        next_seq: &'a mut u64,
        group: u64,
    ) -> Self {
        Writer {
            txn,
            committed: &shared.depth,
            next_seq,
            depth: HashMap::new(),
            op_depth: HashMap::new(),
            wakes: HashSet::new(),
            stamp: stamp(shared.epoch, group),
            fresh: &shared.fresh,
            accepted: Vec::new(),
            legacy_until: shared.legacy_until,
        }
    }

    /// Counts `delta` more pending deliveries of `dest` for the operation under way.
    pub(super) fn count(&mut self, dest: &str, delta: i64) {
        match self.op_depth.get_mut(dest) {
            Some(n) => *n += delta,
            None => {
                self.op_depth.insert(dest.to_string(), delta);
            }
        }
    }

    /// Ends the operation under way: its writes and its queue changes join the group's.
    pub(super) fn end_op(&mut self) -> Result<(), StoreError> {
        if let Err(e) = self.txn.end_op() {
            self.op_depth.clear();
            return Err(e);
        }
        for (dest, delta) in self.op_depth.drain() {
            *self.depth.entry(dest).or_default() += delta;
        }
        Ok(())
    }

    /// Drops the operation under way: its writes and its queue changes.
    pub(super) fn abort_op(&mut self) {
        self.txn.abort_op();
        self.op_depth.clear();
    }

    /// Puts delivery `seq` of `dest` in the due queue at `due`; its scheduler is woken once
    /// the group is durable.
    pub(super) fn queue(&mut self, dest: &str, due: u64, seq: u64) -> Result<(), StoreError> {
        self.txn.put(&queue_key(dest, due, seq), &self.stamp)?;
        if !self.wakes.contains(dest) {
            self.wakes.insert(dest.to_string());
        }
        Ok(())
    }
}

/// The value of a due-queue entry written by group `group` of the process with `epoch`.
pub(super) fn stamp(epoch: u64, group: u64) -> [u8; 16] {
    let mut v = [0; 16];
    v[..8].copy_from_slice(&epoch.to_be_bytes());
    v[8..].copy_from_slice(&group.to_be_bytes());
    v
}

/// Whether a due-queue entry with value `v` may be acted on: written by an earlier process
/// (all of which is durable: it was read back), or by a group of this one that is durable.
pub(super) fn durable(v: &[u8], epoch: u64, flushed: u64) -> bool {
    v.len() != 16 || v[..8] != epoch.to_be_bytes() || read_u64(&v[8..]) <= flushed
}

pub(super) fn writer_loop<E: Engine>(
    shared: Arc<Shared<E>>,
    mut next_seq: u64,
    rx: mpsc::Receiver<(Job, Urgency)>,
) {
    let mut done: Vec<Done> = Vec::with_capacity(MAX_GROUP);
    let mut group = shared.flushed.load(Ordering::Relaxed);
    // Destinations written to by groups that failed: woken when a later flush succeeds.
    let mut unwoken: HashSet<String> = HashSet::new();
    loop {
        let next = if unwoken.is_empty() {
            rx.recv().map_err(|_| ())
        } else {
            match rx.recv_timeout(FLUSH_RETRY) {
                Ok(next) => Ok(next),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Nothing to write: try the flush alone, so what failed is sent once
                    // it is durable even if no other write comes.
                    if shared.engine.sync().is_ok() {
                        shared.flushed.store(group, Ordering::Release);
                        wake(&shared, &mut unwoken);
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
            }
        };
        let Ok((first, urgency)) = next else { break };
        group += 1;
        let mut first = Some(first);
        let mut urgent = urgency == Urgency::Now;
        let mut depth = HashMap::new();
        let mut wakes = HashSet::new();
        let mut accepted = Vec::new();
        let committed = shared.engine.group(&mut |txn| {
            let mut w = Writer::new(txn, &shared, &mut next_seq, group);
            if let Some(job) = first.take() {
                done.push(job(&mut w));
            }
            let company_until = Instant::now() + COMPANY_WAIT;
            // A group an operation has doomed (redb) takes no more company to fail with it.
            while done.len() < MAX_GROUP && !w.txn.doomed() {
                let (job, urgency) = match rx.try_recv() {
                    Ok(next) => next,
                    Err(_) if urgent => break,
                    Err(_) => {
                        let left = company_until.saturating_duration_since(Instant::now());
                        match rx.recv_timeout(left) {
                            Ok(next) => next,
                            Err(_) => break,
                        }
                    }
                };
                urgent |= urgency == Urgency::Now;
                done.push(job(&mut w));
            }
            if let Err(e) = persist_depth(w.txn, &w.depth) {
                w.txn.abort_op();
                if w.txn.put(RECOUNT_KEY, b"1").and_then(|_| w.txn.end_op()).is_err() {
                    // Neither the counts nor the word to rebuild them: redb fails the
                    // group rather than commit counts it would trust; sled is not marked
                    // clean at its close, so its next start counts.
                    w.txn.abort_op();
                    shared.recount.store(true, Ordering::Relaxed);
                }
                tracing::warn!(error = %e, "keeping the queue counts failed; rebuilt at the next start");
            }
            depth = std::mem::take(&mut w.depth);
            wakes = std::mem::take(&mut w.wakes);
            accepted = std::mem::take(&mut w.accepted);
        });
        if let Some(job) = first.take() {
            // The transaction could not even start: the operation fails unrun.
            let e = committed
                .err()
                .unwrap_or_else(|| StoreError::Unavailable("no transaction".into()));
            let d = job(&mut Writer::new(
                &mut FailedTxn(e.clone()),
                &shared,
                &mut next_seq,
                group,
            ));
            d(Some(e));
            continue;
        }
        // The durable mark and the counters first, so a caller that reads after its
        // answer sees its change.
        if committed.is_ok() {
            // Before the mark: a scheduler that sees the group's due entries finds these.
            for (event, uses) in accepted.drain(..) {
                shared.fresh.insert(event, uses);
            }
            shared.flushed.store(group, Ordering::Release);
        }
        // A group that failed on an engine without atomic groups (sled) failed at its
        // flush: its operations are in the store, durable at the next flush, so they count.
        if committed.is_ok() || !shared.engine.atomic_groups() {
            for (dest, delta) in depth {
                let c = shared.depth_counter(&dest);
                if delta >= 0 {
                    c.fetch_add(delta as u64, Ordering::Relaxed);
                } else {
                    let down = delta.unsigned_abs();
                    let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                        Some(v.saturating_sub(down))
                    });
                }
            }
        }
        for d in done.drain(..) {
            d(committed.as_ref().err().cloned());
        }
        unwoken.extend(wakes);
        if committed.is_ok() {
            wake(&shared, &mut unwoken);
        }
    }
    let _ = shared.engine.sync();
}

/// How long the writer waits, with nothing to write after a failed group, before it tries
/// the flush alone.
const FLUSH_RETRY: Duration = Duration::from_secs(1);

/// Wakes the schedulers of `dests`, once what was written for them is durable (after the
/// mark, so that their next read sees it).
fn wake<E: Engine>(shared: &Shared<E>, dests: &mut HashSet<String>) {
    let wakeups = shared.wakeups.read().unwrap();
    for dest in dests.drain() {
        if let Some(n) = wakeups.get(&dest) {
            n.notify_one();
        }
    }
}

/// Stands in when a group's transaction cannot even start: every operation fails.
pub(super) struct FailedTxn(StoreError);

impl Txn for FailedTxn {
    fn get(&mut self, _: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Err(self.0.clone())
    }
    fn scan_from(
        &mut self,
        _: &[u8],
        _: &[u8],
        _: &mut engine::Visit<'_>,
    ) -> Result<(), StoreError> {
        Err(self.0.clone())
    }
    fn put(&mut self, _: &[u8], _: &[u8]) -> Result<(), StoreError> {
        Err(self.0.clone())
    }
    fn delete(&mut self, _: &[u8]) -> Result<(), StoreError> {
        Err(self.0.clone())
    }
    fn end_op(&mut self) -> Result<(), StoreError> {
        Err(self.0.clone())
    }
    fn abort_op(&mut self) {}
}
