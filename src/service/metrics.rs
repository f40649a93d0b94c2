//! Metric definitions and the HTTP endpoint that serves them in Prometheus text format, beside
//! the `/healthz` and `/readyz` probes.
//!
//! Each relay owns its own registry (no process globals), so several relays in one test
//! process do not mix their numbers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::config::HealthConfig;
use crate::service::health::{Health, Verdict};
use crate::service::shutdown::Shutdown;

/// Every `reason` label of `outbox_relay_publish_errors_total`: what a delivery error can be
/// classified as by the publisher, plus `invalid_row` for rows that cannot become
/// a record at all. They start at zero so that dashboards see the series from the
/// first scrape.
pub const PUBLISH_ERROR_REASONS: &[&str] = &[
    "message_timeout",
    "queue_full",
    "unknown_topic",
    "message_too_large",
    "not_authorized",
    "invalid_record",
    "broker_unavailable",
    "producer_fenced",
    "producer_closed",
    "invalid_row",
    "partition_out_of_range",
    "other",
];

/// The relay's metrics. Names and labels are documented in the README; change both together.
pub struct Metrics {
    registry: Registry,
    /// `outbox_relay_published_total{topic}`: records the broker acknowledged and whose rows
    /// were then marked.
    pub published: IntCounterVec,
    /// `outbox_relay_publish_errors_total{reason}`: records that failed, by reason.
    pub publish_errors: IntCounterVec,
    /// `outbox_relay_batch_duration_seconds`: claim to mark, per batch.
    pub batch_duration: Histogram,
    /// `outbox_relay_pending_rows`: unpublished rows at the last stats query.
    pub pending_rows: IntGauge,
    /// `outbox_relay_oldest_pending_age_seconds`: age of the oldest unpublished row (0 when
    /// none is pending).
    pub oldest_pending_age: Gauge,
    /// `outbox_relay_failed_rows`: rows the relay gave up on (until `outbox-relay retry`).
    pub failed_rows: IntGauge,
    /// `outbox_relay_failing_rows`: rows failing with errors of their own, retried after a
    /// backoff until `relay.max_attempts`.
    pub failing_rows: IntGauge,
    /// `outbox_relay_held_rows`: pending rows waiting for an open transaction that began
    /// before they were inserted.
    pub held_rows: IntGauge,
    /// `outbox_relay_watermark_holdback_seconds`: how long the open transaction holding rows
    /// back has been open (0 when nothing is held back).
    pub watermark_holdback: Gauge,
    /// `outbox_relay_shards_owned`: shards this relay publishes.
    pub shards_owned: IntGauge,
    /// `outbox_relay_batch_size`: rows claimed per batch.
    pub batch_size: Histogram,
    /// `outbox_relay_delivery_latency_seconds`: from a row's creation to the broker's
    /// acknowledgement of its record (with exactly-once delivery, to its transaction's commit).
    pub delivery_latency: Histogram,
    /// `outbox_relay_producer_restarts_total`: new producer sessions started to recover.
    pub producer_restarts: IntCounter,
    /// `outbox_relay_key_order_breaks_total`: records acknowledged after an earlier record of
    /// their key in the same batch failed at the broker (the one case per-key order does not
    /// cover; see the README).
    pub key_order_breaks: IntCounter,
    /// `outbox_relay_table_changes_total{change}`: operator changes to the table the relay
    /// noticed and recovered from: `replaced` (its name resolved to another table: renamed and
    /// recreated, restored from a dump), `ids_reused` (truncated, or its sequence set back,
    /// under the claim floor).
    pub table_changes: IntCounterVec,
    /// `outbox_relay_stalled_records{topic,partition}`: records set aside unacknowledged
    /// because their partition stalled (`?` for a partition the relay cannot tell).
    pub stalled_records: IntGaugeVec,
    /// `outbox_relay_retention_deleted_total`: published rows deleted by retention.
    pub retention_deleted: IntCounter,
    /// `outbox_relay_kafka_queue_messages`: records in librdkafka's queue (sent or waiting).
    pub kafka_queue_messages: IntGauge,
    /// `outbox_relay_kafka_brokers_up`: brokers librdkafka is connected to.
    pub kafka_brokers_up: IntGauge,
    /// `outbox_relay_kafka_broker_rtt_seconds{broker}`: average request round-trip time.
    pub kafka_broker_rtt: GaugeVec,
    /// `outbox_relay_retries_total{kind}`: failed attempts after which the row stays queued
    /// for another try; `kind` is `row` (caused by the row) or `outage` (broker unreachable).
    pub retries: IntCounterVec,
    /// `outbox_relay_transactions_total`: Kafka transactions ended, by outcome (committed,
    /// aborted), with `kafka.delivery = "exactly_once"`.
    pub transactions: IntCounterVec,
    /// `outbox_relay_transaction_commit_seconds`: how long committing a transaction took.
    pub transaction_commit: Histogram,
}

