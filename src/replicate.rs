//! Replication of the KV store and the file store to remote storage, and the way back.
//!
//! One task watches the store's commits. Once writes settle (`kv.replicate_delay`
//! without a new one, or ten times that since the first unexported change, so a
//! constant stream of writes cannot starve it) it runs a pass: every namespace whose
//! version differs from its last export is exported to `kv/<namespace>.kv`, and every
//! pending file store change is uploaded to (or deleted from) `<path>`. A pass that
//! fails is retried with backoff; what it finished is recorded and not redone.
//! [`ReplicaHandle::flush`] is the barrier that `POST /v1/sync`, `PUT /v1/files?sync=true`
//! and the final sync wait on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::files::{self, FileStore, Pending};
use crate::kv::{KvError, KvStore};
use crate::metrics::Metrics;
use crate::remote::{self, Backoff, Remote, RemoteError};

/// File uploads in flight during one pass.
const FILE_CONCURRENCY: usize = 8;
/// A change waits at most this many replicate delays for writes to settle.
const SETTLE_MAX_FACTOR: u32 = 10;
/// Files restored into the store per transaction (bounded by bytes too).
const IMPORT_BATCH_BYTES: usize = 32 << 20;

#[derive(Debug, thiserror::Error, Clone)]
pub enum ReplicateError {
    #[error("remote storage: {0}")]
    Remote(String),
    #[error("local store: {0}")]
    Store(String),
    #[error("the replicator has stopped")]
    Stopped,
}

impl From<RemoteError> for ReplicateError {
    fn from(e: RemoteError) -> Self {
        ReplicateError::Remote(e.to_string())
    }
}

impl From<KvError> for ReplicateError {
    fn from(e: KvError) -> Self {
        ReplicateError::Store(e.to_string())
    }
}

/// What one pass uploaded.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PassStats {
    pub namespaces: u64,
    pub files_uploaded: u64,
    pub files_deleted: u64,
    pub bytes_uploaded: u64,
}

/// The replication part of `GET /v1/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplicaStatus {
    pub last_export_at: Option<String>,
    pub last_error: Option<String>,
}

type Waiter = oneshot::Sender<Result<PassStats, ReplicateError>>;

#[derive(Clone)]
pub struct ReplicaHandle {
    tx: mpsc::Sender<Waiter>,
    status: Arc<Mutex<ReplicaStatus>>,
}

impl ReplicaHandle {
    /// Waits until every KV and file store change committed before the call is in
    /// remote storage (retrying failures until then).
    pub async fn flush(&self) -> Result<PassStats, ReplicateError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .await
            .map_err(|_| ReplicateError::Stopped)?;
        rx.await.map_err(|_| ReplicateError::Stopped)?
    }

    pub fn status(&self) -> ReplicaStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub struct Replicator {
    kv: KvStore,
    files: FileStore,
    remote: Arc<dyn Remote>,
    /// `<prefix>conversations/<user>/<conversation>/`.
    prefix: String,
    delay: Duration,
    commands: mpsc::Receiver<Waiter>,
    status: Arc<Mutex<ReplicaStatus>>,
    metrics: Arc<Metrics>,
}

/// The object key of a namespace's export.
pub fn export_key(conversation_prefix: &str, ns: &str) -> String {
    format!("{conversation_prefix}kv/{ns}.kv")
}

impl Replicator {
    pub fn new(
        kv: KvStore,
        files: FileStore,
        remote: Arc<dyn Remote>,
        conversation_prefix: String,
        delay: Duration,
        metrics: Arc<Metrics>,
    ) -> (Self, ReplicaHandle) {
        let (tx, commands) = mpsc::channel(1024);
        let status = Arc::new(Mutex::new(ReplicaStatus::default()));
        let r = Self {
            kv,
            files,
            remote,
            prefix: conversation_prefix,
            delay,
            commands,
            status: status.clone(),
            metrics,
        };
        (r, ReplicaHandle { tx, status })
    }

