//! The file store: small durable files (agent SDK event logs, conversation state) kept
//! in the same redb database as the KV store, encrypted the same way, written through
//! the same group-committing writer, and mirrored to remote storage path for path
//! (`<conversation prefix><path>`) by the replicator.
//!
//! Every change also records the path in a pending table in the same transaction, so
//! a change acknowledged before a crash is still uploaded after the restart.

use bytes::Bytes;
use redb::{ReadableTable, TableDefinition};

use crate::kv::crypto::Cipher;
use crate::kv::{KvError, KvStore, now_ms};

/// path → sealed (updated_ms, bytes).
const FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("files");
/// path → change sequence number: changes not yet in remote storage.
const PENDING: TableDefinition<&str, u64> = TableDefinition::new("files_pending");
/// "seq" → the last change sequence number.
const META: TableDefinition<&str, u64> = TableDefinition::new("files_meta");

const AAD_PREFIX: &[u8] = b"sandkeep:file\0";
const HEADER_LEN: usize = 8;
/// Top-level names that belong to the rest of the conversation's remote layout.
pub const RESERVED: [&str; 3] = ["workspace", "kv", ".sandkeep"];
const MAX_PATH: usize = 1024;
const MAX_SEGMENT: usize = 255;

fn aad(path: &str) -> Vec<u8> {
    let mut a = AAD_PREFIX.to_vec();
    a.extend_from_slice(path.as_bytes());
    a
}

/// Checks a file store path as API.md describes it; `conversation_prefix` is the part of
/// the remote key before the path, which together with it must fit in 1024 bytes.
pub fn validate_path(path: &str, conversation_prefix: &str) -> Result<(), KvError> {
    let invalid = |why: &str| Err(KvError::InvalidPath(format!("invalid file path: {why}")));
    if path.is_empty() {
        return invalid("the path is empty");
    }
    if path.len() > MAX_PATH {
        return invalid("longer than 1024 bytes");
    }
    if path.chars().any(|c| c.is_control()) {
        return invalid("control characters are not allowed");
    }
    if path.starts_with('/') {
        return invalid("the path must be relative");
    }
    for seg in path.split('/') {
        match seg {
            "" => return invalid("empty segment (`//` or a trailing `/`)"),
            "." | ".." => return invalid("`.` and `..` segments are not allowed"),
            s if s.len() > MAX_SEGMENT => return invalid("a segment is longer than 255 bytes"),
            _ => {}
        }
    }
    let top = path.split('/').next().unwrap_or_default();
    if RESERVED.contains(&top) {
        return Err(KvError::InvalidPath(format!(
            "invalid file path: the top-level name `{top}` is reserved"
        )));
    }
    if conversation_prefix.len() + path.len() > MAX_PATH {
        return invalid("the remote object key would be longer than 1024 bytes");
    }
    Ok(())
}

/// Whether `rel` (a key below the conversation prefix) belongs to the file store.
pub fn is_file_store_key(rel: &str) -> bool {
    let top = rel.split('/').next().unwrap_or_default();
    !rel.is_empty() && !RESERVED.contains(&top) && validate_path(rel, "").is_ok()
}

/// A change that still has to reach remote storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub path: String,
    pub seq: u64,
}

#[derive(Clone)]
pub struct FileStore {
    kv: KvStore,
}

fn next_seq(wtx: &redb::WriteTransaction) -> Result<u64, KvError> {
    let mut meta = wtx.open_table(META)?;
    let seq = meta.get("seq")?.map_or(0, |v| v.value()) + 1;
    meta.insert("seq", seq)?;
    Ok(seq)
}

fn open_file(cipher: &Cipher, path: &str, blob: &[u8]) -> Result<Vec<u8>, KvError> {
    let mut plain = cipher
        .open(&aad(path), blob)
        .map_err(|e| KvError::Storage(format!("file {path}: {e}")))?;
    if plain.len() < HEADER_LEN {
        return Err(KvError::Storage(format!(
            "file {path}: record is truncated"
        )));
    }
    Ok(plain.split_off(HEADER_LEN))
}

fn seal_file(cipher: &Cipher, path: &str, data: &[u8]) -> Vec<u8> {
    let mut plain = Vec::with_capacity(HEADER_LEN + data.len());
    plain.extend_from_slice(&now_ms().to_le_bytes());
    plain.extend_from_slice(data);
    cipher.seal(&aad(path), &plain)
}

/// Refuses a new file at `path` when one of its parents is a file or when files exist
/// below it: a file and a directory cannot share a name in the `dir` remote, in a
/// workspace, or in a local file store that the conversation may move to.
fn refuse_file_dir_clash<T: ReadableTable<&'static str, &'static [u8]>>(
    files: &T,
    path: &str,
) -> Result<(), KvError> {
    for (i, _) in path.match_indices('/') {
        let parent = &path[..i];
        if files.get(parent)?.is_some() {
            return Err(KvError::InvalidPath(format!(
                "invalid file path: `{parent}` is a file, so nothing can be stored below it"
            )));
        }
    }
    let below = format!("{path}/");
    if let Some(item) = files.range(below.as_str()..)?.next() {
        let (k, _) = item?;
        if k.value().starts_with(&below) {
            return Err(KvError::InvalidPath(format!(
                "invalid file path: `{path}` is a directory (it holds `{}`)",
                k.value()
            )));
        }
    }
    Ok(())
}

