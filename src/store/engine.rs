//! The key-value engine under the store: ordered byte keys, atomic groups of writes.
//!
//! `kv::KvStore` holds all of the store's logic (keys, dedup, queue, group commit) and asks
//! an engine for only this: point reads, prefix scans, and a write transaction that commits
//! a whole group durably. `sled` and `redb` implement it; so could anything else that can.

use super::StoreError;

/// The file redb keeps a store in, inside the store's directory.
pub const REDB_FILE: &str = "hookrelay.redb";

/// Refuses a directory that holds the other engine's store: opened as it is, this engine
/// would start a new, empty store beside it, and everything the other holds (pending
/// deliveries, dead letters, dedup records) would be silently left behind. `backend` is
/// this engine's name in `[store] backend`.
pub fn refuse_the_other_engines(path: &std::path::Path, backend: &str) -> Result<(), StoreError> {
    let sled = path.join("conf").is_file() && path.join("db").is_file();
    let redb = path.join(REDB_FILE).is_file();
    let other = match backend {
        "redb" if sled => "sled",
        "sled" if redb => "redb",
        _ => return Ok(()),
    };
    // A sled store met by redb is most likely an older build's default, kept by an upgrade.
    let why = if other == "sled" {
        " (the default changed from sled to redb)"
    } else {
        ""
    };
    Err(StoreError::Unavailable(format!(
        "{} holds a {other} store, not a {backend} one: set [store] backend = \"{other}\" to \
         use it{why}, or point [store] path at another directory for a new {backend} store",
        path.display()
    )))
}

/// Visits `(key, value)` pairs; returns `false` to stop.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool, StoreError> + 'a;

/// Visits the value of the `i`th key asked for (`None`: absent).
pub type VisitValue<'a> = dyn FnMut(usize, Option<&[u8]>) -> Result<(), StoreError> + 'a;

pub trait Engine: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Point reads of `keys`: `visit(i, value)` for each, in their order (`None`: absent). An
    /// engine that can reads them all from one snapshot (one read transaction, not one each).
    fn get_each(&self, keys: &[Vec<u8>], visit: &mut VisitValue<'_>) -> Result<(), StoreError> {
        for (i, k) in keys.iter().enumerate() {
            visit(i, self.get(k)?.as_deref())?;
        }
        Ok(())
    }
    /// Keys starting with `prefix`, in ascending order.
    fn scan_prefix(&self, prefix: &[u8], visit: &mut Visit<'_>) -> Result<(), StoreError> {
        self.scan_from(prefix, prefix, visit)
    }
    /// Keys starting with `prefix` from `from` on, in ascending order.
    fn scan_from(
        &self,
        prefix: &[u8],
        from: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError>;
    /// Keys starting with `prefix` and below `below`, in descending order.
    fn scan_back(
        &self,
        prefix: &[u8],
        below: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError>;
    /// The greatest key starting with `prefix`.
    fn last_with_prefix(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut below = prefix.to_vec();
        below.push(0xff);
        below.extend_from_slice(&[0xff; 16]);
        let mut last = None;
        self.scan_back(prefix, &below, &mut |k, _| {
            last = Some(k.to_vec());
            Ok(false)
        })?;
        Ok(last)
    }
    /// Runs one group: `f` does its operations in a write transaction (one writer at a
    /// time), which is then committed durably. An error means nothing of the group is
    /// known to be durable.
    fn group(&self, f: &mut dyn FnMut(&mut dyn Txn)) -> Result<(), StoreError>;
    /// Makes everything committed so far durable (at close).
    fn sync(&self) -> Result<(), StoreError>;
    /// Lets go of the files at close, after [`Engine::sync`]: another process may open them
    /// from then on (a relay replacing this one), and nothing is read or written here.
    fn release(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether a group commits all or nothing, so that what a group writes last (the queue
    /// counts) always agrees with the rest of it, crash or not.
    fn atomic_groups(&self) -> bool;
}

/// A group's write transaction. Operations run one after another inside it; each ends with
/// `end_op` (its writes then form one atomic unit, even for engines that cannot roll back a
/// group); the engine commits the whole group when `Engine::group`'s closure returns.
pub trait Txn {
    /// Reads see the writes of operations already ended in this group.
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Keys starting with `prefix` and not below `from`, in ascending order.
    fn scan_from(
        &mut self,
        prefix: &[u8],
        from: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError>;
    fn scan_prefix(&mut self, prefix: &[u8], visit: &mut Visit<'_>) -> Result<(), StoreError> {
        self.scan_from(prefix, prefix, visit)
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn delete(&mut self, key: &[u8]) -> Result<(), StoreError>;
    fn end_op(&mut self) -> Result<(), StoreError>;
    /// Drops the current operation's writes. An engine that cannot drop just those (redb)
    /// fails the whole group instead, so an operation is never half committed.
    fn abort_op(&mut self);
    /// Whether the group will fail whatever comes next (an operation failed halfway on an
    /// engine that cannot drop just its writes).
    fn doomed(&self) -> bool {
        false
    }
}
