//! What the API's migration calls do: preflight on both sides, starting a
//! migration (checks first, so a refused start creates nothing on either
//! side), its status, and verification. Errors are tonic statuses whose
//! code tells the CLI its exit status: `InvalidArgument` is bad input (2),
//! anything else a failed operation (1).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use walbridge_daemon::pg::describe;
use walbridge_migration::finding::{Extension, Finding, SourceFacts, SourceSchema};
use walbridge_migration::ident::QualifiedName;
use walbridge_migration::selection::{self, Selection};
use walbridge_migration::skip::Skip;
use walbridge_proto::convert::{name_from_wire, name_to_wire};
use walbridge_proto::v1 as wire;

use crate::migration::{APPLICATION_NAME, MigrationRecord, Migrations, Phase};
use crate::plan::plan;
use crate::registry::AgentClient;
use crate::rehearsal::SchemaScope;
use crate::subscription::Route;
use crate::{subscription, transfer};

/// Tables verified at once by `verify`.
const VERIFY_PARALLEL: usize = 4;
/// How often the controller checks a streaming migration's health.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

pub fn selection_from_wire(selection: Option<wire::TableSelection>) -> Selection {
    let selection = selection.unwrap_or_default();
    Selection {
        tables: selection.tables,
        exclude: selection.exclude,
    }
}

