//! The write fence: a [`Fence`] says whether this daemon may write to the
//! conversation's prefix now, and [`FencedRemote`] refuses every write the fence does
//! not allow with [`RemoteError::Fenced`], before anything is sent. Reads always pass.
//!
//! [`crate::owner::Owner`] is the only one that moves the fence: it opens it up to a
//! deadline after each successful claim or lease renewal and closes it for good when
//! another daemon took over or at release. The owner object itself is written through
//! the inner remote, never through the fence.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use std::time::Duration;

use super::{ListPage, ObjectInfo, Precondition, Remote, RemoteError};

/// A reading of the machine's `CLOCK_BOOTTIME`. Unlike `Instant` (`CLOCK_MONOTONIC`),
/// it goes on while the machine is suspended, so a write window counted with it ends
/// on time when the machine wakes up: a host that slept through a lease writes
/// nothing before it renewed (another daemon may own the conversation by then).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BootInstant(Duration);

impl BootInstant {
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write to. CLOCK_BOOTTIME exists since
        // Linux 2.6.39; where a sandbox's system-call filter refuses it, the monotonic
        // clock (which stops while the machine sleeps) is the next best: a clock stuck
        // at zero would keep every write window open for ever.
        if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
            // SAFETY: as above.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        }
        Self(Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        ))
    }

    /// How long after `earlier` this is (zero if it is not after).
    pub fn since(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::ops::Add<Duration> for BootInstant {
    type Output = BootInstant;

    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_add(d))
    }
}

#[derive(Clone, Debug)]
enum State {
    /// Ownership not (yet) established: writes wait for the first claim.
    Unclaimed,
    /// Owned: writes allowed until `until` (the lease renewal moves it forward).
    Owned { until: BootInstant },
    /// Never again: another daemon took over, or this one released the conversation.
    Revoked { reason: String },
}

/// Whether writes are allowed now. Shared between the [`crate::owner::Owner`] that
/// moves it and the [`FencedRemote`]s that obey it.
#[derive(Debug)]
pub struct Fence {
    state: Mutex<State>,
    /// Why the last claim or renewal failed, if it did: a refused write says it, so
    /// that whoever sees the refusal (a sync's error) sees the cause too.
    why: Mutex<Option<String>>,
    /// Writes the fence let start that have not ended yet.
    in_flight: std::sync::atomic::AtomicUsize,
    ended: tokio::sync::Notify,
}

impl Default for Fence {
    fn default() -> Self {
        Self {
            state: Mutex::new(State::Unclaimed),
            why: Mutex::new(None),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            ended: tokio::sync::Notify::new(),
        }
    }
}

/// A write the fence let start; counted until dropped.
pub struct Writing<'a>(&'a Fence);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.ended.notify_waiters();
    }
}

impl Fence {
    /// A closed fence: nothing may be written until [`Fence::allow_until`].
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allows writes until `until` (a later renewal moves it again). No effect once
    /// the fence was revoked.
    pub fn allow_until(&self, until: BootInstant) {
        let mut s = self.state();
        match &*s {
            State::Revoked { .. } => {}
            State::Owned { until: old } if *old >= until => {}
            _ => *s = State::Owned { until },
        }
    }

    /// Records why the last claim or renewal failed (`None`: it succeeded).
    pub fn note_failure(&self, why: Option<String>) {
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Refuses every write from now on, for good.
    pub fn revoke(&self, reason: impl Into<String>) {
        *self.state() = State::Revoked {
            reason: reason.into(),
        };
    }

    /// Whether a write may start now.
    pub fn allows_writes(&self) -> bool {
        self.check("").is_ok()
    }

    /// Whether the fence was revoked.
    pub fn is_revoked(&self) -> bool {
        matches!(*self.state(), State::Revoked { .. })
    }

    /// `Ok` when a write of `key` may start now, else [`RemoteError::Fenced`] saying why.
    /// [`check`](Self::check), and counts the write as in flight until the result is
    /// dropped (a release waits for it: see [`wait_idle`](Self::wait_idle)).
    pub fn begin(&self, key: &str) -> Result<Writing<'_>, RemoteError> {
        // Counted first, so that a release that revokes meanwhile sees it.
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let writing = Writing(self);
        self.check(key)?;
        Ok(writing)
    }

