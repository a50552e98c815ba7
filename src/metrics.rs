//! Prometheus metrics: names as constants in one place, one registry per daemon.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::kv::CommitStats;

/// `sandkeep_kv_ops_total{op,status}`: KV requests by operation and HTTP status.
pub const KV_OPS: &str = "sandkeep_kv_ops";
/// `sandkeep_kv_op_duration_seconds{op}`: KV request latency.
pub const KV_OP_DURATION: &str = "sandkeep_kv_op_duration";
/// `sandkeep_kv_conflicts_total{reason}`: 409 answers by reason (version_mismatch, exists, not_exists).
pub const KV_CONFLICTS: &str = "sandkeep_kv_conflicts";
/// `sandkeep_sync_rounds_total{result}`: rounds by result (ok, error, unavailable).
pub const SYNC_ROUNDS: &str = "sandkeep_sync_rounds";
/// `sandkeep_sync_files_uploaded_total`.
pub const SYNC_FILES_UPLOADED: &str = "sandkeep_sync_files_uploaded";
/// `sandkeep_sync_files_changing_total`: reads of a workspace file that found it
/// changing, so that it was not uploaded then (the next attempts upload copies of it,
/// for as long as it keeps changing).
pub const SYNC_FILES_CHANGING: &str = "sandkeep_sync_files_changing";
/// `sandkeep_sync_bytes_uploaded_total`.
pub const SYNC_BYTES_UPLOADED: &str = "sandkeep_sync_bytes_uploaded";
/// `sandkeep_sync_pending_files`: changed files not yet in the remote.
pub const SYNC_PENDING_FILES: &str = "sandkeep_sync_pending_files";
/// `sandkeep_sync_lag_seconds`: age of the oldest pending change.
pub const SYNC_LAG: &str = "sandkeep_sync_lag";
/// `sandkeep_sync_debounce_seconds`: the current debounce delay.
pub const SYNC_DEBOUNCE: &str = "sandkeep_sync_debounce";
/// `sandkeep_workspace_bytes`: bytes of the mirrored files.
pub const WORKSPACE_BYTES: &str = "sandkeep_workspace_bytes";
/// `sandkeep_workspace_skipped_files`: files the mirror leaves out (over
/// `sync.max_file_bytes`, a key too long, unreadable).
pub const WORKSPACE_SKIPPED: &str = "sandkeep_workspace_skipped_files";
/// `sandkeep_remote_errors_total{op}`.
pub const REMOTE_ERRORS: &str = "sandkeep_remote_errors";
/// `sandkeep_snapshot_duration_seconds`: time to build and upload one snapshot.
pub const SNAPSHOT_DURATION: &str = "sandkeep_snapshot_duration";
/// `sandkeep_snapshot_bytes`: size of the last snapshot stored.
pub const SNAPSHOT_BYTES: &str = "sandkeep_snapshot_bytes";
/// `sandkeep_snapshots_total{result}`: snapshots by result (ok, error).
pub const SNAPSHOTS: &str = "sandkeep_snapshots";
/// `sandkeep_git_bundles_total{result}`: git bundles by result (ok, error).
pub const GIT_BUNDLES: &str = "sandkeep_git_bundles";
/// `sandkeep_git_bundle_duration_seconds`: time to build and upload one bundle.
pub const GIT_BUNDLE_DURATION: &str = "sandkeep_git_bundle_duration";

/// `sandkeep_kv_commits_total`: KV commit groups (one durable commit each).
pub const KV_COMMITS: &str = "sandkeep_kv_commits";
/// `sandkeep_kv_committed_writes_total`: successful KV write requests in those
/// groups; divided by the commits, about the mean group size.
pub const KV_COMMITTED_WRITES: &str = "sandkeep_kv_committed_writes";
/// `sandkeep_kv_checkpoints_total`: durable commits of the KV database itself.
pub const KV_CHECKPOINTS: &str = "sandkeep_kv_checkpoints";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpStatus {
    pub op: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// 10 ms .. ~11 min, for snapshots and bundles.
fn backup_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.01, 2.0, 17,
    ))
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~3.3 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 17,
    ))
}

