//! The daemon's life: lock the state directory, open the store, bind the socket, serve,
//! and on a signal (or `POST /v1/shutdown`) shut down in order.
//!
//! Start: state dir lock → KV key → database → socket → own the conversation (single
//! writer) → restore (workspace, then KV and file store) → reconcile → ready.
//! Stop: not ready (readyz 503) → final sync (the remote part arrives with the sync
//! engine; this is where it runs, while the API still answers) → refuse writes →
//! release the conversation → drain HTTP requests → close the database → remove the
//! socket → release the lock.

use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::auth::Authenticator;
use crate::config::{AuthMode, Config, RestoreMode};
use crate::files::FileStore;
use crate::kv::crypto::{self, KeySource};
use crate::kv::ops::Limits;
use crate::kv::store::db_path;
use crate::kv::{KvStore, StoreOptions};
use crate::metrics::Metrics;
use crate::replicate::Replicator;
use crate::sync::SyncEngine;

/// How long in-flight requests may take to finish once the server stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of `shutdown.deadline` (at most a fifth of it) kept from the final sync for
/// what follows it: releasing the conversation, stopping the server and the tasks.
const TAIL_RESERVE: Duration = Duration::from_secs(3);
/// Write requests that may wait for the writer before new ones get `busy`.
const WRITE_QUEUE: usize = 16_384;
/// Longest wait for the startup reconcile round before the daemon reports ready anyway
/// (degraded, still retrying in the background).
const RECONCILE_WAIT: Duration = Duration::from_secs(30);
/// Exit code when the final sync could not finish within the deadline (EX_TEMPFAIL).
pub const EXIT_INCOMPLETE: u8 = 75;
/// In the state directory while a workspace restore is under way.
const WORKSPACE_RESTORE_MARKER: &str = "workspace-restore.pending";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Ready,
    ShuttingDown,
}

/// Shared lifecycle state.
///
/// `shutdown` is cancelled once, by the first signal, `POST /v1/shutdown` or the
/// caller's shutdown future; long-lived tasks (watch requests, the purger) end on it.
/// `abort` is cancelled by a second signal: the final sync gives up at once.
pub struct Lifecycle {
    phase: AtomicU8,
    pub shutdown: CancellationToken,
    pub abort: CancellationToken,
    /// What the restores at start did, for `GET /v1/status`.
    restored: std::sync::Mutex<serde_json::Map<String, serde_json::Value>>,
    /// The final sync's outcome once it is known: the exit code and what was left.
    stopped: tokio::sync::watch::Sender<Option<(u8, Vec<String>)>>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            phase: AtomicU8::new(0),
            shutdown: CancellationToken::new(),
            abort: CancellationToken::new(),
            restored: Default::default(),
            stopped: tokio::sync::watch::Sender::new(None),
        }
    }
}

impl Lifecycle {
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::ShuttingDown,
        }
    }

    fn set_phase(&self, p: Phase) {
        let v = match p {
            Phase::Starting => 0,
            Phase::Ready => 1,
            Phase::ShuttingDown => 2,
        };
        self.phase.store(v, Ordering::Release);
    }

    /// Records what one restore at start did (`workspace`, `stores`).
    pub fn record_restore(&self, what: &str, report: serde_json::Value) {
        self.restored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(what.to_string(), report);
    }

    pub fn restored(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.restored
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    pub fn request_shutdown(&self) {
        self.set_phase(Phase::ShuttingDown);
        self.shutdown.cancel();
    }

    /// Waits for the final sync's outcome: the exit code the daemon will have (0 or
    /// 75) and what was left out of remote storage.
    pub async fn final_sync_outcome(&self) -> (u8, Vec<String>) {
        let mut rx = self.stopped.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or((EXIT_INCOMPLETE, Vec::new())),
            Err(_) => (EXIT_INCOMPLETE, Vec::new()),
        }
    }
}

