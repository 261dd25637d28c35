//! `preflight` and `start`: every check on both sides first (and the proof
//! that the subscription can log in), so a refused start creates nothing
//! on either side; then the migration is journaled and handed to the
//! runner.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::Status;
use walbridge_daemon::pg::describe;
use walbridge_migration::finding::{Extension, Finding, NamedRole, SourceFacts, SourceSchema};
use walbridge_migration::ident::QualifiedName;
use walbridge_migration::selection::{self, Selection};
use walbridge_migration::skip::Skip;
use walbridge_proto::convert::{name_from_wire, name_to_wire};
use walbridge_proto::v1 as wire;

use crate::migration::{Context, MigrationRecord, Phase, SourceIdentity, slot_name};
use crate::plan::plan;
use crate::registry::AgentClient;
use crate::rehearsal::SchemaScope;
use crate::runner::Runner;
use crate::subscription::Route;
use crate::target::{self, Purpose};

/// What a migration without `--privileges` tells the operator.
pub const NO_PRIVILEGES: &str = "the source's GRANTs and default privileges were not carried: the target has none \
     of them, so the application's roles cannot use their tables there until you grant them (start \
     --privileges carries them)";

pub fn selection_from_wire(selection: Option<wire::TableSelection>) -> Selection {
    let selection = selection.unwrap_or_default();
    Selection {
        tables: selection.tables,
        exclude: selection.exclude,
    }
}

pub fn agent_client(ctx: &Context, name: &str) -> Result<AgentClient, Status> {
    if let Some(agent) = ctx.registry.get(name) {
        return Ok(agent.client);
    }
    let connected: Vec<String> = ctx.registry.list().into_iter().map(|a| a.name).collect();
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
    ctx: &Context,
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
            privileges: schema.privileges,
            skip_large_objects: schema.skip_large_objects,
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
        roles: source.roles.into_iter().map(NamedRole::from).collect(),
    };
    let mut findings: Vec<Finding> = source.findings.into_iter().map(Finding::from).collect();
    let target = ctx
        .target
        .as_ref()
        .ok_or_else(|| Status::failed_precondition("target.url is not set on the controller"))?;
    let client = target::connect(target, Purpose::Control)
        .await
        .map_err(|f| Status::unavailable(f.to_string()))?;
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
                ctx.door
                    .open_for_probe(agent_name)
                    .map_err(|busy| Status::failed_precondition(busy.to_string()))?,
            ),
            Route::Direct => None,
        };
        findings.extend(crate::probe::subscription_login(&client, agent, route, &ctx.settings.subscription_tls).await);
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

pub async fn preflight_call(ctx: &Context, request: wire::PreflightRequest) -> Result<Vec<Finding>, Status> {
    let agent = agent_client(ctx, &request.agent)?;
    let selection = selection_from_wire(request.selection);
    let skip = skips_from_wire(request.skip)?;
    let planned = plan(catalog(&agent).await?, &selection, ctx.settings.split_bytes).map_err(bad_selection)?;
    let schema = SchemaScope {
        dump_exclude: planned.dump_exclude,
        skip,
        privileges: request.privileges,
        skip_large_objects: request.skip_large_objects,
    };
    let route = subscription_route(ctx, request.direct, request.copy_only)?;
    preflight(
        ctx,
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
fn subscription_route(ctx: &Context, direct: bool, copy_only: bool) -> Result<Option<Route>, Status> {
    if copy_only {
        return Ok(None);
    }
    ctx.route(direct).map(Some).map_err(|_| {
        Status::failed_precondition(
            "listen.tunnel is not set on the controller: the subscription needs the tunnel to reach the source \
             (or start with --direct when the target can reach the source itself)",
        )
    })
}

/// Checks everything, records the migration, and starts running it.
pub async fn start(runner: &Arc<Runner>, request: wire::StartRequest) -> Result<wire::StartResponse, Status> {
    let ctx = runner.ctx();
    let agent = agent_client(ctx, &request.agent)?;
    if ctx.target.is_none() {
        return Err(Status::failed_precondition("target.url is not set on the controller"));
    }
    if let Some(current) = ctx.state.current().map_err(|e| Status::internal(e.to_string()))?
        && !current.phase.is_finished()
    {
        return Err(Status::failed_precondition(format!(
            "migration {} is in phase {}: finish it (`walbridge cleanup`) or `walbridge abort` it first",
            current.id,
            current.phase.name()
        )));
    }
    let route = subscription_route(ctx, request.direct, request.copy_only)?;
    let selection = selection_from_wire(request.selection);
    let skip = skips_from_wire(request.skip)?;
    let planned = plan(catalog(&agent).await?, &selection, ctx.settings.split_bytes).map_err(bad_selection)?;
    let schema = SchemaScope {
        dump_exclude: planned.dump_exclude.clone(),
        skip,
        privileges: request.privileges,
        skip_large_objects: request.skip_large_objects,
    };
    let findings = preflight(
        ctx,
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
    let hello = crate::link::hello(&agent).await.map_err(Status::unavailable)?;
    let source = hello.source.clone().unwrap_or_default();
    let parallel = match request.parallel {
        0 => hello.host_cpus.clamp(2, 16),
        n => n,
    };
    let id = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    );
    let name = slot_name(&id, 0);
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
        events: if schema.privileges {
            Vec::new()
        } else {
            vec![NO_PRIVILEGES.to_owned()]
        },
        error: None,
        direct: request.direct,
        copy_only: request.copy_only,
        subscription: format!("walbridge_{id}"),
        subscription_oid: 0,
        subscription_role: String::new(),
        fence_sealed: false,
        detach: Default::default(),
        cutover: None,
        skip: schema.skip,
        privileges: schema.privileges,
        skip_large_objects: schema.skip_large_objects,
        large_objects_copied: false,
        compression: crate::migration::Compression::from_wire(request.compression),
        syncing: Vec::new(),
        refused_tables: Vec::new(),
        source: Some(SourceIdentity {
            system_identifier: source.system_identifier,
            database: source.database,
            server_version_num: source.server_version_num,
        }),
    };
    runner
        .start(record, planned.tables)
        .await
        .map_err(crate::api::status_of)?;
    tracing::info!(migration = %id, tables, parallel, "migration started");
    Ok(wire::StartResponse { migration: id, tables })
}