impl FileStore {
    pub fn new(kv: KvStore) -> Self {
        Self { kv }
    }

    /// Stores `data` at `path`; `Ok(true)` when the file is new. With `if_absent`, an
    /// existing file is left alone and the answer is `exists`. Answers after the commit
    /// is durable; returns the change's sequence number too.
    pub async fn put(
        &self,
        path: &str,
        data: Bytes,
        if_absent: bool,
    ) -> Result<(bool, u64), KvError> {
        let path = path.to_string();
        let r = self
            .kv
            .exec(false, move |wtx, _, cipher| {
                let mut files = wtx.open_table(FILES)?;
                let existed = files.get(path.as_str())?.is_some();
                if existed && if_absent {
                    return Err(KvError::FileExists(path));
                }
                if !existed {
                    refuse_file_dir_clash(&files, &path)?;
                }
                let seq = next_seq(wtx)?;
                files.insert(path.as_str(), seal_file(cipher, &path, &data).as_slice())?;
                wtx.open_table(PENDING)?.insert(path.as_str(), seq)?;
                Ok((!existed, seq))
            })
            .await?;
        self.kv.changes().notify_one();
        Ok(r)
    }

    /// Deletes `path`; whether it existed, and the change's sequence number.
    pub async fn delete(&self, path: &str) -> Result<(bool, u64), KvError> {
        let path = path.to_string();
        let r = self
            .kv
            .exec(false, move |wtx, _, _| {
                let existed = wtx.open_table(FILES)?.remove(path.as_str())?.is_some();
                if !existed {
                    return Ok((false, 0));
                }
                let seq = next_seq(wtx)?;
                wtx.open_table(PENDING)?.insert(path.as_str(), seq)?;
                Ok((true, seq))
            })
            .await?;
        if r.0 {
            self.kv.changes().notify_one();
        }
        Ok(r)
    }

    /// The content of `path`.
    pub async fn get(&self, path: &str) -> Result<Option<Vec<u8>>, KvError> {
        let path = path.to_string();
        self.kv
            .read_txn(move |rtx, cipher| {
                let files = match rtx.open_table(FILES) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                match files.get(path.as_str())? {
                    Some(blob) => open_file(cipher, &path, blob.value()).map(Some),
                    None => Ok(None),
                }
            })
            .await
    }