    /// Runs until `stop` fires. The first pass runs at once: changes committed before a
    /// crash are still pending in the store.
    pub async fn run(mut self, stop: CancellationToken) {
        let changes = self.kv.changes();
        // (first, last) unexported change; None when everything is out.
        let mut dirty: Option<(Instant, Instant)> = None;
        let mut now_due = true;
        let mut waiters: Vec<Waiter> = Vec::new();
        let mut backoff = Backoff::default();
        let mut retry_at: Option<Instant> = None;
        loop {
            let due = if now_due || !waiters.is_empty() {
                Some(Instant::now())
            } else {
                dirty.map(|(first, last)| {
                    (last + self.delay).min(first + self.delay * SETTLE_MAX_FACTOR)
                })
            };
            let due = match (due, retry_at) {
                (Some(d), Some(r)) => Some(d.max(r)),
                (d, _) => d,
            };
            let sleep_to = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                w = self.commands.recv() => match w {
                    Some(w) => { waiters.push(w); continue; }
                    None => return,
                },
                _ = changes.notified() => {
                    let now = Instant::now();
                    dirty = Some((dirty.map_or(now, |(first, _)| first), now));
                    continue;
                }
                _ = tokio::time::sleep_until(sleep_to) => {
                    if due.is_none() {
                        continue;
                    }
                }
            }
            // Whoever waits now is covered by this pass; later callers by the next.
            while let Ok(w) = self.commands.try_recv() {
                waiters.push(w);
            }
            let batch = std::mem::take(&mut waiters);
            let first = dirty.map(|(f, _)| f);
            dirty = None;
            now_due = false;
            match self.pass().await {
                Ok(stats) => {
                    backoff.reset();
                    retry_at = None;
                    {
                        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
                        s.last_error = None;
                        if stats != PassStats::default() {
                            s.last_export_at = Some(crate::kv::rfc3339(crate::kv::now_ms()));
                        }
                    }
                    for w in batch {
                        let _ = w.send(Ok(stats));
                    }
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "replication pass failed; retrying");
                    self.status
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .last_error = Some(e.to_string());
                    retry_at = Some(Instant::now() + delay);
                    let now = Instant::now();
                    dirty = Some((first.unwrap_or(now), now));
                    // Retried after the backoff, whatever the replicate delay.
                    now_due = true;
                    waiters = batch;
                }
            }
        }
    }

    /// Exports the namespaces that changed and uploads the pending file changes.
    async fn pass(&self) -> Result<PassStats, ReplicateError> {
        let mut stats = PassStats::default();
        for (ns, _) in self.kv.exports_due().await? {
            let export = self.kv.export(&ns).await?;
            let size = export.bytes.len() as u64;
            self.remote
                .put_bytes(&export_key(&self.prefix, &ns), Bytes::from(export.bytes))
                .await
                .inspect_err(|_| self.metrics.remote_error("put"))?;
            self.kv.mark_exported(&ns, export.version).await?;
            tracing::debug!(namespace = %ns, version = export.version, keys = export.keys, bytes = size, "kv namespace exported");
            stats.namespaces += 1;
            stats.bytes_uploaded += size;
        }
        let pending = self.files.pending().await?;
        if pending.is_empty() {
            return Ok(stats);
        }
        let results: Vec<Result<(Pending, Option<u64>), ReplicateError>> =
            futures::stream::iter(pending)
                .map(|p| self.replicate_file(p))
                .buffer_unordered(FILE_CONCURRENCY)
                .collect()
                .await;
        let mut done = Vec::new();
        let mut failed = None;
        for r in results {
            match r {
                Ok((p, Some(bytes))) => {
                    stats.files_uploaded += 1;
                    stats.bytes_uploaded += bytes;
                    done.push(p);
                }
                Ok((p, None)) => {
                    stats.files_deleted += 1;
                    done.push(p);
                }
                Err(e) => failed = Some(e),
            }
        }
        self.files.mark_synced(done).await?;
        match failed {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    /// Uploads the current content of a pending path, or deletes its object when the
    /// file is gone. `Some(bytes)` when uploaded.
    async fn replicate_file(&self, p: Pending) -> Result<(Pending, Option<u64>), ReplicateError> {
        let key = format!("{}{}", self.prefix, p.path);
        match self.files.get(&p.path).await? {
            Some(data) => {
                let n = data.len() as u64;
                self.remote
                    .put_bytes(&key, Bytes::from(data))
                    .await
                    .inspect_err(|_| self.metrics.remote_error("put"))?;
                Ok((p, Some(n)))
            }
            None => {
                self.remote
                    .delete_many(std::slice::from_ref(&key))
                    .await
                    .inspect_err(|_| self.metrics.remote_error("delete"))?;
                Ok((p, None))
            }
        }
    }
}

/// An object a restore could not bring back.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BadObject {
    pub key: String,
    pub error: String,
}

/// What [`restore_stores`] brought back.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StoresRestored {
    pub namespaces: u64,
    pub keys: u64,
    pub files: u64,
    pub bad: Vec<BadObject>,
}