/// Records in a state directory which conversation it holds the state of, and refuses
/// one that holds another's: its KV store and mirror cache would go out under this
/// conversation's name (as etcd refuses a data directory of another cluster).
pub fn claim_state_dir(dir: &Path, id: &crate::config::Identity) -> anyhow::Result<()> {
    let path = dir.join("identity");
    let ours = format!("{}/{}\n", id.user, id.conversation);
    match std::fs::read_to_string(&path) {
        Ok(theirs) if theirs.trim() == ours.trim() => Ok(()),
        Ok(theirs) => anyhow::bail!(
            "state_dir {} holds the state of conversation {} (see {}); this daemon is configured for {}: give it a state_dir of its own (or remove that one to start afresh)",
            dir.display(),
            theirs.trim(),
            path.display(),
            ours.trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::replace_file(&path, ours.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// An exclusive lock on the state directory, held for the daemon's life.
pub struct StateLock {
    _file: File,
}

/// Locks `<state_dir>/lock`; a second daemon on the same state dir fails here.
pub fn lock_state_dir(dir: &Path) -> anyhow::Result<StateLock> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create state_dir {}", dir.display()))?;
    let path = dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                .map(|pid| format!(", pid {pid}"))
                .unwrap_or_default();
            anyhow::bail!(
                "another sandkeep daemon is running on state_dir {} (it holds {}{holder})",
                dir.display(),
                path.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    // A state directory made by someone else (a Kubernetes emptyDir is 0777) keeps
    // its mode: its database holds the keys in plain and its key file the KV key.
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(dir)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            state_dir = %dir.display(),
            mode = format!("{:o}", m.permissions().mode() & 0o777),
            "the state directory is open to other users: make it 0700 (the daemon creates it so, but does not change an existing one)"
        );
    }
    Ok(StateLock { _file: file })
}

/// Binds the socket. An existing socket file is removed only when no daemon answers
/// on it; anything else at that path is left alone and refused.
pub fn bind_socket(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "another daemon answers on socket {}; refusing to replace it",
                    path.display()
                );
            }
            tracing::info!(socket = %path.display(), "removing stale socket");
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
        }
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    Ok(listener)
}

/// Creates the workspace directory when it does not exist at start (its parent must),
/// so a fresh sandbox or the development config starts mirroring at once. A workspace
/// that vanishes later is never recreated: the daemon reports `degraded` instead.
fn ensure_workspace(path: &Path) {
    if let Err(e) = std::fs::symlink_metadata(path)
        && e.kind() == std::io::ErrorKind::NotFound
    {
        match std::fs::create_dir(path) {
            Ok(()) => {
                tracing::info!(workspace = %path.display(), "created the workspace directory")
            }
            Err(e) => {
                tracing::warn!(workspace = %path.display(), error = %e, "the workspace is missing and cannot be created")
            }
        }
    }
}

/// Removes the socket file on drop, if it is still ours.
struct SocketGuard {
    path: PathBuf,
    /// The identity of the socket file this daemon bound.
    id: Option<(u64, u64, i64, i64)>,
}

/// Device, inode and modification time: an inode number alone is soon reused. Not the
/// change time, which an operator's `chmod` or `chown` of the socket moves.
fn file_id(path: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec()))
}

impl SocketGuard {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            id: file_id(path),
        }
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        // Only the file this daemon bound: another daemon may have bound the path
        // after someone removed ours.
        if self.id.is_none() || file_id(&self.path) != self.id {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove socket");
        }
    }
}

