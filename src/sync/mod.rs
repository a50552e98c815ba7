//! Continuous workspace sync: watch → debounce → rounds that upload what changed,
//! publish the manifest, then delete what is gone.
//!
//! - [`rules`]: which paths are mirrored.
//! - [`watcher`]: inotify watches, feeding a bounded channel.
//! - [`debounce`]: when the next round may start.
//! - [`scan`]: walking and hashing.
//! - [`manifest`]: the manifest and its local cache.
//!
//! One task (the engine) owns all sync state and runs rounds one at a time; the API
//! talks to it through [`SyncHandle`]. A round never lets the remote manifest name an
//! object that does not exist: uploads first, then the manifest, then deletions.

pub mod debounce;
pub mod manifest;
pub mod rules;
pub mod scan;
pub mod watcher;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::config::{Config, WatchMode};
use crate::metrics::Metrics;
use crate::remote::{self, Backoff, Remote, RemoteError};
use debounce::Debouncer;
use manifest::{FileEntry, Manifest, ManifestCache};
use rules::Rules;
use scan::{Limits, Stat};
use watcher::{EventSink, NativeWatcher, RawEvent};

/// Events buffered between notify's thread and the engine before it falls back to a
/// full rescan.
const EVENT_QUEUE: usize = 65_536;
/// Deletions held back by the mass-delete guard need at least this many files.
const MASS_DELETE_MIN: usize = 100;
/// Rounds run at most after the first before waiters are answered (or kept waiting).
const MAX_EXTRA_ROUNDS: usize = 3;
/// What a listing of the remote mirror found ([`SyncEngine::start_verify`]).
struct VerifyListing {
    /// Manifest entries (path, hash when listed) whose object is gone or has another
    /// size.
    missing: Vec<(String, String)>,
    manifest_seen: bool,
}

/// The first comparison of the mirror with the manifest comes this long after start
/// (or `sync.verify_interval`, when shorter): not in the way of the startup reconcile.
const FIRST_VERIFY: Duration = Duration::from_secs(60);
/// A comparison that failed (an outage) is tried again this soon (or at the interval).
const VERIFY_RETRY: Duration = Duration::from_secs(60);

/// When the next listing of remote storage is due, for what was written there to be
/// compared with what the daemon knows it wrote (`sync.verify_interval`: the mirror,
/// the KV exports and file store, the git bundles): [`FIRST_VERIFY`] after start (or
/// the interval, when shorter), then every interval; [`VERIFY_RETRY`] after one that
/// failed. Never with an interval of zero.
pub(crate) struct VerifySchedule {
    every: Option<Duration>,
    at: Option<Instant>,
}

impl VerifySchedule {
    pub(crate) fn new(interval: Duration) -> Self {
        let every = Some(interval).filter(|d| !d.is_zero());
        Self {
            every,
            at: every.map(|d| Instant::now() + d.min(FIRST_VERIFY)),
        }
    }

    /// Whether a listing is due now; if so, the next is due an interval later.
    pub(crate) fn take_due(&mut self) -> bool {
        let now = Instant::now();
        match (self.at, self.every) {
            (Some(at), Some(every)) if now >= at => {
                self.at = Some(now + every);
                true
            }
            _ => false,
        }
    }

    /// After a listing that failed (or could not be taken): the next comes sooner.
    pub(crate) fn retry(&mut self) {
        if let Some(every) = self.every {
            self.at = Some(Instant::now() + every.min(VERIFY_RETRY));
        }
    }

    /// When the next listing is due (`None`: never).
    pub(crate) fn next(&self) -> Option<Instant> {
        self.at
    }
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum SyncError {
    #[error("the workspace is missing or unreadable: {0}")]
    WorkspaceUnavailable(String),
    #[error("remote storage: {0}")]
    Remote(String),
    /// The daemon's own side failed (its sync state database, scanning the tree):
    /// retried with backoff like a remote failure.
    #[error("{0}")]
    Local(String),
    /// New entries wait for a delete guard (nothing failed: retried at the pace of
    /// the debounce, not with the backoff of a failing remote).
    #[error("{0}")]
    Held(String),
    #[error("the sync engine has stopped")]
    Stopped,
}

/// The error for reading the workspace root that failed with `e`: the workspace is
/// unavailable (missing, closed to the daemon, an I/O error), unless the daemon is
/// short of something (file descriptors, memory), which says nothing of the workspace:
/// a local failure, retried with backoff.
fn root_error(e: &std::io::Error, message: String) -> SyncError {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::EINTR) => {
            SyncError::Local(message)
        }
        _ => SyncError::WorkspaceUnavailable(message),
    }
}

/// What one or more rounds did, as `POST /v1/sync` reports it.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RoundStats {
    pub files_uploaded: u64,
    pub files_deleted: u64,
    pub bytes_uploaded: u64,
    pub duration_ms: u64,
}

impl RoundStats {
    /// What two rounds did together.
    fn plus(self, o: RoundStats) -> RoundStats {
        RoundStats {
            files_uploaded: self.files_uploaded + o.files_uploaded,
            files_deleted: self.files_deleted + o.files_deleted,
            bytes_uploaded: self.bytes_uploaded + o.bytes_uploaded,
            duration_ms: self.duration_ms + o.duration_ms,
        }
    }
}

/// The sync part of `GET /v1/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncStatus {
    pub pending_files: u64,
    pub full_rescan_pending: bool,
    pub last_sync_at: Option<String>,
    pub lag_ms: u64,
    pub debounce_ms: u64,
    pub burst: bool,
    pub last_error: Option<String>,
    pub degraded: bool,
    pub workspace_available: bool,
    pub watch_mode: &'static str,
    pub generation: u64,
    pub files: u64,
    pub bytes: u64,
    pub held_deletes: u64,
    pub skipped_files: u64,
    /// When the oldest change not yet in remote storage arrived (also while a round
    /// carrying it runs): `lag_ms` is computed from it when the status is read, so it
    /// keeps growing while a round hangs.
    #[serde(skip)]
    pub oldest_change: Option<Instant>,
}

enum Command {
    Sync(Waiter),
}

/// A caller waiting for a round that carries the workspace as it is now.
struct Waiter {
    confirm_deletes: bool,
    /// Answered with [`SyncError::Held`] by a round that a guard holds back, instead
    /// of waiting for one that is not (the final sync: nobody is left to confirm).
    until_held: bool,
    reply: oneshot::Sender<Result<RoundStats, SyncError>>,
}

/// The API's handle on the engine.
#[derive(Clone)]
pub struct SyncHandle {
    tx: mpsc::Sender<Command>,
    status: Arc<Mutex<SyncStatus>>,
}

impl SyncHandle {
    /// Waits until everything changed before the call is in the remote.
    pub async fn sync(&self, confirm_deletes: bool) -> Result<RoundStats, SyncError> {
        self.ask(confirm_deletes, false).await
    }

    /// Like [`SyncHandle::sync`], but a round that a delete guard holds back answers
    /// [`SyncError::Held`] at once: for the final sync, which would otherwise wait for
    /// a `confirm_deletes` that cannot come any more.
    pub async fn sync_unless_held(&self) -> Result<RoundStats, SyncError> {
        self.ask(false, true).await
    }

    async fn ask(&self, confirm_deletes: bool, until_held: bool) -> Result<RoundStats, SyncError> {
        let (reply, rx) = oneshot::channel();
        let waiter = Waiter {
            confirm_deletes,
            until_held,
            reply,
        };
        self.tx
            .send(Command::Sync(waiter))
            .await
            .map_err(|_| SyncError::Stopped)?;
        rx.await.map_err(|_| SyncError::Stopped)?
    }

    pub fn status(&self) -> SyncStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(oldest) = s.oldest_change {
            s.lag_ms = oldest.elapsed().as_millis() as u64;
        }
        s
    }

    /// The age of the oldest change not yet in remote storage, now.
    pub fn lag(&self) -> Duration {
        Duration::from_millis(self.status().lag_ms)
    }
}

/// Object keys of one conversation's workspace.
#[derive(Clone, Debug)]
pub struct Keys {
    pub conversation: String,
}

impl Keys {
    pub fn new(config: &Config) -> Self {
        Self {
            conversation: config.conversation_prefix(),
        }
    }
    pub fn files_prefix(&self) -> String {
        format!("{}workspace/files/", self.conversation)
    }
    pub fn file(&self, rel: &str) -> String {
        format!("{}workspace/files/{rel}", self.conversation)
    }
    pub fn manifest(&self) -> String {
        format!("{}workspace/manifest.json", self.conversation)
    }
}

/// Removes every entry equal to `under` or below it; returns the removed keys.
fn remove_under<V>(map: &mut BTreeMap<String, V>, under: &str) -> Vec<String> {
    let doomed: Vec<String> = if under.is_empty() {
        map.keys().cloned().collect()
    } else {
        let below = format!("{under}/");
        map.range(under.to_string()..)
            .map(|(k, _)| k)
            .take_while(|k| {
                k.as_str() == under || k.starts_with(&below) || k.as_str() < below.as_str()
            })
            .filter(|k| k.as_str() == under || k.starts_with(&below))
            .cloned()
            .collect()
    };
    for k in &doomed {
        map.remove(k);
    }
    doomed
}

/// The last segment of a `/`-separated path.
fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Whether `set` holds a parent directory of `path`, or a path below it.
pub(crate) fn clashes(set: &BTreeSet<&str>, path: &str) -> bool {
    let parent_in_set = Path::new(path)
        .ancestors()
        .skip(1)
        .filter_map(|a| a.to_str())
        .any(|a| !a.is_empty() && set.contains(a));
    let below = format!("{path}/");
    parent_in_set
        || set
            .range(below.as_str()..)
            .next()
            .is_some_and(|q| q.starts_with(&below))
}

fn remove_under_set(set: &mut BTreeSet<String>, under: &str) {
    if under.is_empty() {
        set.clear();
        return;
    }
    set.retain(|k| !is_under(k, under));
}

/// Deletions held back by a guard.
struct Hold {
    since: Instant,
    /// `since` as Unix milliseconds, as the state directory records it.
    since_ms: u64,
    paths: BTreeSet<String>,
    /// Everything would be gone: only `confirm_deletes` lets it through.
    everything: bool,
    expiry_round_done: bool,
}

/// What happened to one changed file.
enum Outcome {
    /// Uploaded (bytes sent); `true` when from a copy of a file that changed while it
    /// was copied.
    Uploaded(String, FileEntry, u64, bool),
    /// Same content as the manifest says (only mtime or mode changed).
    MetaOnly(String, FileEntry),
    /// Changed while being read: look again next round, uploading a copy then.
    Unstable(String),
    /// Vanished, or changed during the upload: look again next round.
    Retry(String),
    /// The daemon may not read it: skipped (what the mirror holds of it is kept).
    Unreadable(String),
    Failed(String, RemoteError),
}

/// What a running round carries: still pending as far as the status goes.
#[derive(Clone, Copy)]
struct InFlight {
    /// When the oldest change it carries arrived.
    since: Instant,
    files: u64,
    full_rescan: bool,
}

