//! Replication of the KV store and the file store to remote storage, and the way back.
//!
//! One task watches the store's commits. Once writes settle (`kv.replicate_delay`
//! without a new one, or ten times that since the first unexported change, so a
//! constant stream of writes cannot starve it) it runs a pass: every namespace whose
//! version differs from its last export is exported to `kv/<namespace>.kv`, and every
//! pending file store change is uploaded to (or deleted from) `<path>`. A pass that
//! fails is retried with backoff; what it finished is recorded and not redone.
//! [`ReplicaHandle::flush`] is the barrier that `POST /v1/sync`, `PUT /v1/files?sync=true`
//! and the final sync wait on. Every `sync.verify_interval` the exports and the file
//! store's objects are listed: what is gone (deleted behind the daemon's back) is
//! uploaded again by the next pass, as the workspace mirror's verify does.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::files::{self, FileStore, Pending};
use crate::kv::export::{Imported, MAX_OBJECT};
use crate::kv::{KvError, KvStore};
use crate::remote::{self, Backoff, Precondition, Remote, RemoteError};
use crate::sync::VerifySchedule;

/// File uploads in flight during one pass.
const FILE_CONCURRENCY: usize = 8;
/// A change waits at most this many replicate delays for writes to settle.
const SETTLE_MAX_FACTOR: u32 = 10;
/// Most listings one verify makes (one per top-level name of the file store); past it,
/// the whole conversation is listed once instead.
const MAX_VERIFY_LISTINGS: usize = 64;
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
    /// How often the objects are listed to find those deleted behind the daemon's back
    /// (zero: never).
    verify_every: Duration,
    /// When a listing may be taken and its findings acted on ([`VerifyGate`]).
    verify_gate: VerifyGate,
}

/// `Some(epoch)` while this daemon owns the conversation (in `epoch`) with nothing of
/// another daemon's left to take in; `None` otherwise. A file store object that is gone
/// because the daemon that owned the conversation meanwhile deleted it must be taken in
/// as deleted, not uploaded again: a listing counts only when taken and acted on in
/// the same unbroken ownership.
pub type VerifyGate = Arc<dyn Fn() -> Option<u64> + Send + Sync>;

/// What a listing of the exports and the file store's objects found
/// ([`Replicator::start_verify`]).
struct StoreListing {
    /// Namespaces whose current version was exported and whose export is gone.
    namespaces: Vec<String>,
    /// File store paths that were in remote storage and whose objects are gone.
    files: Vec<String>,
}

/// The object key of a namespace's export.
pub fn export_key(conversation_prefix: &str, ns: &str) -> String {
    format!("{conversation_prefix}kv/{ns}.kv")
}

/// The object key of a file store path (path for path under the conversation).
fn file_key(conversation_prefix: &str, path: &str) -> String {
    format!("{conversation_prefix}{path}")
}