/// Runs the daemon until `shutdown` completes, a signal arrives (when the caller
/// installed them) or `POST /v1/shutdown` is called. Returns the process exit code.
pub async fn run(
    config: Config,
    lifecycle: Arc<Lifecycle>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<u8> {
    let config = Arc::new(config);
    if config.auth.mode == AuthMode::None && !config.auth.secret.is_empty() {
        tracing::warn!(
            "auth.secret is set but auth.mode = \"none\": tokens are NOT checked; set auth.mode = \"token\" to require them"
        );
    }
    let _lock = lock_state_dir(&config.state_dir)?;
    // The socket before anything is created in the state directory (its identity
    // first): a start that cannot serve (a socket path taken) leaves nothing behind that
    // a corrected start trips on.
    let listener = bind_socket(&config.socket, config.socket_mode_bits()?)?;
    let _socket = SocketGuard::new(&config.socket);
    claim_state_dir(&config.state_dir, &config.identity)?;
    let env_key = match std::env::var("SANDKEEP_KV_KEY") {
        Ok(key) => Some(key),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("SANDKEEP_KV_KEY is not valid UTF-8 (it holds a base64 key)")
        }
    };
    let (cipher, source) =
        crypto::load_key(env_key.as_deref(), &config.kv.key_file, &config.state_dir)?;
    match &source {
        KeySource::Generated(p) => tracing::warn!(
            key_file = %p.display(),
            "GENERATED A NEW KV ENCRYPTION KEY. Remote KV exports are encrypted with it: \
             keep a copy (kv.key_file or SANDKEEP_KV_KEY) or a restore elsewhere cannot read them"
        ),
        other => tracing::info!(source = ?other, "kv key loaded"),
    }
    let db_file = db_path(&config.state_dir);
    let opts = StoreOptions {
        path: db_file,
        cipher,
        limits: Limits {
            max_value_bytes: config.kv.max_value_bytes,
            max_namespace_bytes: config.kv.max_namespace_bytes,
        },
        queue_capacity: WRITE_QUEUE,
    };
    let kv = tokio::task::spawn_blocking(move || KvStore::open(opts))
        .await
        .context("opening the kv store")??;
    let files = FileStore::new(kv.clone());
    // A new state directory: its database was just created, or a first start created
    // it and died before recording anything (a full disk); either way it holds nothing.
    let new_state = files.restore_pending().await?.is_none()
        && kv.stats().await?.0 == 0
        && files.stats().await?.0 == 0;
    if new_state {
        // Until the restore below finished, a restart must try it again.
        files.set_restore_pending(true).await?;
    }

    ensure_workspace(&config.workspace);
    let metrics = {
        let mut m = Metrics::new();
        m.register_kv_commits(kv.commit_stats());
        Arc::new(m)
    };
    let remote = crate::remote::from_config(&config)
        .await
        .context("setting up remote storage")?;
    let remote: Arc<dyn crate::remote::Remote> = Arc::new(
        crate::remote::metered::MeteredRemote::new(remote, metrics.clone()),
    );
    // -- Single writer (src/owner.rs): every remote write goes through the owner's
    // fence, closed until the claim below succeeds.
    let owner = crate::owner::Owner::new(remote.clone(), &config, metrics.clone())?;
    let remote: Arc<dyn crate::remote::Remote> = Arc::new(
        crate::remote::fenced::FencedRemote::new(remote, owner.fence()),
    );
    let mut shutdown = Box::pin(futures::FutureExt::fuse(shutdown));
    let (mut engine, sync, first_round) =
        SyncEngine::new(config.clone(), remote.clone(), metrics.clone()).await?;

    let snapshots = Arc::new(crate::snapshot::Snapshots::new(
        &config,
        remote.clone(),
        metrics.clone(),
    ));
    let git = Arc::new(crate::gitbundle::GitBundler::new(
        &config,
        remote.clone(),
        metrics.clone(),
        Some(sync.clone()),
    ));
    let (replicator, replica) = Replicator::new(
        kv.clone(),
        files.clone(),
        remote.clone(),
        config.conversation_prefix(),
        config.kv.replicate_delay.0,
    );
    let replicator = {
        let owner = owner.clone();
        replicator.verify_every(
            config.sync.verify_interval.0,
            Arc::new(move || {
                let s = owner.status();
                (s.state == crate::owner::OwnerState::Claimed && !owner.took_over_from_another())
                    .then_some(s.epoch)
            }),
        )
    };

    let state = AppState::new(api::Shared {
        config: config.clone(),
        kv: kv.clone(),
        sync: sync.clone(),
        auth: Arc::new(Authenticator::new(&config)),
        metrics,
        lifecycle: lifecycle.clone(),
        started: Instant::now(),
        snapshots: snapshots.clone(),
        git: git.clone(),
        files: files.clone(),
        replica: replica.clone(),
        owner: owner.clone(),
    });
    let server_stop = CancellationToken::new();
    let mut server = tokio::spawn(api::server::serve(
        listener,
        api::router(state),
        server_stop.clone(),
    ));

    // Own the conversation before restoring or writing anything (a takeover restores
    // what the previous owner left after its final sync). The lease is renewed from
    // the claim on, so a long restore cannot let it lapse.
    let claimed = tokio::select! {
        () = owner.claim() => true,
        () = lifecycle.shutdown.cancelled() => false,
        () = &mut shutdown => {
            lifecycle.request_shutdown();
            false
        }
    };
    let owner_stop = CancellationToken::new();
    let _owner_stop = owner_stop.clone().drop_guard();
    if claimed {
        tokio::spawn(owner.clone().run(owner_stop));
    }

    // Restore (the API answers `not_ready` meanwhile): the workspace first, then the
    // KV and the file store.
    let plan = if claimed {
        workspace_restore_plan(&config)
    } else {
        None
    };
    if let Some(force) = plan {
        let marker = config.state_dir.join(WORKSPACE_RESTORE_MARKER);
        // Until the restore finished, a restart resumes it (a half-restored workspace
        // must never be taken for the truth and mirrored over the remote).
        std::fs::write(&marker, b"").with_context(|| format!("writing {}", marker.display()))?;
        // The workspace says so too (as an init container's restore does): a start on
        // another state directory with this workspace resumes it as well.
        let in_workspace = config.workspace.join(crate::restore::INCOMPLETE_MARKER);
        let marked = std::fs::create_dir_all(&config.workspace)
            .and_then(|()| std::fs::write(&in_workspace, crate::restore::restore_source(&config)));
        if let Err(e) = marked {
            tracing::warn!(error = %e, marker = %in_workspace.display(), "cannot mark the workspace's restore as under way");
        }
        let restored = tokio::select! {
            r = restore_workspace_retrying(remote.as_ref(), &config, force) => Some(r),
            _ = lifecycle.shutdown.cancelled() => None,
        };
        // Finished, whatever it found: the next start need not resume it (nor an init
        // container's unfinished restore, resumed here).
        if restored.is_some() {
            for m in [&marker, &in_workspace] {
                match std::fs::remove_file(m) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!(error = %e, marker = %m.display(), "cannot remove the restore marker");
                    }
                    _ => {}
                }
            }
        }
        match restored {
            Some(Ok(Some(report))) => {
                tracing::info!(
                    generation = report.generation,
                    files = report.files,
                    bytes = report.bytes,
                    unchanged = report.unchanged,
                    repos = report.repos.len(),
                    bad = report.bad.len(),
                    ms = report.duration_ms,
                    "workspace restored from remote storage"
                );
                for b in &report.bad {
                    tracing::error!(path = %b.path, error = %b.error, "entry not restored; its remote copy is kept");
                }
                // The restore decided what the tree holds: what it left out on purpose
                // (a newer bundle's state) is no "never here" for the first round; what
                // it could not write is kept.
                engine.restored(report.bad.iter().map(|b| b.path.clone()));
                lifecycle.record_restore("workspace", serde_json::json!(report));
            }
            Some(Ok(None)) => {
                tracing::info!("nothing to restore: the remote holds no workspace manifest");
                lifecycle.record_restore("workspace", serde_json::json!({"restored": false}));
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "the workspace cannot be restored; starting with what it holds");
                lifecycle.record_restore("workspace", serde_json::json!({"error": e.to_string()}));
            }
            None => tracing::warn!(
                "shut down before the workspace was restored; the next start resumes it"
            ),
        }
    }
    // A state directory that is not new, taking the conversation over from another
    // daemon: what that daemon exported is newer than this store (a sandbox coming
    // back after another one ran). Taken in before anything is served or exported.
    if claimed && !lifecycle.shutdown.is_cancelled() {
        take_in_if_owed(&config, &kv, &files, remote.as_ref(), &owner, &lifecycle).await?;
    }
    if claimed && files.restore_pending().await? == Some(true) && !lifecycle.shutdown.is_cancelled()
    {
        let restored = tokio::select! {
            r = restore_stores_retrying(&kv, &files, remote.as_ref(), &config) => r,
            _ = lifecycle.shutdown.cancelled() => None,
        };
        match restored {
            Some(r) => {
                lifecycle.record_restore("stores", serde_json::json!(r));
                tracing::info!(
                    namespaces = r.namespaces,
                    keys = r.keys,
                    files = r.files,
                    bad = r.bad.len(),
                    "kv and file store restored from remote storage"
                );
                files.set_restore_pending(false).await?;
                owner.take_in_done();
            }
            None => tracing::warn!("shut down before the kv and file store were restored"),
        }
    }

    let tasks = tokio_util::task::TaskTracker::new();
    let background_stop = CancellationToken::new();
    // Periodic snapshots are no part of the final sync: they stop when it starts, so
    // that one in flight neither competes with it for the deadline nor keeps remote
    // writes going past it (which would make the release fail and the next daemon wait
    // a whole lease).
    let snapshots_stop = background_stop.child_token();
    // A shutdown during the restore: nothing was accepted (the API was not ready) and
    // nothing may be mirrored from a half-restored workspace.
    let started = claimed && !lifecycle.shutdown.is_cancelled();
    if started {
        tasks.spawn(kv.clone().run_purger(background_stop.clone()));
        tasks.spawn(engine.run(background_stop.clone()));
        tasks.spawn(snapshots.run(snapshots_stop.clone()));
        tasks.spawn(git.clone().run(background_stop.clone()));
        tasks.spawn(replicator.run(background_stop.clone()));
        // A claim that remote storage kept waiting for at start is won in the
        // background, maybe from another daemon: what that one wrote is taken in then,
        // so that this one stops serving its older copy. Whether the exports start
        // first does not change the outcome: a KV export is conditional on this
        // store's previous one (else the remote one is taken in), and a file changed
        // here wins over the remote copy either way.
        let (config, kv, files, remote, owner, lifecycle) = (
            config.clone(),
            kv.clone(),
            files.clone(),
            remote.clone(),
            owner.clone(),
            lifecycle.clone(),
        );
        tasks.spawn(async move {
            tokio::select! {
                () = owner.wait_claimed() => {}
                () = lifecycle.shutdown.cancelled() => return,
            }
            // Nothing owed any more when the start took it in.
            if let Err(e) =
                take_in_if_owed(&config, &kv, &files, remote.as_ref(), &owner, &lifecycle).await
            {
                tracing::error!(error = %e, "cannot take in what the other daemon wrote");
            }
        });
    }

    // Startup reconcile: what is on disk but not in the remote goes up first.
    if !lifecycle.shutdown.is_cancelled() {
        tokio::select! {
            r = tokio::time::timeout(RECONCILE_WAIT, first_round) => if r.is_err() {
                tracing::warn!("the startup reconcile is still running; reporting ready");
            },
            _ = lifecycle.shutdown.cancelled() => {}
        }
    }
    if !lifecycle.shutdown.is_cancelled() {
        lifecycle.set_phase(Phase::Ready);
        tracing::info!(
            socket = %config.socket.display(),
            state_dir = %config.state_dir.display(),
            user = %config.identity.user,
            conversation = %config.identity.conversation,
            "sandkeep ready"
        );
    }

    tokio::select! {
        _ = &mut shutdown => lifecycle.request_shutdown(),
        _ = lifecycle.shutdown.cancelled() => {}
        r = &mut server => {
            kv.close();
            r.context("server task")?;
            anyhow::bail!("the HTTP server stopped unexpectedly");
        }
    }
    lifecycle.set_phase(Phase::ShuttingDown);
    tracing::info!("shutting down");
    snapshots_stop.cancel();

    // New writes get `shutting_down` from here on; the ones already queued commit.
    kv.stop_writes();
    if let Err(e) = kv.drain().await {
        tracing::error!(error = %e, "the kv writer did not drain");
    }
    // Everything below fits in `shutdown.deadline`: the final sync leaves a little of it
    // for releasing the conversation and stopping the server and the tasks.
    let deadline = config.shutdown.deadline.0;
    let stop_by = tokio::time::Instant::now() + deadline;
    let left = || stop_by.saturating_duration_since(tokio::time::Instant::now());
    let lost = owner.status().state == crate::owner::OwnerState::Lost;
    let (code, left_out) = if started && lost {
        // Its writes are refused for good: waiting out the deadline would not help.
        tracing::error!(
            "final sync skipped: another daemon took over this conversation, so nothing may be written to remote storage; changes made since stay local"
        );
        (
            EXIT_INCOMPLETE,
            vec!["everything: another daemon owns the conversation".to_string()],
        )
    } else if started {
        final_sync(
            &sync,
            &git,
            &replica,
            deadline.saturating_sub((deadline / 5).min(TAIL_RESERVE)),
            &lifecycle.abort,
            // Not released before the final sync ends: ended means lost.
            &owner.ended(),
        )
        .await
    } else {
        tracing::warn!(
            "stopped during start-up (before owning the conversation or finishing the restore): \
             nothing was written to remote storage"
        );
        (
            EXIT_INCOMPLETE,
            vec!["everything: stopped during start-up".to_string()],
        )
    };
    // `POST /v1/shutdown?wait=true` answers with this while the server drains.
    lifecycle.stopped.send_replace(Some((code, left_out)));
    owner.release(left()).await; // single writer: the next daemon may take over at once

    server_stop.cancel();
    // (At least a moment, even past the deadline: `shutdown?wait=true` callers are
    // being answered the outcome.)
    let drain = DRAIN_TIMEOUT.min(left()).max(Duration::from_millis(200));
    match tokio::time::timeout(drain, &mut server).await {
        Ok(r) => r.context("server task")?,
        Err(_) => {
            tracing::warn!("requests still running after the drain timeout; closing them");
            server.abort();
        }
    }
    background_stop.cancel();
    tasks.close();
    // A task inside a remote call that hangs (a server that accepts and never answers)
    // would otherwise keep the daemon past its deadline until the client times out.
    if tokio::time::timeout(DRAIN_TIMEOUT.min(left()), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "background tasks did not stop within the shutdown deadline (a remote call that hangs); leaving them"
        );
    }
    tokio::task::spawn_blocking(move || kv.close())
        .await
        .context("closing the kv store")?;
    tracing::info!(code, "stopped");
    Ok(code)
}

