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
    /// Keys under this prefix fail as if the remote were down.
    down_under: Mutex<Option<String>>,
    /// Calls on keys under this prefix are refused by the "service".
    refused_under: Mutex<Option<String>>,
    /// File uploads wait (a request that gets no answer) while set.
    hang: AtomicBool,
    hang_reads: AtomicBool,
    queue: Mutex<Queue>,
    /// Calls refused so far.
    pub refused: AtomicU64,
    /// Object reads (`get_*`) passed on so far.
    pub reads: AtomicU64,
    /// Listings give each object's ETag (the MD5 of its content), as S3 does.
    etags_in_listings: AtomicBool,
    /// Reads into memory take at most this many bytes, whatever their caller's cap.
    read_cap: AtomicU64,
    /// Conditional writes still to lose the answer of (see [`Self::lose_next_answers`]).
    lose_answers: AtomicU64,
}

/// Failures queued for the next calls.
#[derive(Default)]
struct Queue {
    n: u64,
    /// Only calls of this operation fail; any when `None`.
    op: Option<&'static str>,
    /// A refusal by the service ([`RemoteError::Service`]) instead of no answer
    /// ([`RemoteError::Transport`]).
    refuse: bool,
}

impl FlakyRemote {
    pub fn new(inner: Arc<dyn Remote>) -> Self {
        Self {
            inner,
            down: AtomicBool::new(false),
            down_under: Mutex::new(None),
            refused_under: Mutex::new(None),
            hang: AtomicBool::new(false),
            hang_reads: AtomicBool::new(false),
            queue: Mutex::new(Queue::default()),
            refused: AtomicU64::new(0),
            read_cap: AtomicU64::new(u64::MAX),
            reads: AtomicU64::new(0),
            etags_in_listings: AtomicBool::new(false),
            lose_answers: AtomicU64::new(0),
        }
    }

    /// While set, listings give each object's ETag (the MD5 of its content), as S3's
    /// do and the `dir` backend's do not.
    pub fn set_etags_in_listings(&self, on: bool) {
        self.etags_in_listings.store(on, Ordering::SeqCst);
    }

    /// Reads into memory (`get_bytes_within`, `get_bytes_tagged`) take at most `max`
    /// bytes, as if their callers' caps were that small: a larger object is
    /// [`RemoteError::TooLarge`].
    pub fn set_read_cap(&self, max: u64) {
        self.read_cap.store(max, Ordering::SeqCst);
    }

    /// While set, every call on a key under `prefix` is refused by the "service" (not
    /// transient).
    pub fn set_refused_under(&self, prefix: Option<&str>) {
        *self.refused_under.lock().unwrap_or_else(|e| e.into_inner()) = prefix.map(str::to_string);
    }

    /// While down, every call fails with a transport error.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// While set, every call on a key under `prefix` fails with a transport error.
    pub fn set_down_under(&self, prefix: Option<&str>) {
        *self.down_under.lock().unwrap_or_else(|e| e.into_inner()) = prefix.map(str::to_string);
    }

    /// While set, file uploads hang (they go on once it is cleared).
    pub fn set_hang(&self, hang: bool) {
        self.hang.store(hang, Ordering::SeqCst);
    }

    /// While set, reads of single objects (`get_bytes_tagged`) never answer.
    pub fn set_hang_reads(&self, hang: bool) {
        self.hang_reads.store(hang, Ordering::SeqCst);
    }

    /// The next `n` conditional writes (`put_bytes_if`) are made, then fail with a
    /// transport error: the answer was lost on its way back.
    pub fn lose_next_answers(&self, n: u64) {
        self.lose_answers.store(n, Ordering::SeqCst);
    }

    /// The next `n` calls fail with a transport error.
    pub fn fail_next(&self, n: u64) {
        self.set_queue(Queue {
            n,
            op: None,
            refuse: false,
        });
    }

    /// The next `n` calls of `op` (`get`, `put`, `list`, `head`, `delete`) fail with a
    /// transport error; other calls go through.
    pub fn fail_next_of(&self, op: &'static str, n: u64) {
        self.set_queue(Queue {
            n,
            op: Some(op),
            refuse: false,
        });
    }

    /// The next `n` calls of `op` are refused by the "service" (not transient).
    pub fn refuse_next_of(&self, op: &'static str, n: u64) {
        self.set_queue(Queue {
            n,
            op: Some(op),
            refuse: true,
        });
    }

    fn set_queue(&self, q: Queue) {
        *self.queue.lock().unwrap_or_else(|e| e.into_inner()) = q;
    }

    fn check(&self, op: &'static str, key: &str) -> Result<(), RemoteError> {
        /// Whether `key` is under the prefix `set` holds.
        fn under(set: &Mutex<Option<String>>, key: &str) -> bool {
            set.lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_deref()
                .is_some_and(|p| key.starts_with(p))
        }
        let refuse = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.n > 0 && q.op.is_none_or(|o| o == op) {
                q.n -= 1;
                Some(q.refuse)
            } else if under(&self.refused_under, key) {
                Some(true)
            } else if self.down.load(Ordering::SeqCst) || under(&self.down_under, key) {
                Some(false)
            } else {
                None
            }
        };
        let Some(refuse) = refuse else {
            return Ok(());
        };
        self.refused.fetch_add(1, Ordering::SeqCst);
        let (key, message) = (key.to_string(), "injected failure".to_string());
        Err(if refuse {
            RemoteError::Service { op, key, message }
        } else {
            RemoteError::Transport { op, key, message }
        })
    }
}

#[async_trait]
impl Remote for FlakyRemote {
    async fn put_file(&self, key: &str, path: &Path, md5: [u8; 16]) -> Result<u64, RemoteError> {
        self.check("put", key)?;
        while self.hang.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
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
        let etag = self.inner.put_bytes_if(key, data, cond).await?;
        let lost = self
            .lose_answers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if lost.is_ok() {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(RemoteError::Transport {
                op: "put",
                key: key.to_string(),
                message: "injected failure after the write".into(),
            });
        }
        Ok(etag)
    }
    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<u64, RemoteError> {
        self.check("get", key)?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.get_to_file(key, dest).await
    }
    async fn get_bytes_within(&self, key: &str, max: u64) -> Result<Option<Bytes>, RemoteError> {
        self.check("get", key)?;
        self.reads.fetch_add(1, Ordering::SeqCst);
        let max = max.min(self.read_cap.load(Ordering::SeqCst));
        self.inner.get_bytes_within(key, max).await
    }
    async fn get_bytes_tagged(
        &self,
        key: &str,
        max: u64,
    ) -> Result<Option<(Bytes, String)>, RemoteError> {
        self.check("get", key)?;
        while self.hang_reads.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.reads.fetch_add(1, Ordering::SeqCst);
        let max = max.min(self.read_cap.load(Ordering::SeqCst));
        self.inner.get_bytes_tagged(key, max).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, RemoteError> {
        self.check("head", key)?;
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str, token: Option<String>) -> Result<ListPage, RemoteError> {
        self.check("list", prefix)?;
        let mut page = self.inner.list(prefix, token).await?;
        if self.etags_in_listings.load(Ordering::SeqCst) {
            for o in &mut page.objects {
                o.etag = self
                    .inner
                    .get_bytes(&o.key)
                    .await?
                    .map(|b| super::md5_etag(&b));
            }
        }
        Ok(page)
    }
    async fn delete_many(&self, keys: &[String]) -> Result<(), RemoteError> {
        self.check("delete", keys.first().map_or("", String::as_str))?;
        self.inner.delete_many(keys).await
    }
}
