//! The key-value store: namespaced JSON values with versions, TTLs and Redis-like list
//! and counter operations, kept encrypted in redb.
//!
//! - [`validate`]: key, namespace and value rules.
//! - [`jsonpath`]: `?path=` parsing and navigation.
//! - [`crypto`]: AES-256-GCM records and the key's origin.
//! - [`ops`]: what each operation does to a namespace, staged in memory so a failing
//!   request (or batch) changes nothing.
//! - [`store`]: the redb database, the single writer thread with group commit, reads,
//!   watch notifications and the TTL purger.
//! - [`wal`]: the write-ahead log that makes a write group durable with one small
//!   fsync'd append; the database is checkpointed from it.

pub mod crypto;
pub mod export;
pub mod jsonpath;
pub mod ops;
pub mod store;
pub mod validate;
mod wal;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Files for which a test turned on an injected fault (tests run in parallel: by path,
/// not globally).
#[cfg(test)]
pub(crate) struct Faults(std::sync::Mutex<Vec<std::path::PathBuf>>);

#[cfg(test)]
impl Faults {
    pub(crate) const fn new() -> Self {
        Self(std::sync::Mutex::new(Vec::new()))
    }

    pub(crate) fn set(&self, path: &std::path::Path, on: bool) {
        let mut f = self.0.lock().unwrap();
        f.retain(|p| p != path);
        if on {
            f.push(path.to_path_buf());
        }
    }

    pub(crate) fn on(&self, path: &std::path::Path) -> bool {
        self.0.lock().unwrap().iter().any(|p| p == path)
    }
}

use serde_json::Value;

pub use ops::{BatchRequest, NewValue, Op, Ttl};
pub use store::{CommitStats, KvStore, NsMeta, StoreOptions};

/// Everything a KV request can fail with; the HTTP layer maps each to API.md's codes.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidKey(String),
    #[error("{0}")]
    InvalidPath(String),
    #[error("{0}")]
    InvalidParam(String),
    #[error("{0}")]
    WrongType(String),
    #[error("keys starting with `$` are reserved: `{0}`")]
    ReservedKey(String),
    #[error("{0}")]
    Overflow(String),
    #[error("key `{0}` does not exist")]
    NotFound(String),
    #[error("path `{0}` does not exist in the value")]
    PathNotFound(String),
    #[error(
        "version mismatch{}: expected {expected}, found {actual}",
        key.as_ref().map(|k| format!(" on `{k}`")).unwrap_or_default()
    )]
    VersionMismatch {
        /// The key whose version differs; `None` for the namespace's version.
        key: Option<String>,
        expected: u64,
        actual: u64,
    },
    #[error("key `{0}` already exists")]
    Exists(String),
    #[error("key `{0}` does not exist")]
    NotExists(String),
    /// A file store `if_absent` write found the file.
    #[error("file `{0}` already exists")]
    FileExists(String),
    #[error("{what} of {current_size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    TooLarge {
        what: &'static str,
        limit_bytes: u64,
        current_size_bytes: u64,
    },
    #[error("{0}")]
    InvalidValue(String),
    #[error("the write queue is full")]
    Busy,
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("storage error: {0}")]
    Storage(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A batch operation (or check) failed; `index` names it.
    #[error("operation {index}: {source}")]
    Batch {
        index: usize,
        #[source]
        source: Box<KvError>,
    },
}

impl KvError {
    fn at(self, index: usize) -> Self {
        KvError::Batch {
            index,
            source: Box::new(self),
        }
    }
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for KvError {
            fn from(e: $t) -> Self {
                KvError::Storage(e.to_string())
            }
        }
    )*};
}
storage_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// One stored value and its metadata. Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub value: Value,
    pub version: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub expires_ms: Option<u64>,
}

impl Record {
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|e| e <= now_ms)
    }

    /// The meta fields of API.md: `version`, `created_at`, `updated_at`, `expires_at`.
    pub fn meta_into(&self, body: &mut serde_json::Map<String, Value>) {
        body.insert("version".into(), self.version.into());
        body.insert("created_at".into(), rfc3339(self.created_ms).into());
        body.insert("updated_at".into(), rfc3339(self.updated_ms).into());
        body.insert(
            "expires_at".into(),
            self.expires_ms
                .map(rfc3339)
                .map_or(Value::Null, Value::String),
        );
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-22T04:20:05.123Z`.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
