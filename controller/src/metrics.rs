//! Prometheus metrics on `listen.metrics`, in the OpenMetrics text format.
//! They are read at scrape time from the same figures `status` reports,
//! so there is one source of truth and nothing to keep in step.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::migration::Migrations;
use crate::operations;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Serves `GET /metrics` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    migrations: Arc<Migrations>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
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
        let migrations = migrations.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let migrations = migrations.clone();
                async move { Ok::<_, Infallible>(answer(&migrations, request.uri().path()).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

async fn answer(migrations: &Migrations, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if path == "/metrics" {
        match render(migrations).await {
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

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

fn float_gauge(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, FloatGauge> {
    let family = Family::<Labels, FloatGauge>::default();
    registry.register(name, help, family.clone());
    family
}

fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_owned(), value.to_owned())]
}

/// The metrics text of this moment.
pub async fn render(migrations: &Migrations) -> Result<String, String> {
    let status = operations::status(migrations)
        .await
        .map_err(|s| s.message().to_owned())?;
    let mut registry = Registry::default();

    let phase = gauge(
        &mut registry,
        "walbridge_migration_phase",
        "1 for the migration's current phase",
    );
    phase.get_or_create(&label("phase", &status.phase)).set(1);

    let rows = gauge(&mut registry, "walbridge_table_rows", "Rows copied, per table");
    let bytes = gauge(
        &mut registry,
        "walbridge_table_bytes",
        "Bytes of COPY data copied, per table",
    );
    let rate = float_gauge(
        &mut registry,
        "walbridge_table_copy_bytes_per_second",
        "Copy throughput of each finished table",
    );
    for table in &status.tables {
        let labels = label("table", &table.name);
        rows.get_or_create(&labels).set(table.rows as i64);
        bytes.get_or_create(&labels).set(table.bytes as i64);
        if table.copy_seconds > 0.0 {
            rate.get_or_create(&labels).set(table.bytes as f64 / table.copy_seconds);
        }
    }

    let none = Labels::new();
    gauge(
        &mut registry,
        "walbridge_replication_lag_bytes",
        "Source WAL position minus the slot's confirmed one",
    )
    .get_or_create(&none)
    .set(status.lag_bytes as i64);
    float_gauge(
        &mut registry,
        "walbridge_replication_lag_seconds",
        "The walsender's replay lag",
    )
    .get_or_create(&none)
    .set(status.lag_seconds);
    gauge(
        &mut registry,
        "walbridge_retained_wal_bytes",
        "WAL the slot holds on the source",
    )
    .get_or_create(&none)
    .set(status.retained_wal_bytes as i64);
    gauge(
        &mut registry,
        "walbridge_subscription_streaming",
        "1 while the subscription's worker streams",
    )
    .get_or_create(&none)
    .set(i64::from(status.subscription == "streaming"));
    gauge(
        &mut registry,
        "walbridge_warnings",
        "Health warnings now (status lists them)",
    )
    .get_or_create(&none)
    .set(status.warnings.len() as i64);
    gauge(
        &mut registry,
        "walbridge_migration_errors",
        "Errors of the migration (status lists them)",
    )
    .get_or_create(&none)
    .set(status.errors.len() as i64);

    let connected = gauge(
        &mut registry,
        "walbridge_agent_connected",
        "1 for each agent connected now",
    );
    let agents = migrations.registry().list();
    for agent in &agents {
        connected.get_or_create(&label("agent", &agent.name)).set(1);
    }
    // The migration's own agent is listed even while it is away.
    if !status.agent.is_empty() && !agents.iter().any(|a| a.name == status.agent) {
        connected.get_or_create(&label("agent", &status.agent)).set(0);
    }

    if let Some(cutover) = &status.cutover {
        float_gauge(
            &mut registry,
            "walbridge_cutover_seconds",
            "The last cutover, all its steps",
        )
        .get_or_create(&none)
        .set(cutover.steps.iter().map(|s| s.seconds).sum());
        float_gauge(
            &mut registry,
            "walbridge_cutover_write_downtime_seconds",
            "The last cutover's write downtime",
        )
        .get_or_create(&none)
        .set(cutover.write_downtime_seconds);
        gauge(
            &mut registry,
            "walbridge_cutover_done",
            "1 when the last cutover completed",
        )
        .get_or_create(&none)
        .set(i64::from(cutover.done));
    }

    let mut text = String::new();
    encode(&mut text, &registry).map_err(|e| e.to_string())?;
    Ok(text)
}