impl Metrics {
    /// Records published so far, over every topic.
    pub fn published_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.published
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|metric| metric.get_counter().value() as u64)
            .sum()
    }

    /// Creates the metrics in a fresh registry.
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let published = IntCounterVec::new(
            Opts::new("outbox_relay_published_total", "Records acknowledged by the broker and marked published."),
            &["topic"],
        )
        .expect("static metric definition");
        let publish_errors = IntCounterVec::new(
            Opts::new("outbox_relay_publish_errors_total", "Records that could not be published, by reason."),
            &["reason"],
        )
        .expect("static metric definition");
        let batch_duration = Histogram::with_opts(
            HistogramOpts::new("outbox_relay_batch_duration_seconds", "Time from claiming a batch to marking it.")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .expect("static metric definition");
        let pending_rows = IntGauge::new("outbox_relay_pending_rows", "Unpublished rows in the outbox table.")
            .expect("static metric definition");
        let oldest_pending_age = Gauge::new(
            "outbox_relay_oldest_pending_age_seconds",
            "Age of the oldest unpublished row; 0 when none is pending.",
        )
        .expect("static metric definition");
        let failed_rows = IntGauge::new("outbox_relay_failed_rows", "Rows the relay gave up on, until re-queued.")
            .expect("static metric definition");
        let failing_rows = IntGauge::new(
            "outbox_relay_failing_rows",
            "Rows failing with errors of their own (not an outage), retried after a backoff.",
        )
        .expect("static metric definition");
        let held_rows = IntGauge::new(
            "outbox_relay_held_rows",
            "Pending rows waiting for an open transaction that began before they were inserted.",
        )
        .expect("static metric definition");
        let watermark_holdback = Gauge::new(
            "outbox_relay_watermark_holdback_seconds",
            "How long the open transaction holding rows back has been open; 0 when none is.",
        )
        .expect("static metric definition");
        let shards_owned = IntGauge::new("outbox_relay_shards_owned", "Shards of the table this relay publishes.")
            .expect("static metric definition");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("outbox_relay_batch_size", "Rows claimed per batch.")
                .buckets(vec![1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0]),
        )
        .expect("static metric definition");
        let delivery_latency = Histogram::with_opts(
            HistogramOpts::new(
                "outbox_relay_delivery_latency_seconds",
                "From a row's creation to the broker's acknowledgement of its record (with exactly-once delivery, to its transaction's commit).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 300.0, 1800.0,
            ]),
        )
        .expect("static metric definition");
        let producer_restarts = IntCounter::new(
            "outbox_relay_producer_restarts_total",
            "New producer sessions started to recover from a broker that refused the old one.",
        )
        .expect("static metric definition");
        let key_order_breaks = IntCounter::new(
            "outbox_relay_key_order_breaks_total",
            "Records acknowledged after an earlier record of their key in the same batch failed at the broker.",
        )
        .expect("static metric definition");
        let table_changes = IntCounterVec::new(
            Opts::new(
                "outbox_relay_table_changes_total",
                "Changes to the outbox table the relay noticed and recovered from (replaced, ids_reused).",
            ),
            &["change"],
        )
        .expect("static metric definition");
        for change in ["replaced", "ids_reused"] {
            table_changes.with_label_values(&[change]);
        }
        let stalled_records = IntGaugeVec::new(
            Opts::new(
                "outbox_relay_stalled_records",
                "Records set aside unacknowledged because their partition stalled, by topic and partition.",
            ),
            &["topic", "partition"],
        )
        .expect("static metric definition");
        let retention_deleted =
            IntCounter::new("outbox_relay_retention_deleted_total", "Published rows deleted by retention.")
                .expect("static metric definition");
        let kafka_queue_messages = IntGauge::new(
            "outbox_relay_kafka_queue_messages",
            "Records in librdkafka's queue, sent or waiting to be (from its statistics).",
        )
        .expect("static metric definition");
        let kafka_brokers_up = IntGauge::new("outbox_relay_kafka_brokers_up", "Brokers librdkafka is connected to.")
            .expect("static metric definition");
        let kafka_broker_rtt = GaugeVec::new(
            Opts::new("outbox_relay_kafka_broker_rtt_seconds", "Average request round-trip time per broker."),
            &["broker"],
        )
        .expect("static metric definition");
        let retries = IntCounterVec::new(
            Opts::new(
                "outbox_relay_retries_total",
                "Failed attempts after which the row stays queued for another try, by kind (row, outage).",
            ),
            &["kind"],
        )
        .expect("static metric definition");
        for kind in ["row", "outage"] {
            retries.with_label_values(&[kind]);
        }
        let transactions = IntCounterVec::new(
            Opts::new(
                "outbox_relay_transactions_total",
                "Kafka transactions ended, by outcome (committed, aborted), with kafka.delivery = exactly_once.",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        for outcome in ["committed", "aborted"] {
            transactions.with_label_values(&[outcome]);
        }
        let transaction_commit = Histogram::with_opts(
            HistogramOpts::new("outbox_relay_transaction_commit_seconds", "Time to commit one Kafka transaction.")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .expect("static metric definition");
        let build_info = IntGaugeVec::new(
            Opts::new("outbox_relay_build_info", "Always 1; the labels say which build is running."),
            &["version"],
        )
        .expect("static metric definition");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for collector in [
            Box::new(published.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(publish_errors.clone()),
            Box::new(batch_duration.clone()),
            Box::new(pending_rows.clone()),
            Box::new(oldest_pending_age.clone()),
            Box::new(failed_rows.clone()),
            Box::new(failing_rows.clone()),
            Box::new(held_rows.clone()),
            Box::new(watermark_holdback.clone()),
            Box::new(shards_owned.clone()),
            Box::new(batch_size.clone()),
            Box::new(delivery_latency.clone()),
            Box::new(producer_restarts.clone()),
            Box::new(key_order_breaks.clone()),
            Box::new(table_changes.clone()),
            Box::new(stalled_records.clone()),
            Box::new(retention_deleted.clone()),
            Box::new(kafka_queue_messages.clone()),
            Box::new(kafka_brokers_up.clone()),
            Box::new(kafka_broker_rtt.clone()),
            Box::new(retries.clone()),
            Box::new(transactions.clone()),
            Box::new(transaction_commit.clone()),
            Box::new(build_info),
        ] {
            registry.register(collector).expect("metric names are unique");
        }
        for reason in PUBLISH_ERROR_REASONS {
            publish_errors.with_label_values(&[*reason]);
        }
        Arc::new(Metrics {
            registry,
            published,
            publish_errors,
            batch_duration,
            pending_rows,
            oldest_pending_age,
            failed_rows,
            failing_rows,
            held_rows,
            watermark_holdback,
            shards_owned,
            batch_size,
            delivery_latency,
            producer_restarts,
            key_order_breaks,
            table_changes,
            stalled_records,
            retention_deleted,
            kafka_queue_messages,
            kafka_brokers_up,
            kafka_broker_rtt,
            retries,
            transactions,
            transaction_commit,
        })
    }

    /// The metrics in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding our own well-formed metrics into a Vec does not fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

/// A failure to open the metrics endpoint.
#[derive(Debug, thiserror::Error)]
#[error("metrics.listen: cannot listen on {addr}: {source}")]
pub struct ServeError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// What the HTTP endpoint serves.
#[derive(Clone)]
struct Endpoint {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    config: HealthConfig,
}

/// Binds `addr` now (so a taken port fails at startup) and serves `/metrics`, `/healthz` and
/// `/readyz` until shutdown. Returns the bound address, which differs from `addr` when its port
/// is 0.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    config: HealthConfig,
    shutdown: Shutdown,
) -> Result<SocketAddr, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError { addr, source })?;
    let bound = listener.local_addr().map_err(|source| ServeError { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Endpoint { metrics, health, config });
    tokio::spawn(async move {
        let stopped = async move { shutdown.requested().await };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");
    Ok(bound)
}

async fn render_metrics(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], endpoint.metrics.render())
}

async fn healthz(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    verdict_response(endpoint.health.alive(endpoint.config.liveness_timeout))
}

async fn readyz(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    verdict_response(endpoint.health.ready(&endpoint.config))
}

/// 200 or 503, with the verdict as JSON so a person running curl sees why.
fn verdict_response(verdict: Verdict) -> impl IntoResponse {
    let status = if verdict.ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::to_string(&verdict).unwrap_or_else(|_| String::from("{}"));
    (status, [(CONTENT_TYPE, "application/json")], body)
}
