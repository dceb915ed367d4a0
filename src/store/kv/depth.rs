//! Kept queue counts: pending deliveries per destination, stored with every group and read
//! at start instead of counting the queue, unless they may disagree with it.

use std::collections::HashMap;

use super::keys::*;
use crate::store::engine::{Engine, Txn};
use crate::store::StoreError;

/// Adds a group's queue changes to the kept counts (an operation of its own, last).
pub(super) fn persist_depth(
    txn: &mut dyn Txn,
    deltas: &HashMap<String, i64>,
) -> Result<(), StoreError> {
    for (dest, delta) in deltas {
        if *delta == 0 {
            continue;
        }
        let k = depth_key(dest);
        let cur = match txn.get(&k)?.map(|v| stored_u64(&v).ok_or(v.len())) {
            None => 0,
            Some(Ok(n)) => n,
            // Damaged: counted again at the next start.
            Some(Err(bytes)) => {
                tracing::warn!(destination = %dest, bytes, "a kept queue count cannot be read; the queue is counted again at the next start");
                txn.put(RECOUNT_KEY, b"1")?;
                0
            }
        };
        let new = if *delta >= 0 {
            cur.saturating_add(*delta as u64)
        } else {
            cur.saturating_sub(delta.unsigned_abs())
        };
        txn.put(&k, &be(new))?;
    }
    txn.end_op()
}

/// The pending count per destination: the kept counts after a clean close, else a count of
/// the queue (which then replaces the kept counts). Marks the store as open (not clean).
pub(super) fn load_depths<E: Engine>(engine: &E) -> Result<HashMap<String, u64>, StoreError> {
    let trusted = engine.get(RECOUNT_KEY)?.is_none()
        && (engine.get(CLEAN_KEY)?.is_some() || engine.atomic_groups());
    let mut kept: HashMap<String, u64> = HashMap::new();
    let mut damaged = false;
    engine.scan_prefix(DEPTH_PREFIX, &mut |k, v| {
        let dest = String::from_utf8_lossy(&k[DEPTH_PREFIX.len()..]).into_owned();
        match stored_u64(v) {
            Some(n) => {
                kept.insert(dest, n);
            }
            None => damaged = true,
        }
        Ok(true)
    })?;
    let depth = if trusted && !damaged {
        kept.clone()
    } else {
        // Pending = the due queue plus the deliveries waiting in an order key's line
        // behind its head: each line's entries, less the one (its head) that is queued.
        let mut counted: HashMap<String, i64> = HashMap::new();
        engine.scan_prefix(b"q/", &mut |k, _| {
            *counted.entry(dest_of(k)).or_default() += 1;
            Ok(true)
        })?;
        let mut line: Vec<u8> = Vec::new();
        engine.scan_prefix(b"o/", &mut |k, _| {
            let n = counted.entry(dest_of(k)).or_default();
            let this = &k[..k.len().saturating_sub(8)];
            if this == line.as_slice() {
                *n += 1; // waits behind the line's head
            } else {
                line = this.to_vec(); // the head, counted in the queue
            }
            Ok(true)
        })?;
        counted
            .into_iter()
            .map(|(dest, n)| (dest, n.max(0) as u64))
            .collect()
    };
    let mut failed = None;
    engine.group(&mut |txn| {
        let mut write = || -> Result<(), StoreError> {
            txn.delete(CLEAN_KEY)?;
            txn.delete(RECOUNT_KEY)?;
            if !trusted {
                for dest in kept.keys() {
                    txn.put(&depth_key(dest), &be(depth.get(dest).copied().unwrap_or(0)))?;
                }
                for (dest, n) in &depth {
                    txn.put(&depth_key(dest), &be(*n))?;
                }
            }
            txn.end_op()
        };
        failed = write().err();
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(depth),
    }
}
