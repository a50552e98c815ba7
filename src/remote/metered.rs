//! Counts the failures of remote storage (`sandkeep_remote_errors_total{op}`) for every
//! caller at once: the mirror, the exports, snapshots, bundles, restores and the owner's
//! claims and renewals all go through it. Only failures of the service count (it
//! refused, or did not answer): a missing object, a failed precondition or a local
//! error is an answer, not a failure.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListPage, ObjectInfo, Precondition, Remote, RemoteError};
use crate::metrics::Metrics;

/// Forwards to `inner`, counting its failures by operation.
pub struct MeteredRemote {
    inner: Arc<dyn Remote>,
    metrics: Arc<Metrics>,
}

impl MeteredRemote {
    pub fn new(inner: Arc<dyn Remote>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn count<T>(&self, op: &'static str, r: Result<T, RemoteError>) -> Result<T, RemoteError> {
        if let Err(RemoteError::Service { .. } | RemoteError::Transport { .. }) = &r {
            self.metrics.remote_error(op);
        }
        r
    }
}

#[async_trait]
impl Remote for MeteredRemote {
    async fn put_file(&self, key: &str, path: &Path, md5: [u8; 16]) -> Result<u64, RemoteError> {
        self.count("put", self.inner.put_file(key, path, md5).await)
    }
    async fn put_stream(
        &self,
        key: &str,
        reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<u64, RemoteError> {
        self.count("put", self.inner.put_stream(key, reader).await)
    }
    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), RemoteError> {
        self.count("put", self.inner.put_bytes(key, data).await)
    }
    async fn put_bytes_if(
        &self,
        key: &str,
        data: Bytes,
        cond: Precondition,
    ) -> Result<String, RemoteError> {
        self.count("put", self.inner.put_bytes_if(key, data, cond).await)
    }
    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<u64, RemoteError> {
        self.count("get", self.inner.get_to_file(key, dest).await)
    }
    async fn get_bytes_within(&self, key: &str, max: u64) -> Result<Option<Bytes>, RemoteError> {
        self.count("get", self.inner.get_bytes_within(key, max).await)
    }
    async fn get_bytes_tagged(
        &self,
        key: &str,
        max: u64,
    ) -> Result<Option<(Bytes, String)>, RemoteError> {
        self.count("get", self.inner.get_bytes_tagged(key, max).await)
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, RemoteError> {
        self.count("head", self.inner.head(key).await)
    }
    async fn list(&self, prefix: &str, token: Option<String>) -> Result<ListPage, RemoteError> {
        self.count("list", self.inner.list(prefix, token).await)
    }
    async fn delete_many(&self, keys: &[String]) -> Result<(), RemoteError> {
        self.count("delete", self.inner.delete_many(keys).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::dir::DirRemote;
    use crate::remote::flaky::FlakyRemote;

    #[tokio::test]
    async fn failures_of_the_service_count_answers_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Remote> = Arc::new(DirRemote::new(dir.path()).unwrap());
        let flaky = Arc::new(FlakyRemote::new(inner));
        let metrics = Arc::new(Metrics::new());
        let remote = MeteredRemote::new(flaky.clone(), metrics.clone());
        let errors = |op: &str| {
            let text = metrics.encode();
            let line = format!("sandkeep_remote_errors_total{{op=\"{op}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .map(|v| v.parse::<u64>().unwrap())
        };
        assert_eq!(errors("get"), Some(0), "present from the start");
        assert_eq!(remote.get_bytes("missing").await.unwrap(), None);
        remote.put_bytes("k", Bytes::from("v")).await.unwrap();
        let absent = remote.put_bytes_if("k", Bytes::from("w"), Precondition::Absent);
        assert!(matches!(
            absent.await,
            Err(RemoteError::PreconditionFailed { .. })
        ));
        flaky.set_down(true);
        assert!(remote.get_bytes("k").await.is_err());
        assert!(remote.list("", None).await.is_err());
        flaky.set_down(false);
        flaky.refuse_next_of("put", 1);
        assert!(remote.put_bytes("k", Bytes::from("x")).await.is_err());
        assert_eq!(errors("get"), Some(1));
        assert_eq!(errors("list"), Some(1));
        assert_eq!(errors("put"), Some(1));
        assert_eq!(errors("head"), Some(0));
    }
}
