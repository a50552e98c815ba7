//! Workspace snapshots: a tar.gz of the workspace streamed straight into remote storage
//! (`workspace/compressed/backup-<YYYYMMDDTHHMMSSmmm>Z.tar.gz`), the newest
//! `snapshot.keep` kept, taken every `snapshot.interval` when the workspace changed and
//! on `POST /v1/snapshots`.
//!
//! A snapshot holds what the file mirror holds (the same ignore rules) plus `.git/`,
//! minus `snapshot.exclude`; entries are relative to the workspace root, with modes,
//! mtimes, owners, symlinks (never followed) and empty directories. The archive is built
//! with `tar` + `flate2` (zlib-rs) on a blocking thread that writes into a bounded
//! channel; [`Remote::put_stream`] consumes it, so there is no temporary file of the
//! archive and memory stays bounded whatever the workspace size. If building fails
//! half-way, the error travels down the channel and the upload is abandoned: a
//! truncated archive is never stored under a snapshot name.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::remote::{self, Remote, RemoteError};
use crate::sync::rules::Rules;

/// Where snapshots live, below the conversation prefix.
pub const COMPRESSED_DIR: &str = "workspace/compressed/";
/// Snapshot object names: `<NAME_PREFIX><timestamp><NAME_SUFFIX>`.
pub const NAME_PREFIX: &str = "backup-";
pub const NAME_SUFFIX: &str = ".tar.gz";
/// Deflate level: zlib-rs at 3 compresses source trees nearly as well as gzip -6 at a
/// fraction of its time (see `benches/snapshot-vs-tar.sh`).
pub const LEVEL: u32 = 3;
/// Size of the chunks handed from the archive builder to the upload.
pub const CHUNK: usize = 256 * 1024;
/// Chunks buffered between the builder and the upload (4 MiB).
pub const CHANNEL_CHUNKS: usize = 16;
/// Where the fingerprint of the last snapshot is kept across restarts.
const FINGERPRINT_FILE: &str = "snapshot.fingerprint";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the workspace {} is missing or unreadable: {source}", path.display())]
    Workspace { path: PathBuf, source: io::Error },
    #[error("invalid exclude pattern: {0}")]
    Rules(#[from] ignore::Error),
    #[error("building the archive: {0}")]
    Build(#[source] io::Error),
    #[error("remote storage: {0}")]
    Remote(#[from] RemoteError),
    #[error("the snapshot task failed: {0}")]
    Task(String),
}

/// What `POST /v1/snapshots` answers.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Taken {
    pub key: String,
    pub bytes: u64,
    pub files: u64,
    pub duration_ms: u64,
}

/// One stored snapshot, as `GET /v1/snapshots` lists it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub bytes: u64,
    pub created_at: String,
}

/// The `snapshots` part of `GET /v1/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SnapshotStatus {
    /// Snapshots in remote storage (`None` until listed once).
    pub count: Option<u64>,
    pub last: Option<Listed>,
    pub last_error: Option<String>,
    pub interval_s: u64,
    pub keep: u64,
}

/// What one walk of the workspace saw (and archived, unless it was a dry run).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Sockets, FIFOs, devices, and entries that could not be read.
    pub skipped: u64,
    /// Files whose size changed while they were archived (padded or cut to the size
    /// recorded in their header).
    pub changed: u64,
    /// Files left out for being larger than `sync.max_file_bytes`.
    pub too_large: u64,
    /// Digest of every entry's path, type, size, mtime, mode and link target.
    pub fingerprint: [u8; 32],
}

/// `backup-<YYYYMMDDTHHMMSSmmm>Z.tar.gz` for a time in milliseconds since the epoch.
pub fn backup_name(ms: u64) -> String {
    let stamp: String = crate::kv::rfc3339(ms)
        .chars()
        .filter(|c| !matches!(c, '-' | ':' | '.'))
        .collect();
    format!("{NAME_PREFIX}{stamp}{NAME_SUFFIX}")
}

/// The time (ms since the epoch) in a snapshot object name (or key); `None` for any
/// other name.
pub fn parse_backup_name(name: &str) -> Option<u64> {
    let name = name.rsplit('/').next()?;
    let s = name.strip_prefix(NAME_PREFIX)?.strip_suffix(NAME_SUFFIX)?;
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != 19 || b[8] != b'T' || b[18] != b'Z' || !digits(0..8) || !digits(9..18) {
        return None;
    }
    let text = format!(
        "{}-{}-{}T{}:{}:{}.{}Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15],
        &s[15..18]
    );
    let t = humantime::parse_rfc3339(&text).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
}