/// Whether `path` is `dir` or lies below it.
fn is_under(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

pub struct SyncEngine {
    config: Arc<Config>,
    remote: Arc<dyn Remote>,
    rules: Arc<Rules>,
    cache: Arc<ManifestCache>,
    keys: Keys,
    root: PathBuf,
    manifest: Manifest,
    pending: BTreeSet<String>,
    full_rescan: bool,
    debouncer: Debouncer,
    events: mpsc::Receiver<RawEvent>,
    sink: EventSink,
    watcher: Option<NativeWatcher>,
    poll: bool,
    backoff: Backoff,
    retry_at: Option<Instant>,
    /// Deletions held by the guards.
    hold: Option<Hold>,
    /// Paths a restore could not write: kept in the remote (and the manifest) while
    /// they are missing here, instead of being deleted as gone.
    protected: BTreeSet<String>,
    waiters: Vec<Waiter>,
    commands: mpsc::Receiver<Command>,
    status: Arc<Mutex<SyncStatus>>,
    metrics: Arc<Metrics>,
    last_sync_ms: Option<u64>,
    last_error: Option<String>,
    degraded: bool,
    available: bool,
    skipped: u64,
    first_round: Option<oneshot::Sender<()>>,
    /// A round left files for a second one (they replace paths it deleted).
    again: bool,
    /// The state directory had no manifest of its own: the first full round keeps
    /// what the tree lacks (see `round_inner`).
    first_of_new_state: bool,
    /// The remote manifest was read at start (or found missing): until then no round
    /// may publish one.
    manifest_adopted: bool,
    /// The remote manifest is gone (a verify found it missing): the next round
    /// publishes one even when nothing changed.
    republish: bool,
    /// The guards as the state directory last recorded them.
    stored_guards: manifest::Guards,
    /// Files seen changing while they were read: the next attempt uploads a copy, and
    /// so on while the copies see them change too.
    unstable: HashSet<String>,
    /// Files the daemon may not read (skipped and counted until that changes).
    unreadable: BTreeSet<String>,
    /// Where copies of changing files are made (`<state_dir>/staging`).
    staging: PathBuf,
    /// The last round left files it must look at again (changed during the upload,
    /// or vanished): whoever waits for it waits for another round.
    retried: bool,
    /// Directories that need watches, added after the events at hand are taken in: new
    /// ones, or the whole tree (the root) when the ignore rules changed and directories
    /// they no longer ignore need them.
    to_watch: Vec<PathBuf>,
    /// The oldest change a running round carries (see [`SyncStatus::oldest_change`]).
    in_flight: Option<InFlight>,
}

/// [`NativeWatcher::start`] on a blocking thread (it walks the whole tree).
async fn start_native(rules: Arc<Rules>, sink: EventSink) -> notify::Result<NativeWatcher> {
    tokio::task::spawn_blocking(move || NativeWatcher::start(&rules, sink))
        .await
        .unwrap_or_else(|e| Err(notify::Error::generic(&e.to_string())))
}

/// `dirs` without those inside another of them (a tree's walk covers its
/// subdirectories), each once.
fn outermost(mut dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    // Paths order by component, so a directory's subdirectories follow it at once.
    dirs.sort();
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        if !out.last().is_some_and(|kept| d.starts_with(kept)) {
            out.push(d);
        }
    }
    out
}

impl SyncEngine {
    /// Prepares the engine: opens the manifest cache (the remote manifest is looked at
    /// when the engine starts running). Returns the engine (to be `run`), its handle,
    /// and a receiver that fires once the startup reconcile round was attempted.
    pub async fn new(
        config: Arc<Config>,
        remote: Arc<dyn Remote>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<(Self, SyncHandle, oneshot::Receiver<()>)> {
        let root = match std::fs::canonicalize(&config.workspace) {
            Ok(r) => r,
            Err(_) => std::path::absolute(&config.workspace)?,
        };
        // The daemon's own directories (state, a `dir` remote) are never mirrored.
        let excludes = crate::sync::rules::mirror_excludes(&config, &root);
        let rules = Arc::new(Rules::new(&root, &excludes)?);
        let cache_path = config.state_dir.join("sync.redb");
        let cache = tokio::task::spawn_blocking(move || ManifestCache::open(&cache_path)).await??;
        let cache = Arc::new(cache);
        // Copies of files that changed while read; none outlives its upload.
        let staging = config.state_dir.join("staging");
        match std::fs::remove_dir_all(&staging) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        std::fs::create_dir_all(&staging)?;
        let keys = Keys::new(&config);
        let manifest = cache.load()?;
        let guards = cache.load_guards()?;
        let new_state = guards.new_state || manifest.generation == 0;
        let (tx, events) = mpsc::channel(EVENT_QUEUE);
        let sink = EventSink {
            tx,
            overflow: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(Notify::new()),
        };
        let (cmd_tx, commands) = mpsc::channel(1024);
        let status = Arc::new(Mutex::new(SyncStatus::default()));
        let (first_tx, first_rx) = oneshot::channel();
        let debouncer = Debouncer::new(
            config.sync.debounce_min.0,
            config.sync.debounce_max.0,
            config.sync.burst_threshold,
            Instant::now(),
        );
        let engine = Self {
            remote,
            rules,
            cache,
            keys,
            root,
            manifest,
            pending: BTreeSet::new(),
            full_rescan: true,
            debouncer,
            events,
            sink,
            watcher: None,
            poll: false,
            backoff: Backoff::default(),
            retry_at: None,
            hold: guards.hold.clone().map(|h| {
                let held_for = crate::kv::now_ms().saturating_sub(h.since_ms);
                let now = Instant::now();
                Hold {
                    since: now
                        .checked_sub(Duration::from_millis(held_for))
                        .unwrap_or(now),
                    since_ms: h.since_ms,
                    paths: h.paths,
                    everything: h.everything,
                    expiry_round_done: false,
                }
            }),
            protected: guards.kept.clone(),
            waiters: Vec::new(),
            commands,
            status: status.clone(),
            metrics,
            last_sync_ms: None,
            last_error: None,
            degraded: false,
            available: true,
            skipped: 0,
            first_round: Some(first_tx),
            again: false,
            first_of_new_state: new_state,
            manifest_adopted: false,
            republish: false,
            stored_guards: guards,
            unstable: HashSet::new(),
            unreadable: BTreeSet::new(),
            staging,
            retried: false,
            to_watch: Vec::new(),
            in_flight: None,
            config,
        };
        Ok((engine, SyncHandle { tx: cmd_tx, status }, first_rx))
    }

    /// Keeps `paths` (entries a restore could not write) in remote storage while
    /// they are missing from the workspace; one that appears again syncs as usual.
    pub fn protect(&mut self, paths: impl IntoIterator<Item = String>) {
        self.protected.extend(paths);
        self.save_guards_now();
    }

    /// The workspace was restored into this new state directory: the entries in
    /// `bad` are kept (see [`SyncEngine::protect`]); anything else the tree lacks the
    /// restore left out on purpose, so the first round mirrors the tree as it is.
    pub fn restored(&mut self, bad: impl IntoIterator<Item = String>) {
        self.first_of_new_state = false;
        self.protect(bad);
    }

    fn save_guards_now(&mut self) {
        let Some(guards) = self.changed_guards() else {
            return;
        };
        match self.cache.store_guards(&guards) {
            Ok(()) => self.stored_guards = guards,
            Err(e) => tracing::error!(error = %e, "cannot record the delete guards"),
        }
    }

    /// The delete guards' state, as [`ManifestCache::store_guards`] keeps it, when it
    /// differs from what the state directory holds.
    fn changed_guards(&self) -> Option<manifest::Guards> {
        let guards = manifest::Guards {
            kept: self.protected.clone(),
            hold: self.hold.as_ref().map(|h| manifest::HeldDeletes {
                paths: h.paths.clone(),
                everything: h.everything,
                since_ms: h.since_ms,
            }),
            new_state: self.first_of_new_state,
        };
        (guards != self.stored_guards).then_some(guards)
    }

    /// Records the delete guards durably when they changed: a restart must hold back
    /// what this daemon held back. A failure is logged (the guards then hold only until
    /// a restart, and the next round tries again).
    async fn persist_guards(&mut self) {
        let Some(guards) = self.changed_guards() else {
            return;
        };
        let cache = self.cache.clone();
        let stored = guards.clone();
        match tokio::task::spawn_blocking(move || cache.store_guards(&stored)).await {
            Ok(Ok(())) => self.stored_guards = guards,
            Ok(Err(e)) => tracing::error!(error = %e, "cannot record the delete guards"),
            Err(e) => tracing::error!(error = %e, "cannot record the delete guards"),
        }
    }

    fn root_available(&self) -> Result<(), SyncError> {
        match std::fs::read_dir(&self.root) {
            Ok(_) => Ok(()),
            Err(e) => Err(root_error(&e, format!("{}: {e}", self.root.display()))),
        }
    }

    /// Starts native watching (or polling, by configuration or as a fallback). The
    /// walk that adds the watches runs on a blocking thread, as in
    /// [`add_watches`](Self::add_watches).
    async fn start_watching(&mut self) {
        self.watcher = None;
        self.to_watch.clear();
        self.poll = false;
        if self.root_available().is_err() {
            return;
        }
        match self.config.watch.mode {
            WatchMode::Poll => self.poll = true,
            mode => match start_native(self.rules.clone(), self.sink.clone()).await {
                Ok(w) => self.watcher = Some(w),
                Err(e) if mode == WatchMode::Auto => {
                    tracing::warn!(error = %e, limit = watcher::is_watch_limit(&e), "native watching failed; polling the workspace instead");
                    self.poll = true;
                }
                Err(e) => {
                    tracing::error!(error = %e, "native watching failed (watch.mode = \"native\"); only explicit syncs and rescans will notice changes");
                    self.last_error = Some(format!("watcher: {e}"));
                }
            },
        }
    }

    /// Adopts the remote manifest when it is newer than the cached one (a new state
    /// directory, or another daemon wrote since). Runs when the engine starts, after
    /// any restore, so the first round compares the tree with what the remote holds.
    async fn adopt_remote_manifest(&mut self) -> Result<(), SyncError> {
        let key = self.keys.manifest();
        match self
            .remote
            .get_bytes_within(&key, remote::DOCUMENT_MAX)
            .await
        {
            Ok(Some(bytes)) => match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(m) if m.generation > self.manifest.generation => {
                    tracing::info!(
                        generation = m.generation,
                        "adopting the newer remote manifest"
                    );
                    // Another daemon published since this state directory last did
                    // (an old sandbox coming back after a newer one took over): what
                    // it added, this tree never had, so its absence is no deletion.
                    // It is kept like what a new state directory lacks.
                    if self.manifest.generation > 0 {
                        let ours = &self.manifest;
                        let theirs: Vec<String> = m
                            .files
                            .keys()
                            .chain(m.symlinks.keys())
                            .filter(|p| {
                                !ours.files.contains_key(*p) && !ours.symlinks.contains_key(*p)
                            })
                            .cloned()
                            .collect();
                        if !theirs.is_empty() {
                            tracing::warn!(
                                entries = theirs.len(),
                                "another daemon added entries to the remote mirror since this state directory last synced; those this workspace lacks stay in remote storage (POST /v1/sync with confirm_deletes deletes them)"
                            );
                            self.protect(theirs);
                        }
                    }
                    if let Err(e) = self.cache.store(&m, &[]) {
                        tracing::error!(error = %e, "cannot cache the remote manifest");
                    }
                    self.manifest = m;
                }
                Ok(_) => {}
                Err(e) => {
                    // What it names stays in remote storage, but only it says what the
                    // objects are (times, modes, symlinks, empty directories): a copy
                    // is kept before the next round replaces it.
                    let aside = crate::remote::unreadable_key(&key, &bytes);
                    if let Err(put) = self.remote.put_bytes(&aside, bytes.clone()).await {
                        return Err(SyncError::Remote(format!(
                            "the remote manifest is unreadable ({e}) and cannot be kept aside before it is rewritten: {put}"
                        )));
                    }
                    tracing::error!(error = %e, kept_as = %aside, "the remote manifest is unreadable: kept aside, and rewritten from this workspace; the objects it named stay in remote storage");
                }
            },
            Ok(None) if self.manifest.generation > 0 => {
                tracing::warn!(
                    "the remote has no manifest although one was published: uploading everything again"
                );
                self.manifest.files.clear();
                self.manifest.symlinks.clear();
                self.manifest.empty_dirs.clear();
            }
            Ok(None) => {}
            Err(RemoteError::TooLarge { .. }) => {
                // Larger than any manifest: kept aside, as an unreadable one is, but
                // streamed through the staging directory instead of held in memory.
                let aside = self.keep_aside_streamed(&key).await?;
                tracing::error!(kept_as = %aside, limit = remote::DOCUMENT_MAX, "the remote manifest is too large to read: kept aside, and rewritten from this workspace; the objects it named stay in remote storage");
            }
            Err(e) => {
                // A round now would publish a manifest that does not know what the
                // remote one names: the rounds wait for it (retried with backoff).
                return Err(SyncError::Remote(format!(
                    "cannot read the remote manifest: {e}"
                )));
            }
        }
        self.manifest_adopted = true;
        Ok(())
    }