/// Whether the workspace is restored at start, and with `force`: `force` always;
/// `auto` when the workspace holds nothing (the daemon's own directories aside) or an
/// earlier restore was cut short; `never` never.
fn workspace_restore_plan(config: &Config) -> Option<bool> {
    // Ours, or that of a `sandkeep restore` from the same place (an init container)
    // that failed, unless restoring is off.
    if config.state_dir.join(WORKSPACE_RESTORE_MARKER).exists()
        || (config.restore != RestoreMode::Never
            && crate::restore::unfinished_restore_in(&config.workspace, config))
    {
        tracing::info!("an earlier restore was cut short: resuming it");
        return Some(config.restore == RestoreMode::Force);
    }
    match config.restore {
        RestoreMode::Never => None,
        RestoreMode::Force => Some(true),
        RestoreMode::Auto => {
            match crate::restore::holds_nothing_to_keep(config, &config.workspace) {
                Ok(true) => Some(false),
                Ok(false) => {
                    tracing::info!(
                        "the workspace is not empty: not restoring (restore = \"auto\"); \
                         reconciling it with remote storage instead"
                    );
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the workspace; not restoring");
                    None
                }
            }
        }
    }
}

/// Remote storage that does not answer, or a workspace file system that is full or
/// read-only, may come right: the restore is tried again (and meanwhile the daemon
/// stays not ready, with the restore marker in place).
fn transient_restore_error(e: &crate::restore::RestoreError) -> bool {
    match e {
        crate::restore::RestoreError::Remote(_) => true,
        crate::restore::RestoreError::Local { source, .. } => {
            crate::restore::is_file_system_failure(source)
        }
        _ => false,
    }
}

