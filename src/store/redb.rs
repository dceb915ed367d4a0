//! The redb engine: one table in one file; a group is one write transaction committed with
//! `fsync` (redb's default durability), so an accepted event survives power loss too.
//!
//! After an I/O error (a full disk) redb refuses every later write until the database is
//! closed and opened again ("previous I/O error"): the engine does that at its next write,
//! so a relay whose disk got room again accepts again, no restart needed. What was
//! committed before the error is what the reopened file holds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{
    Database, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, StorageError as Io,
    TableDefinition, TableError, TransactionError, WriteTransaction,
};

use super::engine::{Engine, Txn, Visit, VisitValue};
use super::kv::KvStore;
use super::StoreError;

/// Page cache; more only helps lookups of old events.
const CACHE_BYTES: usize = 32 << 20;

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("hookrelay");

/// The store on redb.
pub type RedbStore = KvStore<RedbEngine>;

pub struct RedbEngine {
    /// `None` while a reopen after an I/O error has not succeeded yet, and once released.
    db: RwLock<Option<Database>>,
    file: PathBuf,
    /// Released at close: never opened again.
    released: std::sync::atomic::AtomicBool,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) the store in the directory `path` (file `hookrelay.redb`).
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        KvStore::start(RedbEngine::create(path)?)
    }
}

/// The store's one table, read-only.
type ReadTable = ReadOnlyTable<&'static [u8], &'static [u8]>;

impl RedbEngine {
    /// Opens (or creates) the engine's file in the directory `path`.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        super::engine::refuse_the_other_engines(path, "redb")?;
        std::fs::create_dir_all(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        let file = path.join(super::engine::REDB_FILE);
        Ok(RedbEngine {
            db: RwLock::new(Some(open(&file)?)),
            file,
            released: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        let db = self.db.read().unwrap();
        if self.released.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let db = db.as_ref().ok_or_else(reopening)?;
        db.begin_read().map_err(err)
    }

    /// A write transaction; if redb refuses it for an earlier I/O error, the database is
    /// closed and opened again first.
    fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        {
            let db = self.db.read().unwrap();
            if let Some(db) = db.as_ref() {
                match db.begin_write() {
                    Ok(tx) => return Ok(tx),
                    Err(TransactionError::Storage(Io::PreviousIo)) => {}
                    Err(e) => return Err(err(e)),
                }
            }
        }
        self.reopen()?;
        let db = self.db.read().unwrap();
        db.as_ref()
            .ok_or_else(reopening)?
            .begin_write()
            .map_err(err)
    }

    /// Closes the database (read transactions still alive fail from then on) and opens its
    /// file again, which recovers the last commit.
    ///
    /// The lock is not held meanwhile: after an I/O error redb recovers the whole file at the
    /// open, which can take seconds, and readers (on the async workers) get "reopening" at
    /// once instead of blocking their threads. Only the writer thread writes, so no other
    /// reopen runs beside this one.
    fn reopen(&self) -> Result<(), StoreError> {
        let old = {
            let mut slot = self.db.write().unwrap();
            if self.released.load(std::sync::atomic::Ordering::Acquire) {
                return Err(StoreError::Closed);
            }
            slot.take()
        };
        if let Some(old) = old {
            let _ = old.close();
        }
        let db = open(&self.file)?;
        let mut slot = self.db.write().unwrap();
        // Released meanwhile: the new database is dropped (closed) here.
        if self.released.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        *slot = Some(db);
        tracing::warn!(
            "the store had an I/O error (a full disk?); it was closed and opened again, and takes writes"
        );
        Ok(())
    }

    /// The table in a new read transaction; `None` before the first write made it.
    fn read_table(&self) -> Result<Option<ReadTable>, StoreError> {
        let tx = self.begin_read()?;
        match tx.open_table(TABLE) {
            Ok(t) => Ok(Some(t)),
            Err(TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(err(e)),
        }
    }
}

/// Opens (or creates) the database in `file`, with the store's one table.
fn open(file: &Path) -> Result<Database, StoreError> {
    // redb's default cache is 1 GiB; the store's working set is the queue heads.
    let db = redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(file)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StoreError::InUse(file.display().to_string())
            }
            e => err(format!("{}: {e}", file.display())),
        })?;
    let tx = db.begin_write().map_err(err)?;
    tx.open_table(TABLE).map_err(err)?;
    tx.commit().map_err(err)?;
    Ok(db)
}

fn reopening() -> StoreError {
    StoreError::Unavailable("the store is being opened again after an I/O error".into())
}

fn scan<T: ReadableTable<&'static [u8], &'static [u8]>>(
    table: &T,
    prefix: &[u8],
    from: &[u8],
    visit: &mut Visit<'_>,
) -> Result<(), StoreError> {
    for kv in table.range(from.max(prefix)..).map_err(err)? {
        let (k, v) = kv.map_err(err)?;
        if !k.value().starts_with(prefix) || !visit(k.value(), v.value())? {
            break;
        }
    }
    Ok(())
}

