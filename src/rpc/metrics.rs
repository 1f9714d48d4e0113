//! Prometheus metrics (`GET /metrics`, encoded by `prometheus-client`).
//!
//! Two exposition formats, chosen by the scraper's `Accept` header ([`Format::negotiate`]): the
//! Prometheus text format 0.0.4 by default, because that is what `curl`, `promtool check
//! metrics` and older scrapers read, and OpenMetrics 1.0.0 when asked for it (Prometheus asks
//! first for OpenMetrics). `prometheus-client` writes only OpenMetrics; the text format is
//! derived from it ([`to_prometheus_text`]): the two differ only in the names a counter's
//! `# HELP`/`# TYPE` lines carry, `# UNIT` lines, the type names and the `# EOF` terminator.
//!
//! `volcrypt_operation_duration_seconds` is the whole engine call. The engine times its phases
//! ([`crate::volume::timing`]), so attach latency is also split into KDF time
//! (`volcrypt_attach_kdf_seconds`: keyslot unlock) and device-mapper time
//! (`volcrypt_attach_dm_seconds`: table load, resume, udev wait), detach into device-mapper time
//! (`volcrypt_detach_dm_seconds`), and the smaller phases (key fetch, header read, format, links,
//! journal) go to `volcrypt_operation_phase_seconds`. The time spent waiting for the KDF memory
//! budget is measured separately (`volcrypt_kdf_budget_wait_seconds`), and the KDF memory
//! admitted is a gauge.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::volume::timing::{AttachTimings, DetachTimings};

