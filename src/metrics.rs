//! Prometheus metrics: names as constants in one place, one registry per daemon.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// `sandkeep_kv_ops_total{op,status}`: KV requests by operation and HTTP status.
pub const KV_OPS: &str = "sandkeep_kv_ops";
/// `sandkeep_kv_op_duration_seconds{op}`: KV request latency.
pub const KV_OP_DURATION: &str = "sandkeep_kv_op_duration";
/// `sandkeep_kv_conflicts_total{reason}`: 409 answers by reason (version_mismatch, exists, not_exists).
pub const KV_CONFLICTS: &str = "sandkeep_kv_conflicts";

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
        Self {
            registry,
            kv_ops,
            kv_op_duration,
            kv_conflicts,
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

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