/// Imports every KV namespace export and every file store object of the conversation
/// into a new, empty state directory. An object that cannot be read, decrypted or
/// stored is reported and skipped; only failing to list the remote is an error.
pub async fn restore_stores(
    kv: &KvStore,
    files: &FileStore,
    remote: &dyn Remote,
    conversation_prefix: &str,
    max_file_bytes: u64,
) -> Result<StoresRestored, ReplicateError> {
    let mut out = StoresRestored::default();
    let kv_prefix = format!("{conversation_prefix}kv/");
    let objects = remote::list_all(remote, conversation_prefix).await?;
    let mut batch: Vec<(String, Vec<u8>)> = Vec::new();
    let mut batch_bytes = 0usize;
    for o in objects {
        let Some(rel) = o.key.strip_prefix(conversation_prefix) else {
            continue;
        };
        let bad = |error: String| BadObject {
            key: o.key.clone(),
            error,
        };
        if rel.starts_with("kv/") {
            let Some(ns) = crate::kv::export::namespace_of(&o.key, &kv_prefix) else {
                continue;
            };
            let imported = match remote.get_bytes(&o.key).await {
                Ok(Some(bytes)) => kv.import(&ns, &bytes).await.map_err(|e| e.to_string()),
                Ok(None) => Err("vanished while restoring".to_string()),
                Err(e) => Err(e.to_string()),
            };
            match imported {
                Ok(keys) => {
                    out.namespaces += 1;
                    out.keys += keys as u64;
                }
                Err(e) => {
                    tracing::warn!(key = %o.key, error = %e, "kv namespace not restored");
                    out.bad.push(bad(e));
                }
            }
            continue;
        }
        if !files::is_file_store_key(rel) {
            continue;
        }
        if o.size > max_file_bytes {
            let e = format!(
                "{} bytes is above files.max_file_bytes ({max_file_bytes})",
                o.size
            );
            tracing::warn!(key = %o.key, error = %e, "file not restored");
            out.bad.push(bad(e));
            continue;
        }
        match remote.get_bytes(&o.key).await {
            Ok(Some(data)) => {
                batch_bytes += data.len();
                batch.push((rel.to_string(), data.to_vec()));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(key = %o.key, error = %e, "file not restored");
                out.bad.push(bad(e.to_string()));
            }
        }
        if batch_bytes >= IMPORT_BATCH_BYTES {
            out.files += batch.len() as u64;
            files.import(std::mem::take(&mut batch)).await?;
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        out.files += batch.len() as u64;
        files.import(batch).await?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::crypto::Cipher;
    use crate::kv::ops::Limits;
    use crate::kv::{BatchRequest, Op, StoreOptions};
    use crate::remote::dir::DirRemote;
    use crate::remote::flaky::FlakyRemote;
    use serde_json::json;

    const PREFIX: &str = "conversations/u/c/";

    fn store(dir: &std::path::Path) -> KvStore {
        KvStore::open(StoreOptions {
            path: dir.join("db.redb"),
            cipher: Cipher::new(&[9; 32]),
            limits: Limits {
                max_value_bytes: 1 << 16,
                max_namespace_bytes: 1 << 24,
            },
            queue_capacity: 64,
        })
        .unwrap()
    }

    async fn set(kv: &KvStore, ns: &str, key: &str, value: serde_json::Value) {
        let op = Op::Set {
            key: key.into(),
            value,
            nx: false,
            xx: false,
            if_version: None,
            ttl: None,
            keep_ttl: false,
            get: false,
        };
        kv.write(ns, BatchRequest::single(op), false).await.unwrap();
    }

    #[tokio::test]
    async fn flush_waits_through_an_outage_and_redoes_nothing_finished() {
        let tmp = tempfile::tempdir().unwrap();
        let dir: Arc<dyn Remote> = Arc::new(DirRemote::new(&tmp.path().join("remote")).unwrap());
        let flaky = Arc::new(FlakyRemote::new(dir.clone()));
        let kv = store(tmp.path());
        let files = FileStore::new(kv.clone());
        let (rep, handle) = Replicator::new(
            kv.clone(),
            files.clone(),
            flaky.clone(),
            PREFIX.into(),
            Duration::from_secs(3600),
            Arc::new(Metrics::new()),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(rep.run(stop.clone()));
        // Let the pass the replicator runs at start finish first: it could otherwise
        // pick up the writes below and leave the flush with nothing to count.
        assert_eq!(handle.flush().await.unwrap(), PassStats::default());

        set(&kv, "ns1", "k", json!(1)).await;
        files
            .put("events/e1", Bytes::from_static(b"e1"), false)
            .await
            .unwrap();
        let s = handle.flush().await.unwrap();
        assert_eq!((s.namespaces, s.files_uploaded), (1, 1));
        assert!(files.pending().await.unwrap().is_empty());
        assert_eq!(
            dir.get_bytes("conversations/u/c/events/e1")
                .await
                .unwrap()
                .as_deref(),
            Some(&b"e1"[..])
        );

        // Down: flush keeps waiting (retrying) and answers once the remote is back.
        flaky.set_down(true);
        set(&kv, "ns1", "k", json!(2)).await;
        files.delete("events/e1").await.unwrap();
        let waiting = tokio::spawn({
            let handle = handle.clone();
            async move { handle.flush().await }
        });
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!waiting.is_finished(), "flush answered during the outage");
        assert!(handle.status().last_error.is_some());
        assert!(flaky.refused.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        flaky.set_down(false);
        let s = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((s.namespaces, s.files_deleted), (1, 1));
        assert!(
            dir.get_bytes("conversations/u/c/events/e1")
                .await
                .unwrap()
                .is_none()
        );
        let export = dir
            .get_bytes("conversations/u/c/kv/ns1.kv")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            crate::kv::export::inspect(&Cipher::new(&[9; 32]), "ns1", &export).unwrap(),
            (2, 1)
        );
        assert!(handle.status().last_error.is_none());

        // Nothing changed: a flush uploads nothing.
        let s = handle.flush().await.unwrap();
        assert_eq!(s, PassStats::default());
        stop.cancel();
        task.await.unwrap();
    }
}
