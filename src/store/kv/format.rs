//! The store's format version: a start refuses a store written in a newer format than
//! this build reads, and marks an older one as written in [`FORMAT`] once it can read it so.

use super::keys::*;
use crate::store::engine::Engine;
use crate::store::StoreError;

/// Refuses a store written in a newer format than this build reads (it would misread it);
/// marks an older one, or a new one, as written in [`FORMAT`], an older one to have its
/// queue counted at this start. Returns the store's
/// [`LEGACY_UNTIL_KEY`] (0: none).
pub(super) fn check_format<E: Engine>(engine: &E) -> Result<u64, StoreError> {
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
        return match engine.get(LEGACY_UNTIL_KEY)? {
            Some(v) => stored_u64(&v).ok_or_else(|| corrupt("the marker m/legacy-dedup-until")),
            None => Ok(0),
        };
    }
    let legacy_until = legacy_expiry(engine)?;
    let mut marked = Ok(());
    engine.group(&mut |txn| {
        marked = (|| {
            if legacy_until > 0 {
                txn.put(LEGACY_UNTIL_KEY, &be(legacy_until))?;
            }
            // A store of an older build may hold no kept counts (format 1 predates them),
            // or counts that build kept otherwise: counted once, not trusted as none.
            txn.put(RECOUNT_KEY, b"1")?;
            txn.put(FORMAT_KEY, &FORMAT.to_be_bytes())?;
            txn.end_op()
        })();
    })?;
    marked.map(|_| legacy_until)
}