pub struct Metrics {
    registry: Registry,
    pub kv_ops: Family<OpStatus, Counter>,
    pub kv_op_duration: Family<OpLabel, Histogram, fn() -> Histogram>,
    pub kv_conflicts: Family<Reason, Counter>,
    pub sync_rounds: Family<ResultLabel, Counter>,
    pub sync_files_uploaded: Counter,
    pub sync_files_changing: Counter,
    pub sync_bytes_uploaded: Counter,
    pub sync_pending_files: Gauge,
    pub sync_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub sync_debounce: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub workspace_bytes: Gauge,
    pub workspace_skipped: Gauge,
    pub remote_errors: Family<OpLabel, Counter>,
    pub snapshot_duration: Histogram,
    pub snapshot_bytes: Gauge,
    pub snapshots: Family<ResultLabel, Counter>,
    pub git_bundles: Family<ResultLabel, Counter>,
    pub git_bundle_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let kv_ops = Family::<OpStatus, Counter>::default();
        registry.register(
            KV_OPS,
            "KV requests by operation and status",
            kv_ops.clone(),
        );
        let kv_op_duration = Family::<OpLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            KV_OP_DURATION,
            "KV request latency",
            Unit::Seconds,
            kv_op_duration.clone(),
        );
        let kv_conflicts = Family::<Reason, Counter>::default();
        registry.register(
            KV_CONFLICTS,
            "KV requests refused with 409 by reason",
            kv_conflicts.clone(),
        );
        let sync_rounds = Family::<ResultLabel, Counter>::default();
        registry.register(
            SYNC_ROUNDS,
            "Workspace sync rounds by result",
            sync_rounds.clone(),
        );
        let sync_files_uploaded = Counter::default();
        registry.register(
            SYNC_FILES_UPLOADED,
            "Workspace files uploaded",
            sync_files_uploaded.clone(),
        );
        let sync_files_changing = Counter::default();
        registry.register(
            SYNC_FILES_CHANGING,
            "Reads of workspace files that found them changing (not uploaded then)",
            sync_files_changing.clone(),
        );
        let sync_bytes_uploaded = Counter::default();
        registry.register(
            SYNC_BYTES_UPLOADED,
            "Bytes uploaded by the workspace sync",
            sync_bytes_uploaded.clone(),
        );
        let sync_pending_files = Gauge::default();
        registry.register(
            SYNC_PENDING_FILES,
            "Changed files not yet in remote storage",
            sync_pending_files.clone(),
        );
        let sync_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            SYNC_LAG,
            "Age of the oldest pending change",
            Unit::Seconds,
            sync_lag.clone(),
        );
        let sync_debounce = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            SYNC_DEBOUNCE,
            "Current debounce delay",
            Unit::Seconds,
            sync_debounce.clone(),
        );
        let workspace_bytes = Gauge::default();
        registry.register(
            WORKSPACE_BYTES,
            "Bytes of the mirrored workspace files",
            workspace_bytes.clone(),
        );
        let workspace_skipped = Gauge::default();
        registry.register(
            WORKSPACE_SKIPPED,
            "Workspace files left out of the mirror (over sync.max_file_bytes, a key too long, unreadable)",
            workspace_skipped.clone(),
        );
        let remote_errors = Family::<OpLabel, Counter>::default();
        registry.register(
            REMOTE_ERRORS,
            "Failed remote storage operations",
            remote_errors.clone(),
        );
        let snapshot_duration = backup_histogram();
        registry.register_with_unit(
            SNAPSHOT_DURATION,
            "Time to build and upload one workspace snapshot",
            Unit::Seconds,
            snapshot_duration.clone(),
        );
        let snapshot_bytes = Gauge::default();
        registry.register(
            SNAPSHOT_BYTES,
            "Size of the last workspace snapshot stored",
            snapshot_bytes.clone(),
        );
        let snapshots = Family::<ResultLabel, Counter>::default();
        registry.register(
            SNAPSHOTS,
            "Workspace snapshots by result",
            snapshots.clone(),
        );
        let git_bundles = Family::<ResultLabel, Counter>::default();
        registry.register(GIT_BUNDLES, "Git bundles by result", git_bundles.clone());
        let git_bundle_duration = backup_histogram();
        registry.register_with_unit(
            GIT_BUNDLE_DURATION,
            "Time to build and upload one git bundle",
            Unit::Seconds,
            git_bundle_duration.clone(),
        );
        // The series alerts watch exist from the start at 0, so that `rate()` and
        // `increase()` see their first event (a series born at 1 shows no increase).
        for result in ["ok", "error", "unavailable"] {
            drop(sync_rounds.get_or_create(&ResultLabel { result }));
        }
        for result in ["ok", "error"] {
            drop(snapshots.get_or_create(&ResultLabel { result }));
            drop(git_bundles.get_or_create(&ResultLabel { result }));
        }
        for op in ["put", "get", "head", "list", "delete"] {
            drop(remote_errors.get_or_create(&OpLabel { op }));
        }
        for reason in ["version_mismatch", "exists", "not_exists"] {
            drop(kv_conflicts.get_or_create(&Reason { reason }));
        }
        Self {
            registry,
            snapshot_duration,
            snapshot_bytes,
            snapshots,
            git_bundles,
            git_bundle_duration,
            kv_ops,
            kv_op_duration,
            kv_conflicts,
            sync_rounds,
            sync_files_uploaded,
            sync_files_changing,
            sync_bytes_uploaded,
            sync_pending_files,
            sync_lag,
            sync_debounce,
            workspace_bytes,
            workspace_skipped,
            remote_errors,
        }
    }

    /// Records one finished KV request.
    pub fn kv_request(&self, op: &'static str, status: u16, elapsed: Duration) {
        self.kv_ops.get_or_create(&OpStatus { op, status }).inc();
        self.kv_op_duration
            .get_or_create(&OpLabel { op })
            .observe(elapsed.as_secs_f64());
    }

    pub fn kv_conflict(&self, reason: &'static str) {
        self.kv_conflicts.get_or_create(&Reason { reason }).inc();
    }

    pub fn sync_round(&self, result: &'static str) {
        self.sync_rounds
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn sync_uploaded(&self, bytes: u64) {
        self.sync_files_uploaded.inc();
        self.sync_bytes_uploaded.inc_by(bytes);
    }

    pub fn sync_file_changing(&self) {
        self.sync_files_changing.inc();
    }

    pub fn remote_error(&self, op: &'static str) {
        self.remote_errors.get_or_create(&OpLabel { op }).inc();
    }

    pub fn sync_gauges(&self, status: &crate::sync::SyncStatus, lag_s: f64, debounce_s: f64) {
        self.sync_pending_files.set(status.pending_files as i64);
        self.sync_lag.set(lag_s);
        self.sync_debounce.set(debounce_s);
        self.workspace_bytes.set(status.bytes as i64);
        self.workspace_skipped.set(status.skipped_files as i64);
    }

    pub fn snapshot_taken(&self, elapsed: Duration, bytes: u64) {
        self.snapshot_duration.observe(elapsed.as_secs_f64());
        self.snapshot_bytes.set(bytes as i64);
        self.snapshots
            .get_or_create(&ResultLabel { result: "ok" })
            .inc();
    }

    pub fn snapshot_failed(&self) {
        self.snapshots
            .get_or_create(&ResultLabel { result: "error" })
            .inc();
    }

    pub fn git_bundle(&self, result: &'static str, elapsed: Duration) {
        self.git_bundles
            .get_or_create(&ResultLabel { result })
            .inc();
        if result == "ok" {
            self.git_bundle_duration.observe(elapsed.as_secs_f64());
        }
    }

    /// Exposes the KV writer's counts (read at each scrape).
    pub fn register_kv_commits(&mut self, stats: Arc<CommitStats>) {
        self.registry
            .register_collector(Box::new(KvCommitCollector(stats)));
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Encodes [`CommitStats`] as counters.
#[derive(Debug)]
struct KvCommitCollector(Arc<CommitStats>);

impl Collector for KvCommitCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        for (name, help, value) in [
            (
                KV_COMMITS,
                "KV commit groups, each made durable at once",
                &s.groups,
            ),
            (
                KV_COMMITTED_WRITES,
                "Successful KV write requests committed (a batch counts once)",
                &s.writes,
            ),
            (
                KV_CHECKPOINTS,
                "Durable commits of the KV database (write-ahead log checkpoints)",
                &s.checkpoints,
            ),
        ] {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_series_alerts_watch_exist_at_zero_from_the_start() {
        let text = Metrics::new().encode();
        for series in [
            r#"sandkeep_sync_rounds_total{result="error"} 0"#,
            r#"sandkeep_snapshots_total{result="error"} 0"#,
            r#"sandkeep_git_bundles_total{result="error"} 0"#,
            r#"sandkeep_remote_errors_total{op="put"} 0"#,
            r#"sandkeep_kv_conflicts_total{reason="version_mismatch"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }

    #[test]
    fn names_match_the_design() {
        let m = Metrics::new();
        m.kv_request("get", 200, Duration::from_micros(100));
        m.kv_conflict("version_mismatch");
        let text = m.encode();
        assert!(
            text.contains(r#"sandkeep_kv_ops_total{op="get",status="200"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("sandkeep_kv_op_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains(r#"sandkeep_kv_conflicts_total{reason="version_mismatch"} 1"#),
            "{text}"
        );
        m.snapshot_taken(Duration::from_millis(1500), 4096);
        let text = m.encode();
        assert!(
            text.contains("sandkeep_snapshot_duration_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("sandkeep_snapshot_bytes 4096"), "{text}");
        assert!(
            text.contains(r#"sandkeep_snapshots_total{result="ok"} 1"#),
            "{text}"
        );

        let mut m = Metrics::new();
        let stats = Arc::new(CommitStats::default());
        m.register_kv_commits(stats.clone());
        stats.groups.store(3, Ordering::Relaxed);
        stats.writes.store(40, Ordering::Relaxed);
        stats.checkpoints.store(1, Ordering::Relaxed);
        let text = m.encode();
        for line in [
            "sandkeep_kv_commits_total 3",
            "sandkeep_kv_committed_writes_total 40",
            "sandkeep_kv_checkpoints_total 1",
            "# TYPE sandkeep_kv_commits counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}: {text}");
        }
    }
}