/// Keys of snapshots to delete so that only the newest `keep` remain. Objects whose
/// names are not snapshot names are never selected.
pub fn select_expired(keys: &[String], keep: usize) -> Vec<String> {
    let mut named: Vec<(u64, &String)> = keys
        .iter()
        .filter_map(|k| parse_backup_name(k).map(|ms| (ms, k)))
        .collect();
    named.sort_by(|a, b| b.cmp(a));
    named
        .into_iter()
        .skip(keep)
        .map(|(_, k)| k.clone())
        .collect()
}

/// A file's bytes cut or zero-padded to exactly the size in its tar header, so that a
/// file changing while it is read never corrupts the archive.
struct ExactReader<R> {
    inner: io::Take<R>,
    pad: u64,
    short: bool,
}

impl<R: Read> ExactReader<R> {
    fn new(inner: R, size: u64) -> Self {
        Self {
            inner: inner.take(size),
            pad: size,
            short: false,
        }
    }
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.short {
            let n = self.inner.read(buf)?;
            if n > 0 || buf.is_empty() {
                self.pad -= n as u64;
                return Ok(n);
            }
            if self.pad == 0 {
                return Ok(0);
            }
            self.short = true;
        }
        let n = (self.pad.min(buf.len() as u64)) as usize;
        buf[..n].fill(0);
        self.pad -= n as u64;
        Ok(n)
    }
}

/// Walks the workspace under `rules` in name order; archives every entry into
/// `builder` (a dry run when `None`, for the change check).
struct Walker<'a, W: Write> {
    rules: &'a Rules,
    /// Files larger than this outside `.git/` are left out, as the mirror leaves them
    /// out (`sync.max_file_bytes`).
    max_file_bytes: u64,
    builder: Option<tar::Builder<W>>,
    hasher: blake3::Hasher,
    stats: ArchiveStats,
}

fn header(meta: &std::fs::Metadata, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    set_mtime(&mut h, meta.mtime());
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    h.set_size(0);
    h
}

/// The header's modification time. A time before 1970 is written in GNU tar's
/// base-256 form (two's complement over the whole field, which GNU tar and the `tar`
/// crate both read back as negative): octal has no sign.
fn set_mtime(h: &mut tar::Header, secs: i64) {
    match u64::try_from(secs) {
        Ok(secs) => h.set_mtime(secs),
        Err(_) => {
            let field = &mut h.as_old_mut().mtime;
            field[..4].fill(0xff);
            field[4..].copy_from_slice(&secs.to_be_bytes());
        }
    }
}

/// Whether `rel` lies in a repository's `.git` directory.
fn in_git_dir(rel: &Path) -> bool {
    rel.components().any(|c| c.as_os_str() == ".git")
}

/// Whether `rel` lies in the object store of a repository (`.../.git/objects/...`).
fn in_git_objects(rel: &Path) -> bool {
    let mut parts = rel.components().map(|c| c.as_os_str());
    while let Some(p) = parts.next() {
        if p == ".git" {
            return parts.next().is_some_and(|n| n == "objects");
        }
    }
    false
}

/// Whether `rel` is a repository's index (`.../.git/index`).
fn is_git_index(rel: &Path) -> bool {
    rel.file_name().is_some_and(|n| n == "index")
        && rel
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|p| p == ".git")
}

