//! A failure-injecting wrapper around any backend, for retry and outage tests.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListPage, ObjectInfo, Precondition, Remote, RemoteError};

/// Forwards to `inner` unless it is "down" or has failures queued.
pub struct FlakyRemote {
    inner: Arc<dyn Remote>,
    down: AtomicBool,
    fail_next: AtomicU64,
    /// The operation (`get`, `put`, `list`, ...) the queued failures are for; any when
    /// `None`.
    fail_op: Mutex<Option<&'static str>>,
    /// Calls refused so far.
    pub refused: AtomicU64,
}

impl FlakyRemote {
    pub fn new(inner: Arc<dyn Remote>) -> Self {
        Self {
            inner,
            down: AtomicBool::new(false),
            fail_next: AtomicU64::new(0),
            fail_op: Mutex::new(None),
            refused: AtomicU64::new(0),
        }
    }

    /// While down, every call fails with a transport error.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The next `n` calls fail.
    pub fn fail_next(&self, n: u64) {
        self.queue(None, n);
    }

    /// The next `n` calls of `op` (`get`, `put`, `list`, `head`, `delete`) fail; other
    /// calls go through.
    pub fn fail_next_of(&self, op: &'static str, n: u64) {
        self.queue(Some(op), n);
    }

    fn queue(&self, op: Option<&'static str>, n: u64) {
        *self.fail_op.lock().unwrap_or_else(|e| e.into_inner()) = op;
        self.fail_next.store(n, Ordering::SeqCst);
    }

    fn check(&self, op: &'static str, key: &str) -> Result<(), RemoteError> {
        let applies = self
            .fail_op
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|o| o == op);
        let queued = applies
            && self
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if queued || self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(RemoteError::Transport {
                op,
                key: key.to_string(),
                message: "injected failure".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Remote for FlakyRemote {
    async fn put_file(&self, key: &str, path: &Path, md5: [u8; 16]) -> Result<u64, RemoteError> {
        self.check("put", key)?;
        self.inner.put_file(key, path, md5).await
    }
    async fn put_stream(
        &self,
        key: &str,
        reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<u64, RemoteError> {
        self.check("put", key)?;
        self.inner.put_stream(key, reader).await
    }
    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), RemoteError> {
        self.check("put", key)?;
        self.inner.put_bytes(key, data).await
    }
    async fn put_bytes_if(
        &self,
        key: &str,
        data: Bytes,
        cond: Precondition,
    ) -> Result<String, RemoteError> {
        self.check("put", key)?;
        self.inner.put_bytes_if(key, data, cond).await
    }
    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<u64, RemoteError> {
        self.check("get", key)?;
        self.inner.get_to_file(key, dest).await
    }
    async fn get_bytes(&self, key: &str) -> Result<Option<Bytes>, RemoteError> {
        self.check("get", key)?;
        self.inner.get_bytes(key).await
    }
    async fn get_bytes_tagged(&self, key: &str) -> Result<Option<(Bytes, String)>, RemoteError> {
        self.check("get", key)?;
        self.inner.get_bytes_tagged(key).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, RemoteError> {
        self.check("head", key)?;
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str, token: Option<String>) -> Result<ListPage, RemoteError> {
        self.check("list", prefix)?;
        self.inner.list(prefix, token).await
    }
    async fn delete_many(&self, keys: &[String]) -> Result<(), RemoteError> {
        self.check("delete", keys.first().map_or("", String::as_str))?;
        self.inner.delete_many(keys).await
    }
}
