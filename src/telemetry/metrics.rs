//! Prometheus metrics: what the HTTP front observes (status classes,
//! latency) plus the pool's live counters, read at scrape time.

use super::HttpStats;
use crate::engine::stats::Shared;
use crate::service::admin::Readiness;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

/// The metrics of one server.
pub struct Metrics {
    registry: Registry,
    requests: Family<ClassLabel, Counter>,
    /// The family's counters, looked up once per class instead of once per
    /// request (a lookup takes the family's lock and hashes the label).
    by_class: [OnceLock<Counter>; 5],
    latency: Histogram,
    http: Arc<HttpStats>,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Metrics {
    /// Metrics of the pool counters in `shared` and the service state in
    /// `health`.
    pub fn new(shared: Shared, health: Arc<Readiness>) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("wasmpool");
        let requests = Family::<ClassLabel, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by status class",
            requests.clone(),
        );
        let latency = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ]);
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to sending its response head",
            latency.clone(),
        );
        let http = Arc::<HttpStats>::default();
        registry.register_collector(Box::new(StatsCollector(shared)));
        registry.register_collector(Box::new(HttpCollector(http.clone())));
        registry.register_collector(Box::new(HealthCollector(health)));
        Arc::new(Metrics {
            registry,
            requests,
            by_class: Default::default(),
            latency,
            http,
        })
    }

    /// The HTTP front's counters (connections, client timeouts, limits).
    pub fn http_stats(&self) -> &Arc<HttpStats> {
        &self.http
    }

    /// Records one answered request.
    pub fn observe(&self, status: http::StatusCode, elapsed: Duration) {
        let i = match status.as_u16() {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.by_class[i]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&ClassLabel { class: CLASSES[i] })
                    .clone()
            })
            .inc();
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[derive(Debug)]
struct StatsCollector(Shared);

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats.snapshot();
        let budget = &self.0.budget;
        let counters: [(&str, &str, u64); 11] = [
            (
                "instances_created",
                "Instances created",
                s.instances_created,
            ),
            (
                "instances_reused",
                "Requests served by an instance that had served one before",
                s.instances_reused,
            ),
            (
                "rejected",
                "Requests refused by backpressure (503)",
                s.rejected,
            ),
            (
                "timeouts",
                "Requests that hit the request timeout (504)",
                s.timeouts,
            ),
            ("traps", "Instances ended by a trap", s.traps),
            (
                "instantiation_failures",
                "Instances that failed to start",
                s.instantiation_failures,
            ),
            ("reloads", "Successful reloads", s.reloads),
            (
                "reload_failures",
                "Failed reloads (the previous component kept serving)",
                s.reload_failures,
            ),
            (
                "retried_requests",
                "Requests sent again to a fresh instance after failing on a reused one",
                s.retries,
            ),
            (
                "memory_refusals",
                "Memory growths and instantiations refused because the memory budget was spent",
                budget.refused(),
            ),
            (
                "reuse_fallbacks",
                "Times reuse = auto stopped reusing instances of a component that fails on them",
                s.reuse_fallbacks,
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let gauges: [(&str, &str, u64); 7] = [
            (
                "memory_budget_bytes",
                "Most memory the guests may hold (memory-budget)",
                budget.limit(),
            ),
            (
                "memory_used_bytes",
                "Memory the guests hold now: linear memories, buffered request bodies, and what idle instance slots keep resident past the headroom",
                budget.used(),
            ),
            (
                "memory_retained_bytes",
                "Memory idle instance slots keep resident past the headroom (part of memory_used_bytes)",
                budget.retained(),
            ),
            ("instances_live", "Instances alive now", s.instances_live),
            ("queue_depth", "Requests waiting for a free slot", s.queued),
            (
                "in_flight_requests",
                "Requests admitted and not finished",
                s.in_flight,
            ),
            (
                "instances_peak",
                "Most instances alive at once",
                s.instances_peak,
            ),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(v as i64);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// `ready` (what `/readyz` answers) and `draining` (from SIGTERM on).
#[derive(Debug)]
struct HealthCollector(Arc<Readiness>);

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges = [
            (
                "ready",
                "1 while /readyz answers 200 (serving, no shutdown begun)",
                self.0.is_ready(),
            ),
            (
                "draining",
                "1 from SIGTERM on: during the shutdown delay and the drain",
                self.0.is_draining(),
            ),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(v as i64);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct HttpCollector(Arc<HttpStats>);

impl Collector for HttpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let h = &self.0;
        let counters = [
            ("connections", "Connections accepted", &h.connections),
            (
                "connections_evicted",
                "Idle connections closed to make room for new ones",
                &h.evicted,
            ),
            (
                "connections_refused_per_client",
                "Connections refused because their client held max-connections-per-client",
                &h.refused_per_client,
            ),
            (
                "requests_refused_per_client",
                "Requests refused (429) because their client had max-requests-per-client in flight",
                &h.requests_refused_per_client,
            ),
            (
                "header_timeouts",
                "Connections closed because a request head did not arrive within header-read-timeout",
                &h.header_timeouts,
            ),
            (
                "body_timeouts",
                "Requests ended (408) because their body arrived too slowly",
                &h.body_timeouts,
            ),
            (
                "send_timeouts",
                "Connections closed because the client read too slowly (send-timeout, send-min-rate)",
                &h.send_timeouts,
            ),
            (
                "tls_handshake_failures",
                "TLS handshakes that failed or did not finish in time",
                &h.tls_failures,
            ),
            (
                "keepalive_closes",
                "Idle keep-alive connections closed after keepalive-timeout",
                &h.keepalive_closes,
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v.load(Relaxed));
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let c = ConstCounter::new(super::access::lost_lines());
        c.encode(encoder.encode_descriptor(
            "access_log_lost_lines",
            "Access log lines that could not be written (the output failed)",
            None,
            c.metric_type(),
        )?)?;
        for (name, help, v) in [
            (
                "trace_spans_dropped",
                "Spans not exported: the export queue was full or the collector failed the batch",
                &super::trace::export::DROPPED,
            ),
            (
                "trace_spans_exported",
                "Spans the OTLP collector accepted",
                &super::trace::export::EXPORTED,
            ),
        ] {
            let c = ConstCounter::new(v.load(Relaxed));
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let g = ConstGauge::new(h.connections_open.load(Relaxed) as i64);
        g.encode(encoder.encode_descriptor(
            "connections_open",
            "Connections open now",
            None,
            g.metric_type(),
        )?)?;
        Ok(())
    }
}