    /// Starts listing the mirror in remote storage to compare it with the manifest, as
    /// rclone's `check --size-only` would ([`Self::apply_verify`] takes the result), on
    /// a task of its own: a listing of many pages (or of a slow remote) holds no round,
    /// sync call or final sync back. `None` before a manifest was published or adopted.
    fn start_verify(&self) -> Option<AbortOnDropHandle<Result<VerifyListing, RemoteError>>> {
        if !self.manifest_adopted || self.manifest.generation == 0 {
            return None;
        }
        // Held entries are gone from the workspace: nothing could upload them again.
        let mut expected: HashMap<String, (u64, String, String)> = self
            .manifest
            .files
            .iter()
            .filter(|(p, _)| !self.manifest.held.contains(*p))
            .map(|(p, e)| (self.keys.file(p), (e.size, p.clone(), e.hash.clone())))
            .collect();
        let remote = self.remote.clone();
        let manifest_key = self.keys.manifest();
        let prefix = format!("{}workspace/", self.keys.conversation);
        Some(AbortOnDropHandle::new(tokio::spawn(async move {
            let mut manifest_seen = false;
            let mut token = None;
            loop {
                let page = remote.list(&prefix, token).await?;
                for o in page.objects {
                    if o.key == manifest_key {
                        manifest_seen = true;
                    } else if expected
                        .get(&o.key)
                        .is_some_and(|(size, ..)| *size == o.size)
                    {
                        expected.remove(&o.key);
                    }
                }
                match page.next {
                    Some(t) => token = Some(t),
                    None => break,
                }
            }
            Ok(VerifyListing {
                missing: expected.into_values().map(|(_, p, h)| (p, h)).collect(),
                manifest_seen,
            })
        })))
    }

    /// Takes a finished listing of [`Self::start_verify`]: an entry whose object is gone
    /// or has another size (deleted by a person or a lifecycle rule, a wiped prefix)
    /// leaves the manifest, unless a round changed it since (its upload was checked), so
    /// that the next full round uploads its file again; a manifest object that is gone
    /// is published again by the next round. Returns whether a full round is due.
    fn apply_verify(&mut self, listing: VerifyListing) -> bool {
        let mut missing = Vec::new();
        for (path, hash) in listing.missing {
            if self
                .manifest
                .files
                .get(&path)
                .is_some_and(|e| e.hash == hash)
                && !self.manifest.held.contains(&path)
            {
                self.manifest.files.remove(&path);
                missing.push(path);
            }
        }
        if let Some(first) = missing.first() {
            tracing::warn!(
                files = missing.len(),
                first = %first,
                "files of the mirror are missing in remote storage or have another size there (deleted by someone?): uploading them again"
            );
        }
        if !listing.manifest_seen {
            tracing::warn!(
                "the remote manifest is gone (deleted by someone?): the next round publishes it again"
            );
            self.republish = true;
        }
        !missing.is_empty() || !listing.manifest_seen
    }