impl Replicator {
    pub fn new(
        kv: KvStore,
        files: FileStore,
        remote: Arc<dyn Remote>,
        conversation_prefix: String,
        delay: Duration,
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
            verify_every: Duration::ZERO,
            verify_gate: Arc::new(|| Some(0)),
        };
        (r, ReplicaHandle { tx, status })
    }

    /// Lists the objects every `every` (zero: never), the first time after at most a
    /// minute, and uploads again what is gone; only while `gate` says so.
    pub fn verify_every(mut self, every: Duration, gate: VerifyGate) -> Self {
        self.verify_every = every;
        self.verify_gate = gate;
        self
    }

    /// Lists the exports and the file store's objects on a task of its own (a pass or
    /// a flush does not wait for it): the namespaces and files that were in remote
    /// storage before the listing began and whose objects it did not find.
    fn start_verify(&self) -> AbortOnDropHandle<Result<StoreListing, ReplicateError>> {
        let (kv, files) = (self.kv.clone(), self.files.clone());
        let (remote, prefix) = (self.remote.clone(), self.prefix.clone());
        AbortOnDropHandle::new(tokio::spawn(async move {
            // Read first: what changes while the listing runs is checked by its upload.
            let namespaces = kv.exports_current().await?;
            let synced = files.synced().await?;
            let mut lists = BTreeSet::new();
            if !namespaces.is_empty() {
                lists.insert(format!("{prefix}kv/"));
            }
            // The file store's top-level names, each listed apart: not the workspace.
            for path in &synced {
                lists.insert(match path.split_once('/') {
                    Some((top, _)) => format!("{prefix}{top}/"),
                    None => format!("{prefix}{path}"),
                });
            }
            if lists.len() > MAX_VERIFY_LISTINGS {
                // Many top-level files: one listing of the whole conversation is cheaper.
                lists = BTreeSet::from([prefix.clone()]);
            }
            let mut present = HashSet::new();
            for list in lists {
                let objects = remote::list_all(remote.as_ref(), &list).await?;
                present.extend(objects.into_iter().map(|o| o.key));
            }
            Ok(StoreListing {
                namespaces: namespaces
                    .into_iter()
                    .filter(|ns| !present.contains(&export_key(&prefix, ns)))
                    .collect(),
                files: synced
                    .into_iter()
                    .filter(|p| !present.contains(&file_key(&prefix, p)))
                    .collect(),
            })
        }))
    }

    /// Takes a finished listing of [`Self::start_verify`]: its namespaces are exported
    /// again by the next pass (`forced`), its files made pending. Whether a pass is due.
    async fn apply_verify(&self, listing: StoreListing, forced: &mut BTreeSet<String>) -> bool {
        if let Some(first) = listing.namespaces.first() {
            tracing::warn!(
                namespaces = listing.namespaces.len(),
                first = %first,
                "kv exports are missing in remote storage (deleted by someone?): exporting them again"
            );
        }
        let due = !listing.namespaces.is_empty();
        forced.extend(listing.namespaces);
        let first = listing.files.first().cloned();
        match self.files.mark_unsynced(listing.files).await {
            Ok(0) => due,
            Ok(n) => {
                tracing::warn!(
                    files = n,
                    first = first.unwrap_or_default(),
                    "file store objects are missing in remote storage (deleted by someone?): uploading them again"
                );
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot mark the file store's missing objects for upload");
                due
            }
        }
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
        let mut verify = VerifySchedule::new(self.verify_every);
        // A listing under way (dropped, so aborted, when the replicator stops), with
        // the ownership it was taken in.
        let mut verifying = None;
        let mut verifying_in = None;
        // Namespaces whose exports a listing found gone: exported by the next pass.
        let mut forced = BTreeSet::new();
        loop {
            if verifying.is_none() && verify.take_due() {
                verifying_in = (self.verify_gate)();
                if verifying_in.is_some() {
                    verifying = Some(self.start_verify());
                } else {
                    verify.retry();
                }
            }
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
            let mut sleep_to = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            if let Some(at) = verify.next().filter(|_| verifying.is_none()) {
                sleep_to = sleep_to.min(at);
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                w = self.commands.recv() => match w {
                    // A new caller (a sync, the final sync) gets a pass at once, not
                    // at the end of a backoff that an outage may have grown long.
                    Some(w) => { waiters.push(w); retry_at = None; continue; }
                    None => return,
                },
                _ = changes.notified() => {
                    let now = Instant::now();
                    dirty = Some((dirty.map_or(now, |(first, _)| first), now));
                    continue;
                }
                listed = crate::when_done(&mut verifying), if verifying.is_some() => {
                    verifying = None;
                    match listed {
                        Ok(Ok(listing)) if (self.verify_gate)() == verifying_in => {
                            if self.apply_verify(listing, &mut forced).await {
                                now_due = true;
                            }
                        }
                        Ok(Ok(_)) => tracing::debug!("the conversation changed hands during the listing of the kv exports and file store objects: its findings are dropped"),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "cannot list the kv exports and file store objects to find missing ones; trying again later");
                            verify.retry();
                        }
                        Err(e) => tracing::warn!(error = %e, "the listing of the kv exports and file store objects ended"),
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(sleep_to) => {
                    // Woken for a listing, or before the pass is due.
                    if due.is_none_or(|d| Instant::now() < d) {
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
            match self.pass(&mut forced).await {
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
                    // While a sync or the final sync waits, retried every 2 s at most
                    // (as the workspace mirror is), to answer it soon after the remote
                    // is back; the backoff alone grows to tens of seconds.
                    let delay = backoff.next_delay_for(!batch.is_empty());
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
    /// A namespace whose export fails does not hold the others (nor the file store)
    /// back: the pass goes on, then fails with the first error, to be retried.
    /// `forced`: namespaces exported even if unchanged (their exports are gone); each
    /// leaves it once exported.
    async fn pass(&self, forced: &mut BTreeSet<String>) -> Result<PassStats, ReplicateError> {
        let mut stats = PassStats::default();
        let mut failed = None;
        let mut due: BTreeSet<String> = self
            .kv
            .exports_due()
            .await?
            .into_iter()
            .map(|(ns, _)| ns)
            .collect();
        due.extend(forced.iter().cloned());
        for ns in due {
            let exported = self.export_namespace(&ns).await;
            if exported.is_ok() {
                forced.remove(&ns);
            }
            match exported {
                Ok(Some(size)) => {
                    stats.namespaces += 1;
                    stats.bytes_uploaded += size;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(namespace = %ns, error = %e, "cannot export this kv namespace; the others go on");
                    failed.get_or_insert(e);
                }
            }
        }
        let files = self.replicate_files(&mut stats).await;
        match failed {
            Some(e) => Err(e),
            None => files.map(|()| stats),
        }
    }

    /// Exports `ns`: the bytes uploaded, or `None` when another daemon's export was
    /// taken in instead.
    async fn export_namespace(&self, ns: &str) -> Result<Option<u64>, ReplicateError> {
        let export = self.kv.export(ns).await?;
        let size = export.bytes.len() as u64;
        let key = export_key(&self.prefix, ns);
        let Some(etag) = self
            .store_export(ns, &key, Bytes::from(export.bytes))
            .await?
        else {
            return Ok(None);
        };
        self.kv.mark_exported(ns, export.version, &etag).await?;
        tracing::debug!(namespace = %ns, version = export.version, keys = export.keys, bytes = size, "kv namespace exported");
        Ok(Some(size))
    }

    /// Uploads (and deletes) the file store's pending changes.
    async fn replicate_files(&self, stats: &mut PassStats) -> Result<(), ReplicateError> {
        let pending = self.files.pending().await?;
        if pending.is_empty() {
            return Ok(());
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
            None => Ok(()),
        }
    }

    /// Writes the export of `ns` over the object this store exported last, and only
    /// over that: a conditional write on its ETag (absent when it never exported). The
    /// ETag of the stored export; `None` when another daemon exported the namespace
    /// since (this one lost the conversation for a while, then took it back): its
    /// export is the conversation's state, and replaces this store's namespace.
    async fn store_export(
        &self,
        ns: &str,
        key: &str,
        bytes: Bytes,
    ) -> Result<Option<String>, ReplicateError> {
        let (version, etag) = self.kv.last_export(ns).await?;
        let cond = match (&etag, version) {
            (Some(etag), _) => Precondition::Matches(etag.clone()),
            (None, None) => Precondition::Absent,
            // Exported without an ETag recorded (imported, or by an earlier version):
            // judged by what is there.
            (None, Some(_)) => return self.store_export_over(ns, key, bytes, version).await,
        };
        match self.remote.put_bytes_if(key, bytes.clone(), cond).await {
            Ok(etag) => Ok(Some(etag)),
            Err(RemoteError::PreconditionFailed { .. }) => {
                self.store_export_over(ns, key, bytes, version).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// [`store_export`](Self::store_export) once the object is not the one expected:
    /// still this store's last export (the same version: written over, on its ETag),
    /// or another daemon's (taken in).
    async fn store_export_over(
        &self,
        ns: &str,
        key: &str,
        bytes: Bytes,
        exported: Option<u64>,
    ) -> Result<Option<String>, ReplicateError> {
        // One too large to read is not written over either: the pass fails and says why.
        let Some((theirs, their_etag)) = self.remote.get_bytes_tagged(key, MAX_OBJECT).await?
        else {
            let etag = self
                .remote
                .put_bytes_if(key, bytes, Precondition::Absent)
                .await?;
            return Ok(Some(etag));
        };
        match take_in_unless_ours(&self.kv, ns, &theirs, &their_etag, exported).await? {
            RemoteExport::Ours(_) => {
                let etag = self
                    .remote
                    .put_bytes_if(key, bytes, Precondition::Matches(their_etag))
                    .await?;
                Ok(Some(etag))
            }
            RemoteExport::TakenIn => Ok(None),
            RemoteExport::Unreadable(why) => {
                // Not readable here (another key): kept aside, then written over; left
                // as it is (this namespace's export fails, to be retried) while it
                // cannot be kept.
                let kept = keep_aside(self.remote.as_ref(), key, theirs).await?;
                tracing::error!(namespace = ns, error = %why, kept_as = %kept, "the remote export of this kv namespace cannot be read; kept aside before it is replaced");
                let etag = self
                    .remote
                    .put_bytes_if(key, bytes, Precondition::Matches(their_etag))
                    .await?;
                Ok(Some(etag))
            }
        }
    }

    /// Uploads the current content of a pending path, or deletes its object when the
    /// file is gone. `Some(bytes)` when uploaded.
    async fn replicate_file(&self, p: Pending) -> Result<(Pending, Option<u64>), ReplicateError> {
        let key = file_key(&self.prefix, &p.path);
        match self.files.get(&p.path).await? {
            Some(data) => {
                let n = data.len() as u64;
                self.remote.put_bytes(&key, Bytes::from(data)).await?;
                Ok((p, Some(n)))
            }
            None => {
                self.remote.delete_many(std::slice::from_ref(&key)).await?;
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
    /// For a KV export that cannot be read: the copy of it kept beside it, so that this
    /// daemon's own exports of the namespace cannot overwrite the only copy. Absent for
    /// files, and when this daemon may not write (it lost the conversation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_as: Option<String>,
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
/// into a new, empty state directory.
///
/// Nothing is given up for a failure that may pass: listing or reading remote storage
/// is retried (here, or by the caller for an error) until it works, because a
/// namespace left out would be overwritten by the first export of the new daemon. An
/// export that cannot be read (another KV key, damaged) is reported in `bad` and copied
/// beside itself first, for the same reason. A restore cut short may run again: a
/// namespace that is already here is counted, not imported twice.
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
        if rel.starts_with("kv/") {
            let Some(ns) = crate::kv::export::namespace_of(&o.key, &kv_prefix) else {
                continue;
            };
            // Every failure that may pass is waited out: a namespace left out would be
            // overwritten. One too large to read is reported; its object stays as it
            // is (an export of the namespace from here refuses to write over it).
            let read = read_retrying(remote, &o.key, MAX_OBJECT, |e| {
                !matches!(e, RemoteError::TooLarge { .. })
            });
            let bytes = match read.await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(key = %o.key, error = %e, "kv namespace not restored; it starts empty here");
                    out.bad.push(BadObject {
                        key: o.key,
                        error: e.to_string(),
                        kept_as: None,
                    });
                    continue;
                }
            };
            match kv.import(&ns, &bytes).await? {
                Imported::Keys(keys) => {
                    out.namespaces += 1;
                    out.keys += keys as u64;
                }
                Imported::AlreadyHere => {
                    out.namespaces += 1;
                    out.keys += kv.ns_meta(&ns).await?.keys;
                }
                Imported::Unreadable(error) => {
                    let kept_as = keep_aside(remote, &o.key, bytes).await.ok();
                    tracing::error!(
                        key = %o.key,
                        error = %error,
                        kept_as = kept_as.as_deref().unwrap_or("(not kept)"),
                        "kv namespace not restored; it starts empty here, and the export is kept under another name so that new exports cannot overwrite it"
                    );
                    out.bad.push(BadObject {
                        key: o.key,
                        error,
                        kept_as,
                    });
                }
            }
            continue;
        }
        if !files::is_file_store_key(rel) {
            continue;
        }
        if o.size > max_file_bytes {
            let error = format!(
                "{} bytes is above files.max_file_bytes ({max_file_bytes})",
                o.size
            );
            tracing::warn!(key = %o.key, error = %error, "file not restored");
            out.bad.push(BadObject {
                key: o.key,
                error,
                kept_as: None,
            });
            continue;
        }
        // A file the service refuses to give (permissions, an archived object) is
        // reported; nothing here overwrites its remote copy.
        match read_file_retrying(remote, &o.key, max_file_bytes).await {
            Ok(Some(data)) => {
                batch_bytes += data.len();
                batch.push((rel.to_string(), data.to_vec()));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(key = %o.key, error = %e, "file not restored; its remote copy is kept");
                out.bad.push(BadObject {
                    key: o.key,
                    error: e.to_string(),
                    kept_as: None,
                });
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

/// After a takeover from another daemon (see [`crate::owner::Owner::took_over_from_another`]):
/// every KV export in remote storage that this state directory did not write last
/// replaces its namespace here, so that this daemon's next export of it cannot
/// overwrite what the other daemon wrote. Changes this store made after its last
/// export (as a daemon that had lost the conversation) are dropped. Returns the
/// namespaces replaced.
pub async fn take_in_newer_exports(
    kv: &KvStore,
    remote: &dyn Remote,
    conversation_prefix: &str,
) -> Result<Vec<String>, ReplicateError> {
    let kv_prefix = format!("{conversation_prefix}kv/");
    let mut replaced = Vec::new();
    for o in remote::list_all(remote, &kv_prefix).await? {
        let Some(ns) = crate::kv::export::namespace_of(&o.key, &kv_prefix) else {
            continue;
        };
        let (theirs, their_etag) = match remote.get_bytes_tagged(&o.key, MAX_OBJECT).await {
            Ok(Some(got)) => got,
            Ok(None) => continue,
            // Left to the export path, as one that cannot be opened.
            Err(e @ RemoteError::TooLarge { .. }) => {
                tracing::error!(namespace = %ns, error = %e, "the remote export of this kv namespace cannot be read");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let (ours, our_etag) = kv.last_export(&ns).await?;
        if our_etag.as_deref() == Some(their_etag.as_str()) {
            continue;
        }
        match take_in_unless_ours(kv, &ns, &theirs, &their_etag, ours).await? {
            // This store's own last export (its ETag not recorded yet).
            RemoteExport::Ours(v) => kv.mark_exported(&ns, v, &their_etag).await?,
            RemoteExport::TakenIn => replaced.push(ns),
            // Another key, or damaged: left to the export path, which keeps it aside
            // before it writes over it.
            RemoteExport::Unreadable(why) => {
                tracing::error!(namespace = %ns, error = %why, "the remote export of this kv namespace cannot be read");
            }
        }
    }
    Ok(replaced)
}

/// What [`take_in_remote_files`] changed in the file store.
#[derive(Debug, Default, Serialize)]
pub struct FilesTakenIn {
    /// Paths whose remote copy (another daemon's) replaced or added the file here.
    pub replaced_files: Vec<String>,
    /// Paths removed here because remote storage no longer has them.
    pub removed_files: Vec<String>,
}

/// After a takeover from another daemon, as [`take_in_newer_exports`] for the KV: the
/// file store takes in what that daemon changed. A path with no change pending here
/// holds what this store last uploaded, so a remote copy that differs (or that this
/// store lacks) was written by the other daemon and is taken in, and a file remote
/// storage no longer has was deleted by it and goes. A path with a change pending here
/// keeps it (uploaded next, over the remote copy), with a warning when the remote copy
/// differs: nothing says which of the two came last. A file over `max_file_bytes`, or
/// one the service refuses to give, leaves the path here as it is.
pub async fn take_in_remote_files(
    files: &FileStore,
    remote: &dyn Remote,
    conversation_prefix: &str,
    max_file_bytes: u64,
) -> Result<FilesTakenIn, ReplicateError> {
    let pending: HashSet<String> = files.pending().await?.into_iter().map(|p| p.path).collect();
    let objects: Vec<(String, remote::ObjectInfo)> = remote::list_all(remote, conversation_prefix)
        .await?
        .into_iter()
        .filter_map(|o| {
            let rel = o.key.strip_prefix(conversation_prefix)?.to_string();
            files::is_file_store_key(&rel).then_some((rel, o))
        })
        .collect();
    let in_remote: HashSet<&str> = objects.iter().map(|(rel, _)| rel.as_str()).collect();
    let mut out = FilesTakenIn {
        replaced_files: Vec::new(),
        removed_files: files
            .list("")
            .await?
            .into_iter()
            .filter(|p| !in_remote.contains(p.as_str()) && !pending.contains(p))
            .collect(),
    };
    let kept = files.take_in(Vec::new(), out.removed_files.clone()).await?;
    out.removed_files.retain(|p| !kept.contains(p));
    let mut batch: Vec<(String, Vec<u8>)> = Vec::new();
    let mut batch_bytes = 0usize;
    for (rel, o) in &objects {
        let rel = rel.as_str();
        if o.size > max_file_bytes {
            continue;
        }
        let ours = files.get(rel).await?;
        // The same content, as the listing's ETag says (the MD5 of an object uploaded
        // whole): nothing to download. Any other ETag (none, a multipart one, SSE-KMS)
        // is no answer, and the content is compared.
        if let (Some(ours), Some(etag)) = (&ours, &o.etag)
            && ours.len() as u64 == o.size
            && remote::md5_etag(ours) == *etag
        {
            continue;
        }
        let theirs = match read_file_retrying(remote, &o.key, max_file_bytes).await {
            Ok(Some(data)) => data,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(key = %o.key, error = %e, "cannot read the remote copy of a file: the file here is kept as it is");
                continue;
            }
        };
        if ours.as_deref() == Some(&theirs[..]) {
            continue;
        }
        if pending.contains(rel) {
            tracing::warn!(
                path = rel,
                "a file changed here since its last upload differs from its remote copy: this store's change is kept and uploaded over it"
            );
            continue;
        }
        batch_bytes += theirs.len();
        out.replaced_files.push(rel.to_string());
        batch.push((rel.to_string(), theirs.to_vec()));
        if batch_bytes >= IMPORT_BATCH_BYTES {
            let kept = files
                .take_in(std::mem::take(&mut batch), Vec::new())
                .await?;
            out.replaced_files.retain(|p| !kept.contains(p));
            batch_bytes = 0;
        }
    }
    let kept = files.take_in(batch, Vec::new()).await?;
    out.replaced_files.retain(|p| !kept.contains(p));
    if !out.replaced_files.is_empty() || !out.removed_files.is_empty() {
        tracing::warn!(
            replaced = out.replaced_files.len(),
            removed = out.removed_files.len(),
            "another daemon changed the file store while it owned the conversation: its files are taken in"
        );
    }
    Ok(out)
}

/// Whose the remote export of a namespace is, judged by [`take_in_unless_ours`].
enum RemoteExport {
    /// This store's last export (its version).
    Ours(u64),
    /// Another daemon's: it replaced the namespace here.
    TakenIn,
    /// Not readable with this store's key (or damaged).
    Unreadable(String),
}

/// Judges the remote export `theirs` (the object with `their_etag`) of `ns`: one
/// exported from this database (it carries its id), or at the version this store
/// exported last (an import's), is this store's own, even when its upload was never
/// recorded here (its answer was lost, or the daemon was killed before it recorded
/// it): this store holds everything in it. Any other was written by another daemon
/// while it owned the conversation, and replaces the namespace here (the local changes
/// since this store's last export are dropped).
async fn take_in_unless_ours(
    kv: &KvStore,
    ns: &str,
    theirs: &[u8],
    their_etag: &str,
    exported: Option<u64>,
) -> Result<RemoteExport, ReplicateError> {
    match kv.export_origin(ns, theirs) {
        Ok((v, from_here)) if from_here || Some(v) == exported => Ok(RemoteExport::Ours(v)),
        Ok((v, _)) => {
            tracing::warn!(
                namespace = ns,
                remote_version = v,
                last_exported = ?exported,
                "another daemon exported this kv namespace while it owned the conversation: its export replaces this store's namespace (local changes since this store's last export are dropped)"
            );
            kv.replace_with_export(ns, theirs, their_etag).await?;
            Ok(RemoteExport::TakenIn)
        }
        Err(why) => Ok(RemoteExport::Unreadable(why)),
    }
}

/// Reads a file store object, retrying with backoff while remote storage does not
/// answer; another failure (permissions, an archived object) is returned at once.
async fn read_file_retrying(
    remote: &dyn Remote,
    key: &str,
    max: u64,
) -> Result<Option<Bytes>, RemoteError> {
    read_retrying(remote, key, max, |e| {
        matches!(e, RemoteError::Transport { .. })
    })
    .await
}

/// Reads an object of at most `max` bytes to restore, retrying with backoff while it
/// fails with an error `retry` accepts; `Ok(None)` when the object is gone.
async fn read_retrying(
    remote: &dyn Remote,
    key: &str,
    max: u64,
    retry: impl Fn(&RemoteError) -> bool,
) -> Result<Option<Bytes>, RemoteError> {
    remote::retrying(
        "cannot read an object to restore (the daemon is not ready until it can)",
        || remote.get_bytes_within(key, max),
        retry,
    )
    .await
}

/// Copies an export that cannot be read to [`remote::unreadable_key`], retrying with backoff;
/// `None` when this daemon may not write (it does not own the conversation, so its
/// exports cannot overwrite the original either).
async fn keep_aside(remote: &dyn Remote, key: &str, bytes: Bytes) -> Result<String, RemoteError> {
    let aside = remote::unreadable_key(key, &bytes);
    // Retried while remote storage does not answer; a refusal (a policy, a quota) is
    // no reason to hold every other namespace back: the caller leaves the export as
    // it is and says so.
    let kept = remote::retrying(
        "cannot keep a copy of an unreadable kv export yet",
        || remote.put_bytes(&aside, bytes.clone()),
        |e| matches!(e, RemoteError::Transport { .. }),
    )
    .await;
    match kept {
        Ok(()) => Ok(aside),
        Err(e) => {
            tracing::warn!(key, error = %e, "cannot keep a copy of an unreadable kv export");
            Err(e)
        }
    }
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

    fn options(dir: &std::path::Path) -> StoreOptions {
        StoreOptions {
            path: dir.join("db.redb"),
            cipher: Cipher::new(&[9; 32]),
            limits: Limits {
                max_value_bytes: 1 << 16,
                max_namespace_bytes: 1 << 24,
            },
            queue_capacity: 64,
        }
    }

    fn store(dir: &std::path::Path) -> KvStore {
        KvStore::open(options(dir)).unwrap()
    }

    /// A running replicator (exporting only when flushed) and what stops it.
    fn start_replicator(
        kv: &KvStore,
        files: &FileStore,
        remote: Arc<dyn Remote>,
    ) -> (
        ReplicaHandle,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (rep, handle) = Replicator::new(
            kv.clone(),
            files.clone(),
            remote,
            PREFIX.into(),
            Duration::from_secs(3600),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(rep.run(stop.clone()));
        (handle, stop, task)
    }

    /// Restores `remote` into a new state directory `dir/name`.
    async fn restore_into(
        dir: &std::path::Path,
        name: &str,
        remote: &dyn Remote,
    ) -> (KvStore, FileStore, StoresRestored) {
        let state = dir.join(name);
        std::fs::create_dir(&state).unwrap();
        let kv = store(&state);
        let files = FileStore::new(kv.clone());
        let r = restore_stores(&kv, &files, remote, PREFIX, 1 << 20)
            .await
            .unwrap();
        (kv, files, r)
    }

    /// The verify's listing finds exactly the objects deleted behind the replicator:
    /// exports and file store objects, by a listing per top-level name or, past
    /// [`MAX_VERIFY_LISTINGS`] of them, by one of the whole conversation; and nothing
    /// once everything is there again.
    #[tokio::test]
    async fn a_verify_finds_the_objects_deleted_behind_it() {
        for top_level in [3, MAX_VERIFY_LISTINGS + 5] {
            let tmp = tempfile::tempdir().unwrap();
            let remote: Arc<dyn Remote> = Arc::new(DirRemote::new(&tmp.path().join("r")).unwrap());
            let kv = store(tmp.path());
            let files = FileStore::new(kv.clone());
            set(&kv, "a", "k", json!(1)).await;
            set(&kv, "b", "k", json!(2)).await;
            for i in 0..top_level {
                files
                    .put(&format!("t{i}.json"), Bytes::from("{}"), false)
                    .await
                    .unwrap();
            }
            files
                .put("events/e1", Bytes::from("x"), false)
                .await
                .unwrap();
            files
                .put("events/deep/e2", Bytes::from("y"), false)
                .await
                .unwrap();
            let (rep, _handle) = Replicator::new(
                kv.clone(),
                files.clone(),
                remote.clone(),
                PREFIX.into(),
                Duration::from_secs(3600),
            );
            let mut forced = BTreeSet::new();
            rep.pass(&mut forced).await.unwrap();
            let listing = rep.start_verify().await.unwrap().unwrap();
            assert!(listing.namespaces.is_empty() && listing.files.is_empty());

            let gone = [
                export_key(PREFIX, "b"),
                format!("{PREFIX}t1.json"),
                format!("{PREFIX}events/deep/e2"),
            ];
            remote.delete_many(&gone).await.unwrap();
            let listing = rep.start_verify().await.unwrap().unwrap();
            assert_eq!(listing.namespaces, ["b"], "{top_level}");
            assert_eq!(listing.files, ["events/deep/e2", "t1.json"], "{top_level}");
            assert!(rep.apply_verify(listing, &mut forced).await);
            assert_eq!(forced, BTreeSet::from(["b".to_string()]));
            assert_eq!(files.pending().await.unwrap().len(), 2);

            let stats = rep.pass(&mut forced).await.unwrap();
            assert_eq!((stats.namespaces, stats.files_uploaded), (1, 2));
            assert!(forced.is_empty());
            for key in &gone {
                assert!(remote.head(key).await.unwrap().is_some(), "{key}");
            }
            let listing = rep.start_verify().await.unwrap().unwrap();
            assert!(listing.namespaces.is_empty() && listing.files.is_empty());
        }
    }

    /// While the gate is shut (the conversation not owned, or another daemon's changes
    /// still to take in) a missing object is not uploaded again: it may be one that
    /// daemon deleted. Once it opens, the next listing finds it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_verify_acts_while_the_gate_is_shut() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let tmp = tempfile::tempdir().unwrap();
        let remote: Arc<dyn Remote> = Arc::new(DirRemote::new(&tmp.path().join("r")).unwrap());
        let kv = store(tmp.path());
        let files = FileStore::new(kv.clone());
        files
            .put("events/e1", Bytes::from("x"), false)
            .await
            .unwrap();
        let epoch = Arc::new(AtomicU64::new(0));
        let gate: VerifyGate = {
            let epoch = epoch.clone();
            Arc::new(move || Some(epoch.load(Ordering::SeqCst)).filter(|&e| e > 0))
        };
        let (rep, handle) = Replicator::new(
            kv.clone(),
            files.clone(),
            remote.clone(),
            PREFIX.into(),
            Duration::from_secs(3600),
        );
        let rep = rep.verify_every(Duration::from_secs(1), gate);
        let stop = CancellationToken::new();
        let task = tokio::spawn(rep.run(stop.clone()));
        handle.flush().await.unwrap();
        let key = format!("{PREFIX}events/e1");
        remote
            .delete_many(std::slice::from_ref(&key))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            remote.head(&key).await.unwrap().is_none(),
            "uploaded again while shut"
        );
        assert!(files.pending().await.unwrap().is_empty());
        epoch.store(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while remote.head(&key).await.unwrap().is_none() {
            assert!(Instant::now() < deadline, "never uploaded again once open");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.cancel();
        task.await.unwrap();
    }

    async fn set(kv: &KvStore, ns: &str, key: &str, value: serde_json::Value) {
        let op = Op::Set {
            key: key.into(),
            value: value.into(),
            nx: false,
            xx: false,
            if_version: None,
            ttl: None,
            keep_ttl: false,
            get: false,
        };
        kv.write(ns, BatchRequest::single(op), false).await.unwrap();
    }

    /// A returning store takes in the files another daemon changed, added and deleted;
    /// a path with a change of its own pending keeps that change.
    #[tokio::test]
    async fn a_returning_file_store_takes_in_the_remote_files_but_keeps_its_pending_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir: Arc<dyn Remote> = Arc::new(DirRemote::new(&tmp.path().join("remote")).unwrap());
        let remote = FlakyRemote::new(dir);
        // As S3: a file whose ETag says it holds what this store has is not read.
        remote.set_etags_in_listings(true);
        let kv = store(tmp.path());
        let files = FileStore::new(kv.clone());
        let put = |path: &'static str, data: &'static [u8]| {
            let files = files.clone();
            async move {
                files
                    .put(path, Bytes::from_static(data), false)
                    .await
                    .unwrap()
            }
        };
        for path in ["same", "changed", "deleted", "mine-changed", "mine-deleted"] {
            put(path, b"uploaded").await;
        }
        files
            .mark_synced(files.pending().await.unwrap())
            .await
            .unwrap();
        // Changes of this store's own since its last upload.
        put("mine-changed", b"mine").await;
        put("mine-new", b"mine").await;
        files.delete("mine-deleted").await.unwrap();
        // What the other daemon left in remote storage.
        for (path, data) in [
            ("same", &b"uploaded"[..]),
            ("changed", b"theirs"),
            ("added", b"theirs"),
            ("mine-changed", b"theirs"),
            ("mine-deleted", b"theirs"),
            ("too-big", b"theirs, over the limit"),
            ("workspace/files/x", b"not the file store's"),
        ] {
            let key = format!("{PREFIX}{path}");
            remote
                .put_bytes(&key, Bytes::from_static(data))
                .await
                .unwrap();
        }

        let r = take_in_remote_files(&files, &remote, PREFIX, 10)
            .await
            .unwrap();
        assert_eq!(r.replaced_files, vec!["added", "changed"]);
        assert_eq!(r.removed_files, vec!["deleted"]);
        // added, changed, mine-changed, mine-deleted; not same (nor too-big).
        assert_eq!(remote.reads.load(std::sync::atomic::Ordering::SeqCst), 4);
        let got = |path: &'static str| {
            let files = files.clone();
            async move { files.get(path).await.unwrap() }
        };
        assert_eq!(got("same").await.as_deref(), Some(&b"uploaded"[..]));
        assert_eq!(got("changed").await.as_deref(), Some(&b"theirs"[..]));
        assert_eq!(got("added").await.as_deref(), Some(&b"theirs"[..]));
        assert_eq!(got("deleted").await, None);
        assert_eq!(got("mine-changed").await.as_deref(), Some(&b"mine"[..]));
        assert_eq!(got("mine-new").await.as_deref(), Some(&b"mine"[..]));
        assert_eq!(got("mine-deleted").await, None);
        assert_eq!(got("too-big").await, None);
        // This store's own changes are still to be uploaded; nothing taken in is.
        let mut pending: Vec<String> = files
            .pending()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.path)
            .collect();
        pending.sort();
        assert_eq!(pending, vec!["mine-changed", "mine-deleted", "mine-new"]);
    }

    /// An export that reached remote storage without this store hearing so (its answer
    /// lost, so the retry finds another object there; or the daemon killed before it
    /// recorded it) is still this store's own: the next export writes over it, and
    /// the writes made since are kept, not dropped for it.
    #[tokio::test]
    async fn an_export_stored_without_an_answer_is_still_this_stores() {
        let tmp = tempfile::tempdir().unwrap();
        let dir: Arc<dyn Remote> = Arc::new(DirRemote::new(&tmp.path().join("remote")).unwrap());
        let remote = Arc::new(FlakyRemote::new(dir.clone()));
        let kv = store(tmp.path());
        let files = FileStore::new(kv.clone());
        let (rep, _handle) = Replicator::new(
            kv.clone(),
            files,
            remote.clone(),
            PREFIX.into(),
            Duration::from_secs(3600),
        );
        let exported = |v: u64| {
            let dir = dir.clone();
            let kv = kv.clone();
            async move {
                let key = export_key(PREFIX, "ns");
                let bytes = dir.get_bytes(&key).await.unwrap().unwrap();
                assert_eq!(kv.export_origin("ns", &bytes).unwrap(), (v, true));
            }
        };
        set(&kv, "ns", "k1", json!(1)).await;
        assert!(rep.export_namespace("ns").await.unwrap().is_some());

        // Stored, but the answer is lost.
        set(&kv, "ns", "k2", json!(2)).await;
        remote.lose_next_answers(1);
        assert!(rep.export_namespace("ns").await.is_err());
        exported(2).await;
        set(&kv, "ns", "k3", json!(3)).await;
        assert!(rep.export_namespace("ns").await.unwrap().is_some());
        exported(3).await;

        // Stored by a daemon killed before it recorded it (as it uploads it).
        set(&kv, "ns", "k4", json!(4)).await;
        let export = kv.export("ns").await.unwrap();
        dir.put_bytes(&export_key(PREFIX, "ns"), export.bytes.into())
            .await
            .unwrap();
        set(&kv, "ns", "k5", json!(5)).await;
        assert_eq!(
            take_in_newer_exports(&kv, remote.as_ref(), PREFIX)
                .await
                .unwrap(),
            Vec::<String>::new()
        );
        assert!(rep.export_namespace("ns").await.unwrap().is_some());
        exported(5).await;

        for (key, value) in [("k1", 1), ("k2", 2), ("k3", 3), ("k4", 4), ("k5", 5)] {
            let got = kv.get("ns", key).await.unwrap();
            assert_eq!(got.map(|r| r.value), Some(json!(value)), "{key}");
        }
    }

    /// A take-in runs while the API serves: a client's write made after it looked at
    /// what was pending (so that it would replace or remove that path) is kept, to be
    /// uploaded; a path with nothing pending takes the remote state in.
    #[tokio::test]
    async fn a_take_in_keeps_the_writes_made_while_it_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let kv = store(tmp.path());
        let files = FileStore::new(kv.clone());
        for path in ["a", "b"] {
            files
                .put(path, Bytes::from_static(b"mine"), false)
                .await
                .unwrap();
        }
        let theirs = || vec![("a".to_string(), b"theirs".to_vec())];
        let kept = files.take_in(theirs(), vec!["b".into()]).await.unwrap();
        assert_eq!(kept, ["b", "a"]);
        assert_eq!(files.get("a").await.unwrap().as_deref(), Some(&b"mine"[..]));
        assert_eq!(files.get("b").await.unwrap().as_deref(), Some(&b"mine"[..]));
        assert_eq!(files.pending().await.unwrap().len(), 2);

        files
            .mark_synced(files.pending().await.unwrap())
            .await
            .unwrap();
        let kept = files.take_in(theirs(), vec!["b".into()]).await.unwrap();
        assert!(kept.is_empty());
        assert_eq!(
            files.get("a").await.unwrap().as_deref(),
            Some(&b"theirs"[..])
        );
        assert_eq!(files.get("b").await.unwrap(), None);
        assert!(files.pending().await.unwrap().is_empty());
    }

    /// A namespace whose export keeps failing does not hold the other namespaces or
    /// the file store back; the pass still fails (and is retried) for it.
    #[tokio::test]
    async fn one_namespace_that_cannot_be_exported_holds_no_other_back() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("remote");
        let dir: Arc<dyn Remote> = Arc::new(DirRemote::new(&root).unwrap());
        // A directory where `bad`'s export goes: no write there can succeed.
        let in_the_way = root.join(export_key(PREFIX, "bad")).join("x");
        std::fs::create_dir_all(&in_the_way).unwrap();
        let kv = store(tmp.path());
        let files = FileStore::new(kv.clone());
        let (handle, stop, task) = start_replicator(&kv, &files, dir.clone());
        assert_eq!(handle.flush().await.unwrap(), PassStats::default());
        set(&kv, "bad", "k", json!(1)).await;
        set(&kv, "good", "k", json!(2)).await;
        files
            .put("events/e1", Bytes::from_static(b"e1"), false)
            .await
            .unwrap();
        let flushed = tokio::time::timeout(Duration::from_secs(3), handle.flush()).await;
        assert!(flushed.is_err(), "a flush with bad unexported returned");
        let good = dir.get_bytes(&export_key(PREFIX, "good")).await.unwrap();
        assert!(good.is_some(), "good was not exported");
        let event = dir.get_bytes(&format!("{PREFIX}events/e1")).await.unwrap();
        assert_eq!(event.as_deref(), Some(&b"e1"[..]));
        assert!(handle.status().last_error.is_some());
        stop.cancel();
        task.await.unwrap();
    }

    /// An object at an export's key too large to be an export (a sparse file here) is
    /// refused before it is read: the restore reports it at once instead of retrying
    /// it, restores the rest, and an export of the namespace from here does not write
    /// over it (nor does a take-in fail on it).
    #[tokio::test]
    async fn an_export_too_large_to_read_is_reported_and_not_written_over() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("remote");
        let dir: Arc<dyn Remote> = Arc::new(DirRemote::new(&root).unwrap());
        let old = tmp.path().join("old");
        std::fs::create_dir(&old).unwrap();
        let src = store(&old);
        set(&src, "good", "k1", json!(1)).await;
        let good = src.export("good").await.unwrap();
        dir.put_bytes(&export_key(PREFIX, "good"), good.bytes.into())
            .await
            .unwrap();
        let huge_key = export_key(PREFIX, "huge");
        let huge = root.join(&huge_key);
        std::fs::create_dir_all(huge.parent().unwrap()).unwrap();
        let f = std::fs::File::create(&huge).unwrap();
        f.set_len(MAX_OBJECT + 1).unwrap();

        let restored = restore_into(tmp.path(), "new", dir.as_ref());
        let (kv, files, r) = tokio::time::timeout(Duration::from_secs(20), restored)
            .await
            .expect("the restore does not retry an object too large to read");
        assert_eq!((r.namespaces, r.keys), (1, 1));
        assert_eq!(r.bad.len(), 1, "{:?}", r.bad);
        assert_eq!(r.bad[0].key, huge_key);
        assert!(r.bad[0].error.contains("larger than"), "{:?}", r.bad);
        assert_eq!(r.bad[0].kept_as, None);
        assert_eq!(
            take_in_newer_exports(&kv, dir.as_ref(), PREFIX)
                .await
                .unwrap(),
            Vec::<String>::new()
        );

        set(&kv, "huge", "k", json!(2)).await;
        let (handle, stop, task) = start_replicator(&kv, &files, dir.clone());
        let flushed = tokio::time::timeout(Duration::from_secs(3), handle.flush()).await;
        assert!(flushed.is_err(), "a flush with huge unexported returned");
        let error = handle.status().last_error.unwrap_or_default();
        assert!(error.contains("larger than"), "{error}");
        assert_eq!(std::fs::metadata(&huge).unwrap().len(), MAX_OBJECT + 1);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn flush_waits_through_an_outage_and_redoes_nothing_finished() {
        let tmp = tempfile::tempdir().unwrap();
        let dir: Arc<dyn Remote> = Arc::new(DirRemote::new(&tmp.path().join("remote")).unwrap());
        let flaky = Arc::new(FlakyRemote::new(dir.clone()));
        let kv = store(tmp.path());
        let files = FileStore::new(kv.clone());
        let (handle, stop, task) = start_replicator(&kv, &files, flaky.clone());
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

    /// After a long outage the retries are far apart; a flush does not wait for the
    /// next one: it gets a pass at once.
    /// A replicator with a change of `ns1` to export, a flush waiting for it (`first`),
    /// and two minutes of outage behind: the backoff alone reaches its cap (15 to 30 s).
    struct AfterAnOutage {
        _tmp: tempfile::TempDir,
        flaky: Arc<FlakyRemote>,
        handle: ReplicaHandle,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        first: tokio::task::JoinHandle<Result<PassStats, ReplicateError>>,
    }

    async fn after_an_outage() -> AfterAnOutage {
        let tmp = tempfile::tempdir().unwrap();
        let dir: Arc<dyn Remote> = Arc::new(DirRemote::new(&tmp.path().join("remote")).unwrap());
        let flaky = Arc::new(FlakyRemote::new(dir.clone()));
        let kv = store(tmp.path());
        let files = FileStore::new(kv.clone());
        let (handle, stop, task) = start_replicator(&kv, &files, flaky.clone());
        handle.flush().await.unwrap();
        flaky.set_down(true);
        set(&kv, "ns1", "k", json!(1)).await;
        let first = tokio::spawn({
            let handle = handle.clone();
            async move { handle.flush().await }
        });
        tokio::time::sleep(Duration::from_secs(120)).await;
        AfterAnOutage {
            _tmp: tmp,
            flaky,
            handle,
            stop,
            task,
            first,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_after_an_outage_does_not_wait_for_the_backoff() {
        use std::sync::atomic::Ordering::SeqCst;
        let AfterAnOutage {
            _tmp,
            flaky,
            handle,
            stop,
            task,
            first,
        } = after_an_outage().await;
        // Just after a failed pass, the remote comes back.
        let refused = flaky.refused.load(SeqCst);
        while flaky.refused.load(SeqCst) == refused {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        flaky.set_down(false);
        // Real time from here (the pass does blocking I/O, which paused time would
        // skip over).
        tokio::time::resume();
        let s = tokio::time::timeout(Duration::from_secs(5), handle.flush())
            .await
            .expect("the flush waited for the backoff")
            .unwrap();
        assert_eq!(s.namespaces, 1);
        assert!(first.await.unwrap().is_ok());
        stop.cancel();
        task.await.unwrap();
    }

    /// A flush waiting through a long outage (the final sync's) is retried every 2 s
    /// at most, not after a backoff grown to tens of seconds: it is answered soon after
    /// the remote is back.
    #[tokio::test(start_paused = true)]
    async fn a_flush_waiting_through_an_outage_is_answered_soon_after_it() {
        let AfterAnOutage {
            _tmp,
            flaky,
            handle: _handle,
            stop,
            task,
            first: waiting,
        } = after_an_outage().await;
        flaky.set_down(false);
        tokio::time::resume();
        let s = tokio::time::timeout(Duration::from_secs(4), waiting)
            .await
            .expect("the waiting flush was not retried within 2 s")
            .unwrap()
            .unwrap();
        assert_eq!(s.namespaces, 1);
        stop.cancel();
        task.await.unwrap();
    }

    /// An unreadable export (another key's) whose copy remote storage refuses to keep
    /// is left as it is: that namespace's export fails (to be retried), without
    /// holding the pass up; once the copy can be kept, it is written over.
    #[tokio::test]
    async fn an_unreadable_export_that_cannot_be_kept_aside_is_not_written_over() {
        let tmp = tempfile::tempdir().unwrap();
        let dir: Arc<dyn Remote> = Arc::new(DirRemote::new(&tmp.path().join("remote")).unwrap());
        let remote = Arc::new(FlakyRemote::new(dir.clone()));
        let foreign = KvStore::open(StoreOptions {
            path: tmp.path().join("foreign.redb"),
            cipher: Cipher::new(&[7; 32]),
            ..options(tmp.path())
        })
        .unwrap();
        set(&foreign, "ns", "k", json!(1)).await;
        let sealed_elsewhere = Bytes::from(foreign.export("ns").await.unwrap().bytes);
        let key = export_key(PREFIX, "ns");
        dir.put_bytes(&key, sealed_elsewhere.clone()).await.unwrap();
        let kv = store(tmp.path());
        set(&kv, "ns", "k", json!(2)).await;
        let (rep, _handle) = Replicator::new(
            kv.clone(),
            FileStore::new(kv.clone()),
            remote.clone(),
            PREFIX.into(),
            Duration::from_secs(3600),
        );
        // The copy's key is refused by the service (a policy, say).
        let kept = remote::unreadable_key(&key, &sealed_elsewhere);
        remote.set_refused_under(Some(&kept));
        let tried = tokio::time::timeout(Duration::from_secs(5), rep.export_namespace("ns"))
            .await
            .expect("a refusal is not retried for ever");
        assert!(tried.is_err());
        assert_eq!(
            dir.get_bytes(&key).await.unwrap(),
            Some(sealed_elsewhere.clone())
        );
        assert_eq!(dir.get_bytes(&kept).await.unwrap(), None);
        remote.set_refused_under(None);
        assert!(rep.export_namespace("ns").await.unwrap().is_some());
        assert_eq!(
            dir.get_bytes(&kept).await.unwrap(),
            Some(sealed_elsewhere.clone())
        );
        assert_ne!(dir.get_bytes(&key).await.unwrap(), Some(sealed_elsewhere));
    }

    /// A new state directory's restore: reads that fail are retried (a namespace left
    /// out would be overwritten by the first export), an export sealed with another key
    /// is reported and kept beside itself (and survives the new daemon's export of the
    /// namespace), a restore that runs again counts what it already imported, and a
    /// file the service refuses is reported while a refused export is waited for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restore_retries_reads_keeps_unreadable_exports_and_runs_again() {
        let tmp = tempfile::tempdir().unwrap();
        let dir: Arc<dyn Remote> = Arc::new(DirRemote::new(&tmp.path().join("remote")).unwrap());
        let old = tmp.path().join("old");
        std::fs::create_dir(&old).unwrap();
        let src = store(&old);
        set(&src, "good", "k1", json!(1)).await;
        set(&src, "good", "k2", json!("two")).await;
        let good = src.export("good").await.unwrap();
        dir.put_bytes(&export_key(PREFIX, "good"), good.bytes.into())
            .await
            .unwrap();
        let foreign = KvStore::open(StoreOptions {
            path: tmp.path().join("foreign.redb"),
            cipher: Cipher::new(&[7; 32]),
            ..options(tmp.path())
        })
        .unwrap();
        set(&foreign, "other", "k", json!(2)).await;
        let sealed_elsewhere = Bytes::from(foreign.export("other").await.unwrap().bytes);
        let other_key = export_key(PREFIX, "other");
        dir.put_bytes(&other_key, sealed_elsewhere.clone())
            .await
            .unwrap();
        dir.put_bytes(&format!("{PREFIX}events/e1"), Bytes::from_static(b"e1"))
            .await
            .unwrap();

        let flaky = Arc::new(FlakyRemote::new(dir.clone()));
        flaky.fail_next_of("get", 2);
        let (kv, files, r) = restore_into(tmp.path(), "new", flaky.as_ref()).await;
        assert_eq!(flaky.refused.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!((r.namespaces, r.keys, r.files), (1, 2, 1));
        assert_eq!(r.bad.len(), 1, "{:?}", r.bad);
        assert_eq!(r.bad[0].key, other_key);
        assert!(
            r.bad[0].error.contains("cannot be decrypted"),
            "{:?}",
            r.bad
        );
        let kept = r.bad[0].kept_as.clone().expect("a copy was kept");
        assert!(
            kept.starts_with(&format!("{other_key}.unreadable-")),
            "{kept}"
        );
        assert_eq!(
            dir.get_bytes(&kept).await.unwrap(),
            Some(sealed_elsewhere.clone())
        );
        assert_eq!(
            kv.get("good", "k2").await.unwrap().unwrap().value,
            json!("two")
        );
        assert_eq!(kv.ns_meta("other").await.unwrap().version, 0);

        // Run again (as after a restart in the middle): nothing is imported twice and
        // the kept copy is not taken for an export.
        let again = restore_stores(&kv, &files, dir.as_ref(), PREFIX, 1 << 20)
            .await
            .unwrap();
        assert_eq!((again.namespaces, again.keys, again.files), (1, 2, 1));
        assert_eq!(again.bad.len(), 1);
        assert_eq!(again.bad[0].kept_as.as_ref(), Some(&kept));
        let listed = remote::list_all(dir.as_ref(), PREFIX).await.unwrap();
        assert_eq!(listed.len(), 4, "{listed:?}"); // two exports, one copy, one file

        // The new daemon's first export of `other` replaces the original; the copy stays.
        set(&kv, "other", "new", json!(3)).await;
        let (handle, stop, task) = start_replicator(&kv, &files, dir.clone());
        handle.flush().await.unwrap();
        stop.cancel();
        task.await.unwrap();
        assert_ne!(
            dir.get_bytes(&other_key).await.unwrap(),
            Some(sealed_elsewhere.clone())
        );
        assert_eq!(dir.get_bytes(&kept).await.unwrap(), Some(sealed_elsewhere));

        // Refusals (not transient): a file is reported and skipped; a KV export is
        // waited for. The objects come in key order: events/e1, then kv/good.kv.
        let flaky = Arc::new(FlakyRemote::new(dir.clone()));
        flaky.refuse_next_of("get", 3);
        let (_, _, r) = restore_into(tmp.path(), "third", flaky.as_ref()).await;
        assert_eq!(flaky.refused.load(std::sync::atomic::Ordering::SeqCst), 3);
        // `other.kv` is the new daemon's export by now, sealed with this key.
        assert_eq!((r.namespaces, r.keys, r.files), (2, 3, 0));
        assert_eq!(r.bad.len(), 1, "{:?}", r.bad);
        assert_eq!(r.bad[0].key, format!("{PREFIX}events/e1"));
        assert_eq!(r.bad[0].kept_as, None);
    }
}