impl Engine for RedbEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(table) = self.read_table()? else {
            return Ok(None);
        };
        Ok(table.get(key).map_err(err)?.map(|v| v.value().to_vec()))
    }
    fn get_each(&self, keys: &[Vec<u8>], visit: &mut VisitValue<'_>) -> Result<(), StoreError> {
        let table = self.read_table()?;
        for (i, k) in keys.iter().enumerate() {
            let v = match &table {
                Some(t) => t.get(k.as_slice()).map_err(err)?,
                None => None,
            };
            visit(i, v.as_ref().map(|v| v.value()))?;
        }
        Ok(())
    }
    fn scan_from(
        &self,
        prefix: &[u8],
        from: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let tx = self.begin_read()?;
        let table = tx.open_table(TABLE).map_err(err)?;
        scan(&table, prefix, from, visit)
    }
    fn scan_back(
        &self,
        prefix: &[u8],
        below: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let tx = self.begin_read()?;
        let table = tx.open_table(TABLE).map_err(err)?;
        if below <= prefix {
            return Ok(());
        }
        for kv in table.range(prefix..below).map_err(err)?.rev() {
            let (k, v) = kv.map_err(err)?;
            if !visit(k.value(), v.value())? {
                break;
            }
        }
        Ok(())
    }
    fn group(&self, f: &mut dyn FnMut(&mut dyn Txn)) -> Result<(), StoreError> {
        let tx = self.begin_write()?;
        let broken = {
            // One open table for the whole group.
            let mut table = tx.open_table(TABLE).map_err(err)?;
            let mut txn = RedbTxn {
                table: &mut table,
                op_wrote: false,
                broken: None,
            };
            f(&mut txn);
            txn.broken
        };
        match broken {
            // An operation failed after writing and redb cannot drop just its writes: the
            // whole group goes, rather than half an operation (a queue entry deleted, its
            // delivery record not updated).
            Some(e) => {
                let _ = tx.abort();
                Err(e)
            }
            None => tx.commit().map_err(err),
        }
    }
    fn sync(&self) -> Result<(), StoreError> {
        Ok(()) // every commit is already durable
    }
    fn release(&self) -> Result<(), StoreError> {
        // redb holds its file's lock, and writes its clean shutdown, until the database is
        // dropped: here, not when the last reference goes (at the process's exit, at best).
        let mut slot = self.db.write().unwrap();
        self.released
            .store(true, std::sync::atomic::Ordering::Release);
        match slot.take() {
            Some(db) => db.close().map_err(err),
            None => Ok(()),
        }
    }
    fn atomic_groups(&self) -> bool {
        true // one write transaction per group
    }
}

struct RedbTxn<'a, 't> {
    table: &'a mut redb::Table<'t, &'static [u8], &'static [u8]>,
    /// Whether the current operation has written.
    op_wrote: bool,
    /// Set when an operation failed after writing: the group must not commit.
    broken: Option<StoreError>,
}

impl Txn for RedbTxn<'_, '_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .table
            .get(key)
            .map_err(err)?
            .map(|v| v.value().to_vec()))
    }
    fn scan_from(
        &mut self,
        prefix: &[u8],
        from: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        scan(&*self.table, prefix, from, visit)
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.op_wrote = true;
        self.table.insert(key, value).map_err(err)?;
        Ok(())
    }
    fn delete(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.op_wrote = true;
        self.table.remove(key).map_err(err)?;
        Ok(())
    }
    fn end_op(&mut self) -> Result<(), StoreError> {
        self.op_wrote = false;
        Ok(())
    }
    fn doomed(&self) -> bool {
        self.broken.is_some()
    }
    fn abort_op(&mut self) {
        if std::mem::take(&mut self.op_wrote) && self.broken.is_none() {
            self.broken = Some(StoreError::Unavailable(
                "an operation failed halfway; its group was not committed".into(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_failing_after_a_write_fails_its_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let engine = RedbEngine::create(dir.path()).unwrap();
        let done = engine.group(&mut |txn| {
            txn.put(b"a", b"1").unwrap();
            txn.end_op().unwrap();
            assert!(!txn.doomed());
            txn.put(b"b", b"2").unwrap();
            txn.abort_op(); // failed after writing
            assert!(txn.doomed(), "the writer takes no more operations into it");
        });
        assert!(done.is_err());
        assert_eq!(
            engine.get(b"a").unwrap(),
            None,
            "nothing of the group commits"
        );
        // An operation that fails before writing does not take the group with it.
        engine
            .group(&mut |txn| {
                txn.put(b"a", b"1").unwrap();
                txn.end_op().unwrap();
                txn.abort_op();
            })
            .unwrap();
        assert_eq!(engine.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
    }

    #[test]
    fn get_each_answers_each_key_in_order_as_get_does() {
        let dir = tempfile::tempdir().unwrap();
        let engine = RedbEngine::create(dir.path()).unwrap();
        let keys = [b"b".to_vec(), b"x".to_vec(), b"a".to_vec()];
        let each = |engine: &RedbEngine| {
            let mut seen = Vec::new();
            engine
                .get_each(&keys, &mut |i, v| {
                    seen.push((i, v.map(<[u8]>::to_vec)));
                    Ok(())
                })
                .unwrap();
            seen
        };
        assert_eq!(
            each(&engine),
            vec![(0, None), (1, None), (2, None)],
            "no table yet"
        );
        engine
            .group(&mut |txn| {
                txn.put(b"a", b"1").unwrap();
                txn.put(b"b", b"2").unwrap();
                txn.end_op().unwrap();
            })
            .unwrap();
        let one_by_one: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (i, engine.get(k).unwrap()))
            .collect();
        assert_eq!(each(&engine), one_by_one);
        assert_eq!(
            each(&engine),
            vec![
                (0, Some(b"2".to_vec())),
                (1, None),
                (2, Some(b"1".to_vec()))
            ]
        );
    }
}
