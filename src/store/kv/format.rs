//! The store's format version: a start refuses a store written in a newer format than
//! this build reads, and brings an older one up to [`FORMAT`] before anything else runs.

use super::keys::*;
use crate::store::engine::Engine;
use crate::store::StoreError;

/// Dedup records one upgrade group looks at: a start with millions of them moves them in
/// groups of this many, each committed on its own.
const MOVE_BATCH: usize = 4096;

/// Refuses a store written in a newer format than this build reads (it would misread it);
/// upgrades an older one and marks it, or a new one, as written in [`FORMAT`].
pub(super) fn check_format<E: Engine>(engine: &E) -> Result<(), StoreError> {
    let found = match engine.get(FORMAT_KEY)? {
        Some(v) if v.len() == 4 => u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
        Some(_) => return Err(StoreError::Corrupt("the format marker m/format".into())),
        None => 1,
    };
    if found > FORMAT {
        return Err(StoreError::Format(format!(
            "the store was written in format {found} by a newer hookrelay; this build reads \
             formats 1 to {FORMAT}: run that newer build, or point [store] path at a new \
             directory (the old one keeps its events)"
        )));
    }
    if found == FORMAT {
        return Ok(());
    }
    if found < 4 {
        let moved = move_uuid_dedup(engine)?;
        if moved > 0 {
            tracing::info!(
                moved,
                "store upgraded to format 4: v1 UUID dedup records moved"
            );
        }
    }
    let mut marked = Ok(());
    engine.group(&mut |txn| {
        marked = txn
            .put(FORMAT_KEY, &FORMAT.to_be_bytes())
            .and_then(|_| txn.end_op());
    })?;
    marked
}

/// Format 4 keeps the dedup records of v1 UUID ids under `u/`, in time order
/// ([`time_ordered`]); this moves those that an older format kept under `d/`, one group per
/// [`MOVE_BATCH`] records looked at. Each record is put under its new key before its old
/// key goes, in one operation. The format marker changes only after the last group, so a
/// start that stops half way (a crash) leaves the rest under `d/`, and the next start moves
/// those: both keys are found the same way, so no record is read under the wrong one.
/// Returns how many moved.
fn move_uuid_dedup<E: Engine>(engine: &E) -> Result<u64, StoreError> {
    let mut from = DEDUP_PREFIX.to_vec();
    let mut moved = 0;
    // Every group but the last looks at MOVE_BATCH records and starts past the previous.
    loop {
        let mut next: Option<Vec<u8>> = None;
        let mut result = Ok(0);
        engine.group(&mut |txn| {
            let mut found: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = Vec::new();
            let (mut seen, mut last) = (0, None);
            result = txn
                .scan_from(DEDUP_PREFIX, &from, &mut |k, v| {
                    seen += 1;
                    last = Some(k.to_vec());
                    if let Some(new) = moved_key(k) {
                        found.push((k.to_vec(), new, v.to_vec()));
                    }
                    Ok(seen < MOVE_BATCH)
                })
                .and_then(|_| {
                    for (old, new, v) in &found {
                        txn.put(new, v)?;
                        txn.delete(old)?;
                    }
                    txn.end_op()?;
                    Ok(found.len() as u64)
                });
            next = if seen == MOVE_BATCH {
                last.take()
            } else {
                None
            };
        })?;
        moved += result?;
        match next {
            Some(mut k) => {
                k.push(0); // the smallest key after the last one looked at
                from = k;
            }
            None => return Ok(moved),
        }
    }
}

