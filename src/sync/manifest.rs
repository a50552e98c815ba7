//! The workspace manifest (`workspace/manifest.json`): the last consistent state of the
//! mirror, and its local cache in redb (`<state_dir>/sync.redb`) that rounds compare the
//! tree against.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

pub const FORMAT: u32 = 1;

/// One mirrored file. `mtime` is nanoseconds since the Unix epoch; `mode` the
/// permission bits; `hash` is `blake3:<hex>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    pub mtime: i64,
    pub mode: u32,
    pub hash: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub generation: u64,
    pub updated_at: String,
    pub files: BTreeMap<String, FileEntry>,
    #[serde(default)]
    pub symlinks: BTreeMap<String, String>,
    #[serde(default)]
    pub empty_dirs: BTreeSet<String>,
    /// Files named here that the workspace no longer has, kept by a delete guard (a
    /// held deletion, a new state directory's missing files): a restore lets a newer
    /// bundle's entry in their place stand.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub held: BTreeSet<String>,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.symlinks.is_empty() && self.empty_dirs.is_empty()
    }
}

/// What the delete guards hold back, kept across restarts: a restart must not let
/// through what a running daemon refused to delete.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guards {
    /// Paths kept in remote storage while missing here (a new state directory's, a
    /// restore's bad entries) until they turn up or deletions are confirmed.
    pub kept: BTreeSet<String>,
    pub hold: Option<HeldDeletes>,
    /// The state directory is new and its first full round has not run yet.
    #[serde(default)]
    pub new_state: bool,
}

/// A held mass deletion (or deletion of everything).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldDeletes {
    pub paths: BTreeSet<String>,
    pub everything: bool,
    /// When the same set was first held (Unix milliseconds).
    pub since_ms: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("sync state database: {0}")]
pub struct CacheError(String);

macro_rules! cache_from {
    ($($t:ty),*) => {$(
        impl From<$t> for CacheError {
            fn from(e: $t) -> Self { CacheError(e.to_string()) }
        }
    )*};
}
cache_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("sync_state");
/// Object keys whose files are gone and whose deletion has not been confirmed done.
const PENDING_DELETES: TableDefinition<&str, ()> = TableDefinition::new("sync_pending_deletes");
const MANIFEST_KEY: &str = "manifest";
const GUARDS_KEY: &str = "guards";

/// The last published manifest, kept durably so a restarted daemon compares against
/// exactly what the remote holds.
///
/// After a failed write (a full disk) redb refuses every later transaction until the
/// database is opened again: any failure closes it, and the next use opens it anew, so
/// that the mirror carries on by itself once the disk has room.
pub struct ManifestCache {
    path: PathBuf,
    db: Mutex<Option<Database>>,
}

fn open_database(path: &Path) -> Result<Database, CacheError> {
    crate::kv::store::discard_unborn_database(path);
    let db = Database::create(path).map_err(|e| CacheError(format!("{}: {e}", path.display())))?;
    let wtx = db.begin_write()?;
    wtx.open_table(STATE)?;
    wtx.open_table(PENDING_DELETES)?;
    wtx.commit()?;
    Ok(db)
}

