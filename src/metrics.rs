//! Metric definitions and the HTTP endpoint that serves them in Prometheus text format.
//!
//! Each relay owns its own registry (no process globals), so several relays in one test
//! process do not mix their numbers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Gauge, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::shutdown::Shutdown;

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
    /// `outbox_relay_held_rows`: pending rows waiting for an open transaction that began
    /// before they were inserted.
    pub held_rows: IntGauge,
    /// `outbox_relay_watermark_holdback_seconds`: how long the open transaction holding rows
    /// back has been open (0 when nothing is held back).
    pub watermark_holdback: Gauge,
    /// `outbox_relay_shards_owned`: shards this relay publishes.
    pub shards_owned: IntGauge,
}

impl Metrics {
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
        for collector in [
            Box::new(published.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(publish_errors.clone()),
            Box::new(batch_duration.clone()),
            Box::new(pending_rows.clone()),
            Box::new(oldest_pending_age.clone()),
            Box::new(failed_rows.clone()),
            Box::new(held_rows.clone()),
            Box::new(watermark_holdback.clone()),
            Box::new(shards_owned.clone()),
        ] {
            registry.register(collector).expect("metric names are unique");
        }
        for reason in crate::publisher::ERROR_REASONS {
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
            held_rows,
            watermark_holdback,
            shards_owned,
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

/// Binds `addr` now (so a taken port fails at startup) and serves `/metrics` until shutdown.
/// Returns the bound address, which differs from `addr` when its port is 0.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, shutdown: Shutdown) -> Result<SocketAddr, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError { addr, source })?;
    let bound = listener.local_addr().map_err(|source| ServeError { addr, source })?;
    let app = Router::new().route("/metrics", get(render_metrics)).with_state(metrics);
    tokio::spawn(async move {
        let stopped = async move { shutdown.requested().await };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "serving metrics at /metrics");
    Ok(bound)
}

async fn render_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.render())
}
