//! The key layout of the key-value store (integers big-endian so keys sort); see the table
//! in [`super`]. The records under the keys: [`super::records`].

use crate::store::engine::Visit;
use crate::store::StoreError;

pub(super) fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub(super) fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A stored number (a meta value): `None` when the value is not the 8 bytes of one
/// (damaged), where [`read_u64`] would panic.
pub(super) fn stored_u64(v: &[u8]) -> Option<u64> {
    (v.len() == 8).then(|| read_u64(v))
}

pub(super) fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

pub(super) fn queue_prefix(dest: &str) -> Vec<u8> {
    key(&[b"q/", dest.as_bytes(), b"\0"])
}
pub(super) fn queue_key(dest: &str, due: u64, seq: u64) -> Vec<u8> {
    key(&[b"q/", dest.as_bytes(), b"\0", &be(due), &be(seq)])
}
/// Pending deliveries of `dest` sharing the order key `order`, in accept order; the key is
/// length-prefixed so that no key's prefix is another's.
pub(super) fn order_prefix(dest: &str, order: &str) -> Vec<u8> {
    let len = (order.len() as u32).to_be_bytes();
    key(&[b"o/", dest.as_bytes(), b"\0", &len, order.as_bytes()])
}
pub(super) fn order_key(dest: &str, order: &str, seq: u64) -> Vec<u8> {
    key(&[&order_prefix(dest, order), &be(seq)])
}
pub(super) fn dead_key(dest: &str, seq: u64) -> Vec<u8> {
    key(&[b"z/", dest.as_bytes(), b"\0", &be(seq)])
}
pub(super) fn delivery_key(seq: u64, dest: &str) -> Vec<u8> {
    key(&[b"l/", &be(seq), dest.as_bytes()])
}
pub(super) fn event_key(seq: u64) -> Vec<u8> {
    key(&[b"e/", &be(seq)])
}
pub(super) fn reply_key(seq: u64) -> Vec<u8> {
    key(&[b"r/", &be(seq)])
}
/// Id first, so a lookup by id is a prefix scan.
pub(super) fn dedup_key(source: &str, id: &str) -> Vec<u8> {
    match time_ordered(id.as_bytes()) {
        Some(t) => key(&[UUID_DEDUP_PREFIX, &t, b"\0", source.as_bytes()]),
        None => key(&[DEDUP_PREFIX, id.as_bytes(), b"\0", source.as_bytes()]),
    }
}
/// Pending deliveries of a destination, kept with every group.
pub(super) fn depth_key(dest: &str) -> Vec<u8> {
    key(&[DEPTH_PREFIX, dest.as_bytes()])
}
pub(super) const DEPTH_PREFIX: &[u8] = b"m/depth/";
/// Present while the store is closed cleanly: the kept counts are then exact.
pub(super) const CLEAN_KEY: &[u8] = b"m/clean";
/// The store's format version (`u32`, big-endian).
pub(crate) const FORMAT_KEY: &[u8] = b"m/format";
/// The format this build writes. 1: before the marker existed (readable as 2: it has no
/// order lines); 2: `o/` order lines and `order_key` in delivery records, which a build
/// that reads only format 1 would misread (it would never send a waiting ordered delivery);
/// 3: binary event and delivery records ([`super::records`]; those of 1 and 2 still read);
/// 4: the dedup records of v1 UUID ids under `u/`, in time order ([`time_ordered`]); those
/// an older format wrote under `d/` stay there and are still read ([`LEGACY_UNTIL_KEY`]);
/// 5: reply records in binary ([`crate::store::StoredReply::encode`]; the JSON ones of
/// earlier formats still read), which a build reading only JSON would take for corrupt.
pub(crate) const FORMAT: u32 = 5;
/// Present in a store that formats 1 to 3 wrote v1 UUID dedup records in (under `d/`): the
/// latest expiry among them (`u64`, big-endian). Until then an accept of a v1 UUID id looks
/// under `d/` too; while the key is present, lookups, replays and purges look under both.
pub(super) const LEGACY_UNTIL_KEY: &[u8] = b"m/legacy-dedup-until";
/// Rewritten by a readiness probe after a failed write, as large as the largest event, to
/// see whether the store takes writes again.
pub(super) const PROBE_KEY: &[u8] = b"m/probe";
/// The next sequence number when a purge ran (`u64`, big-endian): a purge may remove the
/// newest events, and a sequence number once given is never given again.
pub(super) const NEXT_SEQ_KEY: &[u8] = b"m/next-seq";
/// Present after a failed update of the kept counts: the next start counts the queue.
pub(super) const RECOUNT_KEY: &[u8] = b"m/recount";
pub(super) fn paused_key(dest: &str) -> Vec<u8> {
    key(&[PAUSED_PREFIX, dest.as_bytes()])
}
pub(super) const PAUSED_PREFIX: &[u8] = b"p/";
/// Where the dedup records of `id` start: `u/` and its characters in time order for a v1
/// UUID ([`time_ordered`]), `d/` and the id as it is for any other.
pub(super) fn id_prefix(id: &str) -> Vec<u8> {
    match time_ordered(id.as_bytes()) {
        Some(t) => key(&[UUID_DEDUP_PREFIX, &t, b"\0"]),
        None => key(&[DEDUP_PREFIX, id.as_bytes(), b"\0"]),
    }
}
/// Where formats 1 to 3 kept the dedup records of `id`, when it is a v1 UUID (now under
/// `u/`); `None` for any other id, whose records never moved.
pub(super) fn legacy_id_prefix(id: &str) -> Option<Vec<u8>> {
    time_ordered(id.as_bytes())?;
    Some(key(&[DEDUP_PREFIX, id.as_bytes(), b"\0"]))
}
/// The key formats 1 to 3 gave the dedup record of a v1 UUID `id` from `source`.
pub(super) fn legacy_dedup_key(source: &str, id: &str) -> Option<Vec<u8>> {
    Some(key(&[&legacy_id_prefix(id)?, source.as_bytes()]))
}
/// The dedup record of `id` from `source`, read with `get`: under `dk` ([`dedup_key`]), or,
/// when `legacy`, where formats 1 to 3 put a v1 UUID's ([`LEGACY_UNTIL_KEY`]).
pub(super) fn read_dedup(
    dk: &[u8],
    source: &str,
    id: &str,
    legacy: bool,
    mut get: impl FnMut(&[u8]) -> Result<Option<Vec<u8>>, StoreError>,
) -> Result<Option<Vec<u8>>, StoreError> {
    let found = match get(dk)? {
        Some(v) => Some(v),
        None => match legacy_dedup_key(source, id) {
            Some(old) if legacy => get(&old)?,
            _ => None,
        },
    };
    match found {
        // Every format wrote at least the event and the window's end.
        Some(v) if v.len() < 16 => Err(corrupt(format!(
            "the dedup record of id {id:?} is {} bytes long",
            v.len()
        ))),
        found => Ok(found),
    }
}
/// Every prefix the dedup records of `id` may be under: [`id_prefix`], then the legacy one
/// if the store has any ([`LEGACY_UNTIL_KEY`] present: `legacy_until > 0`).
pub(super) fn id_prefixes(id: &str, legacy_until: u64) -> impl Iterator<Item = Vec<u8>> {
    let legacy = (legacy_until > 0).then(|| legacy_id_prefix(id)).flatten();
    std::iter::once(id_prefix(id)).chain(legacy)
}
/// The events the dedup records of `id` name (every source's, and earlier ones with the
/// id), each once (an id may be under two prefixes while legacy records remain), in
/// sequence order; `scan` reads the keys under a prefix (the engine's, or a group's).
pub(super) fn events_of_id(
    id: &str,
    legacy_until: u64,
    mut scan: impl FnMut(&[u8], &mut Visit<'_>) -> Result<(), StoreError>,
) -> Result<Vec<u64>, StoreError> {
    let mut seqs = Vec::new();
    for prefix in id_prefixes(id, legacy_until) {
        scan(&prefix, &mut |k, v| {
            if of_id(&prefix, k) {
                seqs.extend(event_seqs(v));
            }
            Ok(true)
        })?;
    }
    seqs.sort_unstable();
    seqs.dedup();
    Ok(seqs)
}

/// Whether dedup key `k`, found under `prefix` (one of [`id_prefixes`]), is of that id and
/// not of a longer one that holds a NUL (`a\0x` from some source is under `d/a\0` too):
/// what follows the prefix is a source name, which has none.
pub(super) fn of_id(prefix: &[u8], k: &[u8]) -> bool {
    !k[prefix.len()..].contains(&0)
}
/// The most earlier events one dedup record names.
pub(super) const EARLIER_KEPT: usize = 16;

/// The events a dedup record names: its own (the newest with the id), then the earlier
/// ones with the same id and source that were still stored when it was written. (Formats 1
/// to 4 wrote only the first; a build that reads only those ignores the rest.)
pub(super) fn event_seqs(v: &[u8]) -> impl Iterator<Item = u64> + '_ {
    // A record too short to name an event (only a damaged one) names none.
    let first = v.get(..8).map(read_u64);
    let earlier = v.get(16..).unwrap_or_default();
    first
        .into_iter()
        .chain(earlier.chunks_exact(8).map(read_u64))
}