impl<W: Write> Walker<'_, W> {
    fn note(&mut self, rel: &Path, kind: u8, meta: &std::fs::Metadata, target: &[u8]) {
        let h = &mut self.hasher;
        h.update(rel.as_os_str().as_bytes());
        h.update(&[0, kind]);
        h.update(&meta.len().to_le_bytes());
        if kind == b'd' || (kind == b'f' && in_git_objects(rel)) {
            // A directory's time moves with every file made and removed in it (git
            // writes `index.lock` and renames it), and its entries are noted anyway.
            // A git object's name is its content; git (and the bundler's work-tree
            // commits) touch an object that exists already instead of writing it
            // again, which is no change of the workspace.
        } else if kind == b'f'
            && is_git_index(rel)
            && let Ok(content) = std::fs::read(self.rules.root().join(rel))
        {
            // `git status` (run by prompts, editors and agents all the time) writes
            // the index again with the same content: the content counts, not the time.
            h.update(blake3::hash(&content).as_bytes());
        } else {
            h.update(&meta.mtime().to_le_bytes());
            h.update(&meta.mtime_nsec().to_le_bytes());
        }
        h.update(&meta.mode().to_le_bytes());
        h.update(target);
        h.update(&[0]);
    }

    /// Archives the directory `rel` ("" = the root, which gets no entry of its own).
    fn dir(&mut self, rel: &Path) -> io::Result<()> {
        let abs = self.rules.root().join(rel);
        let entries = match std::fs::read_dir(&abs) {
            Ok(e) => e,
            Err(e) if rel.as_os_str().is_empty() => return Err(e),
            Err(e) => {
                tracing::warn!(path = %abs.display(), error = %e, "snapshot: cannot read directory; skipped");
                self.stats.skipped += 1;
                return Ok(());
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            match entry {
                Ok(e) => names.push(e.file_name()),
                Err(e) => {
                    tracing::warn!(path = %abs.display(), error = %e, "snapshot: cannot list an entry");
                    self.stats.skipped += 1;
                }
            }
        }
        names.sort();
        for name in names {
            let child = rel.join(&name);
            let meta = match std::fs::symlink_metadata(abs.join(&name)) {
                Ok(m) => m,
                // Removed while walking: nothing to keep.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(path = %child.display(), error = %e, "snapshot: cannot stat; skipped");
                    self.stats.skipped += 1;
                    continue;
                }
            };
            self.entry(&child, &meta)?;
        }
        Ok(())
    }

    fn entry(&mut self, rel: &Path, meta: &std::fs::Metadata) -> io::Result<()> {
        let ft = meta.file_type();
        if self.rules.is_ignored(rel, ft.is_dir()) {
            return Ok(());
        }
        let abs = self.rules.root().join(rel);
        if ft.is_dir() {
            self.note(rel, b'd', meta, b"");
            self.stats.dirs += 1;
            if let Some(b) = self.builder.as_mut() {
                let mut h = header(meta, tar::EntryType::Directory);
                b.append_data(&mut h, rel, io::empty())?;
            }
            return self.dir(rel);
        }
        if ft.is_symlink() {
            let target = match std::fs::read_link(&abs) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => {
                    tracing::warn!(path = %rel.display(), error = %e, "snapshot: cannot read symlink; skipped");
                    self.stats.skipped += 1;
                    return Ok(());
                }
            };
            self.note(rel, b'l', meta, target.as_os_str().as_bytes());
            self.stats.symlinks += 1;
            if let Some(b) = self.builder.as_mut() {
                let mut h = header(meta, tar::EntryType::Symlink);
                b.append_link(&mut h, rel, &target)?;
            }
            return Ok(());
        }
        if !ft.is_file() {
            self.stats.skipped += 1;
            return Ok(());
        }
        if meta.len() > self.max_file_bytes && !in_git_dir(rel) {
            // The mirror warns about it at each full round; not said again here.
            self.stats.too_large += 1;
            return Ok(());
        }
        self.note(rel, b'f', meta, b"");
        let Some(b) = self.builder.as_mut() else {
            self.stats.files += 1;
            return Ok(());
        };
        // Never block on a FIFO or follow a symlink that replaced the file since the
        // directory was read: the opened file is checked again below.
        let opened_file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
                .open(&abs)
        };
        let file = match opened_file {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                tracing::warn!(path = %rel.display(), error = %e, "snapshot: cannot open file; skipped");
                self.stats.skipped += 1;
                return Ok(());
            }
        };
        // The size in the header is the one of the file we opened (it may have been
        // replaced since the directory was read).
        let opened = file.metadata()?;
        if !opened.is_file() {
            self.stats.skipped += 1;
            return Ok(());
        }
        let mut h = header(&opened, tar::EntryType::Regular);
        h.set_size(opened.len());
        let mut data = ExactReader::new(io::BufReader::with_capacity(CHUNK, file), opened.len());
        b.append_data(&mut h, rel, &mut data)?;
        if data.short {
            tracing::warn!(path = %rel.display(), "snapshot: file shrank while archived; padded with zeros");
            self.stats.changed += 1;
        }
        self.stats.files += 1;
        Ok(())
    }
}