impl ManifestCache {
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let db = open_database(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            db: Mutex::new(Some(db)),
        })
    }

    /// Runs `f` on the database, opened again first if a failure closed it.
    fn with<T>(&self, f: impl FnOnce(&Database) -> Result<T, CacheError>) -> Result<T, CacheError> {
        let mut db = self.db.lock().unwrap_or_else(|e| e.into_inner());
        let result = match db.as_ref() {
            Some(open) => f(open),
            None => {
                let open = db.insert(open_database(&self.path)?);
                f(open)
            }
        };
        if result.is_err() {
            *db = None;
        }
        result
    }

    /// The cached manifest (empty, generation 0, when none was published yet).
    pub fn load(&self) -> Result<Manifest, CacheError> {
        self.with(|db| {
            let rtx = db.begin_read()?;
            let t = rtx.open_table(STATE)?;
            match t.get(MANIFEST_KEY)? {
                Some(v) => Ok(serde_json::from_slice(v.value())?),
                None => Ok(Manifest {
                    format: FORMAT,
                    ..Manifest::default()
                }),
            }
        })
    }

    /// The delete guards' state (none held when never stored).
    pub fn load_guards(&self) -> Result<Guards, CacheError> {
        self.with(|db| {
            let rtx = db.begin_read()?;
            let t = rtx.open_table(STATE)?;
            match t.get(GUARDS_KEY)? {
                Some(v) => Ok(serde_json::from_slice(v.value())?),
                None => Ok(Guards::default()),
            }
        })
    }

    pub fn store_guards(&self, guards: &Guards) -> Result<(), CacheError> {
        let json = serde_json::to_vec(guards)?;
        self.with(|db| {
            let wtx = db.begin_write()?;
            wtx.open_table(STATE)?.insert(GUARDS_KEY, json.as_slice())?;
            wtx.commit()?;
            Ok(())
        })
    }

    pub fn pending_deletes(&self) -> Result<Vec<String>, CacheError> {
        self.with(|db| {
            let rtx = db.begin_read()?;
            let t = rtx.open_table(PENDING_DELETES)?;
            let mut out = Vec::new();
            for item in t.iter()? {
                out.push(item?.0.value().to_string());
            }
            Ok(out)
        })
    }

    /// Records a published manifest and the objects to delete now that it is out.
    pub fn store(&self, manifest: &Manifest, deletes: &[String]) -> Result<(), CacheError> {
        let json = serde_json::to_vec(manifest)?;
        self.with(|db| {
            let wtx = db.begin_write()?;
            {
                let mut t = wtx.open_table(STATE)?;
                t.insert(MANIFEST_KEY, json.as_slice())?;
                let mut d = wtx.open_table(PENDING_DELETES)?;
                for k in deletes {
                    d.insert(k.as_str(), ())?;
                }
            }
            wtx.commit()?;
            Ok(())
        })
    }

    pub fn deletes_done(&self, keys: &[String]) -> Result<(), CacheError> {
        self.with(|db| {
            let wtx = db.begin_write()?;
            {
                let mut d = wtx.open_table(PENDING_DELETES)?;
                for k in keys {
                    d.remove(k.as_str())?;
                }
            }
            wtx.commit()?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_closes_the_database_and_the_next_use_opens_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ManifestCache::open(&dir.path().join("sync.redb")).unwrap();
        let m = Manifest {
            generation: 7,
            ..Manifest::default()
        };
        cache.store(&m, &["k".into()]).unwrap();
        let failed: Result<(), _> = cache.with(|_| Err(CacheError("disk full".into())));
        assert!(failed.is_err());
        assert!(
            cache.db.lock().unwrap().is_none(),
            "still open after a failure"
        );
        assert_eq!(cache.load().unwrap().generation, 7);
        assert_eq!(cache.pending_deletes().unwrap(), vec!["k".to_string()]);
        assert!(cache.db.lock().unwrap().is_some());
    }

    #[test]
    fn cache_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sync.redb");
        let mut m = {
            let c = ManifestCache::open(&path).unwrap();
            let m = c.load().unwrap();
            assert_eq!(m.generation, 0);
            assert_eq!(m.format, FORMAT);
            m
        };
        m.generation = 3;
        m.files.insert(
            "a/b.txt".into(),
            FileEntry {
                size: 3,
                mtime: 1_700_000_000_123_456_789,
                mode: 0o644,
                hash: "blake3:00".into(),
            },
        );
        m.symlinks.insert("l".into(), "a/b.txt".into());
        m.empty_dirs.insert("e".into());
        {
            let c = ManifestCache::open(&path).unwrap();
            c.store(&m, &["x/1".into(), "x/2".into()]).unwrap();
            c.deletes_done(&["x/1".into()]).unwrap();
        }
        let c = ManifestCache::open(&path).unwrap();
        assert_eq!(c.load().unwrap(), m);
        assert_eq!(c.pending_deletes().unwrap(), vec!["x/2".to_string()]);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["files"]["a/b.txt"]["mode"], 420);
        assert_eq!(json["empty_dirs"], serde_json::json!(["e"]));
    }
}
