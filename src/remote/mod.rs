//! Remote object storage behind one small trait, with two backends: [`s3::S3Remote`]
//! (S3, MinIO, any S3-compatible server) and [`dir::DirRemote`] (a local directory laid
//! out exactly like the bucket). [`flaky::FlakyRemote`] wraps either to inject failures
//! in tests, and [`fenced::FencedRemote`] wraps the configured one so that only the
//! owner of the conversation writes (see [`crate::owner`]).
//!
//! Keys are full object keys (the configured prefix included). Every upload is verified
//! before it returns: the backend checks that what it stored is the content whose MD5
//! the caller computed while hashing the file, so a file that changed between hashing
//! and upload is reported as [`RemoteError::Changed`] instead of being recorded.

pub mod dir;
pub mod fenced;
pub mod flaky;
pub mod insecure;
pub mod metered;
pub mod s3;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::{Config, RemoteKind};

/// Longest object key S3 accepts.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest path segment (file systems and our own rule).
pub const MAX_SEGMENT_BYTES: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{op} {key}: not found")]
    NotFound { op: &'static str, key: String },
    /// The source changed between hashing and upload; nothing was recorded.
    #[error("{key}: the file changed while it was being uploaded")]
    Changed { key: String },
    /// The service refused the request (credentials, bucket, permissions, ...).
    #[error("{op} {key}: {message}")]
    Service {
        op: &'static str,
        key: String,
        message: String,
    },
    /// The request did not get an answer (connection, timeout, 5xx).
    #[error("{op} {key}: {message}")]
    Transport {
        op: &'static str,
        key: String,
        message: String,
    },
    /// The stream given to [`Remote::put_stream`] failed; nothing was stored.
    #[error("{key}: reading the upload stream: {source}")]
    Source { key: String, source: std::io::Error },
    /// A local file could not be read or written.
    #[error("{op} {}: {source}", path.display())]
    Local {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// [`Remote::get_bytes_within`] found the object larger than it takes; its content
    /// was not read.
    #[error("{key}: the object is larger than the {max} bytes this read takes")]
    TooLarge { key: String, max: u64 },
    /// The condition of [`Remote::put_bytes_if`] did not hold; nothing was written.
    #[error("{key}: the object is not in the expected state (precondition failed)")]
    PreconditionFailed { key: String },
    /// A write refused because this daemon does not (or no longer) own the
    /// conversation; nothing was sent. See [`fenced::FencedRemote`].
    #[error("{key}: write refused: {message}")]
    Fenced { key: String, message: String },
}

impl RemoteError {
    pub fn local(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Local {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// A short label for metrics.
    pub fn op(&self) -> &'static str {
        match self {
            Self::NotFound { op, .. }
            | Self::Service { op, .. }
            | Self::Transport { op, .. }
            | Self::Local { op, .. } => op,
            Self::TooLarge { .. } => "get",
            Self::Changed { .. } | Self::Source { .. } | Self::PreconditionFailed { .. } => "put",
            Self::Fenced { .. } => "fenced",
        }
    }
}

/// When a conditional write ([`Remote::put_bytes_if`]) may replace an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// Only if no object exists at the key (S3 `If-None-Match: *`).
    Absent,
    /// Only if the object's ETag is this one, as [`Remote::get_bytes_tagged`] or a
    /// previous [`Remote::put_bytes_if`] returned it (S3 `If-Match`).
    Matches(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub last_modified: Option<SystemTime>,
    /// The ETag (without quotes) where the listing gives it: S3 does, the `dir`
    /// backend does not (it would read every file for it).
    pub etag: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    /// Pass back to get the next page; `None` on the last page.
    pub next: Option<String>,
}

/// What the sync engine, snapshots and restore need from object storage.
#[async_trait]
pub trait Remote: Send + Sync + 'static {
    /// Uploads the file at `path` (streamed from disk, multipart above the threshold)
    /// and verifies that the stored object is the content whose MD5 is `md5`.
    async fn put_file(&self, key: &str, path: &Path, md5: [u8; 16]) -> Result<u64, RemoteError>;

    /// Uploads everything `reader` yields until its end as one object, without knowing
    /// the size in advance and with bounded memory (multipart on S3, a temporary file
    /// renamed into place on a `dir` remote); returns the size. If the reader fails,
    /// the upload is abandoned ([`RemoteError::Source`]) and no object is created.
    async fn put_stream(
        &self,
        key: &str,
        reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<u64, RemoteError>;

    /// Uploads a small object held in memory (manifests, exports).
    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), RemoteError>;

    /// Uploads a small object only if `cond` holds, atomically with respect to other
    /// conditional writes of the same key; returns the new object's ETag, or
    /// [`RemoteError::PreconditionFailed`] (nothing written). On S3 this relies on the
    /// server honouring `If-None-Match`/`If-Match` on PutObject; a server that ignores
    /// them writes unconditionally.
    async fn put_bytes_if(
        &self,
        key: &str,
        data: Bytes,
        cond: Precondition,
    ) -> Result<String, RemoteError>;

    /// Downloads an object into `dest` (created or truncated), streamed; returns its size.
    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<u64, RemoteError>;

    /// Downloads a small object; `None` when it does not exist.
    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, RemoteError> {
        self.get_bytes_within(key, u64::MAX).await
    }

    /// [`Remote::get_bytes`] of an object of at most `max` bytes: a larger one is
    /// [`RemoteError::TooLarge`], found before its content is read (or, where the size
    /// is not known beforehand, as soon as more than `max` bytes came).
    async fn get_bytes_within(&self, key: &str, max: u64) -> Result<Option<Bytes>, RemoteError>;

    /// Downloads a small object with its ETag (for [`Precondition::Matches`]); `None`
    /// when it does not exist.
    /// An object over `max` bytes is [`RemoteError::TooLarge`], as with
    /// [`Remote::get_bytes_within`].
    async fn get_bytes_tagged(
        &self,
        key: &str,
        max: u64,
    ) -> Result<Option<(Bytes, String)>, RemoteError>;

    /// Size and time of an object; `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, RemoteError>;

    /// One page of the objects whose keys start with `prefix`, in key order.
    async fn list(&self, prefix: &str, token: Option<String>) -> Result<ListPage, RemoteError>;

    /// Deletes these objects; missing ones are not an error.
    async fn delete_many(&self, keys: &[String]) -> Result<(), RemoteError>;
}

/// Every object under `prefix`, following pagination.
pub async fn list_all(remote: &dyn Remote, prefix: &str) -> Result<Vec<ObjectInfo>, RemoteError> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let page = remote.list(prefix, token).await?;
        out.extend(page.objects);
        match page.next {
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

/// Builds the configured backend.
pub async fn from_config(config: &Config) -> anyhow::Result<Arc<dyn Remote>> {
    Ok(match config.remote.kind {
        RemoteKind::Dir => {
            let path = &config.remote.path;
            let dir = dir::DirRemote::new(path).map_err(|e| {
                anyhow::anyhow!(
                    "remote.path {}: cannot create it as a directory: {e}",
                    path.display()
                )
            })?;
            Arc::new(dir)
        }
        RemoteKind::S3 => Arc::new(
            s3::S3Remote::new(&config.remote, config.sync.multipart_threshold_bytes).await?,
        ),
    })
}

/// The largest JSON document this daemon writes and reads whole (the workspace
/// manifest, a repository's git metadata): far above any real one, so that an object
/// under such a key that is not one of ours (or is damaged) is refused before it is
/// read instead of filling memory.
pub const DOCUMENT_MAX: u64 = 1 << 30;

/// Where an object that cannot be read (a KV export sealed with another key, a
/// damaged manifest) is kept before anything replaces it: beside it, under a name no
/// restore reads and that its content decides (`kv/<namespace>.kv.unreadable-<md5>`),
/// so keeping the same object again writes the same copy.
pub fn unreadable_key(key: &str, data: &[u8]) -> String {
    use md5::Digest;
    unreadable_key_of(key, &md5::Md5::digest(data).into())
}

/// [`unreadable_key`] of an object whose content has the MD5 `md5`.
pub fn unreadable_key_of(key: &str, md5: &[u8; 16]) -> String {
    format!("{key}.unreadable-{}", hex::encode(md5))
}

/// Exponential backoff with jitter: 200 ms doubling to 30 s, each delay drawn between
/// half and the full value.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(200);
    pub const MAX: Duration = Duration::from_secs(30);
    /// The longest delay while someone waits for the retried work (a sync call, the
    /// final sync): it is answered soon after the remote is back, while the backoff
    /// goes on growing to [`Backoff::MAX`] for work nobody waits for.
    pub const WAITED_MAX: Duration = Duration::from_secs(2);

    /// [`Backoff::next_delay`], at most [`Backoff::WAITED_MAX`] when `waited`.
    pub fn next_delay_for(&mut self, waited: bool) -> Duration {
        let delay = self.next_delay();
        if waited {
            delay.min(Self::WAITED_MAX)
        } else {
            delay
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        use rand::Rng;
        let full = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let half = full / 2;
        half + Duration::from_millis(rand::thread_rng().gen_range(0..=half.as_millis() as u64))
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Runs `op` again, after a backoff and a log line `<what>; retrying`, for as long as
/// it fails with an error `transient` accepts. The restores at start wait for remote
/// storage this way: starting without them would let the first writes overwrite what
/// the remote holds.
pub async fn retrying<T, E, Fut>(
    what: &str,
    mut op: impl FnMut() -> Fut,
    transient: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::default();
    loop {
        match op().await {
            Err(e) if transient(&e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "{what}; retrying");
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

/// Whether `key` fits S3's limits: at most 1024 bytes, segments at most 255, and no
/// control character (S3 carries keys in XML, where most of them cannot be written).
pub fn key_fits(key: &str) -> bool {
    key.len() <= MAX_KEY_BYTES
        && key.split('/').all(|s| s.len() <= MAX_SEGMENT_BYTES)
        && !key.chars().any(char::is_control)
}

/// The ETag S3 gives an object uploaded in one piece (and the `dir` backend gives every
/// object): the hex MD5 of its content.
pub fn md5_etag(data: &[u8]) -> String {
    use md5::Digest;
    hex::encode(md5::Md5::digest(data))
}

/// The MD5 of everything `reader` yields, read in pieces (never held whole).
pub fn md5_of(reader: &mut impl std::io::Read) -> std::io::Result<[u8; 16]> {
    use md5::Digest;
    let mut md5 = md5::Md5::new();
    std::io::copy(reader, &mut md5)?;
    Ok(md5.finalize().into())
}

/// MD5 in the base64 form of the `Content-MD5` header.
pub fn content_md5(md5: &[u8; 16]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(md5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::default();
        let d = b.next_delay();
        assert!(
            d >= Duration::from_millis(100) && d <= Duration::from_millis(200),
            "{d:?}"
        );
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Backoff::MAX);
        }
        let d = b.next_delay();
        assert!(d >= Backoff::MAX / 2, "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(200));
    }

    #[test]
    fn key_limits() {
        assert!(key_fits("a/b/c"));
        assert!(!key_fits(&"a".repeat(1025)));
        assert!(!key_fits(&format!("x/{}/y", "s".repeat(256))));
        assert!(key_fits(&format!("x/{}/y", "s".repeat(255))));
        assert!(!key_fits("x/a\u{1}b") && !key_fits("x/a\nb"));
    }
}