/// Writes the tar.gz of the workspace under `rules` (files over `max_file_bytes` left
/// out, except in `.git/`) into `out`; returns what it holds.
pub fn write_archive<W: Write>(
    rules: &Rules,
    max_file_bytes: u64,
    out: W,
    level: u32,
) -> io::Result<ArchiveStats> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::new(level));
    let mut builder = tar::Builder::new(gz);
    builder.follow_symlinks(false);
    let mut walker = Walker {
        rules,
        max_file_bytes,
        builder: Some(builder),
        hasher: blake3::Hasher::new(),
        stats: ArchiveStats::default(),
    };
    walker.dir(Path::new(""))?;
    let mut stats = walker.stats;
    stats.fingerprint = walker.hasher.finalize().into();
    if let Some(b) = walker.builder {
        let gz = b.into_inner()?;
        let mut out = gz.finish()?;
        out.flush()?;
    }
    Ok(stats)
}

/// The fingerprint (and counts) of the workspace under `rules` without reading any file.
pub fn fingerprint(rules: &Rules, max_file_bytes: u64) -> io::Result<ArchiveStats> {
    let mut walker: Walker<'_, io::Sink> = Walker {
        rules,
        max_file_bytes,
        builder: None,
        hasher: blake3::Hasher::new(),
        stats: ArchiveStats::default(),
    };
    walker.dir(Path::new(""))?;
    let mut stats = walker.stats;
    stats.fingerprint = walker.hasher.finalize().into();
    Ok(stats)
}

/// The writing end of the pipe: a blocking `Write` that hands `CHUNK`-sized `Bytes`
/// to the async side through a bounded channel (so a slow upload slows the builder
/// down instead of growing memory). [`ChannelWriter::fail`] sends an error instead, so
/// the upload is abandoned rather than completed with a truncated stream.
pub struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
}

impl ChannelWriter {
    pub fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        Self {
            tx,
            buf: BytesMut::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK);
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped reading"))
    }

    /// Tells the reading side that the stream is broken.
    pub fn fail(self, e: &io::Error) {
        let _ = self
            .tx
            .blocking_send(Err(io::Error::new(e.kind(), e.to_string())));
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK.saturating_sub(self.buf.len()).max(1);
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The reading end of the pipe, an `AsyncRead` for [`Remote::put_stream`]. The end of
/// the channel is the end of the stream; an error item is a read error.
pub struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    queued: VecDeque<Bytes>,
}

