//! Single writer: which daemon instance may write a conversation's prefix.
//!
//! `<conversation prefix>.sandkeep/owner.json` names the owner:
//! `{"instance", "epoch", "lease_ms", "renewed_at", "host"}`. The owner rewrites it every
//! `lease / 3` with a conditional write (`If-Match` the ETag it just read), and may write
//! everything else only up to `0.9 × lease` after the last renewal it sent that
//! succeeded; [`Owner::fence`] is the [`Fence`] that [`FencedRemote`](crate::remote::fenced::FencedRemote)
//! obeys.
//!
//! Another daemon takes over when
//! - there is no owner (created with `If-None-Match: *`, epoch 1);
//! - the owner is itself: the same instance id (kept in `<state_dir>/owner-id`), i.e. a
//!   restart on the same state directory, which the state-dir lock makes the only
//!   daemon with that id;
//! - the owner released it (`lease_ms` 0, written at a clean shutdown);
//! - or its lease expired: the same ETag stayed in place for `lease_ms` as measured
//!   on this machine's monotonic clock from when this daemon first saw it. Remote
//!   clocks (`renewed_at`) are only for people.
//!
//! A takeover writes epoch + 1 with `If-Match` the ETag it judged, so of two daemons
//! that judge at once, one wins. The old owner learns it lost at its next renewal (the
//! object names another instance or epoch) and revokes its fence for good. Because the
//! taker waits a whole lease from a renewal it saw, and the old owner stops writing
//! `0.1 × lease` before the lease ends from a renewal it sent earlier, their writes do
//! not interleave, except for a single write that had already started (a long
//! multipart upload) when the window closed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::remote::fenced::{BootInstant, Fence};
use crate::remote::{Precondition, Remote, RemoteError};

