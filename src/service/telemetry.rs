//! The relay's own logs and spans: text or JSON lines on stderr, and, when
//! `telemetry.otlp_endpoint` is set, its spans (one per batch, with its counts) exported over
//! OTLP/HTTP so a trace can show the relay beside the writer and the consumer.
//!
//! Payloads never reach either unless `log.payloads` asks for them.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat};

/// Keeps the span exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the global subscriber: the log format and level of `config` (`RUST_LOG` wins
    /// over `log.level`), plus the OTLP exporter if configured.
    pub fn init(config: &Config) -> Result<Telemetry, String> {
        // RUST_LOG, when set, wins over log.level: it is the usual way to turn up logging briefly.
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
        // Colour only for a person at a terminal; log files and collectors get plain text.
        let colour = std::io::stderr().is_terminal();
        let logs = match config.log.format {
            LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(colour).boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed(),
        };
        let (provider, spans) = match &config.telemetry.otlp_endpoint {
            Some(endpoint) => {
                let provider = otlp_provider(endpoint)?;
                let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("outbox-relay"));
                (Some(provider), Some(layer))
            }
            None => (None, None),
        };
        tracing_subscriber::registry()
            .with(filter)
            .with(logs)
            .with(spans)
            .try_init()
            .map_err(|e| format!("cannot install logging: {e}"))?;
        Ok(Telemetry { provider })
    }

    /// Sends the spans still buffered.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("outbox-relay: exporting the last spans failed: {e}");
        }
    }
}

fn otlp_provider(endpoint: &str) -> Result<SdkTracerProvider, String> {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint: cannot set up the OTLP exporter: {e}"))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("outbox-relay").build())
        .build())
}