/// Restores the workspace, retrying while remote storage cannot be read: from the file
/// mirror; when its manifest cannot be read (it is kept aside before it is rewritten),
/// from the latest snapshot, the workspace as it was a little earlier; with no snapshot
/// either, from the objects alone, which hold every file's content (better than an empty
/// workspace whose first round would leave them unnamed).
async fn restore_workspace_retrying(
    remote: &dyn crate::remote::Remote,
    config: &Config,
    force: bool,
) -> Result<Option<crate::restore::RestoreReport>, crate::restore::RestoreError> {
    use crate::restore::{RestoreError, Source};
    let opts = crate::restore::RestoreOptions::from_config(config, &config.workspace, force);
    let prefix = config.conversation_prefix();
    let from = |source: Source| {
        let (opts, prefix) = (&opts, &prefix);
        async move {
            crate::remote::retrying(
                "cannot restore the workspace yet",
                || {
                    crate::restore::restore(
                        remote,
                        prefix,
                        &source,
                        &config.workspace,
                        opts,
                        &crate::restore::NoProgress,
                    )
                },
                transient_restore_error,
            )
            .await
        }
    };
    let from_mirror = from(Source::Mirror).await;
    let Err(RestoreError::Manifest(why)) = from_mirror else {
        return from_mirror;
    };
    tracing::error!(error = %why, "the remote manifest cannot be read: restoring the latest snapshot instead");
    match from(Source::Snapshot("latest".into())).await {
        Err(RestoreError::NoSnapshot(_)) => {}
        other => return other,
    }
    tracing::error!(
        "no snapshot to restore either: restoring the files from their objects alone (modes outside git repositories, symlinks and empty directories are lost)"
    );
    match from(Source::Objects).await {
        Ok(None) => Err(RestoreError::Manifest(why)),
        r => r,
    }
}