impl ChannelReader {
    pub fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Self {
            rx,
            queued: VecDeque::new(),
        }
    }
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(front) = self.queued.front_mut() {
                let n = front.len().min(out.remaining());
                out.put_slice(&front.split_to(n));
                if front.is_empty() {
                    self.queued.pop_front();
                }
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    if !chunk.is_empty() {
                        self.queued.push_back(chunk);
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A bounded pipe: the blocking writer and the async reader.
pub fn pipe() -> (ChannelWriter, ChannelReader) {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    (ChannelWriter::new(tx), ChannelReader::new(rx))
}

/// Takes, lists and prunes the snapshots of one workspace.
pub struct Snapshots {
    remote: Arc<dyn Remote>,
    metrics: Arc<Metrics>,
    root: PathBuf,
    excludes: Vec<String>,
    /// `sync.max_file_bytes`: larger files are left out, as the mirror leaves them out.
    max_file_bytes: u64,
    /// `<conversation prefix>workspace/compressed/`.
    prefix: String,
    keep: usize,
    interval: Duration,
    fingerprint_path: PathBuf,
    /// One snapshot at a time; holds the fingerprint of the last one taken.
    running: tokio::sync::Mutex<Option<[u8; 32]>>,
    last_ms: Mutex<u64>,
    status: Mutex<SnapshotStatus>,
}

impl Snapshots {
    pub fn new(config: &Config, remote: Arc<dyn Remote>, metrics: Arc<Metrics>) -> Self {
        let root = std::fs::canonicalize(&config.workspace)
            .or_else(|_| std::path::absolute(&config.workspace))
            .unwrap_or_else(|_| config.workspace.clone());
        // The mirror's rules plus the snapshot's own excludes, plus the daemon's own
        // directories if they lie in the workspace (a `dir` remote there would otherwise
        // put every snapshot into the next one).
        let mut excludes = config.sync.exclude.clone();
        excludes.extend(config.snapshot.exclude.iter().cloned());
        excludes.extend(crate::sync::rules::own_excludes(config, &root));
        let fingerprint_path = config.state_dir.join(FINGERPRINT_FILE);
        let last = std::fs::read_to_string(&fingerprint_path)
            .ok()
            .and_then(|t| hex::decode(t.trim()).ok())
            .and_then(|v| <[u8; 32]>::try_from(v).ok());
        Self {
            remote,
            metrics,
            root,
            excludes,
            max_file_bytes: config.sync.max_file_bytes,
            prefix: format!("{}{COMPRESSED_DIR}", config.conversation_prefix()),
            keep: config.snapshot.keep.max(1) as usize,
            interval: config.snapshot.interval.0,
            fingerprint_path,
            running: tokio::sync::Mutex::new(last),
            last_ms: Mutex::new(0),
            status: Mutex::new(SnapshotStatus {
                interval_s: config.snapshot.interval.0.as_secs(),
                keep: config.snapshot.keep,
                ..SnapshotStatus::default()
            }),
        }
    }

    fn rules(&self) -> Result<Rules, SnapshotError> {
        Ok(Rules::new(&self.root, &self.excludes)?.keeping_git())
    }

    /// A time for the next name: now, but always after the previous one (names are
    /// unique and sort by time).
    fn next_ms(&self) -> u64 {
        let mut last = self.last_ms.lock().unwrap_or_else(|e| e.into_inner());
        let ms = crate::kv::now_ms().max(*last + 1);
        *last = ms;
        ms
    }

    pub fn status(&self) -> SnapshotStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_status(&self, f: impl FnOnce(&mut SnapshotStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Stored snapshots, newest first.
    pub async fn list(&self) -> Result<Vec<Listed>, SnapshotError> {
        let objects = remote::list_all(self.remote.as_ref(), &self.prefix).await?;
        let mut out: Vec<(u64, Listed)> = objects
            .into_iter()
            .filter_map(|o| {
                let ms = parse_backup_name(&o.key)?;
                Some((
                    ms,
                    Listed {
                        key: o.key,
                        bytes: o.size,
                        created_at: crate::kv::rfc3339(ms),
                    },
                ))
            })
            .collect();
        out.sort_by_key(|e| std::cmp::Reverse(e.0));
        let listed: Vec<Listed> = out.into_iter().map(|(_, l)| l).collect();
        self.set_status(|s| {
            s.count = Some(listed.len() as u64);
            s.last = listed.first().cloned();
        });
        Ok(listed)
    }

    /// Takes a snapshot now, whether or not the workspace changed.
    pub async fn take(&self) -> Result<Taken, SnapshotError> {
        let mut last = self.running.lock().await;
        let started = Instant::now();
        let result = self.take_locked(&mut last).await;
        let elapsed = started.elapsed();
        match &result {
            Ok(t) => {
                self.metrics.snapshot_taken(elapsed, t.bytes);
                tracing::info!(key = %t.key, bytes = t.bytes, files = t.files, ms = t.duration_ms, "snapshot stored");
                self.set_status(|s| s.last_error = None);
            }
            Err(e) => {
                self.metrics.snapshot_failed();
                tracing::warn!(error = %e, "snapshot failed");
                let msg = e.to_string();
                self.set_status(|s| s.last_error = Some(msg));
            }
        }
        result
    }

    async fn take_locked(&self, last: &mut Option<[u8; 32]>) -> Result<Taken, SnapshotError> {
        let started = Instant::now();
        if let Err(source) = std::fs::read_dir(&self.root) {
            return Err(SnapshotError::Workspace {
                path: self.root.clone(),
                source,
            });
        }
        let rules = self.rules()?;
        let ms = self.next_ms();
        let key = format!("{}{}", self.prefix, backup_name(ms));
        let (writer, reader) = pipe();
        let max_file_bytes = self.max_file_bytes;
        let build = tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            match write_archive(&rules, max_file_bytes, &mut writer, LEVEL) {
                Ok(stats) => Ok(stats),
                Err(e) => {
                    writer.fail(&e);
                    Err(e)
                }
            }
        });
        let uploaded = self.remote.put_stream(&key, Box::new(reader)).await;
        let built = build.await.map_err(|e| SnapshotError::Task(e.to_string()));
        let (bytes, stats) = match (uploaded, built) {
            (Ok(bytes), Ok(Ok(stats))) => (bytes, stats),
            // The builder failed and told the upload, which stored nothing.
            (Err(RemoteError::Source { .. }), Ok(Err(e))) => return Err(SnapshotError::Build(e)),
            // The upload failed (the builder then saw a broken pipe); nothing stored.
            (Err(e), _) => return Err(e.into()),
            // The upload completed but the archive is not whole: it must not stay.
            (Ok(_), Ok(Err(e))) => {
                self.discard(&key).await;
                return Err(SnapshotError::Build(e));
            }
            (Ok(_), Err(e)) => {
                self.discard(&key).await;
                return Err(e);
            }
        };
        *last = Some(stats.fingerprint);
        if let Err(e) = std::fs::write(&self.fingerprint_path, hex::encode(stats.fingerprint)) {
            tracing::warn!(path = %self.fingerprint_path.display(), error = %e, "cannot record the snapshot fingerprint");
        }
        if stats.changed > 0 {
            tracing::warn!(
                files = stats.changed,
                "snapshot: files changed while they were archived"
            );
        }
        if stats.too_large > 0 {
            tracing::info!(
                files = stats.too_large,
                "snapshot: files larger than sync.max_file_bytes left out, as the mirror leaves them out"
            );
        }
        self.prune().await;
        let duration_ms = started.elapsed().as_millis() as u64;
        Ok(Taken {
            key,
            bytes,
            files: stats.files,
            duration_ms,
        })
    }

    /// Deletes an object that must not stay (an archive whose builder failed).
    async fn discard(&self, key: &str) {
        if let Err(e) = self.remote.delete_many(&[key.to_string()]).await {
            tracing::warn!(key, error = %e, "cannot delete an incomplete snapshot");
        }
    }

    /// Keeps the newest `keep` snapshots; failures are logged (the next snapshot
    /// tries again).
    async fn prune(&self) {
        let keys: Vec<String> = match remote::list_all(self.remote.as_ref(), &self.prefix).await {
            Ok(objects) => objects.into_iter().map(|o| o.key).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list snapshots to apply snapshot.keep");
                return;
            }
        };
        let expired = select_expired(&keys, self.keep);
        if !expired.is_empty() {
            if let Err(e) = self.remote.delete_many(&expired).await {
                tracing::warn!(error = %e, "cannot delete old snapshots");
            } else {
                tracing::info!(deleted = expired.len(), "old snapshots deleted");
            }
        }
        if let Err(e) = self.list().await {
            tracing::warn!(error = %e, "cannot list snapshots");
        }
    }

    /// Whether the workspace differs from the last snapshot (always true before the
    /// first one).
    async fn changed(&self) -> Result<bool, SnapshotError> {
        let last = *self.running.lock().await;
        let rules = self.rules()?;
        let max_file_bytes = self.max_file_bytes;
        let now = tokio::task::spawn_blocking(move || fingerprint(&rules, max_file_bytes))
            .await
            .map_err(|e| SnapshotError::Task(e.to_string()))?
            .map_err(|source| SnapshotError::Workspace {
                path: self.root.clone(),
                source,
            })?;
        Ok(last != Some(now.fingerprint))
    }

    /// Takes a snapshot every `snapshot.interval` when the workspace changed, until
    /// `stop` fires (a snapshot in progress is abandoned then).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = self.list() => if let Err(e) = r {
                tracing::warn!(error = %e, "cannot list snapshots");
            },
        }
        if self.interval.is_zero() {
            return;
        }
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + self.interval, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let round = async {
                match self.changed().await {
                    Ok(true) => {
                        let _ = self.take().await;
                    }
                    Ok(false) => tracing::debug!("workspace unchanged since the last snapshot"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot check the workspace for a snapshot")
                    }
                }
            };
            tokio::select! {
                _ = stop.cancelled() => {
                    tracing::info!("periodic snapshot interrupted by shutdown");
                    return;
                }
                _ = round => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_utc_milliseconds_and_parse_back() {
        // 2026-11-22T04:20:05.123Z
        let ms = 1_795_321_205_123;
        let name = backup_name(ms);
        assert_eq!(name, "backup-20261122T042005123Z.tar.gz");
        assert_eq!(parse_backup_name(&name), Some(ms));
        assert_eq!(
            parse_backup_name(&format!("conversations/u/c/{COMPRESSED_DIR}{name}")),
            Some(ms)
        );
        assert_eq!(backup_name(0), "backup-19700101T000000000Z.tar.gz");
        for bad in [
            "backup-20261122T042005123Z.tar",
            "backup-20261122T0420051234Z.tar.gz",
            "backup-2026112XT042005123Z.tar.gz",
            "backup-20261322T042005123Z.tar.gz",
            "other.tar.gz",
        ] {
            assert_eq!(parse_backup_name(bad), None, "{bad}");
        }
        // Names sort by time.
        assert!(backup_name(ms) < backup_name(ms + 1));
        assert!(backup_name(ms + 999) < backup_name(ms + 1000));
    }

    #[test]
    fn retention_keeps_the_newest() {
        let base = 1_795_321_205_000u64;
        let keys: Vec<String> = [5u64, 1, 3, 2, 4]
            .iter()
            .map(|i| format!("p/{COMPRESSED_DIR}{}", backup_name(base + i * 1000)))
            .chain(["p/workspace/compressed/notes.txt".to_string()])
            .collect();
        let mut expired = select_expired(&keys, 3);
        expired.sort();
        assert_eq!(
            expired,
            vec![
                format!("p/{COMPRESSED_DIR}{}", backup_name(base + 1000)),
                format!("p/{COMPRESSED_DIR}{}", backup_name(base + 2000)),
            ]
        );
        assert!(select_expired(&keys, 5).is_empty());
        assert_eq!(select_expired(&keys, 1).len(), 4);
    }

    #[test]
    fn own_directories_inside_the_workspace_are_excluded() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join(".sandkeep/remote")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        let got = crate::sync::rules::inner_excludes(
            &root,
            &[
                root.join(".sandkeep/remote"),
                root.join("state-not-yet-created"),
                outside.path().to_path_buf(),
                root.clone(),
            ],
        );
        assert_eq!(got, vec!["/.sandkeep/remote/", "/state-not-yet-created/"]);
        let rules = Rules::new(&root, &got).unwrap().keeping_git();
        assert!(rules.is_ignored(Path::new(".sandkeep/remote/x.tar.gz"), false));
        assert!(!rules.is_ignored(Path::new("a/.sandkeep/remote/x"), false));
    }

    #[test]
    fn exact_reader_pads_and_cuts() {
        let mut out = Vec::new();
        ExactReader::new(&b"abc"[..], 5)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"abc\0\0");
        out.clear();
        ExactReader::new(&b"abcdef"[..], 4)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"abcd");
    }

    /// Files over `sync.max_file_bytes` are left out as the mirror leaves them out, and
    /// their changes are no change of the snapshot; a repository's own files are kept
    /// whatever their size (a pack file is the repository).
    #[test]
    fn files_over_the_mirror_limit_are_left_out_except_in_git() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join(".git/objects/pack")).unwrap();
        std::fs::write(root.join("small.txt"), "12345").unwrap();
        std::fs::write(root.join("model.bin"), "123456").unwrap();
        std::fs::write(root.join(".git/objects/pack/p.pack"), "1234567").unwrap();
        let rules = Rules::new(&root, &[]).unwrap().keeping_git();
        let mut out = Vec::new();
        let stats = write_archive(&rules, 5, &mut out, LEVEL).unwrap();
        assert_eq!((stats.files, stats.too_large), (2, 1), "{stats:?}");
        let mut names = Vec::new();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&out[..]));
        for e in ar.entries().unwrap() {
            names.push(e.unwrap().path().unwrap().display().to_string());
        }
        assert_eq!(
            names,
            [
                ".git",
                ".git/objects",
                ".git/objects/pack",
                ".git/objects/pack/p.pack",
                "small.txt"
            ]
        );
        let before = fingerprint(&rules, 5).unwrap().fingerprint;
        assert_eq!(before, stats.fingerprint);
        std::fs::write(root.join("model.bin"), "1234567890").unwrap();
        assert_eq!(fingerprint(&rules, 5).unwrap().fingerprint, before);
        assert_ne!(fingerprint(&rules, u64::MAX).unwrap().fingerprint, before);
    }

    #[test]
    fn archive_round_trip_and_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("src/empty")).unwrap();
        std::fs::create_dir_all(root.join(".git/objects")).unwrap();
        std::fs::create_dir_all(root.join("node_modules/x")).unwrap();
        std::fs::write(root.join("src/a.txt"), "alpha").unwrap();
        std::fs::write(root.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
        std::fs::write(root.join("node_modules/x/i.js"), "x").unwrap();
        std::fs::write(root.join(".gitignore"), "*.log\n").unwrap();
        std::fs::write(root.join("debug.log"), "no").unwrap();
        std::os::unix::fs::symlink("src/a.txt", root.join("link")).unwrap();
        let rules = Rules::new(&root, &["node_modules/".into()])
            .unwrap()
            .keeping_git();
        let mut out = Vec::new();
        let stats = write_archive(&rules, u64::MAX, &mut out, LEVEL).unwrap();
        assert_eq!(stats.files, 3, "{stats:?}");
        assert_eq!(stats.symlinks, 1);
        assert_eq!(
            fingerprint(&rules, u64::MAX).unwrap().fingerprint,
            stats.fingerprint
        );

        let mut names = Vec::new();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&out[..]));
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            names.push(e.path().unwrap().display().to_string());
            if e.path().unwrap().ends_with("link") {
                assert_eq!(
                    e.link_name().unwrap().unwrap().display().to_string(),
                    "src/a.txt"
                );
            }
        }
        assert_eq!(
            names,
            vec![
                ".git",
                ".git/HEAD",
                ".git/objects",
                ".gitignore",
                "link",
                "src",
                "src/a.txt",
                "src/empty"
            ]
        );

        std::fs::write(root.join("src/a.txt"), "changed!").unwrap();
        assert_ne!(
            fingerprint(&rules, u64::MAX).unwrap().fingerprint,
            stats.fingerprint
        );
    }

    /// git touches an object it would write again (its name is its content): no
    /// change of the workspace, so no new snapshot. Any other file's time is one.
    #[test]
    fn a_touched_git_object_is_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join(".git/objects/ab")).unwrap();
        std::fs::create_dir_all(root.join("sub/.git/objects/pack")).unwrap();
        for f in [
            ".git/objects/ab/cdef",
            "sub/.git/objects/pack/p.pack",
            ".git/HEAD",
            ".git/index",
            "x.txt",
        ] {
            std::fs::write(root.join(f), "x").unwrap();
        }
        let rules = Rules::new(&root, &[]).unwrap().keeping_git();
        let before = fingerprint(&rules, u64::MAX).unwrap().fingerprint;
        let touch = |f: &str| {
            let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
            let file = std::fs::File::options()
                .write(true)
                .open(root.join(f))
                .unwrap();
            file.set_modified(later).unwrap();
        };
        touch(".git/objects/ab/cdef");
        touch("sub/.git/objects/pack/p.pack");
        assert_eq!(fingerprint(&rules, u64::MAX).unwrap().fingerprint, before);
        touch(".git/index");
        assert_eq!(
            fingerprint(&rules, u64::MAX).unwrap().fingerprint,
            before,
            "same index"
        );
        std::fs::write(root.join(".git/index.lock"), "y").unwrap();
        std::fs::remove_file(root.join(".git/index.lock")).unwrap();
        let now = fingerprint(&rules, u64::MAX).unwrap().fingerprint;
        assert_eq!(now, before, "a lock came and went");
        std::fs::write(root.join(".git/index"), "y").unwrap();
        assert_ne!(
            fingerprint(&rules, u64::MAX).unwrap().fingerprint,
            before,
            "new index"
        );
        let before = fingerprint(&rules, u64::MAX).unwrap().fingerprint;
        touch(".git/HEAD");
        assert_ne!(fingerprint(&rules, u64::MAX).unwrap().fingerprint, before);
        assert!(in_git_objects(Path::new("a/.git/objects/x")));
        assert!(!in_git_objects(Path::new("objects/x")));
        assert!(!in_git_objects(Path::new(".git/refs/objects")));
    }

    #[tokio::test]
    async fn pipe_carries_bytes_and_errors() {
        use tokio::io::AsyncReadExt;
        let (mut w, mut r) = pipe();
        let writer = tokio::task::spawn_blocking(move || {
            let data = vec![7u8; CHUNK * 3 + 5];
            w.write_all(&data).unwrap();
            w.flush().unwrap();
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), CHUNK * 3 + 5);

        let (mut w, mut r) = pipe();
        tokio::task::spawn_blocking(move || {
            w.write_all(b"partial").unwrap();
            w.flush().unwrap();
            w.fail(&io::Error::other("disk on fire"));
        });
        let mut got = Vec::new();
        let err = r.read_to_end(&mut got).await.unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
    }
}
