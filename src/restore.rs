//! Restoring a workspace from remote storage: from the file mirror (the manifest, one
//! object per file) plus the git bundles, or from a tar.gz snapshot.
//!
//! The daemon runs [`restore_workspace`] at start (`restore = auto | force`) and
//! `sandkeep restore --to DIR` runs it (or [`restore_snapshot`]) offline.
//!
//! Safety rules: every path from the remote is checked (relative, no `.`/`..`, never
//! inside `.git` or one of the daemon's own directories, never through a symlink);
//! files are written to a temporary name in their directory, checked against the
//! manifest hash (a mismatch is downloaded once more) and renamed into place with their
//! mode and modification time; an entry that cannot be restored is skipped and
//! reported in [`RestoreReport::bad`], never a reason to abort the rest.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, FileTimes};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde::Serialize;

use crate::config::Config;
use crate::gitbundle::{self, GIT_DIR, GitError};
use crate::remote::{self, Backoff, Remote, RemoteError};
use crate::snapshot::{self, COMPRESSED_DIR};
use crate::sync::manifest::{FileEntry, Manifest};
use crate::sync::rules::{Rules, is_ignore_file};
use crate::sync::scan::Limits;

/// Attempts at a download that fails for want of an answer (connection, 5xx).
const TRANSPORT_ATTEMPTS: u32 = 4;
/// Prefix of the temporary names restored files are written under.
/// Names of the files a restore writes before renaming them into place (never
/// mirrored: see [`Rules::new`]).
pub const TMP_PREFIX: &str = ".sandkeep-restore-";
/// In the target of `sandkeep restore` while it runs, and left there when it fails:
/// the next run resumes it (the directory is not empty, but what is in it is its own).
/// Excluded from the mirror by its prefix.
pub const INCOMPLETE_MARKER: &str = ".sandkeep-restore-incomplete";

/// What the marker of a restore holds: where it restores from (the remote and the
/// conversation), so that only a restore from the same place resumes it.
pub fn restore_source(config: &Config) -> String {
    let remote = match config.remote.kind {
        crate::config::RemoteKind::Dir => format!("dir {}", config.remote.path.display()),
        crate::config::RemoteKind::S3 => {
            format!("s3 {} {}", config.remote.endpoint, config.remote.bucket)
        }
    };
    format!("{remote} {}\n", config.conversation_prefix())
}

/// Whether `dir` holds the marker of an unfinished restore from `config`'s source.
pub fn unfinished_restore_in(dir: &Path, config: &Config) -> bool {
    fs::read_to_string(dir.join(INCOMPLETE_MARKER)).is_ok_and(|m| m == restore_source(config))
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Remote storage could not be read (the manifest, a listing): retry later.
    #[error("reading remote storage: {0}")]
    Remote(#[from] RemoteError),
    #[error("the remote manifest is unreadable: {0}")]
    Manifest(String),
    #[error("{what}: {source}")]
    Local { what: String, source: io::Error },
    #[error("no snapshot named {0:?} in remote storage")]
    NoSnapshot(String),
    #[error("restore task failed: {0}")]
    Task(String),
}

fn local(what: impl std::fmt::Display, source: io::Error) -> RestoreError {
    RestoreError::Local {
        what: what.to_string(),
        source,
    }
}

/// The mode bits a restored file gets: never set-uid or set-gid. The restoring user
/// (root in many sidecars) owns what it restores, so a sandbox process that made its
/// own copy of a shell set-uid would get back a set-uid shell of that user.
const FILE_MODE_BITS: u32 = 0o777;
/// A restored directory's: its sticky bit stays (`/tmp`-like directories), set-id bits
/// do not.
const DIR_MODE_BITS: u32 = 0o1777;

/// How to restore.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Parallel downloads.
    pub concurrency: usize,
    /// Replace the target's content with the remote state: entries the remote does
    /// not have are removed (except excluded ones), entries in the way are replaced.
    /// Without it, files already in the target are still brought to the remote
    /// content (a resumed restore), but nothing else is removed.
    pub force: bool,
    /// Gitignore patterns of what restore never touches (the mirror's excludes and
    /// the daemon's own directories inside the target).
    pub exclude: Vec<String>,
    /// Files larger than this are not mirrored (`sync.max_file_bytes`): one that only a
    /// bundle holds is kept, as an ignored one is.
    pub max_file_bytes: u64,
    /// What snapshots leave out besides `exclude` (`snapshot.exclude`): a restore from
    /// a snapshot never touches it either, since no snapshot has it.
    pub snapshot_exclude: Vec<String>,
}

impl RestoreOptions {
    /// The mirror's concurrency and excludes (the daemon adds its own directories).
    /// The options of a restore into `target`: what the mirror leaves out of it
    /// (`sync.exclude`, the daemon's own directories there) is never touched.
    pub fn from_config(config: &Config, target: &Path, force: bool) -> Self {
        Self {
            concurrency: config.sync.concurrency.max(1) as usize,
            force,
            exclude: crate::sync::rules::mirror_excludes(config, target),
            max_file_bytes: config.sync.max_file_bytes,
            snapshot_exclude: config.snapshot.exclude.clone(),
        }
    }
}

/// One entry that could not be restored.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BadEntry {
    pub path: String,
    pub error: String,
}

/// A repository restored from its bundle.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RepoRestored {
    /// `"."` for the workspace root, else the subdirectory.
    pub repo: String,
    pub refs: usize,
}

/// What a restore did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RestoreReport {
    /// Generation of the manifest restored (0 for a snapshot).
    pub generation: u64,
    /// Files downloaded (or extracted).
    pub files: u64,
    pub bytes: u64,
    /// Files that were already there with the right content (only mode and time set).
    pub unchanged: u64,
    pub symlinks: u64,
    pub empty_dirs: u64,
    /// Entries removed because the remote does not have them (`force`).
    pub removed: u64,
    pub repos: Vec<RepoRestored>,
    /// The snapshot object restored, if it was a snapshot.
    pub snapshot: Option<String>,
    pub bad: Vec<BadEntry>,
    /// Files whose object is newer than the manifest (a round that uploaded them was
    /// cut short before it published its manifest): restored with the object's content,
    /// the manifest's mode and the restore's time, so the next round publishes them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub newer: Vec<String>,
    /// Restored from the file objects alone (no readable manifest, no snapshot): files
    /// came back with their content and the restore's time, the mode of a bundle's
    /// checkout or else 0644; symlinks and empty directories were lost with the manifest
    /// (but for what a bundle checked out).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub objects_only: bool,
    pub duration_ms: u64,
}