/// When a take-in is owed (see [`crate::owner::Owner::took_over_from_another`]) and
/// the stores are not to be restored whole instead: takes in what another daemon
/// wrote to the KV and file store since this state directory last exported, retrying
/// while remote storage fails, until done or shutdown (then it is still owed at the
/// next start).
async fn take_in_if_owed(
    config: &Config,
    kv: &KvStore,
    files: &FileStore,
    remote: &dyn crate::remote::Remote,
    owner: &crate::owner::Owner,
    lifecycle: &Lifecycle,
) -> Result<(), crate::kv::KvError> {
    if !owner.took_over_from_another() || files.restore_pending().await? == Some(true) {
        return Ok(());
    }
    tracing::info!("taking in what the daemon that owned the conversation before wrote");
    let prefix = config.conversation_prefix();
    let taken = tokio::select! {
        r = crate::remote::retrying(
            "cannot compare the kv exports in remote storage with this store yet",
            || crate::replicate::take_in_newer_exports(kv, remote, &prefix),
            |_| true,
        ) => r.ok(),
        _ = lifecycle.shutdown.cancelled() => None,
    };
    // The file store the same way: what the other daemon changed comes in.
    let files_taken = tokio::select! {
        r = crate::remote::retrying(
            "cannot compare the file store with remote storage yet",
            || crate::replicate::take_in_remote_files(
                files,
                remote,
                &prefix,
                config.files.max_file_bytes,
            ),
            |_| true,
        ) => r.ok(),
        _ = lifecycle.shutdown.cancelled() => None,
    };
    let complete = taken.is_some() && files_taken.is_some();
    let mut record = serde_json::Map::new();
    if let Some(replaced) = taken
        && !replaced.is_empty()
    {
        record.insert("replaced_namespaces".into(), serde_json::json!(replaced));
    }
    if let Some(f) = files_taken {
        if !f.replaced_files.is_empty() {
            record.insert("replaced_files".into(), serde_json::json!(f.replaced_files));
        }
        if !f.removed_files.is_empty() {
            record.insert("removed_files".into(), serde_json::json!(f.removed_files));
        }
    }
    if !record.is_empty() {
        lifecycle.record_restore("stores", serde_json::Value::Object(record));
    }
    if complete {
        owner.take_in_done();
        tracing::info!("took in what the other daemon wrote");
    }
    Ok(())
}