    /// Copies the object at `key` to its [`remote::unreadable_key_of`] through a file in
    /// the staging directory; the key of the copy.
    async fn keep_aside_streamed(&self, key: &str) -> Result<String, SyncError> {
        let tmp = self
            .staging
            .join(format!("aside-{:016x}", rand::random::<u64>()));
        let kept = async {
            let remote_error = |e: RemoteError| SyncError::Remote(e.to_string());
            self.remote
                .get_to_file(key, &tmp)
                .await
                .map_err(remote_error)?;
            let path = tmp.clone();
            let md5 = tokio::task::spawn_blocking(move || {
                remote::md5_of(&mut std::fs::File::open(&path)?)
            })
            .await
            .map_err(|e| SyncError::Local(e.to_string()))?
            .map_err(|e| SyncError::Local(e.to_string()))?;
            let aside = remote::unreadable_key_of(key, &md5);
            self.remote
                .put_file(&aside, &tmp, md5)
                .await
                .map_err(remote_error)?;
            Ok(aside)
        }
        .await;
        if let Err(e) = std::fs::remove_file(&tmp)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %tmp.display(), error = %e, "cannot remove a staged copy");
        }
        kept
    }

    /// Runs until `stop` fires.
    pub async fn run(mut self, stop: CancellationToken) {
        if self.first_of_new_state {
            // Adopting the remote manifest caches it: a restart before the first round
            // must still know that this state directory is new.
            self.persist_guards().await;
        }
        if let Err(e) = self.adopt_remote_manifest().await {
            tracing::warn!(error = %e, "the first round waits for the remote manifest");
        }
        self.start_watching().await;
        let mut force = true; // the startup reconcile
        let mut verify = VerifySchedule::new(self.config.sync.verify_interval.0);
        // A listing under way (dropped, so aborted, when the engine stops).
        let mut verifying = None;
        let mut poll_tick = tokio::time::interval(self.config.watch.poll_interval.0);
        poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = Instant::now();
            if self.sink.overflow.swap(false, Ordering::AcqRel) {
                tracing::warn!("watch event queue overflowed: full rescan");
                // Whatever is queued is covered by the rescan.
                while self.events.try_recv().is_ok() {}
                self.full_rescan = true;
                self.debouncer.record(now, 0);
            }
            if let Some(at) = self.hold_expiry()
                && now >= at
            {
                self.full_rescan = true;
                force = true;
            }
            if verifying.is_none() && verify.take_due() {
                verifying = self.start_verify();
            }
            let retry_ok = self.retry_at.is_none_or(|r| now >= r);
            if retry_ok && (force || self.debouncer.is_due(now)) {
                force = self.round_and_reply().await;
                self.publish_status();
                continue;
            }
            self.publish_status();
            let mut wake_at = self.debouncer.deadline();
            if let Some(r) = self.retry_at.filter(|_| force || wake_at.is_some()) {
                wake_at = Some(wake_at.map_or(r, |w| w.max(r)));
            }
            let next_verify = verify.next().filter(|_| verifying.is_none());
            for at in [self.hold_expiry(), next_verify].into_iter().flatten() {
                wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
            }
            let sleep_to = wake_at.unwrap_or(now + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Sync(waiter)) => {
                        self.waiters.push(waiter);
                        self.full_rescan = true;
                        force = true;
                        self.retry_at = None;
                    }
                    None => return,
                },
                ev = self.events.recv() => {
                    if let Some(ev) = ev {
                        self.on_event(ev);
                        // Take whatever else is queued without waking up per event.
                        while let Ok(ev) = self.events.try_recv() {
                            self.on_event(ev);
                        }
                    }
                    self.add_watches().await;
                }
                _ = self.sink.wake.notified() => {}
                listed = crate::when_done(&mut verifying), if verifying.is_some() => {
                    verifying = None;
                    match listed {
                        Ok(Ok(listing)) => {
                            if self.apply_verify(listing) {
                                self.full_rescan = true;
                                force = true;
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "cannot list the remote mirror to compare it with the manifest; trying again later");
                            verify.retry();
                        }
                        Err(e) => tracing::warn!(error = %e, "the comparison of the remote mirror with the manifest ended"),
                    }
                }
                _ = poll_tick.tick() => {
                    if self.poll || self.watcher.is_none() {
                        if self.watcher.is_none() && !self.poll && self.root_available().is_ok() {
                            // The root came back: watch it again.
                            self.start_watching().await;
                        }
                        self.full_rescan = true;
                        self.debouncer.record(Instant::now(), 0);
                    }
                }
                _ = tokio::time::sleep_until(sleep_to) => {}
            }
        }
    }

    /// When held mass deletions may go ahead. Deleting everything never expires: it
    /// waits for `confirm_deletes`. A hold that expired already is not due again (the
    /// round at expiry either deleted or restarted the hold with a new set).
    fn hold_expiry(&self) -> Option<Instant> {
        match &self.hold {
            Some(h) if !h.everything && !h.expiry_round_done => {
                Some(h.since + self.config.sync.mass_delete_hold.0)
            }
            _ => None,
        }
    }

    /// Runs one round and answers the waiters it covers. Returns whether another round
    /// must be forced (a failure to retry).
    async fn round_and_reply(&mut self) -> bool {
        let waiters = std::mem::take(&mut self.waiters);
        let confirm = waiters.iter().any(|w| w.confirm_deletes);
        let mut result = self.round(confirm).await;
        // Files a round had to leave (moved out of the way of a deletion, changed
        // while read or uploaded) are looked at again before anyone waiting is
        // answered; a file that changed while read is uploaded from a copy then.
        for _ in 0..MAX_EXTRA_ROUNDS {
            let Ok(first) = &result else { break };
            let again = std::mem::take(&mut self.again);
            let waited_for = self.retried && !waiters.is_empty();
            if !again && !waited_for {
                break;
            }
            let first = *first;
            result = self.round(confirm).await.map(|second| first.plus(second));
        }
        if result.is_ok() && self.retried && !waiters.is_empty() {
            let files: Vec<&str> = self.pending.iter().take(3).map(String::as_str).collect();
            result = Err(SyncError::Remote(format!(
                "files keep changing or vanishing while they are uploaded ({}...); trying again",
                files.join(", ")
            )));
        }
        if let Some(tx) = self.first_round.take() {
            let _ = tx.send(());
        }
        match result {
            Ok(stats) => {
                self.metrics.sync_round("ok");
                self.backoff.reset();
                self.retry_at = None;
                self.degraded = false;
                self.available = true;
                self.last_error = None;
                self.last_sync_ms = Some(crate::kv::now_ms());
                // Whoever was waiting sees the new state in /v1/status at once.
                self.publish_status();
                for w in waiters {
                    let _ = w.reply.send(Ok(stats));
                }
                false
            }
            Err(SyncError::WorkspaceUnavailable(m)) => {
                self.metrics.sync_round("unavailable");
                tracing::warn!(error = %m, "workspace unavailable: nothing is deleted");
                self.available = false;
                self.degraded = true;
                self.last_error = Some(m.clone());
                self.watcher = None;
                self.publish_status();
                for w in waiters {
                    let _ = w
                        .reply
                        .send(Err(SyncError::WorkspaceUnavailable(m.clone())));
                }
                // Checked again on the poll tick.
                self.retry_at = Some(Instant::now() + self.config.watch.poll_interval.0);
                false
            }
            Err(SyncError::Held(m)) => {
                self.metrics.sync_round("error");
                tracing::warn!(reason = %m, "sync round: new entries wait for a delete guard");
                self.degraded = true;
                self.retry_at = Some(Instant::now() + self.config.sync.debounce_max.0);
                for w in waiters {
                    if w.until_held {
                        let _ = w.reply.send(Err(SyncError::Held(m.clone())));
                    } else {
                        self.waiters.push(w);
                    }
                }
                self.last_error = Some(m);
                true
            }
            Err(e) => {
                self.metrics.sync_round("error");
                // Someone waits for this round (`POST /v1/sync`, the final sync): try
                // again at least every few seconds, so that they are answered soon
                // after the remote comes back, not a full backoff later.
                // Waiters that gave up (their call timed out) are dropped.
                let waiters: Vec<Waiter> = waiters
                    .into_iter()
                    .filter(|w| !w.reply.is_closed())
                    .collect();
                let delay = self.backoff.next_delay_for(!waiters.is_empty());
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "sync round failed; retrying");
                self.degraded = true;
                self.last_error = Some(e.to_string());
                self.retry_at = Some(Instant::now() + delay);
                // Waiters stay until a round succeeds (or they time out).
                self.waiters.extend(waiters);
                true
            }
        }
    }

    /// Adds the watches [`on_event`](Self::on_event) asked for, on a blocking thread: a
    /// new tree (a clone, an unpacked archive) can hold thousands of directories, and
    /// walking them must not hold a runtime worker, which the API's requests need.
    /// When a watch cannot be added the engine polls instead.
    async fn add_watches(&mut self) {
        let dirs = outermost(std::mem::take(&mut self.to_watch));
        if dirs.is_empty() {
            return;
        }
        let Some(mut watcher) = self.watcher.take() else {
            return;
        };
        let rules = self.rules.clone();
        let walked = tokio::task::spawn_blocking(move || {
            let added = dirs.iter().try_for_each(|d| watcher.watch_tree(&rules, d));
            added.map(|()| watcher)
        })
        .await;
        let error = match walked {
            Ok(Ok(watcher)) => {
                self.watcher = Some(watcher);
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(error = %error, "cannot watch new directories (or those the ignore rules let in); polling instead");
        self.poll = true;
        self.full_rescan = true;
        self.debouncer.record(Instant::now(), 0);
    }

    fn on_event(&mut self, ev: RawEvent) {
        let now = Instant::now();
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "watcher error: full rescan");
                self.full_rescan = true;
                self.debouncer.record(now, 0);
                return;
            }
        };
        if ev.need_rescan() {
            self.full_rescan = true;
            self.debouncer.record(now, 0);
            return;
        }
        // Reads (our own scans and hashing among them) change nothing; a file closed
        // after writing does.
        if let notify::EventKind::Access(kind) = ev.kind
            && !matches!(
                kind,
                notify::event::AccessKind::Close(notify::event::AccessMode::Write)
            )
        {
            return;
        }
        let mut new_files = 0;
        for path in &ev.paths {
            let Ok(rel) = path.strip_prefix(&self.root) else {
                continue;
            };
            let Some(rel_str) = rel.to_str() else {
                self.full_rescan = true;
                continue;
            };
            if rel_str.is_empty() {
                if matches!(
                    ev.kind,
                    notify::EventKind::Remove(_)
                        | notify::EventKind::Modify(notify::event::ModifyKind::Name(_))
                ) && self.watcher.is_some()
                {
                    // The root itself was removed or moved away: its watches died with
                    // it. Poll until it is back, then watch it anew and look at it whole.
                    tracing::warn!(root = %self.root.display(), "the workspace directory was removed or moved; polling until it is back");
                    self.watcher = None;
                    self.rules.invalidate();
                    self.full_rescan = true;
                    self.debouncer.record(now, 0);
                }
                continue;
            }
            let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if rules::IGNORE_FILES.contains(&name) {
                // The rules themselves changed: everything may have moved in or out.
                self.rules.invalidate();
                self.full_rescan = true;
                self.to_watch.push(PathBuf::new());
            }
            // A directory moved or removed takes the matchers of its ignore files with
            // it; one created (or moved in) in its place has its own.
            if matches!(
                ev.kind,
                notify::EventKind::Create(_)
                    | notify::EventKind::Remove(_)
                    | notify::EventKind::Modify(notify::event::ModifyKind::Name(_))
            ) {
                self.rules.forget_dir(rel);
            }
            // Symlinks are recorded, never followed: a link to a directory is no
            // directory to watch.
            let is_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
                || (matches!(
                    ev.kind,
                    notify::EventKind::Create(notify::event::CreateKind::Folder)
                ) && !path.is_symlink());
            if self.rules.is_ignored(rel, is_dir) {
                continue;
            }
            if is_dir
                && matches!(
                    ev.kind,
                    notify::EventKind::Create(_)
                        | notify::EventKind::Modify(notify::event::ModifyKind::Name(_))
                )
                && self.watcher.is_some()
            {
                // Files created in a new directory before its watch existed are found
                // by the round walking that directory.
                self.to_watch.push(rel.to_path_buf());
            }
            if self.pending.insert(rel_str.to_string()) {
                new_files += 1;
            }
        }
        self.debouncer.record(now, new_files);
    }

    fn publish_status(&mut self) {
        let now = Instant::now();
        let delay = self.debouncer.delay(now);
        let in_flight = self.in_flight.map(|f| f.since);
        let oldest_change = match (self.debouncer.oldest(), in_flight) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let lag = oldest_change.map_or(Duration::ZERO, |o| now.duration_since(o));
        let s = SyncStatus {
            pending_files: self.pending.len() as u64 + self.in_flight.map_or(0, |f| f.files),
            full_rescan_pending: self.full_rescan || self.in_flight.is_some_and(|f| f.full_rescan),
            last_sync_at: self.last_sync_ms.map(crate::kv::rfc3339),
            lag_ms: lag.as_millis() as u64,
            debounce_ms: delay.as_millis() as u64,
            burst: self.debouncer.burst(),
            last_error: self.last_error.clone(),
            degraded: self.degraded,
            workspace_available: self.available,
            watch_mode: if self.watcher.is_some() {
                "native"
            } else {
                "poll"
            },
            generation: self.manifest.generation,
            files: self.manifest.files.len() as u64,
            bytes: self.manifest.total_bytes(),
            held_deletes: self.hold.as_ref().map_or(0, |h| h.paths.len() as u64)
                + self.protected.len() as u64,
            skipped_files: self.skipped + self.unreadable.len() as u64,
            oldest_change,
        };
        self.metrics
            .sync_gauges(&s, lag.as_secs_f64(), delay.as_secs_f64());
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    async fn flush_pending_deletes(&self) -> Result<u64, SyncError> {
        let cache = self.cache.clone();
        let keys = tokio::task::spawn_blocking(move || cache.pending_deletes())
            .await
            .map_err(|e| SyncError::Local(e.to_string()))?
            .map_err(|e| SyncError::Local(e.to_string()))?;
        if keys.is_empty() {
            return Ok(0);
        }
        self.remote
            .delete_many(&keys)
            .await
            .map_err(|e| SyncError::Remote(e.to_string()))?;
        let cache = self.cache.clone();
        let n = keys.len() as u64;
        tokio::task::spawn_blocking(move || cache.deletes_done(&keys))
            .await
            .map_err(|e| SyncError::Local(e.to_string()))?
            .map_err(|e| SyncError::Local(e.to_string()))?;
        Ok(n)
    }

    /// One round over what is pending.
    async fn round(&mut self, confirm: bool) -> Result<RoundStats, SyncError> {
        let started = std::time::Instant::now();
        tracing::debug!(
            pending = self.pending.len(),
            full = self.full_rescan,
            confirm,
            "sync round starts"
        );
        self.root_available()?;
        if !self.manifest_adopted {
            self.adopt_remote_manifest().await?;
        }
        let full = std::mem::take(&mut self.full_rescan);
        let paths = std::mem::take(&mut self.pending);
        let since = self.debouncer.taken().unwrap_or_else(Instant::now);
        self.in_flight = Some(InFlight {
            since,
            files: paths.len() as u64,
            full_rescan: full,
        });
        self.publish_status();
        let result = self.round_inner(confirm, full, &paths).await;
        self.in_flight = None;
        self.persist_guards().await;
        if result.is_err() {
            // Nothing is lost: look at the same paths again next time, and the lag
            // (what an alert watches during an outage) keeps growing.
            self.full_rescan |= full;
            self.pending.extend(paths);
            self.debouncer.not_taken(since);
        }
        let mut stats = result?;
        stats.duration_ms = started.elapsed().as_millis() as u64;
        if stats.files_uploaded > 0 || stats.files_deleted > 0 {
            tracing::info!(
                uploaded = stats.files_uploaded,
                deleted = stats.files_deleted,
                bytes = stats.bytes_uploaded,
                ms = stats.duration_ms,
                generation = self.manifest.generation,
                "sync round"
            );
        }
        Ok(stats)
    }

    async fn round_inner(
        &mut self,
        confirm: bool,
        full: bool,
        paths: &BTreeSet<String>,
    ) -> Result<RoundStats, SyncError> {
        // The manifest's `updated_at`: when the tree was looked at, not when the
        // manifest went out (a restore compares bundles, read at their own time, with it).
        let scanned_at = crate::kv::now_ms();
        let mut stats = RoundStats {
            files_deleted: self.flush_pending_deletes().await?,
            ..RoundStats::default()
        };
        let rules = self.rules.clone();
        let limits = Limits {
            max_file_bytes: self.config.sync.max_file_bytes,
            key_prefix_len: self.keys.files_prefix().len(),
        };
        // Deletions are judged on the whole tree: a partial round that sees files gone
        // (and every round while deletions are held) looks at everything, so a mass
        // deletion cannot slip through the guards split over several rounds.
        let mut full = full || self.hold.is_some();
        if full {
            // A walk of everything reads every ignore file anyway: nothing an event
            // was missed for (an overflow, a move) keeps a stale matcher past it.
            self.rules.invalidate();
        }
        let (obs, mut next, mut gone) = loop {
            let rules = rules.clone();
            let limits = Limits {
                max_file_bytes: limits.max_file_bytes,
                key_prefix_len: limits.key_prefix_len,
            };
            let paths_owned = paths.clone();
            let obs = tokio::task::spawn_blocking(move || {
                scan::observe(&rules, &limits, &paths_owned, full)
            })
            .await
            .map_err(|e| SyncError::Remote(e.to_string()))?
            .map_err(|e| {
                if full {
                    root_error(&e, e.to_string())
                } else {
                    SyncError::Local(format!("scanning the workspace: {e}"))
                }
            })?;
            // Plan: what stays, what is gone, what must be hashed.
            let mut next = self.manifest.clone();
            let mut gone = Vec::new();
            for c in &obs.covered {
                for p in remove_under(&mut next.files, c) {
                    if !obs.files.contains_key(&p) {
                        gone.push(p);
                    }
                }
                remove_under(&mut next.symlinks, c);
                remove_under_set(&mut next.empty_dirs, c);
            }
            // Nothing is known of what an unreadable directory holds (nor taken of
            // a file over the size limit): what the mirror has of it stays.
            for dir in &obs.kept {
                gone.retain(|p| !is_under(p, dir));
                let m = &self.manifest;
                let kept = m.files.iter().filter(|(p, _)| is_under(p, dir));
                next.files.extend(kept.map(|(p, e)| (p.clone(), e.clone())));
                let kept = m.symlinks.iter().filter(|(p, _)| is_under(p, dir));
                next.symlinks
                    .extend(kept.map(|(p, t)| (p.clone(), t.clone())));
                let kept = m.empty_dirs.iter().filter(|p| is_under(p, dir));
                next.empty_dirs.extend(kept.cloned());
            }
            if !full && !gone.is_empty() {
                full = true;
                continue;
            }
            break (obs, next, gone);
        };
        if full {
            self.unreadable.retain(|p| obs.files.contains_key(p));
            self.unstable.retain(|p| obs.files.contains_key(p));
            self.skipped = obs.skipped.total();
        }
        self.retried = false;
        next.symlinks.extend(obs.symlinks.clone());
        // A new state directory whose workspace was not restored (it had content): what
        // the remote mirror holds and this tree lacks was never here, so its absence is
        // no deletion. It stays in remote storage, like entries a restore could not
        // write, until it appears here or a sync confirms deletions.
        if full && std::mem::take(&mut self.first_of_new_state) {
            let missing: Vec<String> = gone
                .iter()
                .cloned()
                .chain(
                    self.manifest
                        .symlinks
                        .keys()
                        .filter(|p| !obs.symlinks.contains_key(*p))
                        .cloned(),
                )
                .collect();
            if !missing.is_empty() && !confirm {
                tracing::warn!(
                    entries = missing.len(),
                    "a new state directory: the workspace lacks entries of the remote mirror; they stay in remote storage (POST /v1/sync with confirm_deletes deletes them)"
                );
                self.protected.extend(missing);
            }
        }
        if confirm {
            self.protected.clear();
        }
        if !self.protected.is_empty() {
            self.protected
                .retain(|p| !obs.files.contains_key(p) && !obs.symlinks.contains_key(p));
            gone.retain(|p| {
                let keep = self.protected.contains(p);
                if keep && let Some(e) = self.manifest.files.get(p) {
                    next.files.insert(p.clone(), e.clone());
                }
                !keep
            });
            for p in &self.protected {
                if let Some(t) = self.manifest.symlinks.get(p) {
                    next.symlinks.entry(p.clone()).or_insert_with(|| t.clone());
                }
            }
        }
        for d in &obs.non_empty_dirs {
            next.empty_dirs.remove(d);
        }
        next.empty_dirs.extend(obs.empty_dirs.iter().cloned());
        let mut candidates: Vec<(String, Stat)> = Vec::new();
        for (p, st) in &obs.files {
            match self.manifest.files.get(p) {
                Some(e) if e.size == st.size && e.mtime == st.mtime && e.mode == st.mode => {
                    next.files.insert(p.clone(), e.clone());
                }
                _ => candidates.push((p.clone(), *st)),
            }
        }
        // Symlinks the manifest names and the tree lacks, nothing new in their place
        // (a symlink replaced by a file or a directory is no deletion): deletions a
        // guard holding the files' holds too, with the empty directories gone. Looked
        // for only where a guard may act: some file is gone, or a hold stands.
        let (gone_links, gone_dirs) = if gone.is_empty() && self.hold.is_none() {
            (Vec::new(), Vec::new())
        } else {
            let entries: BTreeSet<&str> = next
                .files
                .keys()
                .chain(next.symlinks.keys())
                .chain(candidates.iter().map(|(p, _)| p))
                .map(String::as_str)
                .collect();
            let free = |p: &str| {
                !entries.contains(p)
                    && !clashes(&entries, p)
                    && !obs.empty_dirs.contains(p)
                    && !obs.non_empty_dirs.contains(p)
            };
            let links: Vec<String> = self
                .manifest
                .symlinks
                .keys()
                .filter(|p| !next.symlinks.contains_key(*p) && free(p))
                .cloned()
                .collect();
            let dirs: Vec<String> = self
                .manifest
                .empty_dirs
                .iter()
                .filter(|p| !next.empty_dirs.contains(*p) && free(p))
                .cloned()
                .collect();
            (links, dirs)
        };
        // Never delete everything, or a mass of files, by accident.
        let before = self.manifest.files.len();
        // A directory renamed or moved is no mass deletion: its files turn up under
        // another path with the same name, size and modification time (to the
        // nanosecond, which a move keeps).
        let arrived: HashSet<(&str, u64, i64)> = candidates
            .iter()
            .map(|(p, st)| (file_name(p), st.size, st.mtime))
            .collect();
        let vanished = gone
            .iter()
            .filter(|p| {
                self.manifest
                    .files
                    .get(*p)
                    .is_none_or(|e| !arrived.contains(&(file_name(p), e.size, e.mtime)))
            })
            .count();
        let mass = vanished * 2 > before && vanished >= MASS_DELETE_MIN;
        // Every file the manifest named is gone (new ones or not: a workspace root
        // emptied and a first file written again is the usual accident), or still
        // gone since a round found so: files written after it do not release it.
        let still_everything = self.hold.as_ref().is_some_and(|h| {
            h.everything && {
                let now_gone: HashSet<&String> = gone.iter().chain(&gone_links).collect();
                h.paths.iter().all(|p| now_gone.contains(p))
            }
        });
        // A mass of files gone and every other one written anew (`rm -rf *` and a
        // fresh README.md) is the same accident. (In a small workspace, editing one
        // file and deleting the two others is ordinary work.)
        let rewritten = candidates
            .iter()
            .filter(|(p, _)| self.manifest.files.contains_key(p))
            .count();
        let all_touched = vanished == before || (mass && vanished + rewritten == before);
        let everything = (before > 0 && all_touched) || still_everything;
        if !confirm && (everything || mass) {
            let set: BTreeSet<String> = gone.iter().chain(&gone_links).cloned().collect();
            let now = Instant::now();
            let same = self.hold.as_ref().is_some_and(|h| h.paths == set);
            let (since, since_ms) = match &self.hold {
                Some(h) if same => (h.since, h.since_ms),
                _ => (now, crate::kv::now_ms()),
            };
            let expired = !everything && now >= since + self.config.sync.mass_delete_hold.0;
            if expired {
                tracing::warn!(
                    files = gone.len(),
                    "mass deletion held long enough: deleting"
                );
                self.hold = None;
            } else {
                if !same {
                    tracing::warn!(
                        files = gone.len(),
                        of = before,
                        "refusing to delete this many files without confirmation: keeping them \
                         (POST /v1/sync with confirm_deletes{})",
                        if everything {
                            ""
                        } else {
                            ", or wait for sync.mass_delete_hold"
                        }
                    );
                }
                for p in gone.drain(..) {
                    if let Some(e) = self.manifest.files.get(&p) {
                        next.files.insert(p, e.clone());
                    }
                }
                for p in gone_links {
                    if let Some(t) = self.manifest.symlinks.get(&p) {
                        next.symlinks.insert(p, t.clone());
                    }
                }
                next.empty_dirs.extend(gone_dirs);
                let expiry_round_done = same && now >= since + self.config.sync.mass_delete_hold.0;
                self.hold = Some(Hold {
                    since,
                    since_ms,
                    paths: set,
                    everything,
                    expiry_round_done,
                });
            }
        } else {
            self.hold = None;
        }

        // A file that takes the place of a directory of the old manifest, or the reverse
        // (`y` replaced by `y/z`): an object store or a `dir` remote may refuse the new
        // key while the old object exists. An old path deleted by this round is gone
        // first and the new file uploaded by a second round, before anyone waiting is
        // answered. An old path a guard holds back stays held: the new file waits for
        // the guard (`confirm_deletes`, or a mass deletion's hold running out) and the
        // round says so as its error, rather than the guard giving way to one new file.
        let held: BTreeSet<&str> = self
            .hold
            .iter()
            .flat_map(|h| h.paths.iter())
            .chain(self.protected.iter())
            .map(String::as_str)
            .collect();
        let mut blocked: Vec<String> = Vec::new();
        if !held.is_empty() {
            let (wait, go): (Vec<_>, Vec<_>) =
                candidates.into_iter().partition(|(p, _)| clashes(&held, p));
            candidates = go;
            for (p, _) in wait {
                self.pending.insert(p.clone());
                blocked.push(p);
            }
            // A new symlink or empty directory in a held path's place waits too.
            let new_links: Vec<String> = next
                .symlinks
                .keys()
                .filter(|p| !self.manifest.symlinks.contains_key(*p) && clashes(&held, p))
                .cloned()
                .collect();
            // (An empty directory left where held files were is no clash: the
            // manifest may name both. One in a held file's place, or below it, is.)
            let new_dirs: Vec<String> = next
                .empty_dirs
                .iter()
                .filter(|p| {
                    !self.manifest.empty_dirs.contains(*p)
                        && Path::new(p.as_str())
                            .ancestors()
                            .filter_map(|a| a.to_str())
                            .any(|a| !a.is_empty() && held.contains(a))
                })
                .cloned()
                .collect();
            for p in new_links {
                next.symlinks.remove(&p);
                blocked.push(p);
            }
            for p in new_dirs {
                next.empty_dirs.remove(&p);
                blocked.push(p);
            }
        }
        next.held = held
            .iter()
            .filter(|p| next.files.contains_key(**p) || next.symlinks.contains_key(**p))
            .map(|p| p.to_string())
            .collect();
        if !gone.is_empty() {
            let old: BTreeSet<&str> = gone.iter().map(String::as_str).collect();
            let (later, now): (Vec<_>, Vec<_>) =
                candidates.into_iter().partition(|(p, _)| clashes(&old, p));
            candidates = now;
            for (p, _) in later {
                self.pending.insert(p);
                self.again = true;
            }
        }

        // A directory holding anything mirrored is not empty.
        let occupied: Vec<String> = next
            .files
            .keys()
            .chain(next.symlinks.keys())
            .chain(next.empty_dirs.iter())
            .chain(candidates.iter().map(|(p, _)| p))
            .flat_map(|p| {
                Path::new(p)
                    .ancestors()
                    .skip(1)
                    .filter_map(|a| a.to_str())
                    .filter(|a| !a.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        for d in occupied {
            next.empty_dirs.remove(&d);
        }

        // Hash and upload in parallel.
        let concurrency = self.config.sync.concurrency as usize;
        let outcomes: Vec<Outcome> = futures::stream::iter(candidates)
            .map(|(p, st)| self.upload_one(p, st))
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let mut failure = None;
        let mut retried = false;
        for o in outcomes {
            let path = match &o {
                Outcome::Uploaded(p, ..)
                | Outcome::MetaOnly(p, _)
                | Outcome::Unstable(p)
                | Outcome::Retry(p)
                | Outcome::Unreadable(p)
                | Outcome::Failed(p, _) => p,
            };
            if !matches!(o, Outcome::Unreadable(_)) {
                self.unreadable.remove(path);
            }
            match o {
                Outcome::Unstable(_) | Outcome::Uploaded(.., true) => {
                    self.unstable.insert(path.clone());
                }
                Outcome::Failed(..) => {}
                _ => {
                    self.unstable.remove(path);
                }
            }
            match o {
                Outcome::Uploaded(p, e, bytes, _) => {
                    stats.files_uploaded += 1;
                    stats.bytes_uploaded += bytes;
                    self.metrics.sync_uploaded(bytes);
                    next.files.insert(p, e);
                }
                Outcome::MetaOnly(p, e) => {
                    next.files.insert(p, e);
                }
                Outcome::Unstable(p) | Outcome::Retry(p) => {
                    if let Some(e) = self.manifest.files.get(&p) {
                        next.files.insert(p.clone(), e.clone());
                    }
                    self.pending.insert(p);
                    self.debouncer.record(Instant::now(), 0);
                    retried = true;
                }
                Outcome::Unreadable(p) => {
                    // Like an unreadable directory: the mirror keeps what it has.
                    if let Some(e) = self.manifest.files.get(&p) {
                        next.files.insert(p.clone(), e.clone());
                    }
                    if self.unreadable.insert(p.clone()) {
                        tracing::warn!(
                            path = p,
                            "skipped: cannot read this file; what the mirror holds of it is kept"
                        );
                    }
                }
                Outcome::Failed(p, e) => {
                    if let Some(old) = self.manifest.files.get(&p) {
                        next.files.insert(p.clone(), old.clone());
                    }
                    self.pending.insert(p);
                    failure.get_or_insert(e.to_string());
                }
            }
        }

        // A round whose uploads did not all go through deletes nothing: what it could
        // not upload may be where the gone files went (a rename), and a manifest with
        // neither would lose them. The next round looks again.
        if (failure.is_some() || retried) && !gone.is_empty() {
            for p in gone.drain(..) {
                if let Some(e) = self.manifest.files.get(&p) {
                    next.files.insert(p.clone(), e.clone());
                }
                self.pending.insert(p);
            }
        }
        self.retried = retried;

        let total = next.total_bytes();
        if total > self.config.sync.max_workspace_bytes {
            tracing::warn!(
                bytes = total,
                limit = self.config.sync.max_workspace_bytes,
                "the workspace is larger than sync.max_workspace_bytes"
            );
        }

        // Publish the manifest, then delete what it no longer names. The guards are
        // recorded first: the manifest may name files only they keep.
        self.persist_guards().await;
        let changed = self.republish
            || next.files != self.manifest.files
            || next.held != self.manifest.held
            || next.symlinks != self.manifest.symlinks
            || next.empty_dirs != self.manifest.empty_dirs;
        if changed {
            next.format = manifest::FORMAT;
            next.generation = self.manifest.generation + 1;
            next.updated_at = crate::kv::rfc3339(scanned_at);
            let json =
                serde_json::to_vec_pretty(&next).map_err(|e| SyncError::Remote(e.to_string()))?;
            let len = json.len() as u64;
            if len > remote::DOCUMENT_MAX {
                // A manifest no restore would read: the mirror stays at the last one.
                return Err(SyncError::Remote(format!(
                    "the manifest would take {len} bytes, more than the {} a restore reads: the workspace has too many files to mirror",
                    remote::DOCUMENT_MAX
                )));
            }
            self.remote
                .put_bytes(&self.keys.manifest(), Bytes::from(json))
                .await
                .map_err(|e| SyncError::Remote(e.to_string()))?;
            stats.bytes_uploaded += len;
            let gone_keys: Vec<String> = gone.iter().map(|p| self.keys.file(p)).collect();
            let cache = self.cache.clone();
            let stored = next.clone();
            tokio::task::spawn_blocking(move || cache.store(&stored, &gone_keys))
                .await
                .map_err(|e| SyncError::Local(e.to_string()))?
                .map_err(|e| SyncError::Local(e.to_string()))?;
            self.manifest = next;
            self.republish = false;
            if !gone.is_empty() {
                stats.files_deleted += self.flush_pending_deletes().await?;
            }
        }
        let blocked_message = blocked.first().map(|first| {
            format!(
                "{} new entries (`{first}`...) take the place of files a delete guard holds \
                 back; POST /v1/sync with confirm_deletes lets the deletion, and them, through",
                blocked.len()
            )
        });
        match (failure, blocked_message) {
            (Some(e), _) => Err(SyncError::Remote(e)),
            (None, Some(m)) => Err(SyncError::Held(m)),
            (None, None) => Ok(stats),
        }
    }

    async fn upload_one(&self, rel: String, _seen: Stat) -> Outcome {
        let abs = self.root.join(&rel);
        // A file that changed while it was read last time is uploaded from a copy:
        // otherwise one written more often than it takes to read would never go out.
        let copy = self.unstable.contains(&rel).then(|| {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            self.staging.join(format!("{n}"))
        });
        let outcome = self.upload_from(rel, &abs, copy.as_deref()).await;
        if let Some(copy) = copy
            && let Err(e) = tokio::fs::remove_file(&copy).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %copy.display(), error = %e, "cannot remove a staged copy");
        }
        outcome
    }

    /// Hashes `abs` (or copies it to `copy`, hashing the copy) and uploads it.
    async fn upload_from(&self, rel: String, abs: &Path, copy: Option<&Path>) -> Outcome {
        let hashed = {
            let (root, rel, copy) = (self.root.clone(), rel.clone(), copy.map(Path::to_path_buf));
            let limit = self.config.sync.max_file_bytes;
            tokio::task::spawn_blocking(move || match copy {
                Some(to) => scan::copy_hashed(&root, &rel, &to, limit),
                None => scan::hash_file(&root, &rel, limit),
            })
            .await
        };
        let hashed = match hashed {
            Ok(Ok(h)) => h,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Outcome::Retry(rel),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Outcome::Unreadable(rel);
            }
            Ok(Err(e)) => {
                tracing::warn!(path = rel, error = %e, "cannot read file; will retry");
                return Outcome::Retry(rel);
            }
            Err(e) => {
                return Outcome::Failed(
                    rel,
                    RemoteError::local("hash", abs, std::io::Error::other(e.to_string())),
                );
            }
        };
        if !hashed.stable && copy.is_none() {
            self.metrics.sync_file_changing();
            return Outcome::Unstable(rel);
        }
        // A copy that saw it change (a direct read that did returned above): the next
        // upload copies it again rather than reading it directly, which would only
        // find it changing once more.
        let hot = !hashed.stable;
        let entry = FileEntry {
            size: hashed.stat.size,
            mtime: hashed.stat.mtime,
            mode: hashed.stat.mode,
            hash: hashed.hash.clone(),
        };
        if self
            .manifest
            .files
            .get(&rel)
            .is_some_and(|e| e.hash == hashed.hash)
        {
            return Outcome::MetaOnly(rel, entry);
        }
        match self
            .remote
            .put_file(&self.keys.file(&rel), copy.unwrap_or(abs), hashed.md5)
            .await
        {
            // What a copy holds is what went out, however the file changed since.
            Ok(bytes) if copy.is_some() => Outcome::Uploaded(rel, entry, bytes, hot),
            Ok(bytes) => {
                let now = std::fs::symlink_metadata(abs).map(|m| Stat::of(&m)).ok();
                if now != Some(hashed.stat) {
                    return Outcome::Unstable(rel);
                }
                Outcome::Uploaded(rel, entry, bytes, false)
            }
            Err(RemoteError::Changed { .. }) => Outcome::Unstable(rel),
            Err(RemoteError::Local { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Outcome::Retry(rel)
            }
            Err(e) => Outcome::Failed(rel, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::dir::DirRemote;
    use crate::remote::flaky::FlakyRemote;

    /// A daemon out of file descriptors (or memory) does not call the workspace
    /// unavailable (409 to a sync): it is a local failure, retried.
    #[test]
    fn running_short_is_no_unavailable_workspace() {
        let err = |code| root_error(&std::io::Error::from_raw_os_error(code), String::new());
        assert!(matches!(err(libc::EMFILE), SyncError::Local(_)));
        assert!(matches!(err(libc::ENFILE), SyncError::Local(_)));
        assert!(matches!(err(libc::ENOMEM), SyncError::Local(_)));
        for code in [libc::ENOENT, libc::EACCES, libc::ENOTDIR, libc::EIO] {
            assert!(
                matches!(err(code), SyncError::WorkspaceUnavailable(_)),
                "{code}"
            );
        }
    }

    #[test]
    fn a_walk_is_asked_once_per_tree() {
        let paths = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(
            outermost(paths(&["a b", "a/x/y", "b", "a", "a/x", "ab/c", "a", "ab"])),
            paths(&["a", "a b", "ab", "b"])
        );
        assert_eq!(outermost(paths(&["a/b", "", "c"])), paths(&[""]));
        assert_eq!(outermost(Vec::new()), paths(&[]));
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        ws: PathBuf,
        remote: Arc<FlakyRemote>,
        handle: SyncHandle,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        metrics: Arc<Metrics>,
    }

    async fn engine() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(DirRemote::new(&dir.path().join("remote")).unwrap());
        let remote = Arc::new(FlakyRemote::new(inner));
        engine_in(dir, "", remote, |_| {}).await
    }

    /// An engine on `<dir>/<name>ws` with the state directory `<dir>/<name>state`;
    /// `before_run` sees the workspace before the engine starts.
    async fn engine_in(
        dir: tempfile::TempDir,
        name: &str,
        remote: Arc<FlakyRemote>,
        before_run: impl FnOnce(&Path),
    ) -> Fixture {
        let ws = dir.path().join(format!("{name}ws"));
        std::fs::create_dir_all(&ws).unwrap();
        let mut config = Config {
            workspace: ws.clone(),
            state_dir: dir.path().join(format!("{name}state")),
            ..Config::default()
        };
        std::fs::create_dir_all(&config.state_dir).unwrap();
        config.sync.debounce_min = crate::config::HumanDuration::millis(100);
        config.sync.debounce_max = crate::config::HumanDuration::millis(500);
        before_run(&ws);
        let metrics = Arc::new(Metrics::new());
        let (engine, handle, _first) =
            SyncEngine::new(Arc::new(config), remote.clone(), metrics.clone())
                .await
                .unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(engine.run(stop.clone()));
        Fixture {
            _dir: dir,
            ws,
            remote,
            handle,
            stop,
            task,
            metrics,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_state_directory_keeps_what_its_tree_lacks_and_waits_for_the_manifest() {
        let f = engine().await;
        for name in ["a", "b", "c"] {
            std::fs::write(f.ws.join(name), name).unwrap();
        }
        f.handle.sync(false).await.unwrap();
        f.stop.cancel();
        f.task.await.unwrap();
        // A new sandbox: new state directory, a workspace with other content, and the
        // remote manifest unreadable for a moment when the engine starts.
        let remote = f.remote.clone();
        remote.fail_next_of("get", 2);
        let g = engine_in(f._dir, "new-", remote, |ws| {
            std::fs::write(ws.join("x"), "x").unwrap();
        })
        .await;
        let stats = tokio::time::timeout(Duration::from_secs(20), g.handle.sync(false))
            .await
            .expect("the sync finished")
            .unwrap();
        assert_eq!(
            (stats.files_uploaded, stats.files_deleted),
            (1, 0),
            "{stats:?}"
        );
        assert_eq!(g.handle.status().held_deletes, 3);
        let remote = mirrored(&g).await;
        assert_eq!(
            remote.keys().map(String::as_str).collect::<Vec<_>>(),
            ["a", "b", "c", "x"]
        );
        let manifest = Keys::new(&Config::default()).manifest();
        let m: Manifest =
            serde_json::from_slice(&g.remote.get_bytes(&manifest).await.unwrap().unwrap()).unwrap();
        assert_eq!(m.files.keys().collect::<Vec<_>>(), ["a", "b", "c", "x"]);
        // A file that turns up again is mirrored as usual; a confirming sync deletes the rest.
        std::fs::write(g.ws.join("a"), "a2").unwrap();
        g.handle.sync(false).await.unwrap();
        assert_eq!(g.handle.status().held_deletes, 2);
        g.handle.sync(true).await.unwrap();
        let remote = mirrored(&g).await;
        assert_eq!(
            remote.keys().map(String::as_str).collect::<Vec<_>>(),
            ["a", "x"]
        );
        assert_eq!(remote["a"], b"a2");
        g.stop.cancel();
        g.task.await.unwrap();
    }

    /// A remote manifest too large to read (here: reads capped below its size) is kept
    /// aside whole, streamed, as an unreadable one is, and rewritten from the
    /// workspace: the mirror does not stop on it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_manifest_too_large_to_read_is_kept_aside_and_rewritten() {
        let f = engine().await;
        std::fs::write(f.ws.join("a"), "a").unwrap();
        f.handle.sync(false).await.unwrap();
        f.stop.cancel();
        f.task.await.unwrap();
        let manifest = Keys::new(&Config::default()).manifest();
        let big = Bytes::from(vec![b'x'; 4096]);
        f.remote.put_bytes(&manifest, big.clone()).await.unwrap();
        let remote = f.remote.clone();
        remote.set_read_cap(1024);
        let g = engine_in(f._dir, "new-", remote, |ws| {
            std::fs::write(ws.join("b"), "b").unwrap();
        })
        .await;
        tokio::time::timeout(Duration::from_secs(20), g.handle.sync(false))
            .await
            .expect("the sync finished")
            .unwrap();
        g.remote.set_read_cap(u64::MAX);
        let aside = remote::unreadable_key(&manifest, &big);
        assert_eq!(g.remote.get_bytes(&aside).await.unwrap(), Some(big));
        let m: Manifest =
            serde_json::from_slice(&g.remote.get_bytes(&manifest).await.unwrap().unwrap()).unwrap();
        assert!(m.files.contains_key("b"), "{:?}", m.files.keys());
        g.stop.cancel();
        g.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outage_degrades_then_everything_converges() {
        let f = engine().await;
        std::fs::write(f.ws.join("a.txt"), "1").unwrap();
        f.handle.sync(false).await.unwrap();
        f.remote.set_down(true);
        for i in 0..5 {
            std::fs::write(f.ws.join(format!("b{i}.txt")), "2").unwrap();
        }
        let waited = tokio::time::timeout(Duration::from_millis(1500), f.handle.sync(false)).await;
        assert!(
            waited.is_err(),
            "a sync cannot finish while the remote is down"
        );
        let s = f.handle.status();
        assert!(s.degraded, "{s:?}");
        assert!(
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("injected")),
            "{s:?}"
        );
        // The lag counts from the oldest change still waiting, through failed rounds.
        assert!(s.lag_ms >= 300, "{s:?}");
        assert!(
            f.remote.refused.load(Ordering::SeqCst) >= 2,
            "retried with backoff"
        );
        f.remote.set_down(false);
        let stats = tokio::time::timeout(Duration::from_secs(40), f.handle.sync(false))
            .await
            .expect("converges once the remote is back")
            .unwrap();
        let _ = stats;
        let s = f.handle.status();
        assert!(!s.degraded, "{s:?}");
        assert_eq!(s.files, 6);
        assert_eq!(s.pending_files, 0);
        f.stop.cancel();
        f.task.await.unwrap();
    }

    /// While a sync call waits through an outage, failed rounds are tried again every
    /// 2 s at most (not a backoff of up to 30 s): the call is answered soon after the
    /// remote comes back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_sync_is_retried_often_through_an_outage() {
        let f = engine().await;
        f.handle.sync(false).await.unwrap();
        f.remote.set_down(true);
        std::fs::write(f.ws.join("a.txt"), "1").unwrap();
        let handle = f.handle.clone();
        let call = tokio::spawn(async move { handle.sync(false).await });
        // Uncapped, the backoff (200 ms doubling, jittered to half) leaves a gap of
        // at least 3.2 s between two attempts within 10 s.
        let start = tokio::time::Instant::now();
        let (mut seen, mut last, mut widest) = (0, start, Duration::ZERO);
        while start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = f.remote.refused.load(Ordering::SeqCst);
            if now != seen {
                widest = widest.max(last.elapsed());
                (seen, last) = (now, tokio::time::Instant::now());
            }
        }
        widest = widest.max(last.elapsed());
        assert!(seen >= 5, "retried: {seen}");
        assert!(widest < Duration::from_millis(2800), "{widest:?}");
        f.remote.set_down(false);
        let back = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("answered")
            .unwrap()
            .unwrap();
        assert!(
            back.elapsed() < Duration::from_secs(3),
            "{:?}",
            back.elapsed()
        );
        f.stop.cancel();
        f.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transient_failures_are_retried_without_a_sync_call() {
        let f = engine().await;
        f.handle.sync(false).await.unwrap();
        f.remote.fail_next(3);
        std::fs::write(f.ws.join("late.txt"), "x").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let s = f.handle.status();
            if s.files == 1 && !s.degraded && s.pending_files == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never converged: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(f.remote.refused.load(Ordering::SeqCst), 3);
        f.stop.cancel();
        f.task.await.unwrap();
    }

    /// A file written more often than it can be read (a training log) still goes
    /// out, from a copy: a sync answers once the remote holds everything written
    /// before the call, and deletions are not held up meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_written_all_the_time_still_reaches_the_remote() {
        use std::io::Write;
        let f = engine().await;
        let log = f.ws.join("train.log");
        std::fs::write(&log, vec![b'x'; 8 << 20]).unwrap();
        std::fs::write(f.ws.join("gone.txt"), "g").unwrap();
        f.handle.sync(false).await.unwrap();
        std::fs::remove_file(f.ws.join("gone.txt")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = std::thread::spawn({
            let (log, stop) = (log.clone(), stop.clone());
            move || {
                let mut out = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
                for n in 0u64.. {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    writeln!(out, "line {n}").unwrap();
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before_call = std::fs::metadata(&log).unwrap().len();
        let synced = tokio::time::timeout(Duration::from_secs(60), f.handle.sync(false)).await;
        synced.expect("the sync finished").unwrap();
        let changing = f.metrics.sync_files_changing.get();
        assert!(changing >= 1, "the first read found it changing");
        // Still written to: uploaded from a copy again, not read directly first (which
        // would only find it changing once more).
        let synced = tokio::time::timeout(Duration::from_secs(60), f.handle.sync(false)).await;
        assert_eq!(f.metrics.sync_files_changing.get(), changing);
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        synced.expect("the sync finished").unwrap();
        let remote = mirrored(&f).await;
        assert!(!remote.contains_key("gone.txt"), "the deletion went out");
        let sent = &remote["train.log"];
        assert!(
            sent.len() as u64 >= before_call,
            "{} bytes sent, {before_call} written before the sync",
            sent.len()
        );
        assert!(std::fs::read(&log).unwrap().starts_with(sent));
        let manifest = Keys::new(&Config::default()).manifest();
        let m: Manifest =
            serde_json::from_slice(&f.remote.get_bytes(&manifest).await.unwrap().unwrap()).unwrap();
        let entry = &m.files["train.log"];
        assert_eq!(entry.size, sent.len() as u64);
        assert_eq!(
            entry.hash,
            format!("blake3:{}", blake3::hash(sent).to_hex())
        );
        let staged = std::fs::read_dir(f._dir.path().join("state/staging")).unwrap();
        assert_eq!(staged.count(), 0, "no copy outlives its upload");
        f.stop.cancel();
        f.task.await.unwrap();
    }

    /// A round that hangs (an upload that gets no answer) shows in the lag, which
    /// keeps growing until the change is in remote storage.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lag_grows_while_a_round_hangs() {
        let f = engine().await;
        f.handle.sync(false).await.unwrap();
        f.remote.set_hang(true);
        std::fs::write(f.ws.join("a.txt"), "a").unwrap();
        let waiting = tokio::spawn({
            let handle = f.handle.clone();
            async move { handle.sync(false).await }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!waiting.is_finished());
        let s = f.handle.status();
        assert!(s.lag_ms >= 1000, "{s:?}");
        assert!(f.handle.lag() >= Duration::from_secs(1));
        f.remote.set_hang(false);
        waiting.await.unwrap().unwrap();
        assert_eq!(f.handle.status().lag_ms, 0);
        f.stop.cancel();
        f.task.await.unwrap();
    }

    /// The workspace files in the remote, by path.
    async fn mirrored(f: &Fixture) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for o in crate::remote::list_all(f.remote.as_ref(), "")
            .await
            .unwrap()
        {
            if let Some((_, rel)) = o.key.split_once("/workspace/files/") {
                let data = f.remote.get_bytes(&o.key).await.unwrap().unwrap();
                out.insert(rel.to_string(), data.to_vec());
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_swapped_with_a_directory_reaches_the_remote_unless_a_guard_holds_it() {
        let f = engine().await;
        std::fs::write(f.ws.join("y"), "old y").unwrap();
        std::fs::create_dir_all(f.ws.join("d")).unwrap();
        std::fs::write(f.ws.join("d/a"), "old d/a").unwrap();
        std::fs::write(f.ws.join("keep"), "k").unwrap();
        f.handle.sync(false).await.unwrap();
        // `y` becomes a directory and `d` a file: both land, with no failed upload.
        std::fs::remove_file(f.ws.join("y")).unwrap();
        std::fs::create_dir_all(f.ws.join("y")).unwrap();
        std::fs::write(f.ws.join("y/z"), "new work").unwrap();
        std::fs::remove_dir_all(f.ws.join("d")).unwrap();
        std::fs::write(f.ws.join("d"), "d is a file").unwrap();
        let stats = tokio::time::timeout(Duration::from_secs(20), f.handle.sync(false))
            .await
            .expect("the sync finished")
            .unwrap();
        assert_eq!(
            (stats.files_uploaded, stats.files_deleted),
            (2, 2),
            "{stats:?}"
        );
        let s = f.handle.status();
        assert!(!s.degraded && s.last_error.is_none(), "{s:?}");
        let remote = mirrored(&f).await;
        assert_eq!(remote.get("y/z").map(Vec::as_slice), Some(&b"new work"[..]));
        assert_eq!(
            remote.get("d").map(Vec::as_slice),
            Some(&b"d is a file"[..])
        );
        assert!(!remote.contains_key("y") && !remote.contains_key("d/a"));

        // A mass deletion held, and one file takes the deleted directory's name: the
        // hold stays, and the new file waits for a confirmation, saying so.
        std::fs::create_dir_all(f.ws.join("many")).unwrap();
        for i in 0..120 {
            std::fs::write(f.ws.join(format!("many/m{i}")), "m").unwrap();
        }
        f.handle.sync(false).await.unwrap();
        std::fs::remove_dir_all(f.ws.join("many")).unwrap();
        f.handle.sync(false).await.unwrap();
        assert_eq!(f.handle.status().held_deletes, 120);
        std::fs::write(f.ws.join("many"), "oops").unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(3), f.handle.sync(false)).await;
        assert!(waited.is_err(), "the new file went past the hold");
        let s = f.handle.status();
        assert_eq!(s.held_deletes, 120, "{s:?}");
        assert!(
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("confirm_deletes")),
            "{s:?}"
        );
        assert_eq!(
            mirrored(&f)
                .await
                .keys()
                .filter(|k| k.starts_with("many/"))
                .count(),
            120
        );
        f.handle.sync(true).await.unwrap();
        let remote = mirrored(&f).await;
        assert_eq!(remote.get("many").map(Vec::as_slice), Some(&b"oops"[..]));
        assert_eq!(remote.keys().filter(|k| k.starts_with("many/")).count(), 0);
        f.stop.cancel();
        f.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_renamed_directory_is_no_mass_deletion() {
        let f = engine().await;
        std::fs::create_dir_all(f.ws.join("src")).unwrap();
        for i in 0..150 {
            std::fs::write(f.ws.join(format!("src/f{i}.rs")), format!("{i}")).unwrap();
        }
        f.handle.sync(false).await.unwrap();
        std::fs::rename(f.ws.join("src"), f.ws.join("lib")).unwrap();
        let stats = f.handle.sync(false).await.unwrap();
        assert_eq!(
            (stats.files_uploaded, stats.files_deleted),
            (150, 150),
            "{stats:?}"
        );
        assert_eq!(f.handle.status().held_deletes, 0);
        let remote = mirrored(&f).await;
        assert!(remote.keys().all(|k| k.starts_with("lib/")), "{remote:?}");
        // Removing them for good is still held.
        std::fs::remove_dir_all(f.ws.join("lib")).unwrap();
        std::fs::write(f.ws.join("other"), "x").unwrap();
        f.handle.sync(false).await.unwrap();
        assert_eq!(f.handle.status().held_deletes, 150);
        f.stop.cancel();
        f.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rename_whose_uploads_fail_deletes_nothing() {
        let f = engine().await;
        std::fs::create_dir_all(f.ws.join("src")).unwrap();
        for i in 0..5 {
            std::fs::write(f.ws.join(format!("src/p{i}.rs")), format!("{i}")).unwrap();
        }
        f.handle.sync(false).await.unwrap();
        f.remote.fail_next_of("put", 5);
        std::fs::rename(f.ws.join("src"), f.ws.join("lib")).unwrap();
        let failed = tokio::time::timeout(Duration::from_secs(10), async {
            while !f.handle.status().degraded {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(failed.is_ok(), "no failed round");
        let remote = mirrored(&f).await;
        assert_eq!(
            remote.keys().filter(|k| k.starts_with("src/")).count(),
            5,
            "the old paths went before their new places were in: {remote:?}"
        );
        f.handle.sync(false).await.unwrap();
        let remote = mirrored(&f).await;
        assert!(remote.keys().all(|k| k.starts_with("lib/")), "{remote:?}");
        assert_eq!(remote.len(), 5);
        f.stop.cancel();
        f.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn emptied_and_a_file_written_again_is_held() {
        let f = engine().await;
        for i in 0..120 {
            std::fs::write(f.ws.join(format!("f{i}.txt")), "w").unwrap();
        }
        std::fs::write(f.ws.join("README.md"), "old").unwrap();
        f.handle.sync(false).await.unwrap();
        for i in 0..120 {
            std::fs::remove_file(f.ws.join(format!("f{i}.txt"))).unwrap();
        }
        std::fs::write(f.ws.join("README.md"), "# fresh").unwrap();
        f.handle.sync(false).await.unwrap();
        assert_eq!(f.handle.status().held_deletes, 120);
        assert_eq!(mirrored(&f).await.len(), 121);
        f.stop.cancel();
        f.task.await.unwrap();
    }

    /// A workspace emptied: its symlinks and empty directories are held with its
    /// files (a restore brings them back), until a sync confirms the deletions; a
    /// symlink replaced by a file is no deletion.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn symlinks_and_empty_directories_are_held_with_the_files() {
        let f = engine().await;
        for name in ["a", "b", "c"] {
            std::fs::write(f.ws.join(name), name).unwrap();
        }
        std::os::unix::fs::symlink("a", f.ws.join("link")).unwrap();
        std::os::unix::fs::symlink("b", f.ws.join("swapped")).unwrap();
        std::fs::create_dir_all(f.ws.join("empty/dir")).unwrap();
        f.handle.sync(false).await.unwrap();
        let manifest = Keys::new(&Config::default()).manifest();
        let read = || async {
            let bytes = f.remote.get_bytes(&manifest).await.unwrap().unwrap();
            serde_json::from_slice::<Manifest>(&bytes).unwrap()
        };
        let m = read().await;
        assert_eq!(m.symlinks.len(), 2, "{m:?}");
        assert!(m.empty_dirs.contains("empty/dir"), "{m:?}");

        for name in ["a", "b", "c", "link", "swapped"] {
            std::fs::remove_file(f.ws.join(name)).unwrap();
        }
        std::fs::remove_dir_all(f.ws.join("empty")).unwrap();
        std::fs::write(f.ws.join("swapped"), "a file now").unwrap();
        f.handle.sync(false).await.unwrap();
        assert_eq!(f.handle.status().held_deletes, 4);
        let m = read().await;
        assert_eq!(m.symlinks.keys().collect::<Vec<_>>(), ["link"], "{m:?}");
        assert!(m.empty_dirs.contains("empty/dir"), "{m:?}");
        assert!(m.held.contains("link"), "{m:?}");
        assert_eq!(
            m.files.keys().collect::<Vec<_>>(),
            ["a", "b", "c", "swapped"]
        );

        f.handle.sync(true).await.unwrap();
        assert_eq!(f.handle.status().held_deletes, 0);
        let m = read().await;
        assert!(m.symlinks.is_empty(), "{m:?}");
        assert!(m.empty_dirs.is_empty(), "{m:?}");
        assert_eq!(m.files.keys().collect::<Vec<_>>(), ["swapped"]);
        f.stop.cancel();
        f.task.await.unwrap();
    }

    /// In a small workspace, deleting most files and editing the rest is ordinary
    /// work: no guard holds it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_workspace_edited_and_pruned_is_no_accident() {
        let f = engine().await;
        for name in ["main.py", "scratch1.txt", "scratch2.txt"] {
            std::fs::write(f.ws.join(name), "v1").unwrap();
        }
        f.handle.sync(false).await.unwrap();
        std::fs::write(f.ws.join("main.py"), "v2").unwrap();
        std::fs::remove_file(f.ws.join("scratch1.txt")).unwrap();
        std::fs::remove_file(f.ws.join("scratch2.txt")).unwrap();
        let stats = f.handle.sync(false).await.unwrap();
        assert_eq!(stats.files_deleted, 2, "{stats:?}");
        assert_eq!(f.handle.status().held_deletes, 0);
        assert_eq!(mirrored(&f).await.keys().collect::<Vec<_>>(), ["main.py"]);
        f.stop.cancel();
        f.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_file_in_the_place_of_a_kept_back_one_waits_for_confirmation() {
        let f = engine().await;
        std::fs::write(f.ws.join("notes"), "old").unwrap();
        std::fs::write(f.ws.join("other"), "o").unwrap();
        f.handle.sync(false).await.unwrap();
        f.stop.cancel();
        f.task.await.unwrap();
        // A new state directory whose workspace has notes/ as a directory.
        let g = engine_in(f._dir, "new-", f.remote.clone(), |ws| {
            std::fs::create_dir_all(ws.join("notes")).unwrap();
            std::fs::write(ws.join("notes/today.md"), "today").unwrap();
        })
        .await;
        let waited = tokio::time::timeout(Duration::from_secs(3), g.handle.sync(false)).await;
        assert!(waited.is_err(), "the new file went past the kept one");
        let s = g.handle.status();
        assert!(
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("confirm_deletes")),
            "{s:?}"
        );
        assert_eq!(
            mirrored(&g).await.get("notes").map(Vec::as_slice),
            Some(&b"old"[..])
        );
        g.handle.sync(true).await.unwrap();
        let remote = mirrored(&g).await;
        assert_eq!(
            remote.get("notes/today.md").map(Vec::as_slice),
            Some(&b"today"[..])
        );
        assert!(
            !remote.contains_key("notes") && !remote.contains_key("other"),
            "{remote:?}"
        );
        g.stop.cancel();
        g.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_symlink_in_the_place_of_held_files_waits_too() {
        let f = engine().await;
        std::fs::create_dir_all(f.ws.join("proj")).unwrap();
        std::fs::write(f.ws.join("proj/f1"), "1").unwrap();
        std::fs::write(f.ws.join("proj/f2"), "2").unwrap();
        f.handle.sync(false).await.unwrap();
        std::fs::remove_dir_all(f.ws.join("proj")).unwrap();
        std::os::unix::fs::symlink("/etc", f.ws.join("proj")).unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(3), f.handle.sync(false)).await;
        assert!(waited.is_err(), "the symlink went past the hold");
        let s = f.handle.status();
        assert_eq!(s.held_deletes, 2, "{s:?}");
        assert!(
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("confirm_deletes")),
            "{s:?}"
        );
        let manifest = Keys::new(&Config::default()).manifest();
        let m: Manifest =
            serde_json::from_slice(&f.remote.get_bytes(&manifest).await.unwrap().unwrap()).unwrap();
        assert!(m.symlinks.is_empty(), "{m:?}");
        assert_eq!(m.held.len(), 2, "{m:?}");
        f.handle.sync(true).await.unwrap();
        f.stop.cancel();
        f.task.await.unwrap();
    }

    /// Stops `f` and starts an engine on the same state directory and workspace.
    async fn restart(f: Fixture) -> Fixture {
        f.stop.cancel();
        f.task.await.unwrap();
        engine_in(f._dir, "", f.remote.clone(), |_| {}).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_the_guards_hold_stays_held_across_restarts() {
        let f = engine().await;
        for i in 0..20 {
            std::fs::write(f.ws.join(format!("f{i}.txt")), "w").unwrap();
        }
        f.handle.sync(false).await.unwrap();
        // Everything gone and a new file: held, also after a restart (the manifest now
        // names the new file, so a restart alone would not see "everything" again).
        for i in 0..20 {
            std::fs::remove_file(f.ws.join(format!("f{i}.txt"))).unwrap();
        }
        std::fs::write(f.ws.join("new.txt"), "n").unwrap();
        f.handle.sync(false).await.unwrap();
        assert_eq!(f.handle.status().held_deletes, 20);
        let f = restart(f).await;
        f.handle.sync(false).await.unwrap();
        assert_eq!(f.handle.status().held_deletes, 20);
        assert_eq!(mirrored(&f).await.len(), 21);
        f.stop.cancel();
        f.task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_a_new_state_directory_lacks_stay_kept_across_restarts() {
        let f = engine().await;
        for i in 0..5 {
            std::fs::write(f.ws.join(format!("w{i}.txt")), "w").unwrap();
        }
        f.handle.sync(false).await.unwrap();
        f.stop.cancel();
        f.task.await.unwrap();
        let g = engine_in(f._dir, "new-", f.remote.clone(), |ws| {
            std::fs::write(ws.join("baked.txt"), "b").unwrap();
        })
        .await;
        g.handle.sync(false).await.unwrap();
        assert_eq!(g.handle.status().held_deletes, 5);
        g.stop.cancel();
        g.task.await.unwrap();
        let g = engine_in(g._dir, "new-", g.remote.clone(), |_| {}).await;
        g.handle.sync(false).await.unwrap();
        assert_eq!(g.handle.status().held_deletes, 5);
        assert_eq!(mirrored(&g).await.len(), 6);
        g.stop.cancel();
        g.task.await.unwrap();
    }

    /// An old sandbox coming back after a newer one published: what the newer one
    /// added and the old tree never had is kept, not deleted as gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_old_state_directory_keeps_what_another_daemon_added() {
        let f = engine().await;
        for name in ["a", "b"] {
            std::fs::write(f.ws.join(name), name).unwrap();
        }
        f.handle.sync(false).await.unwrap();
        f.stop.cancel();
        f.task.await.unwrap();
        let g = engine_in(f._dir, "newer-", f.remote.clone(), |ws| {
            for name in ["a", "b", "d"] {
                std::fs::write(ws.join(name), name).unwrap();
            }
        })
        .await;
        g.handle.sync(false).await.unwrap();
        std::fs::write(g.ws.join("d"), "d2").unwrap();
        g.handle.sync(false).await.unwrap();
        g.stop.cancel();
        g.task.await.unwrap();
        // The first one's state directory and tree again (a, b; never d).
        let f = engine_in(g._dir, "", g.remote.clone(), |_| {}).await;
        f.handle.sync(false).await.unwrap();
        assert_eq!(f.handle.status().held_deletes, 1);
        let remote = mirrored(&f).await;
        assert_eq!(remote.keys().collect::<Vec<_>>(), ["a", "b", "d"]);
        assert_eq!(remote["d"], b"d2");
        // A restart keeps it kept; a confirming sync lets the deletion through.
        let f = restart(f).await;
        f.handle.sync(false).await.unwrap();
        assert_eq!(mirrored(&f).await.len(), 3);
        f.handle.sync(true).await.unwrap();
        assert_eq!(mirrored(&f).await.keys().collect::<Vec<_>>(), ["a", "b"]);
        f.stop.cancel();
        f.task.await.unwrap();
    }

    #[test]
    fn clashes_finds_parents_and_children_only() {
        let set: BTreeSet<&str> = ["a/b", "c", "e/f/g"].into_iter().collect();
        assert!(clashes(&set, "a")); // a/b is below a
        assert!(clashes(&set, "c/d")); // c is a parent
        assert!(clashes(&set, "e/f")); // e/f/g is below
        assert!(clashes(&set, "e/f/g/h/i"));
        assert!(!clashes(&set, "a/b")); // the same path is a replacement in place
        assert!(!clashes(&set, "a/bc"));
        assert!(!clashes(&set, "ab"));
        assert!(!clashes(&set, "cd"));
    }

    #[test]
    fn remove_under_takes_the_subtree_only() {
        let mut m: BTreeMap<String, u8> = ["a", "a/b", "a/b/c", "a-b", "a.txt", "ab", "b"]
            .iter()
            .map(|k| (k.to_string(), 0))
            .collect();
        let mut removed = remove_under(&mut m, "a");
        removed.sort();
        assert_eq!(removed, vec!["a", "a/b", "a/b/c"]);
        assert_eq!(
            m.keys().cloned().collect::<Vec<_>>(),
            vec!["a-b", "a.txt", "ab", "b"]
        );
        assert_eq!(remove_under(&mut m, "").len(), 4);
    }
}