pub(crate) fn agent_client(migrations: &Migrations, name: &str) -> Result<AgentClient, Status> {
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

/// Source checks through the agent, then target checks here, then the
/// schema rehearsed on the target, then (unless the migration will only
/// copy) the proof that the subscription can log in.
pub async fn preflight(
    migrations: &Migrations,
    agent_name: &str,
    agent: &AgentClient,
    tables: &[QualifiedName],
    schema: &SchemaScope,
    subscribe: Option<&Route>,
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
        schemas: source.schemas.into_iter().map(SourceSchema::from).collect(),
    };
    let mut findings: Vec<Finding> = source.findings.into_iter().map(Finding::from).collect();
    let target = migrations
        .target()
        .ok_or_else(|| Status::failed_precondition("target.url is not set on the controller"))?;
    let client = target
        .connect(APPLICATION_NAME)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    findings.extend(
        crate::preflight::check_target(&client, &facts)
            .await
            .map_err(|e| Status::internal(format!("target preflight failed: {}", describe(&e))))?,
    );
    let rehearsed = crate::rehearsal::check_schema(agent, target, schema, &findings).await;
    findings.extend(rehearsed.map_err(Status::invalid_argument)?);
    // The probe needs a role that may create a subscription on the target
    // and one that may make the subscription's role on the source.
    let cannot_probe = findings
        .iter()
        .any(|f| f.is_error() && matches!(f.check.as_str(), "subscription_privilege" | "subscription_role"));
    if let Some(route) = subscribe
        && !cannot_probe
    {
        // The target's probe comes in through the tunnel: open it for this
        // agent while the probe runs (a no-op for --direct).
        let _door = match route {
            Route::Tunnel { .. } => Some(
                migrations
                    .tunnel_door()
                    .open_for_probe(agent_name)
                    .map_err(|busy| Status::failed_precondition(busy.to_string()))?,
            ),
            Route::Direct => None,
        };
        findings.extend(
            crate::probe::subscription_login(&client, agent, route, &migrations.settings().subscription_tls).await,
        );
    }
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

fn skips_from_wire(skip: Vec<String>) -> Result<Vec<Skip>, Status> {
    skip.iter()
        .map(|s| Skip::parse(s).map_err(|e| Status::invalid_argument(e.to_string())))
        .collect()
}

pub async fn preflight_call(migrations: &Migrations, request: wire::PreflightRequest) -> Result<Vec<Finding>, Status> {
    let agent = agent_client(migrations, &request.agent)?;
    let selection = selection_from_wire(request.selection);
    let skip = skips_from_wire(request.skip)?;
    let planned = plan(catalog(&agent).await?, &selection, migrations.settings().split_bytes).map_err(bad_selection)?;
    let schema = SchemaScope {
        dump_exclude: planned.dump_exclude,
        skip,
    };
    let route = subscription_route(migrations, request.direct, request.copy_only)?;
    preflight(
        migrations,
        &request.agent,
        &agent,
        &planned.publication_tables,
        &schema,
        route.as_ref(),
    )
    .await
}

/// How the subscription will reach the source; `None` when there will be
/// no subscription.
fn subscription_route(migrations: &Migrations, direct: bool, copy_only: bool) -> Result<Option<Route>, Status> {
    if copy_only {
        return Ok(None);
    }
    migrations.route(direct).map(Some).map_err(|_| {
        Status::failed_precondition(
            "listen.tunnel is not set on the controller: the subscription needs the tunnel to reach the source \
             (or start with --direct when the target can reach the source itself)",
        )
    })
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
        && !current.phase.is_finished()
    {
        return Err(Status::failed_precondition(format!(
            "migration {} is in phase {}: finish it (`walbridge cleanup`) or `walbridge abort` it first",
            current.id,
            current.phase.name()
        )));
    }
    let route = subscription_route(migrations, request.direct, request.copy_only)?;
    let selection = selection_from_wire(request.selection);
    let skip = skips_from_wire(request.skip)?;
    let planned = plan(catalog(&agent).await?, &selection, migrations.settings().split_bytes).map_err(bad_selection)?;
    let schema = SchemaScope {
        dump_exclude: planned.dump_exclude.clone(),
        skip,
    };
    let findings = preflight(
        migrations,
        &request.agent,
        &agent,
        &planned.publication_tables,
        &schema,
        route.as_ref(),
    )
    .await?;
    if let Some(refused) = crate::preflight::refusal(&findings) {
        return Err(Status::failed_precondition(refused));
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
        direct: request.direct,
        copy_only: request.copy_only,
        subscription: format!("walbridge_{id}"),
        subscription_oid: 0,
        subscription_role: String::new(),
        fence_sealed: false,
        cutover: None,
        skip: schema.skip,
    };
    migrations
        .create(record, planned.tables)
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    tracing::info!(migration = %id, tables, parallel, "migration started");
    tasks.spawn(migrations.clone().run(shutdown.clone()));
    Ok(wire::StartResponse { migration: id, tables })
}

/// Lag and health of a streaming migration; `None` when it has no
/// subscription to speak of.
pub struct Health {
    pub slot: wire::SlotStatusResponse,
    pub subscription: subscription::State,
    /// Errors its workers hit (PostgreSQL 15 and later).
    pub subscription_errors: u64,
    pub warnings: Vec<String>,
}

pub async fn health(migrations: &Migrations, record: &MigrationRecord) -> Option<Health> {
    if !matches!(record.phase, Phase::Streaming | Phase::Cutover | Phase::CutOver) {
        return None;
    }
    let mut warnings = Vec::new();
    let slot = match migrations.registry().get(&record.agent) {
        Some(agent) => crate::cutover::slot_status(&agent.client, &record.slot)
            .await
            .unwrap_or_else(|problem| {
                warnings.push(problem);
                wire::SlotStatusResponse::default()
            }),
        None => {
            warnings.push(format!("agent {} is not connected: lag is unknown", record.agent));
            wire::SlotStatusResponse::default()
        }
    };
    let limit = migrations.settings().retained_wal_warning;
    if slot.retained_wal_bytes > limit {
        warnings.push(format!(
            "slot {} holds {} bytes of WAL on the source (over streaming.retained_wal_warning, {limit}): \
             a stalled subscription fills the source's disk",
            record.slot, slot.retained_wal_bytes
        ));
    }
    let observed = match migrations.target() {
        Some(target) => match subscription::session(target).await {
            Ok(client) => subscription::health(&client, &record.subscription).await,
            Err(e) => Err(e),
        },
        None => Ok((subscription::State::Missing, 0)),
    };
    let (subscription, subscription_errors) = observed.unwrap_or_else(|e| {
        warnings.push(format!("cannot read the subscription: {e}"));
        (subscription::State::Missing, 0)
    });
    if record.phase == Phase::Streaming && subscription == subscription::State::Disabled {
        warnings.push(format!(
            "subscription {} is disabled: nothing is applied (the target's server log says why)",
            record.subscription
        ));
    }
    if subscription_errors > 0 && record.phase == Phase::Streaming {
        warnings.push(format!(
            "subscription {} has hit {subscription_errors} error(s) applying changes; it retries, and the \
             target's server log says what fails",
            record.subscription
        ));
    }
    Some(Health {
        slot,
        subscription,
        subscription_errors,
        warnings,
    })
}

/// Logs health warnings while a migration streams.
pub async fn watch_health(migrations: Arc<Migrations>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
        let Ok(Some(record)) = migrations.current() else {
            continue;
        };
        if record.phase != Phase::Streaming {
            continue;
        }
        if let Some(health) = health(&migrations, &record).await {
            for warning in health.warnings {
                tracing::warn!(migration = %record.id, "{warning}");
            }
        }
    }
}