type Labels = Vec<(&'static str, String)>;

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    kdf_wait: Histogram,
    attach_kdf: Histogram,
    attach_dm: Family<Labels, Histogram, fn() -> Histogram>,
    detach_dm: Histogram,
    phase: Family<Labels, Histogram, fn() -> Histogram>,
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
    /// Completed verifies, per volume.
    verify_bytes: Family<Labels, Counter>,
    verify_mismatches: Family<Labels, Counter>,
    verify_last: Family<Labels, Gauge>,
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
        let attach_kdf = latency_histogram();
        registry.register(
            "attach_kdf_seconds",
            "KDF time of attaches that opened a LUKS mapping: keyslot key derivation, keyslot area decryption, anti-forensic merge, digest check (volcrypt's userspace unlock)",
            attach_kdf.clone(),
        );
        let attach_dm = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "attach_dm_seconds",
            "Device-mapper time of attaches that opened a mapping: activation (volume key digest check, table load, resume, wait for udev). unlock=volcrypt: the KDF ran before and is in volcrypt_attach_kdf_seconds; unlock=libcryptsetup (plain mode, fallback, first attach after format): the KDF is included",
            attach_dm.clone(),
        );
        let detach_dm = latency_histogram();
        registry.register(
            "detach_dm_seconds",
            "Device-mapper time of detaches that closed a mapping: deactivation with its udev wait, and the retries while busy",
            detach_dm.clone(),
        );
        let phase = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "operation_phase_seconds",
            "The other engine phases of attaches that opened a mapping and detaches that closed one: key_fetch, header, format, links, journal (state record writes with fsync)",
            phase.clone(),
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
        let verify_bytes = Family::<Labels, Counter>::default();
        registry.register(
            "verify_bytes",
            "Bytes of the mapping checked by completed verifies (plaintext read through the mapping against the userspace decryption of the backing device), per volume",
            verify_bytes.clone(),
        );
        let verify_mismatches = Family::<Labels, Counter>::default();
        registry.register(
            "verify_mismatches",
            "Sectors completed verifies found differing (after re-reads), per volume: any increase is an alert",
            verify_mismatches.clone(),
        );
        let verify_last = Family::<Labels, Gauge>::default();
        registry.register(
            "verify_last_timestamp_seconds",
            "Unix time the last verify of the volume completed (whatever its verdict)",
            verify_last.clone(),
        );
        Metrics {
            verify_bytes,
            verify_mismatches,
            verify_last,
            waiting_attachments,
            lost_attachments,
            device_events,
            registry,
            duration,
            kdf_wait,
            attach_kdf,
            attach_dm,
            detach_dm,
            phase,
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

    /// Phase histograms of an attach; nothing for one that opened no mapping (raw device,
    /// already attached), whose timings are all zero.
    pub fn observe_attach_phases(&self, t: &AttachTimings) {
        if t.dm.is_zero() {
            return;
        }
        if t.kdf_split {
            self.attach_kdf.observe(t.kdf.as_secs_f64());
        }
        let unlock = if t.kdf_split {
            "volcrypt"
        } else {
            "libcryptsetup"
        };
        self.attach_dm
            .get_or_create(&vec![("unlock", unlock.to_owned())])
            .observe(t.dm.as_secs_f64());
        let mut phases = vec![
            ("key_fetch", t.key_fetch),
            ("header", t.header),
            ("links", t.links),
            ("journal", t.journal),
        ];
        if !t.format.is_zero() {
            phases.push(("format", t.format));
        }
        self.observe_phases("attach", &phases);
    }

    /// Phase histograms of a detach that closed a mapping.
    pub fn observe_detach_phases(&self, t: &DetachTimings, closed: bool) {
        if !closed {
            return;
        }
        self.detach_dm.observe(t.dm.as_secs_f64());
        self.observe_phases("detach", &[("links", t.links), ("journal", t.journal)]);
    }

    fn observe_phases(&self, op: &'static str, phases: &[(&'static str, std::time::Duration)]) {
        for (name, d) in phases {
            self.phase
                .get_or_create(&vec![("op", op.to_owned()), ("phase", (*name).to_owned())])
                .observe(d.as_secs_f64());
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

    /// A completed verify of `volume_id`.
    pub fn observe_verify(&self, volume_id: &str, bytes: u64, mismatches: u64, unix: u64) {
        let l = vec![("volume_id", volume_id.to_owned())];
        self.verify_bytes.get_or_create(&l).inc_by(bytes);
        // Created even at 0, so an alert on its increase has a series from the first verify.
        self.verify_mismatches.get_or_create(&l).inc_by(mismatches);
        self.verify_last
            .get_or_create(&l)
            .set(i64::try_from(unix).unwrap_or(i64::MAX));
    }

    /// Drop the per-volume verify series of a detached volume (a volume attached again
    /// starts new series; a scrape no longer shows volumes that are gone).
    pub fn forget_volume(&self, volume_id: &str) {
        let l = vec![("volume_id", volume_id.to_owned())];
        self.verify_bytes.remove(&l);
        self.verify_mismatches.remove(&l);
        self.verify_last.remove(&l);
    }

    pub fn rejected_peer(&self) {
        self.rejected_peers.inc();
    }

    /// The exposition text in `format`.
    pub fn encode(&self, format: Format) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out = "# EOF\n".into();
        }
        match format {
            Format::OpenMetrics => out,
            Format::Prometheus => to_prometheus_text(&out),
        }
    }
}

/// An exposition format of `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (`text/plain; version=0.0.4`).
    Prometheus,
    /// OpenMetrics 1.0.0 (`application/openmetrics-text; version=1.0.0`).
    OpenMetrics,
}

impl Format {
    /// The format for a request's `Accept` header: OpenMetrics only when the header names
    /// `application/openmetrics-text` with a weight above zero and no lower than the weight it
    /// gives `text/plain`; the text format otherwise (no header, `*/*`, `text/plain`, or
    /// anything else), since every scraper reads it.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let (mut openmetrics, mut text) = (None::<f32>, None::<f32>);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(0.0);
            let slot = match media.as_str() {
                "application/openmetrics-text" => &mut openmetrics,
                "text/plain" => &mut text,
                _ => continue,
            };
            *slot = Some(slot.map_or(q, |old| old.max(q)));
        }
        match openmetrics {
            Some(om) if om > 0.0 && om >= text.unwrap_or(0.0) => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The `Content-Type` of an exposition in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The Prometheus text format 0.0.4 of an OpenMetrics exposition. In OpenMetrics a counter
/// family `x` has `# HELP x`/`# TYPE x counter` and the sample `x_total`; the text format wants
/// the sample's name on the HELP and TYPE lines (else the sample has no help or type). It has
/// no `# UNIT` lines, no `# EOF`, and knows fewer types (`unknown` is its `untyped`; the
/// OpenMetrics-only types volcrypt does not use are exported as `untyped` too).
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A HELP line waits for its TYPE line, which says whether the name gains `_total`.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take());
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, ty) = match ty {
                "counter" => (format!("{name}_total"), "counter"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), ty),
                _ => (name.to_owned(), "untyped"),
            };
            match help.take() {
                Some((h, text)) if h == rest.split(' ').next().unwrap_or("") => {
                    flush_help(&mut out, Some((&name, text)))
                }
                other => flush_help(&mut out, other),
            }
            out.push_str("# TYPE ");
            out.push_str(&name);
            out.push(' ');
            out.push_str(ty);
            out.push('\n');
            continue;
        }
        flush_help(&mut out, help.take());
        out.push_str(line);
        out.push('\n');
    }
    flush_help(&mut out, help);
    out
}

