//! The sled engine: one tree; each operation's writes go in as one atomic batch, and a
//! group ends with one `flush` (which on Linux is `sync_file_range`, not `fsync`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::engine::{Engine, Txn, Visit};
use super::kv::KvStore;
use super::StoreError;

/// The store on sled.
pub type SledStore = KvStore<SledEngine>;

pub struct SledEngine {
    db: ::sled::Db,
}

impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

impl SledStore {
    /// Opens (or creates) the store in the directory `path`.
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        let db = ::sled::Config::new()
            .path(path)
            .cache_capacity(32 << 20)
            .mode(::sled::Mode::HighThroughput)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        KvStore::start(SledEngine { db })
    }
}

fn scan(tree: &::sled::Db, prefix: &[u8], visit: &mut Visit<'_>) -> Result<(), StoreError> {
    for kv in tree.scan_prefix(prefix) {
        let (k, v) = kv?;
        if !visit(&k, &v)? {
            break;
        }
    }
    Ok(())
}

impl Engine for SledEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }
    fn scan_prefix(&self, prefix: &[u8], visit: &mut Visit<'_>) -> Result<(), StoreError> {
        scan(&self.db, prefix, visit)
    }
    fn scan_back(
        &self,
        prefix: &[u8],
        below: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        if below <= prefix {
            return Ok(());
        }
        for kv in self.db.range(prefix..below).rev() {
            let (k, v) = kv?;
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }
    fn group(&self, f: &mut dyn FnMut(&mut dyn Txn)) -> Result<(), StoreError> {
        f(&mut SledTxn {
            db: &self.db,
            batch: ::sled::Batch::default(),
            overlay: BTreeMap::new(),
        });
        self.db.flush()?;
        Ok(())
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
    fn atomic_groups(&self) -> bool {
        false // each operation is its own batch
    }
}

/// Buffers one operation's writes (readable through `overlay`) until `end_op`.
struct SledTxn<'a> {
    db: &'a ::sled::Db,
    batch: ::sled::Batch,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Txn for SledTxn<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }
    /// Sees earlier operations of the group, not the current one's own writes.
    fn scan_from(
        &mut self,
        prefix: &[u8],
        from: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        for kv in self.db.range(from.max(prefix)..) {
            let (k, v) = kv?;
            if !k.starts_with(prefix) || !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.batch.insert(key, value);
        self.overlay.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }
    fn delete(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.batch.remove(key);
        self.overlay.insert(key.to_vec(), None);
        Ok(())
    }
    fn end_op(&mut self) -> Result<(), StoreError> {
        self.overlay.clear();
        self.db.apply_batch(std::mem::take(&mut self.batch))?;
        Ok(())
    }
    fn abort_op(&mut self) {
        self.overlay.clear();
        self.batch = ::sled::Batch::default();
    }
}
