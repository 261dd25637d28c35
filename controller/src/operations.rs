//! What the API's migration calls do: preflight on both sides, starting a
//! migration (checks first, so a refused start creates nothing on either
//! side), its status, and verification. Errors are tonic statuses whose
//! code tells the CLI its exit status: `InvalidArgument` is bad input (2),
//! anything else a failed operation (1).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use walbridge_migration::finding::{Extension, Finding, SourceFacts};
use walbridge_migration::ident::QualifiedName;
use walbridge_migration::selection::{self, Selection};
use walbridge_proto::convert::{name_from_wire, name_to_wire};
use walbridge_proto::v1 as wire;

use crate::migration::{APPLICATION_NAME, MigrationRecord, Migrations, Phase};
use crate::plan::plan;
use crate::registry::AgentClient;
use crate::transfer;

/// Tables verified at once by `verify`.
const VERIFY_PARALLEL: usize = 4;

pub fn selection_from_wire(selection: Option<wire::TableSelection>) -> Selection {
    let selection = selection.unwrap_or_default();
    Selection {
        tables: selection.tables,
        exclude: selection.exclude,
    }
}

fn agent_client(migrations: &Migrations, name: &str) -> Result<AgentClient, Status> {
    if let Some(agent) = migrations.registry().get(name) {
        return Ok(agent.client);
    }
    let connected: Vec<String> = migrations.registry().list().into_iter().map(|a| a.name).collect();
    Err(Status::not_found(format!(
        "no agent named {name:?} is connected (connected: {})",
        if connected.is_empty() {
            "none".to_owned()
        } else {
            connected.join(", ")
        }
    )))
}

/// Source checks through the agent, then target checks here.
pub async fn preflight(
    migrations: &Migrations,
    agent: &AgentClient,
    tables: &[QualifiedName],
) -> Result<Vec<Finding>, Status> {
    let source = agent
        .clone()
        .preflight(wire::SourcePreflightRequest {
            tables: tables.iter().cloned().map(name_to_wire).collect(),
        })
        .await?
        .into_inner();
    let facts = SourceFacts {
        server_version_num: source.server_version_num,
        database_size_bytes: source.database_size_bytes,
        extensions: source
            .extensions
            .into_iter()
            .map(|e| Extension {
                name: e.name,
                version: e.version,
            })
            .collect(),
        tables: source.tables.into_iter().map(name_from_wire).collect(),
    };
    let mut findings: Vec<Finding> = source.findings.into_iter().map(Finding::from).collect();
    let target = migrations
        .target()
        .ok_or_else(|| Status::failed_precondition("target.url is not set on the controller"))?;
    let client = target
        .connect(APPLICATION_NAME)
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach the target: {e}")))?;
    findings.extend(
        crate::preflight::check_target(&client, &facts)
            .await
            .map_err(|e| Status::internal(format!("target preflight failed: {}", transfer::db_message(&e))))?,
    );
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    Ok(findings)
}

async fn catalog(agent: &AgentClient) -> Result<Vec<wire::SourceTable>, Status> {
    Ok(agent
        .clone()
        .list_tables(wire::ListTablesRequest {})
        .await?
        .into_inner()
        .tables)
}

fn bad_selection(e: selection::SelectionError) -> Status {
    Status::invalid_argument(e.to_string())
}

pub async fn preflight_call(migrations: &Migrations, request: wire::PreflightRequest) -> Result<Vec<Finding>, Status> {
    let agent = agent_client(migrations, &request.agent)?;
    let selection = selection_from_wire(request.selection);
    let planned = plan(catalog(&agent).await?, &selection, migrations.split_bytes()).map_err(bad_selection)?;
    preflight(migrations, &agent, &planned.publication_tables).await
}

