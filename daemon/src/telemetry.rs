//! Logs and traces: `tracing` to stderr (human-readable or JSON), and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over OTLP.
//!
//! Trace context crosses the agent link as W3C `traceparent` gRPC metadata:
//! the caller injects it with [`inject_context`], the callee continues the
//! trace with [`continue_trace`].

use std::str::FromStr;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::Setting;

pub const LOG_FORMAT: &str = "log.format";

/// The `log.format` setting, shared by both daemons.
pub const LOG_SETTINGS: [Setting; 1] = [Setting {
    key: LOG_FORMAT,
    help: "how logs are written to stderr: human or json (RUST_LOG filters them, default info)",
    value_name: "FORMAT",
    default: Some("human"),
}];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format: use human or json")),
        }
    }
}

/// Holds the trace exporter; call [`Telemetry::shutdown`] before exit so
/// that buffered spans are sent.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber for a daemon named `service`.
pub fn init(service: &'static str, format: LogFormat) -> Telemetry {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let mut export_problem = None;
    let provider = match std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Some(_) => match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
            Ok(exporter) => Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(service)
                            .build(),
                    )
                    .build(),
            ),
            Err(e) => {
                export_problem = Some(e.to_string());
                None
            }
        },
        None => None,
    };
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            .with_filter(filter())
    });
    tracing_subscriber::registry().with(logs).with(traces).init();
    if let Some(problem) = export_problem {
        tracing::warn!(%problem, "OTEL_EXPORTER_OTLP_ENDPOINT is set but spans cannot be exported");
    }
    Telemetry { provider }
}

impl Telemetry {
    /// Sends the spans still buffered. The exporter blocks, so it runs off
    /// the async runtime's threads (on the runtime, spans are lost).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Puts the current span's trace context into an outgoing request.
pub fn inject_context(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// Makes `span` a child of the trace context that came with a request.
pub fn continue_trace(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let parent =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&MetadataExtractor(metadata)));
    // Without a tracing-opentelemetry layer there is nothing to attach to.
    let _ = span.set_parent(parent);
}

/// A tonic interceptor that puts the current trace context on every call,
/// so the callee's spans join the caller's trace.
#[derive(Debug, Clone, Copy, Default)]
pub struct PropagateTrace;

impl tonic::service::Interceptor for PropagateTrace {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject_context(request.metadata_mut());
        Ok(request)
    }
}