/// Imports the KV namespaces and the file store of a new state directory, retrying
/// every failure (remote storage cannot be listed, an import did not commit).
async fn restore_stores_retrying(
    kv: &KvStore,
    files: &FileStore,
    remote: &dyn crate::remote::Remote,
    config: &Config,
) -> Option<crate::replicate::StoresRestored> {
    let prefix = config.conversation_prefix();
    crate::remote::retrying(
        "cannot restore the kv and file store yet",
        || {
            crate::replicate::restore_stores(
                kv,
                files,
                remote,
                &prefix,
                config.files.max_file_bytes,
            )
        },
        |_| true,
    )
    .await
    .ok()
}

/// The final sync: the last workspace round with its manifest, the git bundles and
/// the KV and file store exports, side by side, each retrying remote failures, all
/// within `deadline`; a second signal (`abort`) ends it at once. Returns the exit code:
/// 0 when everything is in remote storage, [`EXIT_INCOMPLETE`] otherwise (after a log
/// line naming what was left).
async fn final_sync(
    sync: &crate::sync::SyncHandle,
    git: &crate::gitbundle::GitBundler,
    replica: &crate::replicate::ReplicaHandle,
    deadline: Duration,
    abort: &CancellationToken,
    lost: &CancellationToken,
) -> (u8, Vec<String>) {
    let started = Instant::now();
    let (mut ws_done, mut git_done, mut stores_done) = (false, false, false);
    let workspace = async {
        match sync.sync_unless_held().await {
            Ok(stats) => {
                tracing::info!(
                    uploaded = stats.files_uploaded,
                    deleted = stats.files_deleted,
                    "final sync: workspace in remote storage"
                );
                ws_done = true;
            }
            Err(e) => tracing::error!(error = %e, "final sync: workspace round failed"),
        }
    };
    let bundles = async {
        let mut backoff = crate::remote::Backoff::default();
        loop {
            match git.write_changed_until_stored().await {
                Ok(round) => {
                    // A repository that cannot be read gets no bundle however long
                    // this waits (it is in the status's `git[].error`).
                    for f in &round.errors {
                        tracing::error!(repo = %f.repo, error = %f.error, "final sync: no git bundle for this repository");
                    }
                    tracing::info!(
                        written = round.bundles.len(),
                        unchanged = round.unchanged.len(),
                        "final sync: git bundles in remote storage"
                    );
                    git_done = true;
                    return;
                }
                Err(e) if !git.root().exists() => {
                    // Nothing to bundle, and waiting will not bring the workspace back.
                    tracing::error!(error = %e, "final sync: git bundles: the workspace is missing");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "final sync: git bundles failed; retrying"),
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    };
    let stores = async {
        match replica.flush().await {
            Ok(stats) => {
                tracing::info!(
                    namespaces_exported = stats.namespaces,
                    files_exported = stats.files_uploaded + stats.files_deleted,
                    "final sync: kv and file store in remote storage (counts are what changed since the last export)"
                );
                stores_done = true;
            }
            Err(e) => tracing::error!(error = %e, "final sync: kv and file store export failed"),
        }
    };
    let cut_short = tokio::select! {
        _ = futures::future::join3(workspace, bundles, stores) => None,
        _ = tokio::time::sleep(deadline) => Some("the shutdown deadline passed"),
        _ = abort.cancelled() => Some("a second signal aborted it"),
        // Its writes are refused for good from then on: waiting would not help.
        _ = lost.cancelled() => Some("another daemon took the conversation over"),
    };
    let mut left = Vec::new();
    if !ws_done {
        let s = sync.status();
        left.push(format!(
            "workspace files ({} pending{}{})",
            s.pending_files,
            if s.full_rescan_pending {
                ", rescan pending"
            } else {
                ""
            },
            s.last_error
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        ));
    }
    if !git_done {
        left.push("git bundles".to_string());
    }
    if !stores_done {
        let s = replica.status();
        left.push(format!(
            "kv and file store exports{}",
            s.last_error
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        ));
    }
    if left.is_empty() {
        let held = sync.status().held_deletes;
        if held > 0 {
            // Nothing is missing from remote storage, but it holds more than the
            // workspace.
            tracing::warn!(
                held_deletes = held,
                "final sync: deletions held by the delete guard stay undone; their objects \
                 remain in remote storage, and a restore brings back those files that git \
                 keeps no copy of (POST /v1/sync with confirm_deletes before the stop \
                 deletes them)"
            );
        }
        tracing::info!(
            duration_ms = started.elapsed().as_millis() as u64,
            held_deletes = held,
            "final sync done: everything is in remote storage"
        );
        (0, left)
    } else {
        tracing::error!(
            reason = cut_short.unwrap_or("a part failed"),
            left = %left.join("; "),
            "exiting before everything reached remote storage"
        );
        (EXIT_INCOMPLETE, left)
    }
}

/// Keeps glibc's malloc from hoarding memory. Rust code allocates with jemalloc (see
/// `main.rs`); the bundled C libraries (libgit2 building bundles, aws-lc) still call
/// glibc's malloc. Their large buffers come from mmap and go back to the OS when freed,
/// and they get at most two arenas however many blocking threads call them. glibc
/// otherwise raises its mmap threshold after the first large free and keeps one arena
/// per thread (this showed as ~20 MiB of extra resident memory before jemalloc).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any
    // other thread of ours exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
}

/// A stop signal this soon after the first is the same stop sent twice (to the process
/// and to its group), not a second signal that aborts the final sync.
const SIGNAL_SENT_TWICE: Duration = Duration::from_millis(100);

/// `sandkeep serve`: a runtime, signal handling, and [`run`].
pub fn serve(config: Config) -> anyhow::Result<u8> {
    tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sandkeep")
        .build()
        .context("cannot start the tokio runtime")?;
    let code = runtime.block_on(async move {
        let lifecycle = Arc::new(Lifecycle::default());
        // SIGHUP too: a terminal closed on a foreground `serve` must not lose work
        // (there is no configuration reload to give it).
        // SIGUSR1 and SIGUSR2 (sent by log rotation and reload tools) would kill the
        // daemon at once, with no final sync: they are logged and ignored.
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
        let mut signals =
            signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2])
                .context("cannot install signal handlers")?;
        let handle = signals.handle();
        let lc = lifecycle.clone();
        let watcher = tokio::spawn(async move {
            let mut first: Option<std::time::Instant> = None;
            while let Some(sig) = signals.next().await {
                if sig == SIGUSR1 || sig == SIGUSR2 {
                    tracing::info!(
                        signal = sig,
                        "signal ignored (SIGTERM, SIGINT or SIGHUP stops the daemon)"
                    );
                    continue;
                }
                // The same stop sent twice at once (GNU `timeout`, and scripts, signal
                // the process and then its group) is one signal.
                if first.is_some_and(|t| t.elapsed() < SIGNAL_SENT_TWICE) {
                    tracing::debug!(signal = sig, "signal sent again at once: the same stop");
                    continue;
                }
                if first.is_none() {
                    first = Some(std::time::Instant::now());
                    tracing::info!(signal = sig, "signal received: final sync, then exit");
                    lc.request_shutdown();
                } else {
                    tracing::warn!(signal = sig, "second signal: aborting the final sync");
                    lc.abort.cancel();
                }
            }
        });
        let code = run(config, lifecycle, std::future::pending()).await;
        handle.close();
        watcher.abort();
        code
    });
    // Blocking work still running (a remote call that hangs) must not hold the exit
    // (the database is closed by now).
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_state_dir(dir.path()).unwrap();
        let err = lock_state_dir(dir.path()).err().unwrap().to_string();
        assert!(err.contains("another sandkeep daemon"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        assert!(lock_state_dir(dir.path()).is_ok());
    }

    #[tokio::test]
    async fn the_socket_guard_removes_only_the_socket_it_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let first = bind_socket(&path, 0o600).unwrap();
        let guard = SocketGuard::new(&path);
        // Someone removes our socket and another daemon binds the path.
        std::fs::remove_file(&path).unwrap();
        drop(first);
        let _second = bind_socket(&path, 0o600).unwrap();
        drop(guard);
        assert!(path.exists(), "the other daemon's socket was removed");
        let own = SocketGuard::new(&path);
        drop(own);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_but_live_one_and_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let live = bind_socket(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = bind_socket(&path, 0o600).err().unwrap().to_string();
        assert!(err.contains("another daemon answers"), "{err}");
        drop(live); // the file stays behind, nobody answers: stale
        assert!(bind_socket(&path, 0o600).is_ok());
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let err = bind_socket(&file, 0o600).err().unwrap().to_string();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
