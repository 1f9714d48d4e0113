//! Prometheus metrics (`GET /metrics`, OpenMetrics text exposition via `prometheus-client`).
//!
//! The attach engine does not report where an attach spends its time, so the latency
//! histograms are the whole engine call (`volcrypt_operation_duration_seconds`); the time spent
//! waiting for the KDF memory budget is measured separately
//! (`volcrypt_kdf_budget_wait_seconds`), and the KDF memory admitted is a gauge. Splitting KDF
//! from device-mapper time needs the engine to time its phases (see the report).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    kdf_wait: Histogram,
    failures: Family<Labels, Counter>,
    requests: Family<Labels, Counter>,
    rejected_peers: Counter,
    pub active_attachments: Gauge,
    pub kdf_memory_in_use_mib: Gauge,
    pub kdf_memory_budget_mib: Gauge,
    pub in_flight: Gauge,
    /// udev-triggered activation: records whose device is gone (torn down, `waiting`) and
    /// whose device vanished while in use (`lost`).
    pub waiting_attachments: Gauge,
    pub lost_attachments: Gauge,
    /// udev events acted upon, by action (teardown, lost, reactivated, …).
    device_events: Family<Labels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~65 s: from PBKDF2-1000 test volumes to Argon2 at 1 GiB on a slow host.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("volcrypt");
        let duration = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "operation_duration_seconds",
            "Engine time of attach/detach/extend (whole call: KDF and device-mapper together), by operation and result",
            duration.clone(),
        );
        let kdf_wait = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            "kdf_budget_wait_seconds",
            "Time attaches waited for KDF memory budget",
            kdf_wait.clone(),
        );
        let failures = Family::<Labels, Counter>::default();
        registry.register(
            "operation_failures",
            "Failed operations by operation and reason (the API error code)",
            failures.clone(),
        );
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "API requests by route and status",
            requests.clone(),
        );
        let rejected_peers = Counter::default();
        registry.register(
            "rejected_peers",
            "Connections refused by the SO_PEERCRED check",
            rejected_peers.clone(),
        );
        let active_attachments = Gauge::default();
        registry.register(
            "active_attachments",
            "Volumes volcrypt manages (state records, not counting waiting or lost ones), counted at scrape time",
            active_attachments.clone(),
        );
        let kdf_memory_in_use_mib = Gauge::default();
        registry.register(
            "kdf_memory_in_use_mib",
            "KDF memory admitted to running attaches, MiB",
            kdf_memory_in_use_mib.clone(),
        );
        let kdf_memory_budget_mib = Gauge::default();
        registry.register(
            "kdf_memory_budget_mib",
            "KDF memory budget, MiB",
            kdf_memory_budget_mib.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "operations_in_flight",
            "Engine operations running now",
            in_flight.clone(),
        );
        let waiting_attachments = Gauge::default();
        registry.register(
            "waiting_attachments",
            "Attachments waiting for their backing device to appear (state records in phase waiting), counted at scrape time",
            waiting_attachments.clone(),
        );
        let lost_attachments = Gauge::default();
        registry.register(
            "lost_attachments",
            "Attachments whose backing device vanished while the mapping was in use (phase lost), counted at scrape time",
            lost_attachments.clone(),
        );
        let device_events = Family::<Labels, Counter>::default();
        registry.register(
            "device_events",
            "What the agent did on udev events: teardown, lost, reactivated, reactivation_failed",
            device_events.clone(),
        );
        Metrics {
            waiting_attachments,
            lost_attachments,
            device_events,
            registry,
            duration,
            kdf_wait,
            failures,
            requests,
            rejected_peers,
            active_attachments,
            kdf_memory_in_use_mib,
            kdf_memory_budget_mib,
            in_flight,
        }
    }

    pub fn observe_operation(&self, op: &'static str, seconds: f64, failure: Option<&str>) {
        let result = if failure.is_some() { "error" } else { "ok" };
        self.duration
            .get_or_create(&vec![("op", op.to_owned()), ("result", result.to_owned())])
            .observe(seconds);
        if let Some(reason) = failure {
            self.failure(op, reason);
        }
    }

    pub fn failure(&self, op: &'static str, reason: &str) {
        self.failures
            .get_or_create(&vec![("op", op.to_owned()), ("reason", reason.to_owned())])
            .inc();
    }

    pub fn observe_kdf_wait(&self, seconds: f64) {
        self.kdf_wait.observe(seconds);
    }

    pub fn request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    pub fn device_event(&self, outcome: &'static str) {
        self.device_events
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }

    pub fn rejected_peer(&self) {
        self.rejected_peers.inc();
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out = "# EOF\n".into();
        }
        out
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_histograms_failures_and_gauges() {
        let m = Metrics::new();
        m.observe_operation("attach", 0.25, None);
        m.observe_operation("attach", 0.01, Some("dm_unavailable"));
        m.active_attachments.set(3);
        let t = m.encode();
        assert!(
            t.contains("# TYPE volcrypt_operation_duration_seconds histogram"),
            "{t}"
        );
        assert!(
            t.contains("volcrypt_operation_duration_seconds_count{op=\"attach\",result=\"ok\"} 1")
        );
        assert!(t.contains(
            "volcrypt_operation_failures_total{op=\"attach\",reason=\"dm_unavailable\"} 1"
        ));
        assert!(t.contains("volcrypt_active_attachments 3"));
        assert!(t.ends_with("# EOF\n"));
    }
}