/// A dedup record: event `seq`, its dedup window's end, and the `earlier` events.
pub(super) fn dedup_value(seq: u64, expires: u64, earlier: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + 8 * earlier.len());
    v.extend_from_slice(&be(seq));
    v.extend_from_slice(&be(expires));
    for s in earlier {
        v.extend_from_slice(&be(*s));
    }
    v
}

pub(super) const DEDUP_PREFIX: &[u8] = b"d/";
pub(super) const UUID_DEDUP_PREFIX: &[u8] = b"u/";

/// A version 1 UUID's 32 hex digits reordered so that they sort by its timestamp:
/// `time_hi` (with the version digit), `time_mid`, `time_low`, then the clock sequence and
/// node. 8x8's event ids are v1 UUIDs, which begin with the timestamp's *low* bits; keyed
/// as they are, consecutive events land on leaves all over the dedup index and each event
/// writes a page of its own. In time order they land together on its last leaf. The
/// reordering keeps every character (case too), so distinct ids keep distinct keys.
/// `None` for anything else.
pub(super) fn time_ordered(id: &[u8]) -> Option<[u8; 32]> {
    const HYPHENS: [usize; 4] = [8, 13, 18, 23];
    if id.len() != 36 || id[14] != b'1' {
        return None;
    }
    for (i, &c) in id.iter().enumerate() {
        if HYPHENS.contains(&i) != (c == b'-') || (c != b'-' && !c.is_ascii_hexdigit()) {
            return None;
        }
    }
    let mut out = [0u8; 32];
    let mut at = 0;
    for part in [14..18, 9..13, 0..8, 19..23, 24..36] {
        let n = part.len();
        out[at..at + n].copy_from_slice(&id[part]);
        at += n;
    }
    Some(out)
}

pub(super) fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// The destination name in a `q/` or `z/` key.
pub(super) fn dest_of(k: &[u8]) -> String {
    let end = k[2..]
        .iter()
        .position(|&c| c == 0)
        .map_or(k.len(), |p| p + 2);
    String::from_utf8_lossy(&k[2..end]).into_owned()
}