/// Told how far a restore got (a progress bar on a terminal).
pub trait Progress: Send + Sync {
    fn start(&self, _files: u64, _bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

pub struct NoProgress;
impl Progress for NoProgress {}

/// Whether `dir` holds nothing worth keeping over the conversation's workspace: only
/// what the mirror would never carry (the daemon's own directories, `sync.exclude`
/// such as a `node_modules/` baked into an image) and a fresh ext4 volume's (a
/// Kubernetes PVC's) `lost+found`. `restore = auto` and `sandkeep restore` without
/// `--force` restore only into such a directory.
pub fn holds_nothing_to_keep(config: &Config, dir: &Path) -> io::Result<bool> {
    let mut skip = crate::sync::rules::own_excludes(config, dir);
    skip.extend(config.sync.exclude.iter().cloned());
    skip.push("/lost+found/".into());
    is_empty_dir(dir, &skip)
}

/// Whether `dir` holds nothing but what `exclude` (gitignore patterns relative to it)
/// names. A missing directory is empty.
pub fn is_empty_dir(dir: &Path, exclude: &[String]) -> io::Result<bool> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    let root = fs::canonicalize(dir)?;
    let rules = Rules::new(&root, exclude).map_err(io::Error::other)?;
    for e in entries {
        let e = e?;
        let is_dir = e.file_type()?.is_dir();
        let rel = PathBuf::from(e.file_name());
        if !rules.excluded_by_config(&rel, is_dir) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Checks a workspace-relative path from the remote: relative, plain segments only,
/// never inside `.git`.
fn checked_rel(rel: &str) -> Result<&Path, String> {
    if rel.is_empty() || rel.contains('\0') {
        return Err("empty path or NUL in the path".into());
    }
    for segment in rel.split('/') {
        match segment {
            "" | "." | ".." => return Err("not a plain relative path".into()),
            ".git" => return Err("paths inside .git are never restored".into()),
            _ => {}
        }
    }
    Ok(Path::new(rel))
}

/// Takes the entries whose path [`checked_rel`] refuses out of `manifest` (nothing
/// else may look at them: the ignore rules assume paths under the root) and reports
/// them as bad.
fn drop_bad_paths(manifest: &mut Manifest, bad: &mut Vec<BadEntry>) {
    let mut refused = |rel: &String| match checked_rel(rel) {
        Ok(_) => false,
        Err(error) => {
            bad.push(BadEntry {
                path: rel.clone(),
                error,
            });
            true
        }
    };
    manifest.files.retain(|rel, _| !refused(rel));
    manifest.symlinks.retain(|rel, _| !refused(rel));
    manifest.empty_dirs.retain(|rel| !refused(rel));
    manifest.held.retain(|rel| checked_rel(rel).is_ok());
}

/// Makes every directory from `root` down to `rel`'s parent a real directory (never
/// following a symlink). In the way: a symlink or file is replaced when `force`, else
/// it is an error.
fn make_parents(root: &Path, rel: &Path, force: bool) -> Result<PathBuf, FileError> {
    make_dirs(root, rel.parent().unwrap_or(Path::new("")), force)
}

/// Makes the directory `dir` inside `root` and every one above it, as
/// [`make_parents`] does.
fn make_dirs(root: &Path, dir: &Path, force: bool) -> Result<PathBuf, FileError> {
    let mut at = root.to_path_buf();
    for c in dir.components() {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => continue,
            Ok(m) => {
                if !force {
                    let what = if m.file_type().is_symlink() {
                        "a symlink"
                    } else {
                        "a file"
                    };
                    let message = format!("{} is {what}, not a directory", at.display());
                    return Err(FileError::Bad(message));
                }
                fs::remove_file(&at)
                    .map_err(|e| io_failure(format_args!("removing {}", at.display()), e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_failure(at.display(), e)),
        }
        match fs::create_dir(&at) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && at.is_dir() => {}
            Err(e) => return Err(io_failure(format_args!("creating {}", at.display()), e)),
        }
    }
    Ok(at)
}

/// After a forced snapshot restore: removes the files, symlinks and then empty
/// directories of `root` that the archive does not name, except what `rules` leave
/// out (ignored and excluded paths are not in a snapshot, and stay). Returns how many
/// entries went.
fn remove_unnamed(root: &Path, rules: &Rules, named: &HashSet<PathBuf>) -> u64 {
    let mut removed = 0;
    let mut dirs = Vec::new();
    walk_kept(root, rules, |rel, e, ft| {
        if ft.is_dir() {
            dirs.push(rel.to_path_buf());
        } else if !named.contains(rel) {
            match fs::remove_file(e.path()) {
                Ok(()) => removed += 1,
                Err(err) => {
                    tracing::warn!(path = %e.path().display(), error = %err, "cannot remove what the snapshot does not have")
                }
            }
        }
    });
    // Deepest first; a directory with anything left in it stays.
    for rel in dirs.iter().rev() {
        if !named.contains(rel) && fs::remove_dir(root.join(rel)).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Walks `root` depth first, calling `visit` with every entry (its relative path,
/// itself, its type) that `rules` do not leave out, directories before what is in them.
fn walk_kept(
    root: &Path,
    rules: &Rules,
    mut visit: impl FnMut(&Path, &fs::DirEntry, fs::FileType),
) {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(root.join(&rel_dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let rel = rel_dir.join(e.file_name());
            let Ok(ft) = e.file_type() else { continue };
            if rules.is_ignored(&rel, ft.is_dir()) {
                continue;
            }
            visit(&rel, &e, ft);
            if ft.is_dir() {
                stack.push(rel);
            }
        }
    }
}

/// Whether `rel` is relative with nothing but names in it (no `..`, no root).
fn is_plain(rel: &Path) -> bool {
    rel.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Whether every directory above the relative `rel` inside `root` is a real directory
/// (no symlink to follow out of the tree).
fn real_dirs_to(root: &Path, rel: &Path) -> bool {
    let mut at = root.to_path_buf();
    rel.parent().unwrap_or(Path::new("")).components().all(|c| {
        at.push(c);
        fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir())
    })
}

/// Removes whatever is at `path` (a directory with its content).
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Gives the open file `f` its manifest modification time and mode (neither needs the
/// file open for writing).
fn set_mode_and_time(f: &fs::File, e: &FileEntry) -> io::Result<()> {
    f.set_times(FileTimes::new().set_modified(system_time(e.mtime)))?;
    f.set_permissions(fs::Permissions::from_mode(e.mode & FILE_MODE_BITS))
}

struct Job<'a> {
    remote: &'a dyn Remote,
    files_prefix: String,
    root: &'a Path,
    force: bool,
    progress: &'a dyn Progress,
    /// When the manifest was published (Unix milliseconds), if it says.
    manifest_ms: Option<u64>,
}

enum FileOutcome {
    Downloaded(u64),
    Unchanged,
    /// The object holds content newer than the manifest's (see [`RestoreReport::newer`]).
    Newer(u64),
}

/// Why a file was not restored: its entry is bad (reported in `bad`, the rest goes
/// on), or remote storage did not answer, or the target's file system cannot take it
/// (full, over quota, read-only): then the restore fails, to be tried again.
#[derive(Debug)]
enum FileError {
    Bad(String),
    Unreachable(RemoteError),
    Local { what: String, source: io::Error },
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bad(message) => f.write_str(message),
            Self::Unreachable(err) => write!(f, "{err}"),
            Self::Local { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

/// Whether a local I/O error is the file system's (full, over quota, read-only), not
/// one entry's.
pub fn is_file_system_failure(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::ReadOnlyFilesystem
    )
}

/// A local I/O error while restoring one entry: the file system's or the entry's.
fn io_failure(what: impl std::fmt::Display, source: io::Error) -> FileError {
    if is_file_system_failure(&source) {
        FileError::Local {
            what: what.to_string(),
            source,
        }
    } else {
        FileError::Bad(format!("{what}: {source}"))
    }
}

impl From<String> for FileError {
    fn from(error: String) -> Self {
        FileError::Bad(error)
    }
}

impl From<RemoteError> for FileError {
    fn from(err: RemoteError) -> Self {
        match err {
            RemoteError::Transport { .. } => FileError::Unreachable(err),
            RemoteError::Local { op, path, source } => {
                io_failure(format_args!("{op} {}", path.display()), source)
            }
            RemoteError::NotFound { .. } => FileError::Bad(MISSING.into()),
            other => FileError::Bad(other.to_string()),
        }
    }
}

impl Job<'_> {
    async fn file(&self, rel: &str, e: &FileEntry) -> Result<FileOutcome, FileError> {
        let relp = checked_rel(rel)?;
        let dir = make_parents(self.root, relp, self.force)?;
        let dest = self.root.join(relp);
        match fs::symlink_metadata(&dest) {
            // An unknown hash (a restore from the objects alone) matches no file here.
            Ok(m) if m.is_file() && m.len() == e.size && !e.hash.is_empty() => {
                let (p, entry) = (dest.clone(), e.clone());
                // Unreadable or different: downloaded like a missing file.
                let same = tokio::task::spawn_blocking(move || {
                    if blake3_of_file(&p).ok() != Some(entry.hash.clone()) {
                        return Some(false);
                    }
                    let f = fs::File::open(&p).ok()?;
                    set_mode_and_time(&f, &entry).ok().map(|()| true)
                })
                .await
                .ok()
                .flatten();
                match same {
                    Some(true) => {
                        self.progress.advance(e.size);
                        return Ok(FileOutcome::Unchanged);
                    }
                    Some(false) => {}
                    None => {
                        let error = "setting the mode and time of the file in place";
                        return Err(FileError::Bad(error.into()));
                    }
                }
            }
            Ok(m) if m.is_dir() && !self.force => {
                return Err(FileError::Bad("a directory is in the way".into()));
            }
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(&dest).map_err(|err| io_failure("removing a directory", err))?;
            }
            _ => {}
        }
        let tmp = dir.join(format!("{TMP_PREFIX}{:016x}", rand::random::<u64>()));
        let key = format!("{}{rel}", self.files_prefix);
        let mut done = Err(FileError::Bad(String::new()));
        // A mismatch is downloaded once more: the object may have been replaced
        // between the manifest and now.
        for attempt in 0..2 {
            // No hash (a restore from the objects alone): the object is the content.
            done = self
                .fetch_verified(&key, e, &tmp, &dest, !e.hash.is_empty())
                .await;
            match &done {
                Err(FileError::Bad(err)) if err == MISMATCH => {
                    tracing::warn!(
                        path = rel,
                        attempt,
                        "restored file does not match the manifest hash"
                    );
                }
                _ => break,
            }
        }
        let newer = matches!(&done, Err(FileError::Bad(err)) if err == MISMATCH)
            && self.written_after_manifest(&key).await;
        if newer {
            let _ = fs::remove_file(&tmp);
            tracing::warn!(
                path = rel,
                "the object is newer than the manifest (a round cut short before it published it): restored with its content"
            );
            done = self.fetch_verified(&key, e, &tmp, &dest, false).await;
        }
        if done.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        done.map(|()| {
            self.progress.advance(e.size);
            if newer {
                FileOutcome::Newer(e.size)
            } else {
                FileOutcome::Downloaded(e.size)
            }
        })
    }

    /// Whether the object at `key` was written after the manifest was published: a
    /// newer version of the file from a round that never published its manifest, not
    /// a damaged copy (which keeps its time).
    async fn written_after_manifest(&self, key: &str) -> bool {
        let Some(manifest_ms) = self.manifest_ms else {
            return false;
        };
        match self.remote.head(key).await {
            Ok(Some(info)) => info
                .last_modified
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .is_some_and(|d| d.as_millis() as u64 > manifest_ms),
            _ => false,
        }
    }

    /// Downloads the object, checks its hash and puts it in place at `dest` (through
    /// `tmp`) with its mode and time. Small files go through memory in one blocking
    /// step; large ones are streamed to `tmp` and hashed from there.
    async fn fetch_verified(
        &self,
        key: &str,
        e: &FileEntry,
        tmp: &Path,
        dest: &Path,
        verify: bool,
    ) -> Result<(), FileError> {
        let mut entry = e.clone();
        if !verify {
            // Not the manifest's content: its time is not this content's either. The
            // restore's own time makes the next round look at the file and publish it.
            entry.mtime = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64);
        }
        let (tmp, dest) = (tmp.to_path_buf(), dest.to_path_buf());
        // The manifest's size decides, the object's caps the read: one larger than
        // the manifest says (replaced since) is streamed instead.
        let small = if e.size <= IN_MEMORY_MAX {
            match retry_transport(|| self.remote.get_bytes_within(key, IN_MEMORY_MAX)).await {
                Err(RemoteError::TooLarge { .. }) => None,
                r => Some(r?.ok_or_else(|| MISSING.to_string())?),
            }
        } else {
            None
        };
        if let Some(data) = small {
            return tokio::task::spawn_blocking(move || {
                if verify && format!("blake3:{}", blake3::hash(&data).to_hex()) != entry.hash {
                    return Err(FileError::Bad(MISMATCH.into()));
                }
                let mut f = fs::File::options()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(|err| io_failure("creating the file", err))?;
                f.write_all(&data)
                    .map_err(|err| io_failure("writing the file", err))?;
                place(f, &tmp, &dest, &entry)
            })
            .await
            .map_err(|err| err.to_string())?;
        }
        retry_transport(|| self.remote.get_to_file(key, &tmp)).await?;
        tokio::task::spawn_blocking(move || {
            if verify
                && blake3_of_file(&tmp).map_err(|err| io_failure("hashing", err))? != entry.hash
            {
                return Err(FileError::Bad(MISMATCH.into()));
            }
            let f = fs::File::open(&tmp).map_err(|err| io_failure("opening the file", err))?;
            place(f, &tmp, &dest, &entry)
        })
        .await
        .map_err(|err| err.to_string())?
    }
}

/// Files up to this size are downloaded into memory and written in one go.
const IN_MEMORY_MAX: u64 = 4 << 20;
const MISMATCH: &str = "the content does not match the manifest hash";
const MISSING: &str = "missing in remote storage";

/// Gives the open file `f` (at `tmp`) its mode and time and renames it to `dest`.
fn place(f: fs::File, tmp: &Path, dest: &Path, e: &FileEntry) -> Result<(), FileError> {
    set_mode_and_time(&f, e).map_err(|err| io_failure("setting mode and time", err))?;
    drop(f);
    fs::rename(tmp, dest).map_err(|err| io_failure("renaming into place", err))
}

/// `blake3:<hex>` of a file's content.
fn blake3_of_file(path: &Path) -> io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(path)?)?;
    Ok(format!("blake3:{}", h.finalize().to_hex()))
}

/// Runs a download, retrying (with backoff, [`TRANSPORT_ATTEMPTS`] times in all) the
/// failures that got no answer (connection, 5xx).
async fn retry_transport<T, F, Fut>(mut op: F) -> Result<T, RemoteError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RemoteError>>,
{
    let mut backoff = Backoff::default();
    let mut tries = 0;
    loop {
        tries += 1;
        match op().await {
            Err(err @ RemoteError::Transport { .. }) if tries < TRANSPORT_ATTEMPTS => {
                tracing::debug!(error = %err, "restore download failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            other => return other,
        }
    }
}

/// Where a restore reads the workspace from.
#[derive(Clone, Debug)]
pub enum Source {
    /// The file mirror: its manifest, the objects and the git bundles
    /// ([`restore_workspace`]).
    Mirror,
    /// A tar.gz snapshot: `latest`, an object name or its timestamp part
    /// ([`restore_snapshot`]).
    Snapshot(String),
    /// The objects and the git bundles without the manifest
    /// ([`restore_workspace_from_objects`]).
    Objects,
}

/// Restores the workspace of `conversation_prefix` from `source` into `target`; `None`
/// when the remote holds nothing of that kind.
pub async fn restore(
    remote: &dyn Remote,
    conversation_prefix: &str,
    source: &Source,
    target: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Option<RestoreReport>, RestoreError> {
    match source {
        Source::Mirror => {
            restore_workspace(remote, conversation_prefix, target, opts, progress).await
        }
        Source::Snapshot(which) => {
            restore_snapshot(remote, conversation_prefix, which, target, opts, progress)
                .await
                .map(Some)
        }
        Source::Objects => {
            restore_workspace_from_objects(remote, conversation_prefix, target, opts, progress)
                .await
        }
    }
}

/// Restores the workspace mirror of `conversation_prefix` into `target`: the git
/// repositories from their bundles first (refs, HEAD, index, the work tree from the WIP
/// commit), then every file of the manifest over them, symlinks and empty directories.
/// `None` when the remote has no manifest (nothing was ever synced).
pub async fn restore_workspace(
    remote: &dyn Remote,
    conversation_prefix: &str,
    target: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Option<RestoreReport>, RestoreError> {
    let manifest_key = format!("{conversation_prefix}workspace/manifest.json");
    // One too large to be a manifest is refused before it is read, as unreadable.
    let bytes = match remote
        .get_bytes_within(&manifest_key, crate::remote::DOCUMENT_MAX)
        .await
    {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(None),
        Err(e @ RemoteError::TooLarge { .. }) => return Err(RestoreError::Manifest(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| RestoreError::Manifest(e.to_string()))?;
    let bundles = remote::list_all(remote, &format!("{conversation_prefix}{GIT_DIR}")).await?;
    restore_manifest(
        remote,
        conversation_prefix,
        target,
        opts,
        progress,
        manifest,
        bundles,
        false,
    )
    .await
    .map(Some)
}

/// Restores the workspace from its file objects alone, for a remote whose manifest
/// cannot be read and that holds no snapshot either: the repositories from their
/// bundles, then every object under `workspace/files/` over them, with its content,
/// the restore's time (so the next round hashes and publishes it) and the mode of what
/// a bundle checked out there, else 0644.
/// Modes, symlinks and empty directories live only in the manifest: they do not come
/// back, except what a bundle checks out (without the manifest nothing says what was
/// deleted since a bundle was written: what it checked out stays). Nothing is removed,
/// even with `force` (files are replaced). `None` when the remote holds no workspace
/// object and no bundle.
pub async fn restore_workspace_from_objects(
    remote: &dyn Remote,
    conversation_prefix: &str,
    target: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<Option<RestoreReport>, RestoreError> {
    let files_prefix = format!("{conversation_prefix}workspace/files/");
    let objects = remote::list_all(remote, &files_prefix).await?;
    let bundles = remote::list_all(remote, &format!("{conversation_prefix}{GIT_DIR}")).await?;
    if objects.is_empty() && bundles.is_empty() {
        return Ok(None);
    }
    let mut manifest = Manifest::default();
    for o in objects {
        // A key ending in `/` is a console's "folder", no file.
        let Some(rel) = o.key.strip_prefix(&files_prefix) else {
            continue;
        };
        if rel.is_empty() || rel.ends_with('/') {
            continue;
        }
        let entry = FileEntry {
            size: o.size,
            mtime: 0,
            mode: 0o644,
            // Unknown: the object's content is taken as it is.
            hash: String::new(),
        };
        manifest.files.insert(rel.to_string(), entry);
    }
    restore_manifest(
        remote,
        conversation_prefix,
        target,
        opts,
        progress,
        manifest,
        bundles,
        true,
    )
    .await
    .map(Some)
}

/// Restores what `manifest` names with the bundles listed in `git_objects` (see
/// [`restore_workspace`]); `objects_only`: the manifest was made from the listing of
/// the objects (see [`restore_workspace_from_objects`]).
#[allow(clippy::too_many_arguments)]
async fn restore_manifest(
    remote: &dyn Remote,
    conversation_prefix: &str,
    target: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
    mut manifest: Manifest,
    git_objects: Vec<remote::ObjectInfo>,
    objects_only: bool,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();

    fs::create_dir_all(target)
        .map_err(|e| local(format_args!("creating {}", target.display()), e))?;
    let root = fs::canonicalize(target)
        .map_err(|e| local(format_args!("resolving {}", target.display()), e))?;
    let rules = Rules::new(&root, &opts.exclude)
        .map_err(|e| local("exclude patterns", io::Error::other(e)))?;
    let files_prefix = format!("{conversation_prefix}workspace/files/");
    // What the mirror does not carry, and so no manifest names.
    let limits = Limits {
        max_file_bytes: opts.max_file_bytes,
        key_prefix_len: files_prefix.len(),
    };
    let mut report = RestoreReport {
        generation: manifest.generation,
        objects_only,
        ..Default::default()
    };
    drop_bad_paths(&mut manifest, &mut report.bad);
    remove_leftovers(&root);
    let excluded = |rel: &str, is_dir: bool| rules.excluded_by_config(Path::new(rel), is_dir);

    let manifest_ms = humantime::parse_rfc3339_weak(&manifest.updated_at)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64);
    // Without a manifest, symlinks and empty directories are unknown: nothing is
    // removed as missing from the remote.
    if opts.force && !objects_only {
        // What to remove is judged by the ignore files being restored, not by those the
        // workspace had: the manifest's go into place first (the pass over every file
        // below finds them there; one that cannot be fetched is reported there).
        let early = Job {
            remote,
            files_prefix: files_prefix.clone(),
            root: &root,
            force: true,
            progress: &NoProgress,
            manifest_ms,
        };
        let ignore_files = manifest
            .files
            .iter()
            .filter(|(rel, _)| is_ignore_file(rel) && !excluded(rel, false));
        for (rel, e) in ignore_files {
            match early.file(rel, e).await {
                Err(FileError::Unreachable(err)) => return Err(err.into()),
                Err(FileError::Local { what, source }) => {
                    return Err(local(format_args!("{rel}: {what}"), source));
                }
                _ => {}
            }
        }
        let rules_now = || {
            Rules::new(&root, &opts.exclude)
                .map_err(|e| local("exclude patterns", io::Error::other(e)))
        };
        let mut doomed = extras(&root, &rules_now()?, &manifest, &limits);
        // An ignore file the remote does not have goes too, and what only it ignored is
        // judged again without it.
        let stray_rules: Vec<String> = doomed
            .iter()
            .filter(|rel| is_ignore_file(rel))
            .cloned()
            .collect();
        if !stray_rules.is_empty() {
            report.removed +=
                remove_paths(&root, &stray_rules, &manifest.empty_dirs, &mut report.bad);
            doomed = extras(&root, &rules_now()?, &manifest, &limits);
        }
        report.removed += remove_paths(&root, &doomed, &manifest.empty_dirs, &mut report.bad);
    }

    // Repositories: the bundles' work trees first, the mirror's files over them.
    // Each restored repository's directory (`""`: the root; else `<name>/`) and whether
    // its bundle is newer than the manifest: there the manifest only fills in files the
    // checkout did not write, and what the checkout wrote is never removed as deleted.
    let mut bundle_is_newer: Vec<(String, bool)> = Vec::new();
    // What each bundle's work-tree commit was made from (see `HeadMeta::work_tree`),
    // by workspace path.
    let mut bundled_stat: HashMap<String, (u64, i64)> = HashMap::new();
    // A repository's object name is its path (`a/b` for `workspace/git/a/b.json`).
    let git_prefix = format!("{conversation_prefix}{}", gitbundle::GIT_DIR);
    let stem_of = |key: &str, suffix: &str| -> Option<String> {
        let stem = key
            .strip_prefix(git_prefix.as_str())?
            .strip_suffix(suffix)?;
        Some(stem.to_string())
    };
    let mut stems: Vec<String> = git_objects
        .iter()
        .filter_map(|o| stem_of(&o.key, ".json"))
        .collect();
    stems.sort_by_key(|s| (s != gitbundle::ROOT_STEM, s.clone()));
    let git_path = |stem: &str| {
        if stem == gitbundle::ROOT_STEM {
            ".git".to_string()
        } else {
            format!("{stem}/.git")
        }
    };
    // A bundle without its description (a first upload cut short between the two):
    // nothing says where it goes, so it is not restored, and the report says so.
    for o in &git_objects {
        if let Some(stem) = stem_of(&o.key, ".bundle")
            && !stems.contains(&stem)
        {
            report.bad.push(BadEntry {
                path: git_path(&stem),
                error: format!(
                    "{} has no description ({stem}.json) in remote storage: its git state \
                     is not restored",
                    o.key
                ),
            });
        }
    }
    let mut metas = Vec::new();
    for stem in stems {
        match gitbundle::fetch_meta(remote, conversation_prefix, &stem).await {
            Ok(Some(meta)) => metas.push((stem, meta)),
            Ok(None) => {}
            Err(GitError::Remote(err @ RemoteError::Transport { .. })) => return Err(err.into()),
            Err(e) => report.bad.push(BadEntry {
                path: git_path(&stem),
                error: e.to_string(),
            }),
        }
    }
    // Linked worktrees after the repositories they belong to, with when each of
    // those was read.
    metas.sort_by_key(|(_, meta)| meta.worktree_of.is_some());
    let mut read_at: HashMap<String, Option<u64>> = HashMap::new();
    for (stem, meta) in metas {
        // The root's object name is also a subdirectory's when the root is no
        // repository: the json says which.
        let is_root = stem == gitbundle::ROOT_STEM && meta.repo.as_deref().is_none_or(|r| r == ".");
        let (repo, dir) = if is_root {
            (".".to_string(), root.clone())
        } else {
            if checked_rel(&stem).is_err()
                || Path::new(&stem).components().count() > gitbundle::MAX_REPO_DEPTH
                || excluded(&stem, true)
            {
                report.bad.push(BadEntry {
                    path: format!("{stem}/.git"),
                    error: "not a directory a repository is bundled from".into(),
                });
                continue;
            }
            if let Err(error) = make_parents(&root, &Path::new(&stem).join(".git"), opts.force)
                .map_err(|e| e.to_string())
            {
                report.bad.push(BadEntry {
                    path: format!("{stem}/.git"),
                    error,
                });
                continue;
            }
            (stem.clone(), root.join(&stem))
        };
        let label = if repo == "." {
            ".git".to_string()
        } else {
            format!("{repo}/.git")
        };
        // A linked worktree whose repository did not come back is one of its own.
        let main = meta.worktree_of.as_ref().and_then(|w| {
            let restored = read_at.get(&w.repo);
            if restored.is_none() {
                tracing::warn!(worktree = %repo, main = %w.repo, "git restore: the repository of a linked worktree is not restored; the worktree comes back as a repository of its own");
            }
            restored.map(|at| gitbundle::MainRepo {
                dir: root.join(&w.repo),
                read_at_ms: *at,
            })
        });
        match gitbundle::restore_fetched(
            remote,
            conversation_prefix,
            &stem,
            meta,
            &dir,
            main,
            &root,
        )
        .await
        {
            Ok(Some(r)) => {
                // A bundle newer than the manifest (the mirror's last round was
                // cut short, or came before the bundle): its work tree is the newer
                // state of the repository's files.
                let newer = r
                    .read_at_ms
                    .is_some_and(|b| manifest_ms.is_some_and(|m| b > m));
                let dir = if repo == "." {
                    String::new()
                } else {
                    format!("{repo}/")
                };
                for (path, stat) in &r.work_tree {
                    bundled_stat.insert(format!("{dir}{path}"), *stat);
                }
                bundle_is_newer.push((dir, newer));
                read_at.insert(repo.clone(), r.read_at_ms);
                report.repos.push(RepoRestored { repo, refs: r.refs });
            }
            Ok(None) => {}
            Err(GitError::Remote(err @ RemoteError::Transport { .. })) => return Err(err.into()),
            Err(e) => report.bad.push(BadEntry {
                path: label,
                error: e.to_string(),
            }),
        }
    }

    if objects_only {
        // Where a bundle checked a file out, its mode is the file's (git keeps the
        // executable bit): better than 0644.
        for (rel, e) in manifest.files.iter_mut() {
            if let Ok(m) = fs::symlink_metadata(root.join(rel))
                && m.is_file()
            {
                e.mode = m.permissions().mode() & 0o7777;
            }
        }
    }

    // What the bundles checked out and the manifest does not name: the bundles may be
    // older than the manifest (written every `git.interval`), so these may be files
    // deleted since. Looked at again once the manifest's files (its `.gitignore`s
    // among them) are in place.
    let in_newer = |rel: &str| repo_dir_of(&bundle_is_newer, rel).is_some_and(|(_, newer)| *newer);
    let held_paths: BTreeSet<&str> = manifest.held.iter().map(String::as_str).collect();
    let from_bundles: Vec<String> = if report.repos.is_empty() || objects_only {
        Vec::new()
    } else {
        // Nor what stands where a held entry was (a directory's name taken by a file
        // the guard kept from the mirror).
        extras(&root, &rules, &manifest, &limits)
            .into_iter()
            .filter(|rel| !in_newer(rel) && !crate::sync::clashes(&held_paths, rel))
            .collect()
    };

    let git_keeps = if objects_only {
        HashSet::new()
    } else {
        held_entries_git_keeps(&root, &manifest, &bundle_is_newer, &bundled_stat).await
    };

    // Files, in parallel.
    let mut wanted: Vec<(&String, &FileEntry)> = manifest
        .files
        .iter()
        .filter(|(rel, _)| !excluded(rel, false) && !git_keeps.contains(rel.as_str()))
        .collect();
    // Whether the newer bundle of `rel`'s repository put something at `rel` or in its
    // way (a file where the manifest has a directory, or the reverse): that is the
    // newer state, which the manifest's entry must not replace. The same for an entry a
    // guard held in the manifest (gone from the workspace, kept in remote storage):
    // whatever a bundle put in its place came after it.
    let newer_in_the_way = |rel: &str| {
        (in_newer(rel) || held_paths.contains(rel))
            && (fs::symlink_metadata(root.join(rel)).is_ok()
                || Path::new(rel)
                    .ancestors()
                    .skip(1)
                    .filter(|a| !a.as_os_str().is_empty())
                    .any(|a| fs::symlink_metadata(root.join(a)).is_ok_and(|m| !m.is_dir())))
    };
    // Manifest entries whose place a newer bundle's file keeps (and its time, below).
    let mut kept_from_bundles: HashSet<String> = HashSet::new();
    if bundle_is_newer.iter().any(|(_, newer)| *newer) || !held_paths.is_empty() {
        // A file the newer bundle checked out with the manifest's content is the
        // manifest's (which then sets its mode and time); anything else it put there
        // changed after the manifest and stays.
        wanted.retain(|(rel, e)| {
            let path = root.join(rel);
            let same = fs::symlink_metadata(&path).is_ok_and(|m| m.is_file())
                && blake3_of_file(&path).is_ok_and(|h| h == e.hash);
            // The bundle's commit was made from the very file the manifest has (same
            // size and time): the manifest's copy is that file byte for byte, the
            // checkout maybe not (line endings, assume-unchanged files).
            let unchanged_since = bundled_stat.get(rel.as_str()) == Some(&(e.size, e.mtime));
            let keep = newer_in_the_way(rel) && !same && !unchanged_since;
            if keep {
                report.unchanged += 1;
                kept_from_bundles.insert(rel.to_string());
            }
            !keep
        });
    }
    progress.start(
        wanted.len() as u64,
        wanted.iter().map(|(_, e)| e.size).sum(),
    );
    // What a bundle checked out may stand where the manifest has something else (a
    // file that became a directory since the bundle): the manifest's entry replaces it.
    // Without `force` the workspace held nothing the mirror carries before the restore,
    // so whatever stands in the way came from a bundle.
    let replace = opts.force || !report.repos.is_empty();
    let job = Job {
        remote,
        files_prefix,
        root: &root,
        force: replace,
        progress,
        manifest_ms,
    };
    let mut results = futures::stream::iter(wanted)
        .map(|(rel, e)| {
            let job = &job;
            async move { (rel, job.file(rel, e).await) }
        })
        .buffer_unordered(opts.concurrency.max(1));
    while let Some((rel, r)) = results.next().await {
        match r {
            Ok(FileOutcome::Downloaded(n)) => {
                report.files += 1;
                report.bytes += n;
            }
            Ok(FileOutcome::Unchanged) => report.unchanged += 1,
            Ok(FileOutcome::Newer(n)) => {
                report.files += 1;
                report.bytes += n;
                report.newer.push(rel.clone());
            }
            Err(FileError::Bad(error)) => report.bad.push(BadEntry {
                path: rel.clone(),
                error,
            }),
            // Not this entry's fault: the restore fails (and is resumed later).
            Err(FileError::Unreachable(err)) => return Err(err.into()),
            Err(FileError::Local { what, source }) => {
                return Err(local(format_args!("{rel}: {what}"), source));
            }
        }
    }
    drop(results);

    for dir in &manifest.empty_dirs {
        if excluded(dir, true) || newer_in_the_way(dir) {
            continue;
        }
        let made = checked_rel(dir).and_then(|rel| {
            make_parents(&root, &rel.join("x"), replace)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        match made {
            Ok(()) => report.empty_dirs += 1,
            Err(error) => report.bad.push(BadEntry {
                path: dir.clone(),
                error,
            }),
        }
    }
    // Symlinks last: nothing is ever written through one of them.
    for (rel, link) in &manifest.symlinks {
        let same = fs::read_link(root.join(rel)).is_ok_and(|t| t == Path::new(link));
        if excluded(rel, false) || (newer_in_the_way(rel) && !same) || git_keeps.contains(rel) {
            continue;
        }
        match restore_symlink(&root, rel, link, replace) {
            Ok(()) => report.symlinks += 1,
            Err(error) => report.bad.push(BadEntry {
                path: rel.clone(),
                error,
            }),
        }
    }
    if !from_bundles.is_empty() {
        // The manifest is the newer state: a file it does not name and that its rules
        // would mirror was deleted after the bundle was written.
        let rules = Rules::new(&root, &opts.exclude)
            .map_err(|e| local("exclude patterns", io::Error::other(e)))?;
        let deleted: Vec<String> = from_bundles
            .into_iter()
            .filter(|rel| !rules.is_ignored(Path::new(rel), false))
            .collect();
        report.removed += remove_paths(&root, &deleted, &manifest.empty_dirs, &mut report.bad);
    }
    // Files only a bundle brought back (tracked files the mirror leaves out: ignored,
    // over the size limit, in a repository the mirror does not enter), and those a
    // newer bundle keeps in the place of an older manifest entry, get the time they had
    // when the bundle was read, where they are still the size they were then: the
    // checkout gave them the restore's.
    for (rel, (size, mtime)) in &bundled_stat {
        // (Paths from remote storage: checked as the manifest's are.)
        let Ok(relp) = checked_rel(rel) else {
            continue;
        };
        if manifest.files.contains_key(rel) && !kept_from_bundles.contains(rel) {
            continue;
        }
        let path = root.join(relp);
        // Never through a symlink (a directory the manifest made one).
        let through_symlink = relp
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .any(|a| fs::symlink_metadata(root.join(a)).is_ok_and(|m| m.file_type().is_symlink()));
        let is_it = fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() == *size);
        if through_symlink || !is_it {
            continue;
        }
        let set = fs::File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|f| f.set_times(FileTimes::new().set_modified(system_time(*mtime))));
        if let Err(e) = set {
            tracing::debug!(path = %path.display(), error = %e, "cannot give a file from a bundle its time");
        }
    }
    // Every file and its time in place: the indexes written before learn them.
    let repos: Vec<PathBuf> = report.repos.iter().map(|r| root.join(&r.repo)).collect();
    let refreshed = tokio::task::spawn_blocking(move || {
        for dir in repos {
            if let Err(e) = gitbundle::refresh_index(&dir) {
                tracing::warn!(repo = %dir.display(), error = %e, "cannot refresh the restored index (git status does it)");
            }
        }
    });
    let _ = refreshed.await;
    progress.finish();
    report.bad.sort_by(|a, b| a.path.cmp(&b.path));
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Of the restored repositories' directories (`""`: the root; else `<name>/`, with
/// whatever goes with each), the one `rel` belongs to: the innermost holding it.
fn repo_dir_of<'a, T>(dirs: &'a [(String, T)], rel: &str) -> Option<&'a (String, T)> {
    dirs.iter()
        .filter(|(d, _)| rel.starts_with(d.as_str()))
        .max_by_key(|(d, _)| d.len())
}

/// Of the entries a delete guard held in the manifest (gone from the workspace, kept in
/// remote storage), those inside a restored repository that its bundle's work tree
/// lacks and that git keeps an exact copy of out of the index (see
/// [`gitbundle::kept_by_git`]): a `git checkout` of a branch with fewer files or a
/// `git stash -u` took them out of the work tree, which is no accident to undo. The
/// restore leaves them where git has them.
async fn held_entries_git_keeps(
    root: &Path,
    manifest: &Manifest,
    repo_dirs: &[(String, bool)],
    bundled: &HashMap<String, (u64, i64)>,
) -> HashSet<String> {
    /// A held entry as the manifest has it, owned for the blocking thread.
    enum Was {
        File(u64, String),
        Symlink(String),
    }
    // By repository directory, paths inside it.
    let mut by_repo: BTreeMap<String, Vec<(String, Was)>> = BTreeMap::new();
    for rel in manifest
        .held
        .iter()
        .filter(|rel| !bundled.contains_key(rel.as_str()))
    {
        let was = match (manifest.files.get(rel), manifest.symlinks.get(rel)) {
            (Some(f), _) => Was::File(f.size, f.hash.clone()),
            (None, Some(target)) => Was::Symlink(target.clone()),
            (None, None) => continue,
        };
        if let Some((dir, _)) = repo_dir_of(repo_dirs, rel) {
            let inner = rel[dir.len()..].to_string();
            by_repo.entry(dir.clone()).or_default().push((inner, was));
        }
    }
    if by_repo.is_empty() {
        return HashSet::new();
    }
    let root = root.to_path_buf();
    let found = tokio::task::spawn_blocking(move || {
        let mut keeps = HashSet::new();
        for (dir, entries) in by_repo {
            let entries: Vec<(&str, gitbundle::HeldEntry<'_>)> = entries
                .iter()
                .map(|(p, was)| {
                    let held = match was {
                        Was::File(size, hash) => gitbundle::HeldEntry::File { size: *size, hash },
                        Was::Symlink(target) => gitbundle::HeldEntry::Symlink { target },
                    };
                    (p.as_str(), held)
                })
                .collect();
            match gitbundle::kept_by_git(&root.join(&dir), &entries) {
                Ok(k) => keeps.extend(k.into_iter().map(|p| format!("{dir}{p}"))),
                Err(e) => tracing::warn!(repo = %dir, error = %e, "cannot tell which held entries git keeps; restoring them all"),
            }
        }
        keeps
    })
    .await
    .unwrap_or_default();
    if !found.is_empty() {
        tracing::info!(
            entries = found.len(),
            "held entries that git keeps exact copies of out of the work tree (moved by a checkout or a stash) are not restored"
        );
    }
    found
}

fn restore_symlink(root: &Path, rel: &str, link: &str, force: bool) -> Result<(), String> {
    let relp = checked_rel(rel)?;
    make_parents(root, relp, force).map_err(|e| e.to_string())?;
    let dest = root.join(relp);
    match fs::symlink_metadata(&dest) {
        Ok(m) if m.file_type().is_symlink() => {
            if fs::read_link(&dest).is_ok_and(|t| t == Path::new(link)) {
                return Ok(());
            }
            fs::remove_file(&dest).map_err(|e| format!("replacing a symlink: {e}"))?;
        }
        Ok(_) if force => {
            remove_any(&dest).map_err(|e| format!("removing what is in the way: {e}"))?
        }
        Ok(_) => return Err("something else is in the way".into()),
        Err(_) => {}
    }
    std::os::unix::fs::symlink(link, &dest).map_err(|e| format!("creating the symlink: {e}"))
}

/// The files and symlinks the manifest does not name and that the mirror would carry
/// (excluded and ignored entries, `.git`, files over `limits.max_file_bytes` and paths
/// whose remote key would be too long are left out).
fn extras(root: &Path, rules: &Rules, manifest: &Manifest, limits: &Limits) -> Vec<String> {
    let mut out = Vec::new();
    // Into directories the remote has as empty too: what is in them here is not the
    // remote's.
    walk_kept(root, rules, |rel, e, ft| {
        let Some(key) = rel.to_str() else { return };
        let too_large = ft.is_file() && e.metadata().is_ok_and(|m| m.len() > limits.max_file_bytes);
        if !ft.is_dir()
            && !too_large
            && crate::sync::scan::key_fits(limits, key)
            && !manifest.files.contains_key(key)
            && !manifest.symlinks.contains_key(key)
        {
            out.push(key.to_string());
        }
    });
    out
}

/// Removes the files in the making that a restore killed before left in the tree
/// (the restore that resumes it starts here).
fn remove_leftovers(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file()
                && e.file_name().to_string_lossy().starts_with(TMP_PREFIX)
                && !(dir == root && e.file_name() == INCOMPLETE_MARKER)
            {
                match fs::remove_file(e.path()) {
                    Ok(()) => {
                        tracing::info!(path = %e.path().display(), "removed what an interrupted restore left")
                    }
                    Err(err) => {
                        tracing::warn!(path = %e.path().display(), error = %err, "cannot remove what an interrupted restore left")
                    }
                }
            }
        }
    }
}

/// Removes `paths` (relative to `root`), and the directories that leaves empty unless
/// `empty_dirs` names them (the mirror would carry them as new empty directories);
/// returns how many paths were removed.
fn remove_paths(
    root: &Path,
    paths: &[String],
    empty_dirs: &BTreeSet<String>,
    bad: &mut Vec<BadEntry>,
) -> u64 {
    let mut removed = 0;
    for rel in paths {
        // Only a file or symlink still there: the manifest's entries may have taken
        // its place since it was listed (a directory now, or a file below one).
        let path = root.join(rel);
        if fs::symlink_metadata(&path).map_or(true, |m| m.is_dir()) {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => {
                removed += 1;
                let parents = Path::new(rel).ancestors().skip(1);
                for dir in parents.take_while(|d| !d.as_os_str().is_empty()) {
                    let named = dir.to_str().is_some_and(|d| empty_dirs.contains(d));
                    // `remove_dir` fails on a directory that is not empty.
                    if named || fs::remove_dir(root.join(dir)).is_err() {
                        break;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(err) => bad.push(BadEntry {
                path: rel.clone(),
                error: format!("removing: {err}"),
            }),
        }
    }
    removed
}

/// Restores a tar.gz snapshot (`which` = `latest`, an object name or its timestamp
/// part) into `target`. `.git` directories come back as they were archived; times
/// have whole seconds (tar headers).
pub async fn restore_snapshot(
    remote: &dyn Remote,
    conversation_prefix: &str,
    which: &str,
    target: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let listed =
        remote::list_all(remote, &format!("{conversation_prefix}{COMPRESSED_DIR}")).await?;
    let mut named: Vec<(u64, &remote::ObjectInfo)> = listed
        .iter()
        .filter_map(|o| Some((snapshot::parse_backup_name(&o.key)?, o)))
        .collect();
    named.sort_by_key(|(ms, _)| *ms);
    let pick = if which == "latest" {
        named.last()
    } else {
        named.iter().find(|(_, o)| {
            let name = o.key.rsplit('/').next().unwrap_or_default();
            // The object key as `GET /v1/snapshots` gives it, its name, or its time.
            o.key == which
                || name == which
                || name
                    .strip_prefix(snapshot::NAME_PREFIX)
                    .and_then(|s| s.strip_suffix(snapshot::NAME_SUFFIX))
                    == Some(which)
        })
    };
    let Some((_, object)) = pick else {
        return Err(RestoreError::NoSnapshot(which.to_string()));
    };
    let name = object
        .key
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    fs::create_dir_all(target)
        .map_err(|e| local(format_args!("creating {}", target.display()), e))?;
    let root = fs::canonicalize(target)
        .map_err(|e| local(format_args!("resolving {}", target.display()), e))?;
    progress.start(1, object.size);
    let tmp = root.join(format!("{TMP_PREFIX}{:016x}.tar.gz", rand::random::<u64>()));
    if let Err(e) = retry_transport(|| remote.get_to_file(&object.key, &tmp)).await {
        let _ = fs::remove_file(&tmp);
        return Err(e.into());
    }
    progress.advance(object.size);
    // Under `force`, what the snapshot left out by its own excludes stays too.
    let kept: Vec<String> = opts
        .exclude
        .iter()
        .chain(&opts.snapshot_exclude)
        .cloned()
        .collect();
    let (archive, dest, force, exclude) =
        (tmp.clone(), root.clone(), opts.force, opts.exclude.clone());
    let extracted =
        tokio::task::spawn_blocking(move || extract(&archive, &dest, force, &exclude, &kept))
            .await
            .map_err(|e| RestoreError::Task(e.to_string()));
    let _ = fs::remove_file(&tmp);
    let mut report = extracted??;
    progress.finish();
    report.snapshot = Some(name);
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Extracts the snapshot at `archive` into `root`, leaving out (and never touching)
/// `exclude`; under `force`, removes what the archive does not name, except `kept`.
fn extract(
    archive: &Path,
    root: &Path,
    force: bool,
    exclude: &[String],
    kept: &[String],
) -> Result<RestoreReport, RestoreError> {
    let file = fs::File::open(archive).map_err(|e| local("opening the snapshot", e))?;
    let gz = flate2::read::GzDecoder::new(io::BufReader::with_capacity(256 * 1024, file));
    let mut tar = tar::Archive::new(gz);
    // Permission bits only (`FILE_MODE_BITS`): no set-id bit comes back.
    tar.set_preserve_permissions(false);
    tar.set_preserve_mtime(true);
    tar.set_overwrite(true);
    tar.set_unpack_xattrs(false);
    let rules_of = |patterns: &[String]| {
        Rules::new(root, patterns)
            .map(Rules::keeping_git)
            .map_err(|e| local("exclude patterns", io::Error::other(e)))
    };
    let rules = rules_of(exclude)?;
    let mut report = RestoreReport::default();
    // Directories with their modes and times, set at the end.
    let mut dirs: Vec<(PathBuf, u32, Option<u64>)> = Vec::new();
    // Every path the archive names (bad entries too: what is there of them stays).
    let mut named: HashSet<PathBuf> = HashSet::new();
    let entries = tar
        .entries()
        .map_err(|e| local("reading the snapshot", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| local("reading the snapshot", e))?;
        let path: PathBuf = match entry.path() {
            // Rebuilt from its components: a trailing `/` would make every lookup of
            // the path follow a symlink there.
            Ok(p) => p.components().collect(),
            Err(e) => {
                report.bad.push(BadEntry {
                    path: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
                    error: e.to_string(),
                });
                continue;
            }
        };
        let label = path.to_string_lossy().trim_end_matches('/').to_string();
        let kind = entry.header().entry_type();
        if label.is_empty() || label == "." {
            continue;
        }
        // Checked first: the matcher takes relative paths only.
        if !is_plain(&path) {
            report.bad.push(BadEntry {
                path: label,
                error: "not a plain relative path".into(),
            });
            continue;
        }
        if rules.excluded_by_config(&path, kind.is_dir()) {
            continue;
        }
        named.insert(path.clone());
        if let Err(error) = make_parents(root, &path, force).map_err(|e| e.to_string()) {
            report.bad.push(BadEntry { path: label, error });
            continue;
        }
        let dest = root.join(&path);
        if !kind.is_dir() && fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
            if !force {
                report.bad.push(BadEntry {
                    path: label,
                    error: "a directory is in the way".into(),
                });
                continue;
            }
            let _ = fs::remove_dir_all(&dest);
        }
        if kind.is_dir() {
            // Modes of directories are set at the end: a read-only one would refuse
            // its own content; so are their times, which their content moves.
            if let Ok(mode) = entry.header().mode() {
                let mtime = entry
                    .header()
                    .mtime()
                    .ok()
                    .filter(|&t| t <= i64::MAX as u64);
                dirs.push((dest.clone(), mode, mtime));
            }
            // The directory itself is made like a parent: a symlink (or file) in its
            // place is replaced under `force`, never gone through.
            match make_dirs(root, &path, force) {
                Ok(_) => report.empty_dirs += 1,
                Err(e) => report.bad.push(BadEntry {
                    path: label,
                    error: e.to_string(),
                }),
            }
            continue;
        }
        if kind == tar::EntryType::Link {
            // A hard link names its target as the archive does: inside the workspace,
            // through no symlink, or not at all (tar would resolve it from the
            // process's directory, and an absolute one anywhere).
            let target = match entry.link_name() {
                Ok(Some(t)) if is_plain(&t) && real_dirs_to(root, &t) => root.join(t),
                _ => {
                    report.bad.push(BadEntry {
                        path: label,
                        error: "a hard link to a path outside the workspace".into(),
                    });
                    continue;
                }
            };
            let linked = remove_any(&dest).and_then(|()| fs::hard_link(&target, &dest));
            match linked {
                Ok(()) => report.files += 1,
                Err(e) if is_file_system_failure(&e) => return Err(local(&label, e)),
                Err(e) => report.bad.push(BadEntry {
                    path: label,
                    error: format!("hard link: {e}"),
                }),
            }
            continue;
        }
        let size = entry.header().size().unwrap_or(0);
        let epoch = kind.is_file() && entry.header().mtime().ok() == Some(0);
        match entry.unpack(&dest) {
            Ok(_) if kind.is_symlink() => report.symlinks += 1,
            Ok(_) => {
                // tar makes a time of 0 (the epoch) 1 s; GNU tar keeps it, and so do we.
                if epoch {
                    let _ = fs::File::open(&dest).and_then(|f| f.set_modified(UNIX_EPOCH));
                }
                report.files += 1;
                report.bytes += size;
            }
            // Not this entry's fault: the restore fails (to be run again).
            Err(e) if is_file_system_failure(&e) => return Err(local(&label, e)),
            Err(e) => report.bad.push(BadEntry {
                path: label,
                error: e.to_string(),
            }),
        }
    }
    // Directories that got content are not empty ones.
    report.empty_dirs = dirs
        .iter()
        .filter(|(d, ..)| fs::read_dir(d).is_ok_and(|mut r| r.next().is_none()))
        .count() as u64;
    if force {
        report.removed = remove_unnamed(root, &rules_of(kept)?, &named);
    }
    // Deepest first: a directory's time is set once nothing more changes in it.
    for (d, mode, mtime) in dirs.iter().rev() {
        // A later entry may have put a symlink there: its target is not ours to touch.
        if fs::symlink_metadata(d).is_ok_and(|m| m.is_dir()) {
            if let Some(t) = mtime {
                let _ = fs::File::open(d).and_then(|f| {
                    f.set_times(FileTimes::new().set_modified(UNIX_EPOCH + Duration::from_secs(*t)))
                });
            }
            let _ = fs::set_permissions(d, fs::Permissions::from_mode(mode & DIR_MODE_BITS));
        }
    }
    report.bad.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A remote that does not answer is no bad entry: the restore fails (the daemon
    /// tries again, the CLI exits 1) and the next attempt resumes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_that_does_not_answer_fails_the_restore_instead_of_its_entries() {
        use crate::remote::flaky::FlakyRemote;
        use bytes::Bytes;
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(crate::remote::dir::DirRemote::new(&dir.path().join("r")).unwrap());
        let remote = FlakyRemote::new(inner);
        let prefix = "conversations/u/c/";
        let mut manifest = Manifest {
            format: crate::sync::manifest::FORMAT,
            generation: 1,
            ..Manifest::default()
        };
        for (rel, data) in [("a.txt", "alpha"), ("b/c.txt", "gamma")] {
            let key = format!("{prefix}workspace/files/{rel}");
            remote.put_bytes(&key, Bytes::from(data)).await.unwrap();
            let entry = FileEntry {
                size: data.len() as u64,
                mtime: 1_700_000_000_000_000_000,
                mode: 0o644,
                hash: format!("blake3:{}", blake3::hash(data.as_bytes()).to_hex()),
            };
            manifest.files.insert(rel.into(), entry);
        }
        let json = serde_json::to_vec(&manifest).unwrap();
        let key = format!("{prefix}workspace/manifest.json");
        remote.put_bytes(&key, Bytes::from(json)).await.unwrap();
        let opts = two_at_a_time();
        let target = dir.path().join("ws");
        remote.set_down_under(Some(&format!("{prefix}workspace/files/b/")));
        let r = restore_workspace(&remote, prefix, &target, &opts, &NoProgress).await;
        assert!(matches!(r, Err(RestoreError::Remote(_))), "{r:?}");
        remote.set_down_under(None);
        let report = restore_workspace(&remote, prefix, &target, &opts, &NoProgress)
            .await
            .unwrap()
            .unwrap();
        assert!(report.bad.is_empty(), "{report:?}");
        assert_eq!(fs::read_to_string(target.join("b/c.txt")).unwrap(), "gamma");
        assert_eq!(fs::read_to_string(target.join("a.txt")).unwrap(), "alpha");
    }

    /// Options of the restores here: two downloads at a time, nothing else set.
    fn two_at_a_time() -> RestoreOptions {
        RestoreOptions {
            concurrency: 2,
            force: false,
            exclude: Vec::new(),
            max_file_bytes: u64::MAX,
            snapshot_exclude: Vec::new(),
        }
    }

    /// An object at the manifest's key too large to be one (a sparse file here) is
    /// refused before it is read, as an unreadable manifest (the daemon then restores
    /// the latest snapshot).
    #[tokio::test]
    async fn a_manifest_too_large_to_read_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let remote = crate::remote::dir::DirRemote::new(&dir.path().join("r")).unwrap();
        let prefix = "conversations/u/c/";
        let manifest = dir
            .path()
            .join("r")
            .join(prefix)
            .join("workspace/manifest.json");
        fs::create_dir_all(manifest.parent().unwrap()).unwrap();
        let f = fs::File::create(&manifest).unwrap();
        f.set_len(crate::remote::DOCUMENT_MAX + 1).unwrap();
        let opts = two_at_a_time();
        let target = dir.path().join("ws");
        let r = restore_workspace(&remote, prefix, &target, &opts, &NoProgress).await;
        match r {
            Err(RestoreError::Manifest(why)) => assert!(why.contains("larger than"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_full_or_read_only_file_system_fails_the_restore_not_one_entry() {
        for kind in [
            io::ErrorKind::StorageFull,
            io::ErrorKind::QuotaExceeded,
            io::ErrorKind::ReadOnlyFilesystem,
        ] {
            assert!(matches!(
                io_failure("writing", io::Error::from(kind)),
                FileError::Local { .. }
            ));
            let remote = RemoteError::local("get", Path::new("/t"), io::Error::from(kind));
            assert!(matches!(FileError::from(remote), FileError::Local { .. }));
        }
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(matches!(io_failure("writing", denied), FileError::Bad(_)));
    }

    #[test]
    fn remote_paths_are_checked() {
        for ok in ["a", "a/b.txt", "dir/.gitignore", "x/.github/y"] {
            assert!(checked_rel(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "./a",
            "a//b",
            "a/",
            ".git/config",
            "sub/.git/HEAD",
            "a\0b",
            "/",
            "a/.",
            "a/./b",
            "a/..",
        ] {
            assert!(checked_rel(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parents_never_go_through_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let outside = root.join("outside");
        fs::create_dir(&outside).unwrap();
        fs::create_dir(root.join("t")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("t/link")).unwrap();
        let t = root.join("t");
        assert!(make_parents(&t, Path::new("link/file"), false).is_err());
        assert!(fs::read_dir(&outside).unwrap().next().is_none());
        // With force the symlink is replaced by a real directory.
        let made = make_parents(&t, Path::new("link/file"), true).unwrap();
        assert!(fs::symlink_metadata(&made).unwrap().is_dir());
        assert!(outside.exists());
    }

    #[test]
    fn empty_means_nothing_but_excluded_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        assert!(is_empty_dir(&d.join("missing"), &[]).unwrap());
        assert!(is_empty_dir(d, &[]).unwrap());
        fs::create_dir(d.join("state")).unwrap();
        assert!(!is_empty_dir(d, &[]).unwrap());
        assert!(is_empty_dir(d, &["/state/".into()]).unwrap());
        fs::write(d.join(".hidden"), "x").unwrap();
        assert!(!is_empty_dir(d, &["/state/".into()]).unwrap());
    }

    /// A tar.gz of raw entries: (type, name, link name, content, mode), names written
    /// as given (tar's builder refuses the hostile ones).
    fn raw_archive(path: &Path, entries: &[(tar::EntryType, &str, &str, &[u8], u32)]) {
        let gz = flate2::write::GzEncoder::new(
            fs::File::create(path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        for (kind, name, link, data, mode) in entries {
            let mut h = tar::Header::new_gnu();
            let g = h.as_gnu_mut().unwrap();
            g.name[..name.len()].copy_from_slice(name.as_bytes());
            g.linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
    }

    /// Times come back to the second, the epoch included (tar would make it 1 s), and
    /// directories' times too, once their content is in place.
    #[test]
    fn snapshot_times_come_back_the_epoch_too() {
        let d = tempfile::tempdir().unwrap();
        let archive = d.path().join("a.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            fs::File::create(&archive).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        use tar::EntryType::{Directory, Regular};
        for (name, mtime, kind) in [
            ("epoch", 0, Regular),
            ("later", 1_700_000_000, Regular),
            ("dir/", 1_500_000_000, Directory),
            ("dir/sub/", 0, Directory),
            ("dir/sub/f", 1_700_000_000, Regular),
        ] {
            let mut h = tar::Header::new_gnu();
            let data: &[u8] = if kind == Regular { b"x" } else { b"" };
            h.set_size(data.len() as u64);
            h.set_mode(if kind == Regular { 0o644 } else { 0o755 });
            h.set_mtime(mtime);
            h.set_entry_type(kind);
            b.append_data(&mut h, name, data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        let ws = d.path().join("ws");
        fs::create_dir(&ws).unwrap();
        let report = extract(&archive, &ws, false, &[], &[]).unwrap();
        assert_eq!(report.bad, []);
        let mtime = |n: &str| fs::metadata(ws.join(n)).unwrap().modified().unwrap();
        assert_eq!(mtime("epoch"), UNIX_EPOCH);
        assert_eq!(
            mtime("later"),
            UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert_eq!(
            mtime("dir"),
            UNIX_EPOCH + Duration::from_secs(1_500_000_000)
        );
        assert_eq!(mtime("dir/sub"), UNIX_EPOCH);
    }

    #[test]
    fn hostile_snapshot_entries_stay_inside_the_workspace() {
        use std::os::unix::fs::MetadataExt;
        use tar::EntryType::{Directory, Link, Regular, Symlink};
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(outside.join("secret"), "s").unwrap();
        let secret = outside.join("secret");
        let secret = secret.to_str().unwrap();
        for force in [false, true] {
            let ws = d.path().join(format!("ws-{force}"));
            fs::create_dir(&ws).unwrap();
            let ws = fs::canonicalize(&ws).unwrap();
            let archive = d.path().join("a.tar.gz");
            raw_archive(
                &archive,
                &[
                    (Regular, "/abs/x", "", b"x", 0o644),
                    (Regular, "a.txt", "", b"a", 0o644),
                    (Link, "same.txt", "a.txt", b"", 0o644),
                    (Link, "abs-link", secret, b"", 0o644),
                    (Link, "up-link", "../outside/secret", b"", 0o644),
                    (Symlink, "d", outside.to_str().unwrap(), b"", 0o777),
                    (Link, "via-symlink", "d/secret", b"", 0o644),
                    (Directory, "d/", "", b"", 0o700),
                ],
            );
            let report = extract(&archive, &ws, force, &[], &[]).unwrap();
            let mut bad: Vec<&str> = report.bad.iter().map(|b| b.path.as_str()).collect();
            bad.sort();
            let mut want = vec!["/abs/x", "abs-link", "up-link", "via-symlink"];
            if !force {
                want.push("d");
            }
            want.sort();
            assert_eq!(bad, want, "force {force}: {:?}", report.bad);
            // The link inside the tree links the tree's own file.
            let (a, same) = (ws.join("a.txt"), ws.join("same.txt"));
            assert_eq!(
                fs::metadata(&a).unwrap().ino(),
                fs::metadata(&same).unwrap().ino()
            );
            assert_eq!(fs::metadata(secret).unwrap().nlink(), 1, "force {force}");
            let mode = fs::metadata(&outside).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o755, "force {force}: chmod went through the symlink");
            let d_is_dir = fs::symlink_metadata(ws.join("d")).unwrap().is_dir();
            assert_eq!(
                d_is_dir, force,
                "under force the directory replaces the symlink"
            );
            assert!(!ws.join("abs").exists() && !Path::new("/abs/x").exists());
        }
    }

    #[test]
    fn files_in_a_directory_the_remote_has_empty_are_extras() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for f in [
            "cache/junk.txt",
            "cache/deeper/more.txt",
            "kept.txt",
            "other.txt",
        ] {
            fs::create_dir_all(root.join(f).parent().unwrap()).unwrap();
            fs::write(root.join(f), "x").unwrap();
        }
        let mut manifest = Manifest::default();
        manifest.empty_dirs.insert("cache".into());
        let entry = crate::sync::manifest::FileEntry {
            size: 1,
            mtime: 0,
            mode: 0o644,
            hash: "blake3:00".into(),
        };
        manifest.files.insert("kept.txt".into(), entry);
        let rules = Rules::new(root, &[]).unwrap();
        let limits = Limits {
            max_file_bytes: u64::MAX,
            key_prefix_len: 0,
        };
        let mut got = extras(root, &rules, &manifest, &limits);
        got.sort();
        assert_eq!(
            got,
            ["cache/deeper/more.txt", "cache/junk.txt", "other.txt"]
        );
        // What the mirror does not carry is no extra: a file whose remote key would be
        // too long (a tracked file only a bundle brings back), one over the size limit.
        let limits = Limits {
            max_file_bytes: 1,
            key_prefix_len: crate::remote::MAX_KEY_BYTES - "other.txt".len() + 1,
        };
        fs::write(root.join("big.txt"), "xx").unwrap();
        assert_eq!(
            extras(root, &rules, &manifest, &limits),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_forced_snapshot_restore_removes_what_the_snapshot_does_not_have() {
        use tar::EntryType::{Directory, Regular};
        let d = tempfile::tempdir().unwrap();
        let archive = d.path().join("a.tar.gz");
        raw_archive(
            &archive,
            &[
                (Regular, ".gitignore", "", b"node_modules/\n", 0o644),
                (Regular, "a.txt", "", b"a", 0o644),
                (Directory, "sub/", "", b"", 0o755),
                (Regular, "sub/b.txt", "", b"b", 0o644),
                (Directory, "empty/", "", b"", 0o755),
                (Regular, "app.log", "", b"log", 0o644),
            ],
        );
        // `snapshot.exclude`: kept under force, still extracted when an archive has it.
        let kept = ["/state/".to_string(), "data/".into(), "*.log".into()];
        for force in [false, true] {
            let ws = d.path().join(format!("ws-{force}"));
            for f in [
                "extra.txt",
                "sub/extra.txt",
                "gone/deep/x.txt",
                "node_modules/pkg/i.js",
                "state/kv.key",
                "empty/junk",
                "data/big.csv",
                "other.log",
            ] {
                fs::create_dir_all(ws.join(f).parent().unwrap()).unwrap();
                fs::write(ws.join(f), "x").unwrap();
            }
            let ws = fs::canonicalize(&ws).unwrap();
            let report = extract(&archive, &ws, force, &["/state/".into()], &kept).unwrap();
            assert!(report.bad.is_empty(), "{:?}", report.bad);
            assert_eq!(fs::read_to_string(ws.join("sub/b.txt")).unwrap(), "b");
            let left = |f: &str| ws.join(f).exists();
            for f in [
                "extra.txt",
                "sub/extra.txt",
                "gone/deep/x.txt",
                "gone",
                "empty/junk",
            ] {
                assert_eq!(left(f), !force, "{f} (force {force})");
            }
            assert!(left("node_modules/pkg/i.js") && left("state/kv.key") && left("empty"));
            assert!(left("data/big.csv") && left("other.log"), "force {force}");
            assert_eq!(fs::read_to_string(ws.join("app.log")).unwrap(), "log");
            // Three files, then the directories they left empty: gone/deep and gone.
            assert_eq!(report.removed, if force { 6 } else { 0 });
        }
    }
}
