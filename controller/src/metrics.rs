//! Prometheus metrics on `listen.metrics`, in the OpenMetrics text format.
//! They are read at scrape time from the same figures `status` reports,
//! so there is one source of truth and nothing to keep in step.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walbridge_daemon::metrics::{encode, float_gauge, gauge, label, set_float_gauge, set_gauge};

use crate::runner::Runner;

/// Serves `GET /metrics` until `shutdown`.
pub async fn serve(listener: TcpListener, runner: Arc<Runner>, tasks: TaskTracker, shutdown: CancellationToken) {
    let render = move || {
        let runner = runner.clone();
        async move { render(&runner).await }
    };
    walbridge_daemon::metrics::serve(listener, render, tasks, shutdown).await;
}

/// The metrics text of this moment. A figure that cannot be known now
/// (lag while the agent is away) is left out, never reported as 0.
pub async fn render(runner: &Runner) -> Result<String, String> {
    let status = crate::status::status(runner)
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

    if let Some(lag) = status.lag_bytes {
        set_gauge(
            &mut registry,
            "walbridge_replication_lag_bytes",
            "Source WAL position minus the slot's confirmed one",
            lag as i64,
        );
    }
    if let Some(lag) = status.lag_seconds {
        set_float_gauge(
            &mut registry,
            "walbridge_replication_lag_seconds",
            "How long ago the source was where the subscriber has confirmed now",
            lag,
        );
    }
    if let Some(age) = status.reply_age_seconds {
        set_float_gauge(
            &mut registry,
            "walbridge_subscriber_reply_age_seconds",
            "Seconds since the subscriber last reported its position to the source",
            age,
        );
    }
    if let Some(safe) = status.safe_wal_bytes {
        set_gauge(
            &mut registry,
            "walbridge_slot_safe_wal_bytes",
            "WAL the source may still write before max_slot_wal_keep_size invalidates the slot: alert near 0",
            safe,
        );
    }
    if let Some(retained) = status.retained_wal_bytes {
        set_gauge(
            &mut registry,
            "walbridge_retained_wal_bytes",
            "WAL the slot holds on the source",
            retained as i64,
        );
    }
    set_gauge(
        &mut registry,
        "walbridge_retries",
        "Units of work being retried after transient faults (status lists them)",
        status.retries.len() as i64,
    );
    set_gauge(
        &mut registry,
        "walbridge_subscription_streaming",
        "Whether the subscription's worker streams now",
        i64::from(status.subscription == "streaming"),
    );
    set_gauge(
        &mut registry,
        "walbridge_subscription_errors",
        "Errors the subscription's workers hit applying changes (PostgreSQL 15+)",
        status.subscription_errors as i64,
    );
    set_gauge(
        &mut registry,
        "walbridge_warnings",
        "Health warnings now (status lists them)",
        status.warnings.len() as i64,
    );
    set_gauge(
        &mut registry,
        "walbridge_migration_errors",
        "Errors of the migration (status lists them)",
        status.errors.len() as i64,
    );

    let connected = gauge(
        &mut registry,
        "walbridge_agent_connected",
        "1 for each agent connected now",
    );
    let agents = runner.ctx().registry.list();
    for agent in &agents {
        connected.get_or_create(&label("agent", &agent.name)).set(1);
    }
    // The migration's own agent is listed even while it is away.
    if !status.agent.is_empty() && !agents.iter().any(|a| a.name == status.agent) {
        connected.get_or_create(&label("agent", &status.agent)).set(0);
    }

    if let Some(cutover) = &status.cutover {
        let total = cutover.steps.iter().map(|s| s.seconds).sum();
        set_float_gauge(
            &mut registry,
            "walbridge_cutover_seconds",
            "The last cutover, all its steps",
            total,
        );
        set_float_gauge(
            &mut registry,
            "walbridge_cutover_write_downtime_seconds",
            "The last cutover's write downtime",
            cutover.write_downtime_seconds,
        );
        set_gauge(
            &mut registry,
            "walbridge_cutover_done",
            "Whether the last cutover completed",
            i64::from(cutover.done),
        );
    }

    encode(&registry)
}