    /// Waits until no write is in flight, at most `limit`; whether none is.
    pub async fn wait_idle(&self, limit: std::time::Duration) -> bool {
        let idle = async {
            loop {
                let ended = self.ended.notified();
                if self.in_flight.load(std::sync::atomic::Ordering::Acquire) == 0 {
                    return;
                }
                ended.await;
            }
        };
        tokio::time::timeout(limit, idle).await.is_ok()
    }

    pub fn check(&self, key: &str) -> Result<(), RemoteError> {
        let mut message = match &*self.state() {
            State::Owned { until } => {
                let now = BootInstant::now();
                if now < *until {
                    return Ok(());
                }
                format!(
                    "ownership of the conversation has not been confirmed for {} ms past its \
                     lease (renewal failing); writes resume once the lease is renewed",
                    now.since(*until).as_millis()
                )
            }
            State::Unclaimed => {
                "this daemon does not own the conversation yet (claim pending)".to_string()
            }
            State::Revoked { reason } => reason.clone(),
        };
        if let Some(why) = &*self.why.lock().unwrap_or_else(|e| e.into_inner()) {
            message = format!("{message} (last failure: {why})");
        }
        Err(RemoteError::Fenced {
            key: key.to_string(),
            message,
        })
    }
}

/// Forwards to `inner`; every write first asks the [`Fence`].
pub struct FencedRemote {
    inner: Arc<dyn Remote>,
    fence: Arc<Fence>,
}

impl FencedRemote {
    pub fn new(inner: Arc<dyn Remote>, fence: Arc<Fence>) -> Self {
        Self { inner, fence }
    }
}