/// Write a pending `# HELP NAME TEXT` line.
fn flush_help(out: &mut String, help: Option<(&str, &str)>) {
    if let Some((name, text)) = help {
        out.push_str("# HELP ");
        out.push_str(name);
        out.push(' ');
        out.push_str(text);
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_histograms_failures_and_gauges() {
        let m = Metrics::new();
        m.observe_operation("attach", 0.25, None);
        m.observe_operation("attach", 0.01, Some("dm_unavailable"));
        m.active_attachments.set(3);
        let t = m.encode(Format::OpenMetrics);
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

    #[test]
    fn attach_and_detach_phases_split_kdf_from_device_mapper_time() {
        use std::time::Duration;
        let m = Metrics::new();
        let ms = Duration::from_millis;
        // Userspace unlock: KDF and dm apart.
        m.observe_attach_phases(&AttachTimings {
            key_fetch: ms(1),
            header: ms(2),
            kdf: ms(300),
            dm: ms(40),
            kdf_split: true,
            links: ms(1),
            journal: ms(3),
            total: ms(347),
            ..AttachTimings::default()
        });
        // libcryptsetup unlocked: its dm time includes the KDF, no KDF sample.
        m.observe_attach_phases(&AttachTimings {
            dm: ms(500),
            total: ms(510),
            ..AttachTimings::default()
        });
        // Already attached / raw: nothing observed.
        m.observe_attach_phases(&AttachTimings::default());
        m.observe_detach_phases(
            &DetachTimings {
                dm: ms(30),
                total: ms(31),
                ..DetachTimings::default()
            },
            true,
        );
        m.observe_detach_phases(&DetachTimings::default(), false);
        let t = m.encode(Format::Prometheus);
        assert!(t.contains("volcrypt_attach_kdf_seconds_count 1\n"), "{t}");
        assert!(t.contains("volcrypt_attach_kdf_seconds_sum 0.3\n"), "{t}");
        assert!(t.contains("volcrypt_attach_dm_seconds_count{unlock=\"volcrypt\"} 1"));
        assert!(t.contains("volcrypt_attach_dm_seconds_sum{unlock=\"volcrypt\"} 0.04"));
        assert!(t.contains("volcrypt_attach_dm_seconds_sum{unlock=\"libcryptsetup\"} 0.5"));
        assert!(t.contains("volcrypt_detach_dm_seconds_count 1\n"), "{t}");
        assert!(t.contains(
            "volcrypt_operation_phase_seconds_sum{op=\"attach\",phase=\"journal\"} 0.003"
        ));
        assert!(t.contains(
            "volcrypt_operation_phase_seconds_count{op=\"attach\",phase=\"key_fetch\"} 2"
        ));
        assert!(!t.contains("phase=\"format\""), "no format phase ran: {t}");
        assert!(
            t.contains("volcrypt_operation_phase_seconds_count{op=\"detach\",phase=\"links\"} 1")
        );
    }

    #[test]
    fn accept_header_chooses_openmetrics_only_when_preferred() {
        use Format::*;
        let cases = [
            (None, Prometheus),
            (Some("*/*"), Prometheus),
            (Some("text/plain"), Prometheus),
            (Some("application/json"), Prometheus),
            (Some("application/openmetrics-text"), OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; version=1.0.0"),
                OpenMetrics,
            ),
            // What Prometheus 2.x sends.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                     version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                OpenMetrics,
            ),
            (
                Some("text/plain;version=0.0.4;q=0.9, application/openmetrics-text;q=0.5"),
                Prometheus,
            ),
            (Some("application/openmetrics-text;q=0"), Prometheus),
            (Some("application/openmetrics-text;q=bogus"), Prometheus),
        ];
        for (accept, want) in cases {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
        assert!(
            Prometheus
                .content_type()
                .starts_with("text/plain; version=0.0.4")
        );
        assert!(
            OpenMetrics
                .content_type()
                .starts_with("application/openmetrics-text; version=1.0.0")
        );
    }

    /// Every sample of the text format belongs to the family its TYPE line names (a histogram's
    /// `_bucket`/`_sum`/`_count` to the histogram, a counter's `_total` sample to a `_total`
    /// family), each family has one HELP and one TYPE, and nothing OpenMetrics-only is left.
    #[test]
    fn prometheus_text_names_counter_families_by_their_samples() {
        let m = Metrics::new();
        m.observe_operation("attach", 0.25, None);
        m.observe_operation("detach", 0.01, Some("busy"));
        m.request("/metrics", 200);
        m.rejected_peer();
        m.device_event("teardown");
        m.active_attachments.set(2);
        m.observe_verify("vol-1", 4096, 0, 1_700_000_000);
        m.observe_verify("vol-1", 512, 1, 1_700_000_100);
        m.observe_verify("vol-gone", 512, 0, 1_700_000_100);
        m.forget_volume("vol-gone");
        let t = m.encode(Format::Prometheus);
        assert!(
            t.contains("volcrypt_verify_bytes_total{volume_id=\"vol-1\"} 4608\n"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE volcrypt_verify_mismatches_total counter\n"),
            "{t}"
        );
        assert!(t.contains("volcrypt_verify_mismatches_total{volume_id=\"vol-1\"} 1\n"));
        assert!(t.contains(
            "# TYPE volcrypt_verify_last_timestamp_seconds gauge\n\
             volcrypt_verify_last_timestamp_seconds{volume_id=\"vol-1\"} 1700000100\n"
        ));
        assert!(
            !t.contains("vol-gone"),
            "a detached volume's series are dropped: {t}"
        );
        assert!(!t.contains("# EOF"), "{t}");
        assert!(!t.contains("# UNIT"), "{t}");
        assert!(t.contains("# HELP volcrypt_rejected_peers_total Connections refused"));
        assert!(t.contains(
            "# TYPE volcrypt_rejected_peers_total counter\nvolcrypt_rejected_peers_total 1\n"
        ));
        assert!(t.contains("# TYPE volcrypt_http_requests_total counter\n"));
        assert!(t.contains("volcrypt_http_requests_total{route=\"/metrics\",status=\"200\"} 1\n"));
        assert!(t.contains("# TYPE volcrypt_operation_duration_seconds histogram\n"));
        assert!(t.contains("volcrypt_active_attachments 2\n"));
        let mut families: std::collections::HashMap<String, (u32, u32, String)> =
            Default::default();
        for line in t.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                families.entry(name.to_owned()).or_default().0 += 1;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').unwrap();
                let f = families.entry(name.to_owned()).or_default();
                f.1 += 1;
                f.2 = ty.to_owned();
            } else {
                assert!(!line.starts_with('#'), "stray comment {line}");
                let name = line.split(['{', ' ']).next().unwrap();
                let family = families.get(name).map(|f| f.2.as_str()).or_else(|| {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .filter_map(|s| name.strip_suffix(s))
                        .find_map(|base| families.get(base).map(|f| f.2.as_str()))
                });
                assert!(
                    matches!(family, Some("counter" | "gauge" | "histogram")),
                    "sample {name} has no family: {t}"
                );
            }
        }
        for (name, (helps, types, _)) in &families {
            assert_eq!((helps, types), (&1, &1), "{name}: {t}");
        }
        // The OpenMetrics form of the same registry is the library's, with its terminator.
        let om = m.encode(Format::OpenMetrics);
        assert!(
            om.contains(
                "# TYPE volcrypt_rejected_peers counter\nvolcrypt_rejected_peers_total 1\n"
            )
        );
        assert!(om.ends_with("# EOF\n"));
        assert_eq!(to_prometheus_text(&om), t);
    }
}