/// The format 4 key of a `d/<id>\0<source>` record whose id is a v1 UUID (sources have no
/// NUL, so the id ends at the last one).
fn moved_key(old: &[u8]) -> Option<Vec<u8>> {
    let rest = old.strip_prefix(DEDUP_PREFIX)?;
    let nul = rest.iter().rposition(|&c| c == 0)?;
    let t = time_ordered(&rest[..nul])?;
    Some(key(&[UUID_DEDUP_PREFIX, &t, &rest[nul..]]))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::super::records::*;
    use super::super::KvStore;
    use super::*;
    use crate::store::*;

    const A: &str = "77e6a667-133a-11ef-9dd4-e911cc6fc82f"; // v1: moves, live
    const B: &str = "627e25f1-133a-11ef-b08c-e33c09483244"; // v1: moves, expired
    const C: &str = "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"; // v4: stays under d/

    /// The key a format 3 build wrote for `id`.
    fn old_key(id: &str) -> Vec<u8> {
        key(&[DEDUP_PREFIX, id.as_bytes(), b"\0", b"s"])
    }

    /// The n-th filler id: a v1 UUID whose time_low (first) runs down while time runs up.
    fn filler(n: u64) -> String {
        format!(
            "{:08x}-{:04x}-1{:03x}-8000-{:012x}",
            u32::MAX as u64 - n,
            n,
            n >> 16,
            n
        )
    }

    fn new_event(id: &str) -> NewEvent {
        NewEvent {
            source: "s".into(),
            id: id.into(),
            body: Bytes::from_static(b"{}"),
            content_type: None,
            received_ms: now_ms(),
            destinations: vec!["a".into()],
            max_queue: Vec::new(),
            order_keys: Vec::new(),
            held: None,
            dedup_window: Duration::from_secs(60),
        }
    }

    /// A format 3 store: events 1 (A, inside its dedup window, dead), 2 (B, past it,
    /// delivered, old enough to purge) and 3 (C, a v4 id, delivered); `fillers` more v1 dedup records, of which
    /// those below `already` were moved before a crash stopped the upgrade.
    fn write_format_3<E: Engine>(engine: &E, fillers: u64, already: u64) {
        let far = u64::MAX;
        let done = |seq, state| Delivery {
            seq,
            destination: "a".into(),
            state,
            attempts: 1,
            window_base: 0,
            first_attempt_ms: Some(1),
            next_due_ms: 1,
            last_status: Some(200),
            last_error: None,
            updated_ms: 1,
            order_key: None,
        };
        engine
            .group(&mut |txn| {
                txn.put(FORMAT_KEY, &3u32.to_be_bytes()).unwrap();
                for (seq, id, expires) in [(1, A, far), (2, B, 1), (3, C, far)] {
                    let meta = EventMeta {
                        id: id.into(),
                        source: "s".into(),
                        received_ms: 1,
                        content_type: None,
                    };
                    txn.put(&event_key(seq), &encode_event(&meta, b"{}"))
                        .unwrap();
                    // A's delivery is dead, so that a replay by its id has work to do.
                    let state = match id == A {
                        true => DeliveryState::Dead,
                        false => DeliveryState::Delivered,
                    };
                    txn.put(&delivery_key(seq, "a"), &encode_delivery(&done(seq, state)))
                        .unwrap();
                    if id == A {
                        txn.put(&dead_key("a", seq), &[]).unwrap();
                    }
                    txn.put(&old_key(id), &key(&[&be(seq), &be(expires)]))
                        .unwrap();
                }
                for n in 0..fillers {
                    let k = match n < already {
                        true => dedup_key("s", &filler(n)),
                        false => old_key(&filler(n)),
                    };
                    txn.put(&k, &key(&[&be(100 + n), &be(far)])).unwrap();
                }
                txn.end_op().unwrap();
            })
            .unwrap();
    }

    fn keys_under<E: Engine>(engine: &E, prefix: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        engine
            .scan_prefix(prefix, &mut |k, _| {
                out.push(k.to_vec());
                Ok(true)
            })
            .unwrap();
        out
    }

    /// Starting a format 3 store (one whose upgrade a crash stopped half way) moves every
    /// v1 UUID's dedup record to `u/`, across several groups, and leaves others under
    /// `d/`; then a duplicate, a lookup by id, a replay and a purge each find the record.
    async fn upgrade_case<E: Engine>(engine: E) {
        let fillers = 2 * MOVE_BATCH as u64 + 7;
        write_format_3(&engine, fillers, 100);
        let st: Arc<KvStore<E>> = KvStore::start(engine).unwrap();
        let engine = &st.shared.engine;
        assert_eq!(engine.get(FORMAT_KEY).unwrap().unwrap(), 4u32.to_be_bytes());
        assert_eq!(keys_under(engine.as_ref(), DEDUP_PREFIX), [old_key(C)]);
        let moved = keys_under(engine.as_ref(), UUID_DEDUP_PREFIX);
        assert_eq!(moved.len() as u64, fillers + 2);
        // In time order: the fillers' keys sort as their n does.
        let fillers_at: Vec<_> = (0..fillers)
            .map(|n| moved.binary_search(&dedup_key("s", &filler(n))).unwrap())
            .collect();
        assert!(fillers_at.windows(2).all(|w| w[0] < w[1]));

        for id in [A, C] {
            let dup = st.accept(new_event(id)).await.unwrap();
            assert!(matches!(dup, Admission::Duplicate { .. }), "{id}: {dup:?}");
            let found = st.lookup(id).await.unwrap();
            assert_eq!(found.len(), 1, "{id}");
            assert_eq!(found[0].event.id, id);
        }
        assert_eq!(
            st.replay(ReplaySelector::EventId(A.into())).await.unwrap(),
            1
        );
        // B is past its window and delivered: the purge takes it and its moved record.
        assert_eq!(st.purge(Duration::ZERO).await.unwrap(), 1);
        assert!(st.lookup(B).await.unwrap().is_empty());
        assert!(engine.get(&dedup_key("s", B)).unwrap().is_none());
        assert!(matches!(
            st.accept(new_event(B)).await.unwrap(),
            Admission::Accepted { .. }
        ));
        st.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_format_3_store_is_upgraded_on_redb() {
        let dir = tempfile::tempdir().unwrap();
        upgrade_case(crate::store::redb::RedbEngine::create(dir.path()).unwrap()).await;
    }

    #[tokio::test]
    async fn a_format_3_store_is_upgraded_on_sled() {
        let dir = tempfile::tempdir().unwrap();
        upgrade_case(crate::store::sled::SledEngine::open(dir.path()).unwrap()).await;
    }

    #[test]
    fn v1_uuids_key_in_time_order_and_others_as_they_are() {
        // time_low runs down as the timestamp runs up.
        let early = "ffffffff-0001-11ef-8000-000000000000";
        let late = "00000000-0002-11ef-8000-000000000000";
        assert!(early > late);
        assert!(id_prefix(early) < id_prefix(late));
        assert_eq!(&id_prefix(late)[..2], UUID_DEDUP_PREFIX);
        assert_eq!(
            &time_ordered(A.as_bytes()).unwrap(),
            b"11ef133a77e6a6679dd4e911cc6fc82f"
        );
        // Case is kept: two spellings stay two ids, as they were.
        assert_ne!(id_prefix(A), id_prefix(&A.to_uppercase()));
        for other in [
            C,
            "77e6a667133a11ef9dd4e911cc6fc82f",
            "77e6a667-133a-11ef-9dd4-e911cc6fc82",
            "g7e6a667-133a-11ef-9dd4-e911cc6fc82f",
            "77e6a667-133a-11ef-9dd4-e911cc6fc82f0",
            "77e6a667+133a-11ef-9dd4-e911cc6fc82f",
            "dids:update:48213",
        ] {
            assert_eq!(time_ordered(other.as_bytes()), None, "{other}");
            assert_eq!(
                id_prefix(other),
                key(&[DEDUP_PREFIX, other.as_bytes(), b"\0"])
            );
        }
    }
}