#[async_trait]
impl Remote for FencedRemote {
    async fn put_file(&self, key: &str, path: &Path, md5: [u8; 16]) -> Result<u64, RemoteError> {
        let _writing = self.fence.begin(key)?;
        self.inner.put_file(key, path, md5).await
    }
    async fn put_stream(
        &self,
        key: &str,
        reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<u64, RemoteError> {
        let _writing = self.fence.begin(key)?;
        self.inner.put_stream(key, reader).await
    }
    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), RemoteError> {
        let _writing = self.fence.begin(key)?;
        self.inner.put_bytes(key, data).await
    }
    async fn put_bytes_if(
        &self,
        key: &str,
        data: Bytes,
        cond: Precondition,
    ) -> Result<String, RemoteError> {
        let _writing = self.fence.begin(key)?;
        self.inner.put_bytes_if(key, data, cond).await
    }
    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<u64, RemoteError> {
        self.inner.get_to_file(key, dest).await
    }
    async fn get_bytes_within(&self, key: &str, max: u64) -> Result<Option<Bytes>, RemoteError> {
        self.inner.get_bytes_within(key, max).await
    }
    async fn get_bytes_tagged(
        &self,
        key: &str,
        max: u64,
    ) -> Result<Option<(Bytes, String)>, RemoteError> {
        self.inner.get_bytes_tagged(key, max).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, RemoteError> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str, token: Option<String>) -> Result<ListPage, RemoteError> {
        self.inner.list(prefix, token).await
    }
    async fn delete_many(&self, keys: &[String]) -> Result<(), RemoteError> {
        let Some(first) = keys.first() else {
            return Ok(());
        };
        let _writing = self.fence.begin(first)?;
        self.inner.delete_many(keys).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::remote::dir::DirRemote;

    #[test]
    fn the_boot_clock_goes_forward_with_time() {
        let a = BootInstant::now();
        std::thread::sleep(Duration::from_millis(50));
        let b = BootInstant::now();
        assert!(b > a && a + Duration::from_millis(50) <= b, "{a:?} {b:?}");
        assert!(b.since(a) < Duration::from_secs(5), "{a:?} {b:?}");
        assert_eq!(a.since(b), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_release_can_wait_for_the_writes_under_way() {
        let fence = Arc::new(Fence::new());
        fence.allow_until(BootInstant::now() + Duration::from_secs(60));
        assert!(fence.wait_idle(Duration::from_millis(10)).await);
        let writing = fence.begin("k").unwrap();
        // A refused write is not counted.
        fence.revoke("released");
        assert!(fence.begin("k").is_err());
        assert!(!fence.wait_idle(Duration::from_millis(50)).await);
        let f = fence.clone();
        let waiter = tokio::spawn(async move { f.wait_idle(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(writing);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn writes_need_an_open_fence_and_reads_always_pass() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Remote> = Arc::new(DirRemote::new(dir.path()).unwrap());
        inner
            .put_bytes("k/there", Bytes::from_static(b"1"))
            .await
            .unwrap();
        let fence = Arc::new(Fence::new());
        let remote = FencedRemote::new(inner.clone(), fence.clone());
        let fenced = |r: Result<(), RemoteError>| match r {
            Err(RemoteError::Fenced { message, .. }) => message,
            other => panic!("expected Fenced, got {other:?}"),
        };

        // Unclaimed: every kind of write is refused, nothing reaches the inner remote.
        let m = fenced(remote.put_bytes("k/a", Bytes::from_static(b"x")).await);
        assert!(m.contains("claim pending"), "{m}");
        let f = dir.path().join("src");
        std::fs::write(&f, b"x").unwrap();
        let md5: [u8; 16] = <md5::Md5 as md5::Digest>::digest(b"x").into();
        fenced(remote.put_file("k/b", &f, md5).await.map(drop));
        fenced(
            remote
                .put_stream("k/c", Box::new(&b"x"[..]))
                .await
                .map(drop),
        );
        fenced(
            remote
                .put_bytes_if("k/d", Bytes::from_static(b"x"), Precondition::Absent)
                .await
                .map(drop),
        );
        fenced(remote.delete_many(&["k/there".into()]).await);
        assert!(remote.delete_many(&[]).await.is_ok());
        assert_eq!(inner.list("k/", None).await.unwrap().objects.len(), 1);
        assert!(remote.get_bytes("k/there").await.unwrap().is_some());
        assert!(
            remote
                .get_bytes_tagged("k/there", 1)
                .await
                .unwrap()
                .is_some()
        );

        // Owned until a deadline: writes pass, then stop at the deadline.
        fence.allow_until(BootInstant::now() + Duration::from_millis(300));
        remote
            .put_bytes("k/a", Bytes::from_static(b"x"))
            .await
            .unwrap();
        // An earlier deadline never shortens the window.
        fence.allow_until(BootInstant::now());
        assert!(fence.allows_writes());
        tokio::time::sleep(Duration::from_millis(350)).await;
        let m = fenced(remote.put_bytes("k/a", Bytes::from_static(b"y")).await);
        assert!(m.contains("renewal failing"), "{m}");
        fence.allow_until(BootInstant::now() + Duration::from_secs(10));
        remote
            .put_bytes("k/a", Bytes::from_static(b"y"))
            .await
            .unwrap();

        // Revoked: for good, whatever comes later.
        fence.revoke("another daemon took over");
        fence.allow_until(BootInstant::now() + Duration::from_secs(10));
        assert!(fence.is_revoked() && !fence.allows_writes());
        let m = fenced(remote.put_bytes("k/a", Bytes::from_static(b"z")).await);
        assert!(m.contains("took over"), "{m}");
        assert_eq!(inner.get_bytes("k/a").await.unwrap().unwrap(), "y");
    }
}
