//! The durable step journal: typed records (serde, JSON) in named sled
//! trees, under a format-version key.
//!
//! A write returns only after sled has flushed it to disk, so a caller that
//! reports an operation done after `put` returns never reports something a
//! crash could take back. A journal written in a format this build does not
//! know is refused, never guessed at.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The record format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// A journal holds little; sled's default cache (1 GiB) would let a quiet
/// agent's memory grow for nothing.
const JOURNAL_CACHE_BYTES: u64 = 4 * 1024 * 1024;

const FORMAT_KEY: &[u8] = b"walbridge.journal.format_version";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "the journal in {path} is in use by another process (is another walbridge daemon running with this data_dir?)"
    )]
    InUse { path: PathBuf },
    #[error(
        "the journal in {path} has format version {found}, but this walbridge reads only version {supported}: \
         run the walbridge release that wrote it, or move the folder away to start afresh"
    )]
    UnknownFormat {
        path: PathBuf,
        found: String,
        supported: u32,
    },
    #[error("the folder {path} holds data that is not a walbridge journal")]
    NotAJournal { path: PathBuf },
    #[error("the journal in {path} cannot be used: {source}")]
    Storage { path: PathBuf, source: sled::Error },
    #[error("journal record {table}/{key} cannot be read: {source}")]
    Corrupt {
        table: String,
        key: String,
        source: serde_json::Error,
    },
}

/// A journal: one sled database in a folder of its own.
#[derive(Clone)]
pub struct Journal {
    db: sled::Db,
    path: PathBuf,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

impl Journal {
    /// Opens (or creates) the journal in `path`.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(JOURNAL_CACHE_BYTES)
            .open()
            .map_err(|source| match &source {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || is_lock_error(io) => {
                    JournalError::InUse { path: path.to_owned() }
                }
                _ => JournalError::Storage {
                    path: path.to_owned(),
                    source,
                },
            })?;
        let journal = Journal {
            db,
            path: path.to_owned(),
        };
        journal.check_format()?;
        Ok(journal)
    }

    fn check_format(&self) -> Result<(), JournalError> {
        match self.db.get(FORMAT_KEY).map_err(|e| self.storage(e))? {
            Some(raw) => {
                let found = <[u8; 4]>::try_from(raw.as_ref())
                    .map(|bytes| u32::from_be_bytes(bytes).to_string())
                    .unwrap_or_else(|_| format!("{:?} (not a number)", String::from_utf8_lossy(&raw)));
                if found != FORMAT_VERSION.to_string() {
                    return Err(JournalError::UnknownFormat {
                        path: self.path.clone(),
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                Ok(())
            }
            None => {
                let holds_data = !self.db.is_empty()
                    || self
                        .db
                        .tree_names()
                        .iter()
                        .any(|name| name.as_ref() != b"__sled__default");
                if holds_data {
                    return Err(JournalError::NotAJournal {
                        path: self.path.clone(),
                    });
                }
                self.db
                    .insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
                    .map_err(|e| self.storage(e))?;
                self.db.flush().map_err(|e| self.storage(e))?;
                Ok(())
            }
        }
    }

    /// The typed table `name`, holding records of type `V` by string key.
    pub fn table<V>(&self, name: &str) -> Result<Table<V>, JournalError> {
        let tree = self.db.open_tree(name).map_err(|e| self.storage(e))?;
        Ok(Table {
            name: name.to_owned(),
            tree,
            journal: self.clone(),
            record: PhantomData,
        })
    }

    /// Where the journal lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    #[doc(hidden)]
    /// Overwrites the format version: only for tests of the refusal.
    pub fn overwrite_format_version_for_test(&self, version: u32) -> Result<(), JournalError> {
        self.db
            .insert(FORMAT_KEY, &version.to_be_bytes())
            .map_err(|e| self.storage(e))?;
        self.db.flush().map_err(|e| self.storage(e))?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), JournalError> {
        self.db.flush_async().await.map_err(|e| self.storage(e))?;
        Ok(())
    }

    fn storage(&self, source: sled::Error) -> JournalError {
        JournalError::Storage {
            path: self.path.clone(),
            source,
        }
    }
}

fn is_lock_error(io: &std::io::Error) -> bool {
    io.to_string().contains("could not acquire lock")
}

/// One named table of a journal, with typed values.
pub struct Table<V> {
    name: String,
    tree: sled::Tree,
    journal: Journal,
    record: PhantomData<fn() -> V>,
}

impl<V> std::fmt::Debug for Table<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("name", &self.name).finish()
    }
}

impl<V: Serialize + DeserializeOwned> Table<V> {
    /// Writes a record and returns once it is on disk.
    pub async fn put(&self, key: &str, value: &V) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec(value).map_err(|source| self.corrupt(key, source))?;
        self.tree
            .insert(key.as_bytes(), bytes)
            .map_err(|e| self.journal.storage(e))?;
        self.journal.flush().await
    }

