//! The key layout of the key-value store (integers big-endian so keys sort); see the table
//! in [`super`]. The records under the keys: [`super::records`].

use crate::store::StoreError;

pub(super) fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub(super) fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
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
    key(&[b"d/", id.as_bytes(), b"\0", source.as_bytes()])
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
/// 3: binary event and delivery records ([`super::records`]; those of 1 and 2 still read).
pub(crate) const FORMAT: u32 = 3;
/// Present after a failed update of the kept counts: the next start counts the queue.
pub(super) const RECOUNT_KEY: &[u8] = b"m/recount";
pub(super) fn paused_key(dest: &str) -> Vec<u8> {
    key(&[PAUSED_PREFIX, dest.as_bytes()])
}
pub(super) const PAUSED_PREFIX: &[u8] = b"p/";
pub(super) fn id_prefix(id: &str) -> Vec<u8> {
    key(&[b"d/", id.as_bytes(), b"\0"])
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