pub async fn status(migrations: &Migrations) -> Result<wire::StatusResponse, Status> {
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
                size_bytes: t.size_bytes,
            }
        })
        .collect();
    let health = health(migrations, &record).await;
    let (slot, subscription, subscription_errors, warnings) = match health {
        Some(h) => (
            h.slot,
            h.subscription.name().to_owned(),
            h.subscription_errors,
            h.warnings,
        ),
        None => Default::default(),
    };
    Ok(wire::StatusResponse {
        lag_bytes: slot.lag_bytes,
        lag_seconds: slot.lag_seconds,
        retained_wal_bytes: slot.retained_wal_bytes,
        slot_active: slot.active,
        subscription,
        subscription_errors,
        warnings,
        cutover: match record.phase {
            Phase::Cutover => migrations.live_cutover(),
            _ => record.cutover.clone(),
        }
        .as_ref()
        .map(crate::cutover::report_to_wire),
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

/// Removes the durable fence a cutover left on the source.
pub async fn release_source(migrations: &Migrations) -> Result<wire::CleanupResponse, Status> {
    let mut record = current(migrations)?;
    let agent = agent_client(migrations, &record.agent)?;
    let mut removed = Vec::new();
    release_fence(&agent, &record, &mut removed).await?;
    record.fence_sealed = false;
    record.events.push("the source's write fence was released".to_owned());
    save(migrations, &record).await?;
    Ok(wire::CleanupResponse {
        removed,
        phase: record.phase.name().to_owned(),
        remaining: Vec::new(),
    })
}

/// After cutover: removes every replication object and the fence.
pub async fn cleanup(migrations: &Migrations) -> Result<wire::CleanupResponse, Status> {
    let record = current(migrations)?;
    if !matches!(record.phase, Phase::CutOver | Phase::CleanedUp | Phase::Copied) {
        return Err(Status::failed_precondition(format!(
            "migration {} is in phase {}: cleanup follows a cutover (or a --copy-only copy); \
             `walbridge abort` stops a migration in any phase",
            record.id,
            record.phase.name()
        )));
    }
    remove_everything(migrations, record, Phase::CleanedUp).await
}

/// Stops the migration in any phase and removes what it made for
/// replication on both sides. The target keeps its tables and data.
pub async fn abort(migrations: &Migrations) -> Result<wire::CleanupResponse, Status> {
    migrations.stop_running().await;
    let record = current(migrations)?;
    if record.phase == Phase::CutOver {
        return Err(Status::failed_precondition(format!(
            "migration {} is cut over: the target is live. Use `walbridge cleanup` (it keeps what the cutover did)",
            record.id
        )));
    }
    let phase = if record.phase == Phase::CleanedUp {
        Phase::CleanedUp
    } else {
        Phase::Aborted
    };
    remove_everything(migrations, record, phase).await
}

pub(crate) fn current(migrations: &Migrations) -> Result<MigrationRecord, Status> {
    migrations
        .current()
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::failed_precondition("there is no migration: run `walbridge start` first"))
}

pub(crate) async fn save(migrations: &Migrations, record: &MigrationRecord) -> Result<(), Status> {
    migrations
        .save_record(record)
        .await
        .map_err(|e| Status::internal(e.to_string()))
}

async fn release_fence(agent: &AgentClient, record: &MigrationRecord, removed: &mut Vec<String>) -> Result<(), Status> {
    let released = agent
        .clone()
        .release_fence(wire::ReleaseFenceRequest {
            migration: record.id.clone(),
        })
        .await?
        .into_inner();
    if released.tables > 0 {
        removed.push(format!("the write fence on {} source tables", released.tables));
    }
    Ok(())
}

/// Subscription (target), snapshot, slots, publication and fence
/// (source). Each removal is idempotent, so running it twice is safe.
async fn remove_everything(
    migrations: &Migrations,
    mut record: MigrationRecord,
    phase: Phase,
) -> Result<wire::CleanupResponse, Status> {
    let agent = agent_client(migrations, &record.agent)?;
    let mut removed = Vec::new();
    let mut remaining = Vec::new();
    if let Some(target) = migrations.target()
        && !record.subscription.is_empty()
    {
        let outcome = subscription::remove(target, &record.subscription, record.subscription_oid)
            .await
            .map_err(Status::unavailable)?;
        removed.extend(outcome.removed);
        remaining.extend(outcome.remaining);
    }
    let released = crate::migration::release_replication(&agent, &record).await;
    removed.extend(released.removed);
    if !released.problems.is_empty() {
        return Err(Status::unavailable(format!(
            "could not release the source: {}",
            released.problems.join("; ")
        )));
    }
    record.snapshot = None;
    release_fence(&agent, &record, &mut removed).await?;
    record.fence_sealed = false;
    record.phase = phase;
    record.events.push(if removed.is_empty() {
        format!("{}: nothing was left to remove", phase.name())
    } else {
        format!("{}: removed {}", phase.name(), removed.join(", "))
    });
    save(migrations, &record).await?;
    tracing::info!(migration = %record.id, phase = phase.name(), ?removed, "replication objects removed");
    Ok(wire::CleanupResponse {
        removed,
        phase: phase.name().to_owned(),
        remaining,
    })
}