/// Checks everything, records the migration, and starts running it.
pub async fn start(
    migrations: &Arc<Migrations>,
    request: wire::StartRequest,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<wire::StartResponse, Status> {
    let agent = agent_client(migrations, &request.agent)?;
    if migrations.target().is_none() {
        return Err(Status::failed_precondition("target.url is not set on the controller"));
    }
    if let Some(current) = migrations.current().map_err(|e| Status::internal(e.to_string()))?
        && current.phase.is_running()
    {
        return Err(Status::failed_precondition(format!(
            "migration {} is already running (phase {})",
            current.id,
            current.phase.name()
        )));
    }
    let selection = selection_from_wire(request.selection);
    let planned = plan(catalog(&agent).await?, &selection, migrations.split_bytes()).map_err(bad_selection)?;
    let findings = preflight(migrations, &agent, &planned.publication_tables).await?;
    let errors: Vec<String> = findings
        .iter()
        .filter(|f| f.is_error())
        .map(|f| format!("{} {}: {}", f.check, f.object, f.message))
        .collect();
    if !errors.is_empty() {
        return Err(Status::failed_precondition(format!(
            "preflight found {} error(s); nothing was created. Run `walbridge preflight` for the fixes.\n{}",
            errors.len(),
            errors.join("\n")
        )));
    }
    let parallel = match request.parallel {
        0 => {
            let hello = crate::link::hello(&agent).await.map_err(Status::unavailable)?;
            hello.host_cpus.clamp(2, 16)
        }
        n => n,
    };
    let id = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    );
    let name = crate::migration::slot_name(&id, 0);
    let tables = planned.tables.len() as u32;
    let record = MigrationRecord {
        id: id.clone(),
        agent: request.agent,
        selection,
        parallel,
        verify: !request.no_verify,
        slot: name.clone(),
        publication: name,
        phase: Phase::Snapshot,
        snapshot: None,
        pre_data_applied: false,
        post_data: Vec::new(),
        post_data_applied: 0,
        publication_tables: planned.publication_tables,
        dump_exclude: planned.dump_exclude,
        materialized_views: planned.materialized_views,
        copy_restarts: 0,
        stale_slots: Vec::new(),
        events: Vec::new(),
        error: None,
    };
    migrations
        .create(record, planned.tables)
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    tracing::info!(migration = %id, tables, parallel, "migration started");
    tasks.spawn(migrations.clone().run(shutdown.clone()));
    Ok(wire::StartResponse { migration: id, tables })
}

pub fn status(migrations: &Migrations) -> Result<wire::StatusResponse, Status> {
    let internal = |e: walbridge_daemon::journal::JournalError| Status::internal(e.to_string());
    let Some(record) = migrations.current().map_err(internal)? else {
        return Ok(wire::StatusResponse {
            phase: "none".to_owned(),
            ..Default::default()
        });
    };
    let tables = migrations
        .table_records()
        .map_err(internal)?
        .into_iter()
        .map(|t| {
            let (rows, bytes) = migrations.live_progress(&t.name).unwrap_or((t.rows, t.bytes));
            wire::TableStatus {
                name: t.name.to_string(),
                state: t.state.name().to_owned(),
                rows,
                bytes,
                copy_seconds: t.copy_seconds,
                copy_attempts: t.copy_attempts,
                ranges: t.ranges.len() as u32,
                wire_bytes: t.wire_bytes,
            }
        })
        .collect();
    Ok(wire::StatusResponse {
        phase: record.phase.name().to_owned(),
        migration: record.id,
        agent: record.agent,
        slot: record.slot,
        consistent_lsn: record.snapshot.map(|s| s.consistent_lsn).unwrap_or_default(),
        tables,
        errors: record.error.into_iter().collect(),
        events: record.events,
        copy_restarts: record.copy_restarts,
    })
}

/// Counts and checksums every table of the current migration on both
/// sides, each side reading a consistent snapshot of its own.
pub async fn verify(migrations: &Migrations, request: wire::VerifyRequest) -> Result<wire::VerifyResponse, Status> {
    let record = migrations
        .current()
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::failed_precondition("there is no migration to verify: run `walbridge start` first"))?;
    let agent = agent_client(migrations, &record.agent)?;
    let target = migrations
        .target()
        .ok_or_else(|| Status::failed_precondition("target.url is not set on the controller"))?
        .clone();
    let selection = selection_from_wire(request.selection);
    let all = migrations
        .table_records()
        .map_err(|e| Status::internal(e.to_string()))?;
    let names: Vec<QualifiedName> = all.iter().map(|t| t.name.clone()).collect();
    let chosen = if selection.tables.is_empty() && selection.exclude.is_empty() {
        names
    } else {
        selection.resolve(&names).map_err(bad_selection)?
    };
    let tables: Vec<_> = all.into_iter().filter(|t| chosen.contains(&t.name)).collect();
    let results = futures_util::stream::iter(tables)
        .map(|table| {
            let (agent, target) = (agent.clone(), target.clone());
            async move {
                let compared = transfer::compare(&agent, &target, "", &table.name, &table.columns).await;
                match compared {
                    Ok(c) => wire::TableVerification {
                        name: table.name.to_string(),
                        matches: c.matches(),
                        source_rows: c.source.0,
                        source_checksum: c.source.1,
                        target_rows: c.target.0,
                        target_checksum: c.target.1,
                        error: String::new(),
                    },
                    Err(e) => wire::TableVerification {
                        name: table.name.to_string(),
                        error: e,
                        ..Default::default()
                    },
                }
            }
        })
        .buffered(VERIFY_PARALLEL)
        .collect()
        .await;
    Ok(wire::VerifyResponse { tables: results })
}