    /// Removes a record and returns once the removal is on disk.
    pub async fn remove(&self, key: &str) -> Result<(), JournalError> {
        self.tree.remove(key.as_bytes()).map_err(|e| self.journal.storage(e))?;
        self.journal.flush().await
    }

    pub fn get(&self, key: &str) -> Result<Option<V>, JournalError> {
        let Some(raw) = self.tree.get(key.as_bytes()).map_err(|e| self.journal.storage(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|source| self.corrupt(key, source))
    }

    /// Every record, in key order.
    pub fn all(&self) -> Result<Vec<(String, V)>, JournalError> {
        self.tree
            .iter()
            .map(|entry| {
                let (key, raw) = entry.map_err(|e| self.journal.storage(e))?;
                let key = String::from_utf8_lossy(&key).into_owned();
                let value = serde_json::from_slice(&raw).map_err(|source| self.corrupt(&key, source))?;
                Ok((key, value))
            })
            .collect()
    }

    fn corrupt(&self, key: &str, source: serde_json::Error) -> JournalError {
        JournalError::Corrupt {
            table: self.name.clone(),
            key: key.to_owned(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Step {
        name: String,
        lsn: u64,
    }

    #[tokio::test]
    async fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let step = Step {
            name: "slot".into(),
            lsn: 42,
        };
        {
            let journal = Journal::open(dir.path()).unwrap();
            let table = journal.table::<Step>("steps").unwrap();
            table.put("1", &step).await.unwrap();
            table.put("2", &step).await.unwrap();
            table.remove("2").await.unwrap();
        }
        let journal = Journal::open(dir.path()).unwrap();
        let table = journal.table::<Step>("steps").unwrap();
        assert_eq!(table.get("1").unwrap(), Some(step.clone()));
        assert_eq!(table.get("2").unwrap(), None);
        assert_eq!(table.all().unwrap(), vec![("1".to_owned(), step)]);
    }

    #[test]
    fn an_unknown_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Journal::open(dir.path())
            .unwrap()
            .overwrite_format_version_for_test(FORMAT_VERSION + 1)
            .unwrap();
        let err = Journal::open(dir.path()).unwrap_err();
        assert!(matches!(err, JournalError::UnknownFormat { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("format version 2"), "{text}");
        assert!(text.contains("reads only version 1"), "{text}");
    }

    #[test]
    fn a_second_opener_is_told_the_journal_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Journal::open(dir.path()).unwrap();
        // sled's lock is per process and file: a second process is what
        // meets it in practice; within one process sled refuses likewise.
        match Journal::open(dir.path()) {
            Err(JournalError::InUse { .. }) => {}
            other => panic!("expected InUse, got {other:?}"),
        }
    }

    #[test]
    fn a_record_that_does_not_parse_names_its_table_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal
            .db
            .open_tree("steps")
            .unwrap()
            .insert("k", &b"not json"[..])
            .unwrap();
        let err = journal.table::<Step>("steps").unwrap().get("k").unwrap_err();
        assert!(err.to_string().contains("steps/k"), "{err}");
    }
}