    /// Every path starting with `prefix`, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, KvError> {
        let prefix = prefix.to_string();
        self.kv
            .read_txn(move |rtx, _| {
                let files = match rtx.open_table(FILES) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
                    Err(e) => return Err(e.into()),
                };
                let mut out = Vec::new();
                for item in files.range(prefix.as_str()..)? {
                    let (k, _) = item?;
                    if !k.value().starts_with(prefix.as_str()) {
                        break;
                    }
                    out.push(k.value().to_string());
                }
                Ok(out)
            })
            .await
    }

    /// Changes not yet in remote storage, oldest path first.
    pub async fn pending(&self) -> Result<Vec<Pending>, KvError> {
        self.kv
            .read_txn(|rtx, _| {
                let t = match rtx.open_table(PENDING) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
                    Err(e) => return Err(e.into()),
                };
                let mut out = Vec::new();
                for item in t.iter()? {
                    let (k, v) = item?;
                    out.push(Pending {
                        path: k.value().to_string(),
                        seq: v.value(),
                    });
                }
                Ok(out)
            })
            .await
    }

    /// Marks these changes as in remote storage (a path changed again since keeps its
    /// newer pending entry).
    pub async fn mark_synced(&self, done: Vec<Pending>) -> Result<(), KvError> {
        if done.is_empty() {
            return Ok(());
        }
        self.kv
            .exec(true, move |wtx, _, _| {
                let mut t = wtx.open_table(PENDING)?;
                for p in &done {
                    let current = t.get(p.path.as_str())?.map(|v| v.value());
                    if current == Some(p.seq) {
                        t.remove(p.path.as_str())?;
                    }
                }
                Ok(())
            })
            .await
    }

    /// Paths with no change pending: in remote storage (unless someone deleted their
    /// objects since).
    pub async fn synced(&self) -> Result<Vec<String>, KvError> {
        self.kv
            .read_txn(|rtx, _| {
                let files = match rtx.open_table(FILES) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
                    Err(e) => return Err(e.into()),
                };
                let pending = match rtx.open_table(PENDING) {
                    Ok(t) => Some(t),
                    Err(redb::TableError::TableDoesNotExist(_)) => None,
                    Err(e) => return Err(e.into()),
                };
                let mut out = Vec::new();
                for item in files.iter()? {
                    let (k, _) = item?;
                    let path = k.value();
                    match &pending {
                        Some(p) if p.get(path)?.is_some() => {}
                        _ => out.push(path.to_string()),
                    }
                }
                Ok(out)
            })
            .await
    }

    /// Makes these paths pending again (their objects are gone from remote storage):
    /// those still here with no change pending. How many were.
    pub async fn mark_unsynced(&self, paths: Vec<String>) -> Result<usize, KvError> {
        if paths.is_empty() {
            return Ok(0);
        }
        let n = self
            .kv
            .exec(true, move |wtx, _, _| {
                let files = wtx.open_table(FILES)?;
                let mut pending = wtx.open_table(PENDING)?;
                let mut n = 0;
                for path in &paths {
                    if pending.get(path.as_str())?.is_some() || files.get(path.as_str())?.is_none()
                    {
                        continue;
                    }
                    pending.insert(path.as_str(), next_seq(wtx)?)?;
                    n += 1;
                }
                Ok(n)
            })
            .await?;
        if n > 0 {
            self.kv.changes().notify_one();
        }
        Ok(n)
    }

    /// Stores files restored from remote storage (not pending: they are there already).
    pub async fn import(&self, files: Vec<(String, Vec<u8>)>) -> Result<(), KvError> {
        self.kv
            .exec(true, move |wtx, _, cipher| {
                let mut t = wtx.open_table(FILES)?;
                for (path, data) in &files {
                    t.insert(path.as_str(), seal_file(cipher, path, data).as_slice())?;
                }
                Ok(())
            })
            .await
    }

    /// Makes the store hold another daemon's changes (see
    /// [`crate::replicate::take_in_remote_files`]), in one transaction: `gone` paths are
    /// removed, then `files` stored, except paths with a change pending here: a
    /// client's write since the caller looked (a take-in runs while the API serves)
    /// is kept, to be uploaded. Returns the paths kept so.
    pub async fn take_in(
        &self,
        files: Vec<(String, Vec<u8>)>,
        gone: Vec<String>,
    ) -> Result<Vec<String>, KvError> {
        self.kv
            .exec(true, move |wtx, _, cipher| {
                let mut t = wtx.open_table(FILES)?;
                let pending = wtx.open_table(PENDING)?;
                let mut kept = Vec::new();
                for path in &gone {
                    if pending.get(path.as_str())?.is_some() {
                        kept.push(path.clone());
                    } else {
                        t.remove(path.as_str())?;
                    }
                }
                for (path, data) in &files {
                    if pending.get(path.as_str())?.is_some() {
                        kept.push(path.clone());
                    } else {
                        t.insert(path.as_str(), seal_file(cipher, path, data).as_slice())?;
                    }
                }
                Ok(kept)
            })
            .await
    }

    /// Whether a restore of the KV and file store from remote storage is still owed (set
    /// when the state directory is new, cleared once the restore finished); `None` when
    /// neither was ever recorded (a database that no start got that far with).
    pub async fn restore_pending(&self) -> Result<Option<bool>, KvError> {
        self.kv
            .read_txn(|rtx, _| match rtx.open_table(META) {
                Ok(t) => Ok(t.get("restore_pending")?.map(|v| v.value() == 1)),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
                Err(e) => Err(e.into()),
            })
            .await
    }

    pub async fn set_restore_pending(&self, pending: bool) -> Result<(), KvError> {
        self.kv
            .exec(true, move |wtx, _, _| {
                wtx.open_table(META)?
                    .insert("restore_pending", u64::from(pending))?;
                Ok(())
            })
            .await
    }

    /// Number of files and their total size.
    pub async fn stats(&self) -> Result<(u64, u64), KvError> {
        self.kv
            .read_txn(|rtx, _| {
                let files = match rtx.open_table(FILES) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok((0, 0)),
                    Err(e) => return Err(e.into()),
                };
                let (mut n, mut bytes) = (0, 0);
                for item in files.iter()? {
                    let (_, v) = item?;
                    n += 1;
                    bytes += v.value().len().saturating_sub(HEADER_LEN + 28) as u64;
                }
                Ok((n, bytes))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_api_rules() {
        let p = "conversations/u/c/";
        for ok in [
            "base_state.json",
            "events/event-00001-abc.json",
            "a/b/c.d",
            "workspaces/x",
            ".sandkeepx",
            "kv2/a",
        ] {
            assert!(validate_path(ok, p).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/",
            "./a",
            "a/../b",
            "..",
            "workspace/x",
            "workspace",
            "kv/ns.kv",
            ".sandkeep/owner.json",
            "a\u{7}b",
            "a\nb",
        ] {
            assert!(
                matches!(validate_path(bad, p), Err(KvError::InvalidPath(_))),
                "{bad:?}"
            );
        }
        assert!(validate_path(&"a".repeat(256), p).is_err());
        assert!(validate_path(&"a/".repeat(512), p).is_err());
        let long = format!("{}/{}", "a".repeat(255), "b".repeat(255));
        assert!(validate_path(&long, p).is_ok());
        assert!(validate_path(&long, &"p".repeat(600)).is_err());
        assert!(is_file_store_key("events/e1.json"));
        assert!(!is_file_store_key("workspace/manifest.json"));
        assert!(!is_file_store_key(".sandkeep/owner.json"));
    }
}
