//! Serving Prometheus metrics (OpenMetrics text) at `/metrics`, for both
//! daemons: each renders its own figures at scrape time.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const LISTEN_METRICS: &str = "listen.metrics";

/// The setting both daemons share.
pub const METRICS_SETTING: crate::settings::Setting = crate::settings::Setting {
    key: LISTEN_METRICS,
    help: "where Prometheus scrapes /metrics, HOST:PORT (plain HTTP: keep it private) [default: off]",
    value_name: "HOST:PORT",
    default: None,
};

/// Binds `listen.metrics` if it is set; a port in use is a settings error.
pub fn bind(
    address: Option<std::net::SocketAddr>,
) -> Result<Option<std::net::TcpListener>, crate::settings::SettingError> {
    address
        .map(|address| crate::net::bind(LISTEN_METRICS, address))
        .transpose()
}

pub type Labels = Vec<(String, String)>;
pub type FloatGauge = Gauge<f64, AtomicU64>;

pub fn gauge(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

pub fn float_gauge(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, FloatGauge> {
    let family = Family::<Labels, FloatGauge>::default();
    registry.register(name, help, family.clone());
    family
}

/// A metric without labels, set to `value`.
pub fn set_gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let gauge = Gauge::<i64>::default();
    gauge.set(value);
    registry.register(name, help, gauge);
}

/// A fractional metric without labels, set to `value`.
pub fn set_float_gauge(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let gauge = FloatGauge::default();
    gauge.set(value);
    registry.register(name, help, gauge);
}

pub fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_owned(), value.to_owned())]
}

/// Encodes a registry as OpenMetrics text.
pub fn encode(registry: &Registry) -> Result<String, String> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).map_err(|e| e.to_string())?;
    Ok(text)
}

/// Serves `GET /metrics` with what `render` returns, until `shutdown`.
pub async fn serve<R, F>(listener: TcpListener, render: R, tasks: TaskTracker, shutdown: CancellationToken)
where
    R: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<String, String>> + Send + 'static,
{
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let render = render.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(request.uri().path(), render).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

async fn answer<R, F>(path: &str, render: R) -> Response<Full<Bytes>>
where
    R: Fn() -> F,
    F: Future<Output = Result<String, String>>,
{
    let (status, content_type, body) = if path == "/metrics" {
        match render().await {
            Ok(text) => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                text,
            ),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e),
        }
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "metrics are at /metrics\n".to_owned(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