/// The owner object, under the conversation prefix.
pub const OWNER_KEY: &str = ".sandkeep/owner.json";
/// [`Unchanged`]'s ETag for an owner object that is not there.
const ABSENT: &str = "(absent)";
/// The owner object is read up to this size: ours are a few hundred bytes, and a
/// larger one is no record of a daemon (an error, retried, never a takeover).
const OWNER_MAX: u64 = 64 * 1024;
/// The file in the state directory that keeps this daemon's instance id.
pub const INSTANCE_FILE: &str = "owner-id";
/// In the state dir while a take-in is owed: written before a claim that takes the
/// conversation over from another instance is sent, removed once what that instance
/// wrote was taken in. A daemon killed in between (or whose claim was answered too
/// late, so that it read its own record back) still knows it owes one.
pub const TAKE_IN_FILE: &str = "take-in-owed";
/// At start, a remote that gave no answer for this long is not waited for any more: the
/// daemon starts with writes held, and keeps claiming in the background.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(10);
/// Longest a release at shutdown may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("cannot read or create the instance id {}: {source}", path.display())]
    InstanceId {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The content of `owner.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub instance: String,
    pub epoch: u64,
    /// 0: released, anyone may take over at once.
    pub lease_ms: u64,
    pub renewed_at: String,
    pub host: String,
}

impl OwnerRecord {
    /// The object's content: pretty JSON, for people who read it.
    fn to_bytes(&self) -> Bytes {
        let mut text = serde_json::to_vec_pretty(self).unwrap_or_default();
        text.push(b'\n');
        Bytes::from(text)
    }
}

/// How logs and errors name the daemon a record is of.
impl std::fmt::Display for OwnerRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "instance {} on {} (epoch {})",
            self.instance, self.host, self.epoch
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerState {
    /// Not the owner (yet): writes are held while the claim goes on.
    Waiting,
    /// The owner: writes allowed while the lease is renewed.
    Claimed,
    /// Another daemon took over: no remote write any more, for good.
    Lost,
    /// Released at shutdown.
    Released,
}

/// The `owner` object of `GET /v1/status`.
#[derive(Clone, Debug, Serialize)]
pub struct OwnerStatus {
    pub instance: String,
    /// This daemon's epoch while it owns (or owned) the conversation; 0 before.
    pub epoch: u64,
    pub state: OwnerState,
    /// Whether a remote write may start now (owned and the lease renewed in time).
    pub writes_allowed: bool,
    pub lease_ms: u64,
    /// The other daemon's record: the one waited for, or the one that took over.
    pub holder: Option<OwnerRecord>,
    pub last_error: Option<String>,
}

/// The claim/renewal protocol's state.
struct Held {
    state: OwnerState,
    epoch: u64,
    /// While waiting: how long the owner object has stayed as it is.
    seen: Unchanged,
    /// The holder last logged, so the log names each new holder once.
    logged: Option<(String, u64)>,
    /// Claims or renewals failed since the last success (for the log).
    failures: u32,
    /// Whether the log already said that writes are held (renewals failing).
    said_held: bool,
}

/// The ETag of the owner object and when it was first seen so.
#[derive(Default)]
struct Unchanged(Option<(String, Instant)>);

impl Unchanged {
    /// How long the owner object has stayed `tag` (its ETag, or [`ABSENT`]) since it
    /// was first seen so: zero when it just changed.
    fn for_(&mut self, tag: &str) -> Duration {
        let now = Instant::now();
        match &self.0 {
            Some((seen, since)) if seen == tag => now - *since,
            _ => {
                self.0 = Some((tag.to_string(), now));
                Duration::ZERO
            }
        }
    }
}

/// This daemon's claim on its conversation. Shared as `Arc<Owner>`: the lifecycle
/// claims, spawns [`Owner::run`] and calls [`Owner::release`]; the API reads
/// [`Owner::status`].
pub struct Owner {
    /// The remote without the fence: the owner object itself is always written.
    remote: Arc<dyn Remote>,
    key: String,
    instance: String,
    host: String,
    lease: Duration,
    unreachable_after: Duration,
    fence: Arc<Fence>,
    /// Held across one protocol step (a read and maybe a write), so renewals and the
    /// release never interleave.
    held: tokio::sync::Mutex<Held>,
    /// What `/v1/status` shows; never held across I/O.
    status: std::sync::Mutex<OwnerStatus>,
    /// Cancelled when the claim ends for good (lost or released): [`Owner::run`] ends.
    ended: CancellationToken,
    /// Cancelled at the first successful claim.
    claimed: CancellationToken,
    /// [`TAKE_IN_FILE`] in the state dir: there while a take-in is owed (see
    /// [`Owner::took_over_from_another`]).
    take_in_owed: PathBuf,
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
}

impl Owner {
    /// The owner of `config`'s conversation, with the instance id of its state dir.
    /// `metrics` counts the claims and renewals that get no answer in time (the remote
    /// layer does not see those: they are given up, not answered).
    pub fn new(
        remote: Arc<dyn Remote>,
        config: &Config,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Self>, OwnerError> {
        let owner = Self::build(
            remote,
            &config.conversation_prefix(),
            &config.state_dir,
            config.remote.lease.0,
            UNREACHABLE_AFTER,
        )?;
        let _ = owner.metrics.set(metrics);
        Ok(owner)
    }

    fn build(
        remote: Arc<dyn Remote>,
        conversation_prefix: &str,
        state_dir: &Path,
        lease: Duration,
        unreachable_after: Duration,
    ) -> Result<Arc<Self>, OwnerError> {
        let instance = instance_id(state_dir)?;
        let lease_ms = lease.as_millis() as u64;
        Ok(Arc::new(Self {
            remote,
            key: format!("{conversation_prefix}{OWNER_KEY}"),
            host: hostname(),
            lease,
            unreachable_after,
            fence: Arc::new(Fence::new()),
            held: tokio::sync::Mutex::new(Held {
                state: OwnerState::Waiting,
                epoch: 0,
                seen: Unchanged::default(),
                logged: None,
                failures: 0,
                said_held: false,
            }),
            status: std::sync::Mutex::new(OwnerStatus {
                instance: instance.clone(),
                epoch: 0,
                state: OwnerState::Waiting,
                writes_allowed: false,
                lease_ms,
                holder: None,
                last_error: None,
            }),
            ended: CancellationToken::new(),
            claimed: CancellationToken::new(),
            take_in_owed: state_dir.join(TAKE_IN_FILE),
            metrics: std::sync::OnceLock::new(),
            instance,
        }))
    }

    /// The fence every other remote write goes through.
    pub fn fence(&self) -> Arc<Fence> {
        self.fence.clone()
    }

    /// Whether this daemon took the conversation over from another instance (one
    /// that released it or whose lease expired), rather than creating the claim or
    /// taking back its own: then remote storage may hold what that daemon wrote, newer
    /// than this state directory. Such a claim (or an earlier start's, cut short)
    /// leaves [`TAKE_IN_FILE`] behind until [`Owner::take_in_done`].
    pub fn took_over_from_another(&self) -> bool {
        self.take_in_owed.exists()
    }

    /// What the other instance wrote was taken in (or restored whole).
    pub fn take_in_done(&self) {
        match std::fs::remove_file(&self.take_in_owed) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %self.take_in_owed.display(), error = %e, "cannot remove the take-in marker; the next start takes in again")
            }
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Whether the conversation was claimed (it may have been lost or released since).
    pub fn was_claimed(&self) -> bool {
        self.claimed.is_cancelled()
    }

    /// Waits for the first successful claim.
    pub async fn wait_claimed(&self) {
        self.claimed.cancelled().await;
    }

    /// Cancelled once the claim ends for good: lost to another daemon, or released.
    pub fn ended(&self) -> CancellationToken {
        self.ended.clone()
    }

    pub fn status(&self) -> OwnerStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        s.writes_allowed = self.fence.allows_writes();
        s
    }

    fn update_status(&self, f: impl FnOnce(&mut OwnerStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Waits until this daemon owns the conversation, or until the remote has not
    /// answered for 10 s (then the daemon starts with writes held and [`Owner::run`]
    /// keeps claiming). Cancel it by dropping the future (a stop signal while waiting).
    pub async fn claim(&self) {
        let mut last_answer = Instant::now();
        loop {
            match self.claim_step().await {
                Ok(true) => return,
                Ok(false) => last_answer = Instant::now(),
                Err(_) => {
                    if last_answer.elapsed() >= self.unreachable_after {
                        tracing::warn!(
                            waited_ms = last_answer.elapsed().as_millis() as u64,
                            "remote storage does not answer (or refuses the claim): starting \
                             WITHOUT owning the conversation; nothing is written to remote \
                             storage until the claim succeeds (retried in the background)"
                        );
                        return;
                    }
                }
            }
            tokio::time::sleep(self.poll()).await;
        }
    }

    /// Keeps the claim: renews the lease every `lease / 3` (sooner after a failure),
    /// or goes on claiming when the daemon started unclaimed. Ends on `stop`, when
    /// another daemon took over, or after [`Owner::release`].
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut next = match self.held.lock().await.state {
            OwnerState::Claimed => self.lease / 3,
            _ => self.poll(),
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.ended.cancelled() => return,
                _ = tokio::time::sleep(next) => {}
            }
            let step = tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.ended.cancelled() => return,
                step = self.step() => step,
            };
            match step {
                Some(d) => next = d,
                None => return,
            }
        }
    }

    /// One claim or renewal; the delay before the next, or `None` when done.
    async fn step(&self) -> Option<Duration> {
        let state = self.held.lock().await.state;
        match state {
            OwnerState::Waiting => match self.claim_step().await {
                Ok(true) => Some(self.lease / 3),
                Ok(_) | Err(_) => Some(self.poll()),
            },
            OwnerState::Claimed => Some(self.renew_step().await),
            OwnerState::Lost | OwnerState::Released => None,
        }
    }

    /// Gives the conversation up at a clean shutdown, after the final sync: the fence
    /// closes for good and the owner object is rewritten with `lease_ms` 0, so the next
    /// daemon takes over at once. Bounded by `within` (at most 5 s); on failure the next
    /// daemon waits for the lease instead.
    pub async fn release(&self, within: Duration) {
        // Ends `run` first, so that a renewal in flight lets go of the state.
        self.ended.cancel();
        let work = async {
            let mut held = self.held.lock().await;
            let was = held.state;
            if matches!(was, OwnerState::Lost | OwnerState::Released) {
                return;
            }
            held.state = OwnerState::Released;
            self.fence
                .revoke("this daemon released the conversation at shutdown");
            self.update_status(|s| s.state = OwnerState::Released);
            // A write already under way (an upload a request started) must land before
            // the next daemon may write: else it could replace that daemon's object.
            if !self.fence.wait_idle(RELEASE_TIMEOUT.mul_f64(0.8)).await {
                tracing::warn!(
                    "remote writes are still under way: the conversation is not released; the next daemon waits for the lease to expire"
                );
                return;
            }
            if was != OwnerState::Claimed {
                return;
            }
            match self.release_once(held.epoch).await {
                Ok(true) => tracing::info!(
                    instance = %self.instance,
                    epoch = held.epoch,
                    "released the conversation: the next daemon may take over at once"
                ),
                Ok(false) => {
                    tracing::warn!("not releasing the conversation: another daemon already owns it")
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot release the conversation; the next daemon waits for the lease to expire"
                ),
            }
        };
        if tokio::time::timeout(within.min(RELEASE_TIMEOUT), work)
            .await
            .is_err()
        {
            self.fence
                .revoke("this daemon released the conversation at shutdown");
            self.update_status(|s| s.state = OwnerState::Released);
            tracing::warn!(
                "releasing the conversation timed out; the next daemon waits for the lease to expire"
            );
        }
    }

    async fn release_once(&self, epoch: u64) -> Result<bool, RemoteError> {
        let Some((bytes, etag)) = self.remote.get_bytes_tagged(&self.key, OWNER_MAX).await? else {
            return Ok(false);
        };
        if !self.is_ours(&bytes, epoch) {
            return Ok(false);
        }
        self.remote
            .put_bytes_if(
                &self.key,
                self.record(epoch, Duration::ZERO),
                Precondition::Matches(etag),
            )
            .await?;
        Ok(true)
    }

    /// How long a protocol step may take before it counts as failed.
    fn step_timeout(&self) -> Duration {
        (self.lease / 2).min(Duration::from_secs(5))
    }

    /// How often a waiting daemon looks at the owner object.
    fn poll(&self) -> Duration {
        (self.lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// How long writes stay allowed after a renewal was sent.
    fn window(&self) -> Duration {
        self.lease.mul_f64(0.9)
    }

    fn record(&self, epoch: u64, lease: Duration) -> Bytes {
        let record = OwnerRecord {
            instance: self.instance.clone(),
            epoch,
            lease_ms: lease.as_millis() as u64,
            renewed_at: crate::kv::rfc3339(crate::kv::now_ms()),
            host: self.host.clone(),
        };
        record.to_bytes()
    }

    fn is_ours(&self, bytes: &[u8], epoch: u64) -> bool {
        serde_json::from_slice::<OwnerRecord>(bytes)
            .is_ok_and(|r| r.instance == self.instance && r.epoch == epoch)
    }

    fn timed_out(&self) -> RemoteError {
        if let Some(m) = self.metrics.get() {
            m.remote_error("owner");
        }
        RemoteError::Transport {
            op: "owner",
            key: self.key.clone(),
            message: format!("no answer within {} ms", self.step_timeout().as_millis()),
        }
    }

    /// One claim attempt: `Ok(true)` once owned, `Ok(false)` while another daemon
    /// holds the conversation (or won a race just now).
    async fn claim_step(&self) -> Result<bool, RemoteError> {
        let mut held = self.held.lock().await;
        if held.state != OwnerState::Waiting {
            return Ok(held.state == OwnerState::Claimed);
        }
        let result = tokio::time::timeout(self.step_timeout(), self.claim_once(&mut held))
            .await
            .unwrap_or_else(|_| Err(self.timed_out()));
        if let Err(e) = &result {
            held.failures += 1;
            // Once, then about once a minute (a lookup every second or less).
            if held.failures % 60 == 1 {
                tracing::warn!(
                    error = %e,
                    failures = held.failures,
                    "cannot read or claim the conversation's owner object; retrying"
                );
            }
        } else {
            held.failures = 0;
        }
        let error = result.as_ref().err().map(ToString::to_string);
        self.fence.note_failure(error.clone());
        self.update_status(|s| s.last_error = error);
        result
    }

    /// Whether remote storage holds anything of the conversation (the first page of
    /// its listing is enough).
    async fn conversation_has_data(&self) -> Result<bool, RemoteError> {
        let prefix = self.key.strip_suffix(OWNER_KEY).unwrap_or(&self.key);
        Ok(!self.remote.list(prefix, None).await?.objects.is_empty())
    }

    async fn claim_once(&self, held: &mut Held) -> Result<bool, RemoteError> {
        let (cond, epoch, reason, from_another) =
            match self.remote.get_bytes_tagged(&self.key, OWNER_MAX).await? {
                // A conversation with data in remote storage has had an owner: its
                // object deleted by someone (an operator, a lifecycle rule) may still
                // have a live owner, which puts it back at its next renewal. Waited
                // for a lease, as an unreadable one is; a new conversation is claimed
                // at once.
                None if self.conversation_has_data().await? => {
                    if held.seen.for_(ABSENT) < self.lease {
                        return Ok(false);
                    }
                    (
                        Precondition::Absent,
                        1,
                        "its owner object was gone for a whole lease",
                        true,
                    )
                }
                None => (Precondition::Absent, 1, "no daemon owned it", false),
                Some((bytes, etag)) => {
                    let record = serde_json::from_slice::<OwnerRecord>(&bytes).ok();
                    let lease = record
                        .as_ref()
                        .map_or(self.lease, |r| Duration::from_millis(r.lease_ms));
                    // (Saturating: an epoch any bucket writer may have set to u64::MAX.)
                    let epoch = record.as_ref().map_or(0, |r| r.epoch).saturating_add(1);
                    let unchanged = held.seen.for_(&etag);
                    let reason = if record.as_ref().is_some_and(|r| r.instance == self.instance) {
                        "restarted on the same state directory"
                    } else if lease.is_zero() {
                        "the previous owner released it"
                    } else if unchanged >= lease {
                        "the previous owner's lease expired"
                    } else {
                        self.note_holder(held, record);
                        return Ok(false);
                    };
                    let from_another = record.as_ref().is_none_or(|r| r.instance != self.instance);
                    (Precondition::Matches(etag), epoch, reason, from_another)
                }
            };
        if from_another {
            crate::replace_file(&self.take_in_owed, b"")
                .map_err(|e| RemoteError::local("claim", &self.take_in_owed, e))?;
        }
        let sent = BootInstant::now();
        match self
            .remote
            .put_bytes_if(&self.key, self.record(epoch, self.lease), cond)
            .await
        {
            Ok(_) => {
                held.state = OwnerState::Claimed;
                held.epoch = epoch;
                held.seen = Unchanged::default();
                held.failures = 0;
                self.fence.allow_until(sent + self.window());
                self.update_status(|s| {
                    s.state = OwnerState::Claimed;
                    s.epoch = epoch;
                    s.holder = None;
                });
                self.claimed.cancel();
                tracing::info!(
                    instance = %self.instance,
                    epoch,
                    lease_ms = self.lease.as_millis() as u64,
                    reason,
                    "this daemon owns the conversation and writes its remote storage"
                );
                Ok(true)
            }
            // Another daemon wrote the object since it was read: look again.
            Err(RemoteError::PreconditionFailed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Logs (once per holder) and shows who holds the conversation while waiting.
    fn note_holder(&self, held: &mut Held, record: Option<OwnerRecord>) {
        let id = record
            .as_ref()
            .map_or((String::new(), 0), |r| (r.instance.clone(), r.epoch));
        if held.logged.as_ref() != Some(&id) {
            match &record {
                Some(r) => tracing::warn!(
                    holder_instance = %r.instance,
                    holder_host = %r.host,
                    holder_epoch = r.epoch,
                    holder_lease_ms = r.lease_ms,
                    holder_renewed_at = %r.renewed_at,
                    key = %self.key,
                    "another daemon owns this conversation: waiting until it stops or its lease \
                     expires; nothing is written meanwhile"
                ),
                None => tracing::warn!(
                    key = %self.key,
                    "the conversation's owner object is unreadable: waiting until it stays \
                     unchanged for a lease before taking over"
                ),
            }
            held.logged = Some(id);
        }
        self.update_status(|s| s.holder = record);
    }

    /// One renewal (retried once at once when the object changed under it); the delay
    /// before the next step.
    async fn renew_step(&self) -> Duration {
        let mut held = self.held.lock().await;
        if held.state != OwnerState::Claimed {
            return self.poll();
        }
        // A second try when the record changed between its read and its write.
        let mut tries = 0;
        let result = loop {
            tries += 1;
            let r = tokio::time::timeout(self.step_timeout(), self.renew_once(&mut held))
                .await
                .unwrap_or_else(|_| Err(self.timed_out()));
            if tries == 2 || !matches!(r, Err(RemoteError::PreconditionFailed { .. })) {
                break r;
            }
        };
        match result {
            Ok(()) => {
                if held.failures > 0 && held.state == OwnerState::Claimed {
                    tracing::info!(
                        failures = held.failures,
                        "owner lease renewed again; remote writes allowed"
                    );
                }
                held.failures = 0;
                held.said_held = false;
                self.fence.note_failure(None);
                self.update_status(|s| s.last_error = None);
                self.lease / 3
            }
            Err(e) => {
                held.failures += 1;
                let writes = self.fence.allows_writes();
                if !writes && !held.said_held && held.state == OwnerState::Claimed {
                    held.said_held = true;
                    tracing::error!(
                        error = %e,
                        failures = held.failures,
                        "the owner lease could not be renewed in time: remote writes are held \
                         until it is"
                    );
                } else if held.failures % 30 == 1 {
                    tracing::warn!(
                        error = %e,
                        failures = held.failures,
                        writes_allowed = writes,
                        "cannot renew the owner lease; retrying (remote writes are held once \
                         0.9 x the lease passed since the last renewal)"
                    );
                }
                let message = e.to_string();
                self.fence.note_failure(Some(message.clone()));
                self.update_status(|s| s.last_error = Some(message));
                (self.lease / 10).max(Duration::from_millis(100))
            }
        }
    }

    async fn renew_once(&self, held: &mut Held) -> Result<(), RemoteError> {
        let cond = match self.remote.get_bytes_tagged(&self.key, OWNER_MAX).await? {
            // Deleted by someone: put it back, unless another daemon is faster.
            None => Precondition::Absent,
            Some((bytes, etag)) => {
                if !self.is_ours(&bytes, held.epoch) {
                    let record = serde_json::from_slice::<OwnerRecord>(&bytes).ok();
                    self.lose(held, record);
                    return Ok(());
                }
                Precondition::Matches(etag)
            }
        };
        let sent = BootInstant::now();
        self.remote
            .put_bytes_if(&self.key, self.record(held.epoch, self.lease), cond)
            .await?;
        self.fence.allow_until(sent + self.window());
        Ok(())
    }

    /// Another daemon took over: no remote write from here on, for good.
    fn lose(&self, held: &mut Held, record: Option<OwnerRecord>) {
        held.state = OwnerState::Lost;
        let who = record.as_ref().map_or_else(
            || "an unreadable owner object".to_string(),
            OwnerRecord::to_string,
        );
        self.fence.revoke(format!(
            "another daemon took over the conversation ({who}); this daemon no longer writes \
             its remote storage"
        ));
        tracing::error!(
            instance = %self.instance,
            epoch = held.epoch,
            new_owner = %who,
            "ANOTHER DAEMON TOOK OVER THIS CONVERSATION: this daemon no longer writes remote \
             storage (local KV keeps serving; later changes stay local)"
        );
        self.update_status(|s| {
            s.state = OwnerState::Lost;
            s.holder = record;
        });
        // Last: whoever this wakes (a sync waiting) reads the status as lost.
        self.ended.cancel();
    }
}

/// How long [`wait_until_unowned`] tries again a read of the owner object that gets no
/// answer.
const WAIT_UNANSWERED_MAX: Duration = Duration::from_secs(30);

/// Why [`wait_until_unowned`] stopped waiting.
#[derive(Debug)]
pub enum Unowned {
    /// No owner object, a released one, or one naming `own_instance`.
    Free,
    /// The owner's lease expired: its object stayed `etag` for a whole lease.
    Expired {
        record: Option<OwnerRecord>,
        etag: String,
    },
}

/// Waits until no other daemon owns the conversation under `conversation_prefix`: its
/// owner object is absent, released, names `own_instance` (the state directory a
/// restore prepares for, whose daemon takes over at once), or stayed the same for a
/// whole lease (its lease expired; `lease` for an object that cannot be read).
/// `waiting` hears each new holder waited for. What `sandkeep restore` does before it
/// reads anything: what the owner writes until its final sync is what a new sandbox
/// must start from.
pub async fn wait_until_unowned(
    remote: &dyn Remote,
    conversation_prefix: &str,
    own_instance: Option<&str>,
    lease: Duration,
    mut waiting: impl FnMut(Option<&OwnerRecord>),
) -> Result<Unowned, RemoteError> {
    let key = format!("{conversation_prefix}{OWNER_KEY}");
    let mut unchanged = Unchanged::default();
    let mut told: Option<String> = None;
    let mut unanswered: Option<(Instant, crate::remote::Backoff)> = None;
    loop {
        // A read that gets no answer is tried again for a while (a dropped connection
        // in a wait of minutes); a remote that stays silent is an error, as it is for
        // the rest of the restore.
        let got = match remote.get_bytes_tagged(&key, OWNER_MAX).await {
            Err(e @ RemoteError::Transport { .. }) => {
                let (since, backoff) =
                    unanswered.get_or_insert_with(|| (Instant::now(), Default::default()));
                if since.elapsed() >= WAIT_UNANSWERED_MAX {
                    return Err(e);
                }
                tracing::warn!(error = %e, "cannot read the conversation's owner object yet; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            other => other?,
        };
        unanswered = None;
        let Some((bytes, etag)) = got else {
            return Ok(Unowned::Free);
        };
        let record = serde_json::from_slice::<OwnerRecord>(&bytes).ok();
        let lease = record
            .as_ref()
            .map_or(lease, |r| Duration::from_millis(r.lease_ms));
        let ours = record
            .as_ref()
            .is_some_and(|r| Some(r.instance.as_str()) == own_instance);
        if ours || lease.is_zero() {
            return Ok(Unowned::Free);
        }
        if unchanged.for_(&etag) >= lease {
            return Ok(Unowned::Expired { record, etag });
        }
        let holder = record
            .as_ref()
            .map_or_else(String::new, |r| format!("{}/{}", r.instance, r.epoch));
        if told.as_deref() != Some(holder.as_str()) {
            waiting(record.as_ref());
            told = Some(holder);
        }
        tokio::time::sleep((lease / 3).clamp(Duration::from_millis(50), Duration::from_secs(2)))
            .await;
    }
}

/// Marks the owner object that [`wait_until_unowned`] saw expire as released (its own
/// record with `lease_ms` 0, written only over that same object), as its owner would
/// have at a clean stop: the next daemon then takes over at once instead of waiting a
/// whole lease again from when it first reads the object (an init container's restore
/// and then its sidecar would wait a lease each). Same instance and epoch: the owner,
/// were it alive after all (a partition), renews it as its own, while a daemon that
/// takes over first makes it stop for good. `Ok(false)` when the object changed since
/// (renewed, or taken over) or cannot be read as a record.
pub async fn mark_released(
    remote: &dyn Remote,
    conversation_prefix: &str,
    expired: &Unowned,
) -> Result<bool, RemoteError> {
    let Unowned::Expired {
        record: Some(record),
        etag,
    } = expired
    else {
        return Ok(false);
    };
    let released = OwnerRecord {
        lease_ms: 0,
        ..record.clone()
    };
    let key = format!("{conversation_prefix}{OWNER_KEY}");
    match remote
        .put_bytes_if(
            &key,
            released.to_bytes(),
            Precondition::Matches(etag.clone()),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(RemoteError::PreconditionFailed { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The instance id kept in `state_dir`, if a valid one was made there.
pub fn existing_instance_id(state_dir: &Path) -> Option<String> {
    read_instance_id(&state_dir.join(INSTANCE_FILE))
        .ok()
        .flatten()
}

/// The instance id in the file `path`: `None` when there is none, or it is not a valid
/// one (with a warning).
fn read_instance_id(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let id = text.trim();
            if (1..=64).contains(&id.len())
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Ok(Some(id.to_string()));
            }
            tracing::warn!(file = %path.display(), "not a valid instance id; not used");
            Ok(None)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// This daemon's instance id: read from `<state_dir>/owner-id`, or made (16 random
/// bytes, hex) and kept there, so a restart on the same state dir is the same instance.
fn instance_id(state_dir: &Path) -> Result<String, OwnerError> {
    let path = state_dir.join(INSTANCE_FILE);
    let err = |source| OwnerError::InstanceId {
        path: path.clone(),
        source,
    };
    if let Some(id) = read_instance_id(&path).map_err(err)? {
        return Ok(id);
    }
    let id = hex::encode(rand::random::<[u8; 16]>());
    crate::replace_file(&path, format!("{id}\n").as_bytes()).map_err(err)?;
    Ok(id)
}

/// The machine's host name, for people reading `owner.json`.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the result is cut at the
    // first NUL (or the end, should a long name have been truncated without one).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::dir::DirRemote;
    use crate::remote::fenced::FencedRemote;
    use crate::remote::flaky::FlakyRemote;

    const PREFIX: &str = "conversations/u1/c1/";
    const LEASE: Duration = Duration::from_millis(1500);

    struct Env {
        dir: tempfile::TempDir,
        remote: Arc<dyn Remote>,
    }

    impl Env {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let remote = Arc::new(DirRemote::new(&dir.path().join("remote")).unwrap());
            Self { dir, remote }
        }

        /// An owner on the shared remote with the state dir `name`.
        fn owner(&self, name: &str) -> Arc<Owner> {
            self.owner_on(self.remote.clone(), name)
        }

        fn owner_on(&self, remote: Arc<dyn Remote>, name: &str) -> Arc<Owner> {
            let state = self.dir.path().join(name);
            std::fs::create_dir_all(&state).unwrap();
            Owner::build(remote, PREFIX, &state, LEASE, UNREACHABLE_AFTER).unwrap()
        }

        async fn record(&self) -> OwnerRecord {
            let bytes = self
                .remote
                .get_bytes(&format!("{PREFIX}{OWNER_KEY}"))
                .await
                .unwrap()
                .expect("owner.json");
            serde_json::from_slice(&bytes).unwrap()
        }
    }

    /// Claims in the background; the task ends once `owner` owns the conversation.
    fn claim_in_background(owner: &Arc<Owner>) -> tokio::task::JoinHandle<Instant> {
        let owner = owner.clone();
        tokio::spawn(async move {
            owner.claim().await;
            Instant::now()
        })
    }

    async fn fenced_write(owner: &Owner, remote: &Arc<dyn Remote>) -> Result<(), RemoteError> {
        FencedRemote::new(remote.clone(), owner.fence())
            .put_bytes(&format!("{PREFIX}data"), Bytes::from_static(b"x"))
            .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claim_creates_the_owner_object_and_opens_the_fence() {
        let env = Env::new();
        let a = env.owner("a");
        assert!(fenced_write(&a, &env.remote).await.is_err());
        assert_eq!(a.status().state, OwnerState::Waiting);
        a.claim().await;
        let r = env.record().await;
        assert_eq!(r.instance, a.instance());
        assert_eq!(r.epoch, 1);
        assert_eq!(u128::from(r.lease_ms), LEASE.as_millis());
        assert!(!r.host.is_empty());
        humantime::parse_rfc3339(&r.renewed_at).unwrap();
        let id = std::fs::read_to_string(env.dir.path().join("a").join(INSTANCE_FILE)).unwrap();
        assert_eq!(id.trim(), a.instance());
        let s = a.status();
        assert_eq!(
            (s.state, s.epoch, s.writes_allowed),
            (OwnerState::Claimed, 1, true)
        );
        fenced_write(&a, &env.remote).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_daemon_waits_while_the_lease_is_renewed_then_takes_over_after_it_expires() {
        let env = Env::new();
        let a = env.owner("a");
        a.claim().await;
        let a_stop = CancellationToken::new();
        let a_run = tokio::spawn(a.clone().run(a_stop.clone()));

        let b = env.owner("b");
        let b_claim = claim_in_background(&b);
        // Several leases pass: A keeps renewing, B keeps waiting and names A.
        tokio::time::sleep(LEASE * 3).await;
        assert!(
            !b_claim.is_finished(),
            "B claimed while A renewed its lease"
        );
        let s = b.status();
        assert_eq!(s.state, OwnerState::Waiting);
        assert!(!s.writes_allowed);
        assert_eq!(s.holder.unwrap().instance, a.instance());
        assert!(fenced_write(&b, &env.remote).await.is_err());
        // A writes (on a loaded machine a late renewal may close its fence for a moment:
        // the next one opens it again).
        let deadline = Instant::now() + LEASE * 2;
        while let Err(e) = fenced_write(&a, &env.remote).await {
            assert!(Instant::now() < deadline, "A cannot write: {e}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(env.record().await.instance, a.instance());

        // A stops renewing (frozen, partitioned): its writes stop within 0.9 x lease,
        // B takes over only after a whole lease.
        a_stop.cancel();
        a_run.await.unwrap();
        let frozen = Instant::now();
        let taken = b_claim.await.unwrap();
        assert!(taken - frozen >= LEASE * 2 / 3, "{:?}", taken - frozen);
        assert!(!a.fence.allows_writes(), "A still writes after B took over");
        let r = env.record().await;
        // 3 when B's claim was answered after its step timed out (a loaded machine):
        // B read its own record back and claimed it again.
        assert_eq!(r.instance.as_str(), b.instance());
        assert!(matches!(r.epoch, 2 | 3), "{}", r.epoch);
        fenced_write(&b, &env.remote).await.unwrap();

        // A comes back: its next renewal finds B and fences it for good.
        let a_run = tokio::spawn(a.clone().run(CancellationToken::new()));
        tokio::time::timeout(Duration::from_secs(5), a_run)
            .await
            .expect("A's run ends once it lost")
            .unwrap();
        let s = a.status();
        assert_eq!(s.state, OwnerState::Lost);
        assert_eq!(s.holder.unwrap().instance, b.instance());
        let err = fenced_write(&a, &env.remote).await.unwrap_err();
        assert!(err.to_string().contains("took over"), "{err}");
        assert_eq!(env.record().await.instance, b.instance());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_instance_takes_over_at_once() {
        let env = Env::new();
        let a = env.owner("a");
        a.claim().await;
        drop(a); // killed: no release, the lease is still running
        let again = env.owner("a");
        let t = Instant::now();
        again.claim().await;
        assert!(t.elapsed() < LEASE / 2, "{:?}", t.elapsed());
        let r = env.record().await;
        assert_eq!((r.instance.as_str(), r.epoch), (again.instance(), 2));
    }

    /// An owner object far larger than any record is never taken for one, nor taken
    /// over: the claim fails (saying why) until it is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_owner_object_is_not_read_nor_taken_over() {
        let env = Env::new();
        let key = format!("{PREFIX}{OWNER_KEY}");
        let junk = vec![b'x'; OWNER_MAX as usize + 1];
        env.remote.put_bytes(&key, Bytes::from(junk)).await.unwrap();
        let b = env.owner("b");
        let b_claim = claim_in_background(&b);
        tokio::time::sleep(LEASE * 3).await;
        assert!(!b.was_claimed());
        let error = b.status().last_error.unwrap_or_default();
        assert!(error.contains("larger than"), "{error}");
        env.remote.delete_many(&[key]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), b.wait_claimed())
            .await
            .expect("claimed once the object is gone");
        b_claim.abort();
    }

    /// An owner object deleted while its owner lives (an operator "unsticking" it) is
    /// not claimed at once when the conversation has data: the owner puts it back at
    /// its next renewal, and the newcomer waits for it as for any holder.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_owner_object_is_not_claimed_while_its_owner_lives() {
        let env = Env::new();
        let a = env.owner("a");
        a.claim().await;
        let a_run = tokio::spawn(a.clone().run(CancellationToken::new()));
        fenced_write(&a, &env.remote).await.unwrap();
        env.remote
            .delete_many(&[format!("{PREFIX}{OWNER_KEY}")])
            .await
            .unwrap();
        let b = env.owner("b");
        let b_claim = claim_in_background(&b);
        tokio::time::sleep(LEASE * 3).await;
        assert!(!b_claim.is_finished(), "B claimed while A lived");
        assert_eq!(env.record().await.instance, a.instance());
        assert!(fenced_write(&b, &env.remote).await.is_err());
        fenced_write(&a, &env.remote).await.unwrap();
        a_run.abort();
        b_claim.abort();
    }

    /// A daemon that took the conversation over and was killed before taking in what
    /// the other one wrote reads its own record back at the next start: it still owes
    /// the take-in, until it is done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_take_in_owed_survives_a_restart_until_it_is_done() {
        let env = Env::new();
        let a = env.owner("a");
        a.claim().await;
        assert!(!a.took_over_from_another(), "nobody owned it before");
        a.release(Duration::from_secs(5)).await;
        let b = env.owner("b");
        b.claim().await;
        assert!(b.took_over_from_another());
        drop(b); // killed before the take-in
        let again = env.owner("b");
        again.claim().await;
        assert_eq!(env.record().await.instance, again.instance());
        assert!(again.took_over_from_another(), "the take-in is still owed");
        again.take_in_done();
        assert!(!again.took_over_from_another());
        drop(again);
        let third = env.owner("b");
        third.claim().await;
        assert!(!third.took_over_from_another());
    }

    /// A restore that waited out a killed owner's lease marks its object released: the
    /// next daemon takes over at once, not after a second lease of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expired_owner_marked_released_is_taken_over_at_once() {
        let env = Env::new();
        let a = env.owner("a");
        a.claim().await;
        drop(a); // killed: never renews
        let started = Instant::now();
        let expired = wait_until_unowned(env.remote.as_ref(), PREFIX, None, LEASE, |_| {})
            .await
            .unwrap();
        assert!(started.elapsed() >= LEASE);
        assert!(
            matches!(&expired, Unowned::Expired { record: Some(r), .. } if r.epoch == 1),
            "{expired:?}"
        );
        assert!(
            mark_released(env.remote.as_ref(), PREFIX, &expired)
                .await
                .unwrap()
        );
        let r = env.record().await;
        assert_eq!((r.lease_ms, r.epoch), (0, 1));
        // Only over the object that expired.
        assert!(
            !mark_released(env.remote.as_ref(), PREFIX, &expired)
                .await
                .unwrap()
        );
        let b = env.owner("b");
        let started = Instant::now();
        b.claim().await;
        assert!(started.elapsed() < LEASE / 2, "{:?}", started.elapsed());
        let r = env.record().await;
        assert_eq!((r.instance.as_str(), r.epoch), (b.instance(), 2));
    }

    /// An owner that was only cut off for a lease (a partition) renews the object a
    /// restore marked released as its own, and keeps writing; nobody else took over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_live_owner_renews_the_object_marked_released() {
        let env = Env::new();
        let a = env.owner("a");
        a.claim().await;
        let expired = wait_until_unowned(env.remote.as_ref(), PREFIX, None, LEASE, |_| {})
            .await
            .unwrap();
        assert!(
            mark_released(env.remote.as_ref(), PREFIX, &expired)
                .await
                .unwrap()
        );
        let stop = CancellationToken::new();
        let run = tokio::spawn(a.clone().run(stop.clone()));
        let renewed = async {
            while env.record().await.lease_ms == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), renewed)
            .await
            .expect("renewed");
        let r = env.record().await;
        assert_eq!((r.instance.as_str(), r.epoch), (a.instance(), 1));
        assert_eq!(a.status().state, OwnerState::Claimed);
        fenced_write(&a, &env.remote).await.unwrap();
        stop.cancel();
        run.await.unwrap();
    }

    /// A claim won in the background (the daemon started while remote storage did not
    /// answer) is seen by [`Owner::wait_claimed`], and one from another daemon owes a
    /// take-in as one won at start does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_won_in_the_background_is_awaited_and_owes_a_take_in() {
        let env = Env::new();
        let a = env.owner("a");
        a.claim().await;
        a.release(Duration::from_secs(5)).await;
        let b = env.owner("b");
        assert!(!b.was_claimed());
        let stop = CancellationToken::new();
        let b_run = tokio::spawn(b.clone().run(stop.clone()));
        tokio::time::timeout(Duration::from_secs(10), b.wait_claimed())
            .await
            .expect("claimed in the background");
        assert!(b.was_claimed() && b.took_over_from_another());
        fenced_write(&b, &env.remote).await.unwrap();
        stop.cancel();
        b_run.await.unwrap();
    }

    /// The wait of an offline restore tries again reads that get no answer for a while,
    /// then gives up: a remote that stays silent is an error.
    #[tokio::test(start_paused = true)]
    async fn waiting_for_no_owner_rides_out_a_dropped_read_not_a_silent_remote() {
        let env = Env::new();
        let flaky = FlakyRemote::new(env.remote.clone());
        flaky.fail_next(2);
        let waited = wait_until_unowned(&flaky, PREFIX, None, LEASE, |_| {}).await;
        assert!(waited.is_ok(), "{waited:?}");
        flaky.set_down(true);
        let started = Instant::now();
        let waited = wait_until_unowned(&flaky, PREFIX, None, LEASE, |_| {}).await;
        assert!(waited.is_err());
        assert!(started.elapsed() >= WAIT_UNANSWERED_MAX);
    }

    /// An owner object with the largest epoch (anyone who may write the bucket may
    /// put one) is taken over like any other, without an overflow.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_largest_epoch_is_taken_over_without_overflow() {
        let env = Env::new();
        let record = serde_json::json!({
            "instance": "someone", "epoch": u64::MAX, "lease_ms": 0,
            "renewed_at": "2026-01-01T00:00:00Z", "host": "h",
        });
        env.remote
            .put_bytes(
                &format!("{PREFIX}{OWNER_KEY}"),
                Bytes::from(record.to_string()),
            )
            .await
            .unwrap();
        let a = env.owner("a");
        tokio::time::timeout(Duration::from_secs(5), a.claim())
            .await
            .unwrap();
        assert_eq!(a.status().state, OwnerState::Claimed);
        assert_eq!(env.record().await.epoch, u64::MAX);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn release_lets_the_next_daemon_take_over_at_once() {
        let env = Env::new();
        let lease = Duration::from_secs(30);
        let state = env.dir.path().join("a");
        std::fs::create_dir_all(&state).unwrap();
        let a = Owner::build(env.remote.clone(), PREFIX, &state, lease, UNREACHABLE_AFTER).unwrap();
        a.claim().await;
        let a_run = tokio::spawn(a.clone().run(CancellationToken::new()));
        let b = env.owner("b");
        let b_claim = claim_in_background(&b);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!b_claim.is_finished());
        let released = Instant::now();
        a.release(Duration::from_secs(5)).await;
        assert_eq!(a.status().state, OwnerState::Released);
        assert!(fenced_write(&a, &env.remote).await.is_err());
        tokio::time::timeout(Duration::from_secs(2), a_run)
            .await
            .expect("run ends after release")
            .unwrap();
        let taken = b_claim.await.unwrap();
        // Not the 30 s lease: at once, give or take a loaded machine's scheduling.
        assert!(taken - released < Duration::from_secs(5));
        let r = env.record().await;
        assert_eq!((r.instance.as_str(), r.epoch), (b.instance(), 2));
        // Releasing twice, or after losing, does nothing.
        a.release(Duration::from_secs(5)).await;
        assert_eq!(env.record().await.instance, b.instance());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_are_held_while_renewals_fail_and_resume_after() {
        let env = Env::new();
        let flaky = Arc::new(FlakyRemote::new(env.remote.clone()));
        let a = env.owner_on(flaky.clone(), "a");
        a.claim().await;
        let run = tokio::spawn(a.clone().run(CancellationToken::new()));
        flaky.set_down(true);
        tokio::time::sleep(LEASE).await;
        let s = a.status();
        assert_eq!(s.state, OwnerState::Claimed);
        assert!(!s.writes_allowed);
        assert!(s.last_error.is_some());
        // The refusal says why: whoever sees it (a sync's error) sees the cause.
        let refused = fenced_write(&a, &env.remote).await.unwrap_err().to_string();
        assert!(refused.contains("injected failure"), "{refused}");
        flaky.set_down(false);
        tokio::time::sleep(LEASE).await;
        let s = a.status();
        assert!(s.writes_allowed && s.last_error.is_none(), "{s:?}");
        fenced_write(&a, &env.remote).await.unwrap();
        run.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_remote_starts_unclaimed_and_claims_in_the_background() {
        let env = Env::new();
        let flaky = Arc::new(FlakyRemote::new(env.remote.clone()));
        flaky.set_down(true);
        let state = env.dir.path().join("a");
        std::fs::create_dir_all(&state).unwrap();
        let a = Owner::build(flaky.clone(), PREFIX, &state, LEASE, LEASE).unwrap();
        tokio::time::timeout(Duration::from_secs(5), a.claim())
            .await
            .expect("claim gives up waiting for an answer");
        let s = a.status();
        assert_eq!(s.state, OwnerState::Waiting);
        assert!(s.last_error.is_some() && !s.writes_allowed);
        let run = tokio::spawn(a.clone().run(CancellationToken::new()));
        flaky.set_down(false);
        // It polls every lease / 4; a loaded machine may delay a poll, so it is given a
        // few leases (a claim that only came at the next start would never come).
        let deadline = tokio::time::Instant::now() + LEASE * 4;
        while a.status().state != OwnerState::Claimed {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not claimed in the background: {:?}",
                a.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fenced_write(&a, &env.remote).await.unwrap();
        run.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn claims_that_get_no_answer_count_as_remote_errors() {
        let env = Env::new();
        let flaky = Arc::new(FlakyRemote::new(env.remote.clone()));
        flaky.set_hang_reads(true);
        let state = env.dir.path().join("a");
        std::fs::create_dir_all(&state).unwrap();
        let a = Owner::build(flaky.clone(), PREFIX, &state, LEASE, LEASE).unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let _ = a.metrics.set(metrics.clone());
        tokio::time::timeout(Duration::from_secs(5), a.claim())
            .await
            .expect("claim gives up waiting for an answer");
        let text = metrics.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("sandkeep_remote_errors_total{op=\"owner\"}"))
            .unwrap_or_else(|| panic!("{text}"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 1.0, "{line}");
    }

    /// Renewals that succeed count no remote error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renewals_answered_in_time_count_no_remote_error() {
        let env = Env::new();
        let a = env.owner("a");
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let _ = a.metrics.set(metrics.clone());
        a.claim().await;
        let run = tokio::spawn(a.clone().run(CancellationToken::new()));
        // About six renewals (one every lease / 3).
        tokio::time::sleep(LEASE * 2).await;
        run.abort();
        assert_eq!(a.status().state, OwnerState::Claimed);
        assert!(a.status().last_error.is_none());
        let text = metrics.encode();
        let errors = text
            .lines()
            .find(|l| l.starts_with("sandkeep_remote_errors_total{op=\"owner\"}"));
        assert!(errors.is_none_or(|l| l.ends_with(" 0")), "{errors:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn of_daemons_claiming_at_once_exactly_one_wins() {
        let env = Env::new();
        let owners: Vec<_> = (0..6)
            .map(|i| {
                let state = env.dir.path().join(format!("s{i}"));
                std::fs::create_dir_all(&state).unwrap();
                let lease = Duration::from_secs(30);
                Owner::build(env.remote.clone(), PREFIX, &state, lease, UNREACHABLE_AFTER).unwrap()
            })
            .collect();
        let claims: Vec<_> = owners.iter().map(claim_in_background).collect();
        let claimed = || {
            owners
                .iter()
                .filter(|o| o.status().state == OwnerState::Claimed)
                .collect::<Vec<_>>()
        };
        let t = Instant::now();
        while claimed().is_empty() && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The losers keep waiting (their lookups see the winner's object).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let claimed = claimed();
        assert_eq!(claimed.len(), 1);
        assert_eq!(env.record().await.instance, claimed[0].instance());
        for c in claims {
            c.abort();
        }
    }
}