/// The latest expiry among the dedup records of v1 UUID ids that formats 1 to 3 wrote under
/// `d/` (0: none). Format 4 keys new ones under `u/` and leaves these where they are, to go
/// with their events: moving them would rewrite a B-tree leaf per record (8–19 s per
/// million on redb, measured), where this one read takes 0.17 s per million.
fn legacy_expiry<E: Engine>(engine: &E) -> Result<u64, StoreError> {
    let mut latest = 0;
    engine.scan_prefix(DEDUP_PREFIX, &mut |k, v| {
        let id = &k[DEDUP_PREFIX.len()..];
        // Sources have no NUL, so the id ends at the last one.
        let id = &id[..id.iter().rposition(|&c| c == 0).unwrap_or(id.len())];
        if time_ordered(id).is_some() && v.len() >= 16 {
            latest = latest.max(read_u64(&v[8..]).max(1));
        }
        Ok(true)
    })?;
    Ok(latest)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::super::records::*;
    use super::super::KvStore;
    use super::*;
    use crate::store::*;

    const A: &str = "77e6a667-133a-11ef-9dd4-e911cc6fc82f"; // v1, inside its window, dead
    const B: &str = "627e25f1-133a-11ef-b08c-e33c09483244"; // v1, past it, delivered
    const C: &str = "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"; // v4, inside its window
    const D: &str = "a1d6a5e2-efec-11e9-b999-efc71013a78f"; // v1, new

    /// The key a format 3 build wrote for `id`.
    fn old_key(id: &str) -> Vec<u8> {
        key(&[DEDUP_PREFIX, id.as_bytes(), b"\0", b"s"])
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

    /// A format 3 store: events 1 (A, dead), 2 (B, delivered, old enough to purge) and 3
    /// (C, delivered), each with its dedup record as format 3 keyed it, expiring at `a_until`
    /// (A), 1 (B) and `a_until + 1` (C).
    fn write_format_3<E: Engine>(engine: &E, a_until: u64) {
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
            waiting: false,
        };
        engine
            .group(&mut |txn| {
                txn.put(FORMAT_KEY, &3u32.to_be_bytes()).unwrap();
                for (seq, id, expires) in [(1, A, a_until), (2, B, 1), (3, C, a_until + 1)] {
                    let meta = EventMeta {
                        id: id.into(),
                        source: "s".into(),
                        received_ms: 1,
                        content_type: None,
                    };
                    txn.put(&event_key(seq), &encode_event(&meta, b"{}"))
                        .unwrap();
                    let state = match id == A {
                        true => DeliveryState::Dead,
                        false => DeliveryState::Delivered,
                    };
                    txn.put(&delivery_key(seq, "a"), &encode_delivery(&done(seq, state)))
                        .unwrap();
                    if id == A {
                        txn.put(&dead_key("a", seq), &[]).unwrap();
                        // A reply route's answer, kept as JSON as formats 1 to 4 did.
                        let reply =
                            br#"{"status":201,"content_type":"text/xml","body":[60,47,62]}"#;
                        txn.put(&reply_key(seq), reply).unwrap();
                    }
                    txn.put(&old_key(id), &key(&[&be(seq), &be(expires)]))
                        .unwrap();
                }
                txn.end_op().unwrap();
            })
            .unwrap();
    }

    /// A format 3 store opens as the current format without moving its records, and its
    /// replies, kept as JSON, still read: the latest expiry of
    /// its v1 UUID records is kept; a duplicate, a lookup and a replay by id find an old
    /// record, across a restart too; a new v1 id is keyed in time order; the purge takes an
    /// old record with its event.
    async fn upgrade_case<E: Engine>(dir: &Path, open: fn(&Path) -> E) {
        let a_until = now_ms() + 600_000;
        // The engine that wrote format 3 is started on, as a store is when upgraded; the
        // second start reopens it after a clean close.
        let mut first = Some(open(dir));
        write_format_3(first.as_ref().unwrap(), a_until);
        for start in 0..2 {
            let engine = first.take().unwrap_or_else(|| open(dir));
            let st: Arc<KvStore<E>> = KvStore::start(engine).unwrap();
            let engine = &st.shared.engine;
            assert_eq!(
                engine.get(FORMAT_KEY).unwrap().unwrap(),
                FORMAT.to_be_bytes()
            );
            assert_eq!(
                st.shared.legacy_until, a_until,
                "the v1 records' latest expiry"
            );
            for id in [A, C] {
                let dup = st.accept(new_event(id)).await.unwrap();
                let Admission::Duplicate { reply, .. } = dup else {
                    panic!("{id}: {dup:?}");
                };
                let kept = (id == A).then(|| StoredReply {
                    status: 201,
                    content_type: Some("text/xml".into()),
                    body: b"</>".to_vec(),
                });
                assert_eq!(reply, kept, "{id}: the reply an older format kept");
                let found = st.lookup(id).await.unwrap();
                assert_eq!(found.len(), 1, "{id}");
                assert_eq!(found[0].event.id, id);
            }
            if start == 0 {
                let replayed = st.replay(ReplaySelector::EventId(A.into())).await;
                assert_eq!(replayed.unwrap(), 1);
                assert!(matches!(
                    st.accept(new_event(D)).await.unwrap(),
                    Admission::Accepted { .. }
                ));
                assert!(engine.get(&dedup_key("s", D)).unwrap().is_some());
                assert_eq!(&dedup_key("s", D)[..2], UUID_DEDUP_PREFIX);
                // B is past its window and delivered: the purge takes it and its record.
                assert_eq!(st.purge(Duration::ZERO).await.unwrap(), 1);
                assert!(engine.get(&old_key(B)).unwrap().is_none());
                assert!(st.lookup(B).await.unwrap().is_empty());
                assert!(matches!(
                    st.accept(new_event(B)).await.unwrap(),
                    Admission::Accepted { .. }
                ));
            }
            assert!(matches!(
                st.accept(new_event(D)).await.unwrap(),
                Admission::Duplicate { .. }
            ));
            st.close().await.unwrap();
            drop(st);
        }
    }

    #[tokio::test]
    async fn a_format_3_store_is_read_on_redb() {
        let dir = tempfile::tempdir().unwrap();
        upgrade_case(dir.path(), |p| {
            crate::store::redb::RedbEngine::create(p).unwrap()
        })
        .await;
    }

    #[tokio::test]
    async fn a_format_3_store_is_read_on_sled() {
        let dir = tempfile::tempdir().unwrap();
        upgrade_case(dir.path(), |p| {
            crate::store::sled::SledEngine::open(p).unwrap()
        })
        .await;
    }

    /// A new store has no old records to look for.
    #[test]
    fn a_new_store_has_no_legacy_records() {
        let dir = tempfile::tempdir().unwrap();
        let engine = crate::store::redb::RedbEngine::create(dir.path()).unwrap();
        assert_eq!(check_format(&engine).unwrap(), 0);
        assert!(engine.get(LEGACY_UNTIL_KEY).unwrap().is_none());
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
        assert_eq!(
            legacy_id_prefix(A).unwrap(),
            key(&[DEDUP_PREFIX, A.as_bytes(), b"\0"])
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
            assert_eq!(legacy_id_prefix(other), None);
        }
    }
}
