//! Tables the application creates while the migration streams. The
//! source's catalog is looked at again every `WATCH_INTERVAL` (and once
//! more before the cutover fences anything):
//!
//! * a **partition** of a published partitioned table is created on the
//!   target too (pg_dump's `CREATE TABLE ... ; ALTER TABLE ... ATTACH
//!   PARTITION`; attaching builds the parent's indexes on it). Its rows
//!   arrive as the root's (`publish_via_partition_root`), and wait in the
//!   subscription until the partition exists. Before 13 the publication
//!   lists leaf partitions instead: a new one is published and copied by
//!   the subscription like a new table (below), since its rows written
//!   before it was published are in no stream;
//! * a **table** the selection covers is created on the target, added to
//!   the publication, and copied by the subscription itself
//!   (`REFRESH PUBLICATION WITH (copy_data = true)`: its table
//!   synchronisation copies and then catches up, so the rows written
//!   before walbridge noticed the table are there too); once synchronised
//!   its indexes and constraints follow.
//!
//! A table that cannot be published as it is (no replica identity, say)
//! is not added: the cutover refuses, naming it and the fix.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use walbridge_migration::fault::Fault;
use walbridge_migration::finding::Finding;
use walbridge_migration::ident::QualifiedName;
use walbridge_proto::convert::name_to_wire;
use walbridge_proto::v1 as wire;

use crate::migration::{Context, MigrationRecord, Phase, RefusedTable, TableRecord, TableState};
use crate::plan::plan;
use crate::registry::AgentClient;
use crate::runner::Runner;
use crate::target::{self, Purpose};
use crate::{schema, subscription};

/// How often the source's catalog is looked at while streaming.
const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// What one look at the catalog changed.
#[derive(Debug, Default)]
pub struct Look {
    /// The record changed (save it).
    pub changed: bool,
    /// Tables that keep the cutover from going ahead, with why.
    pub refusals: Vec<String>,
}

/// What the source has that the migration does not know yet: tables its
/// selection now covers (to be published) and tables (new partitions
/// among them) not yet on record. `None` when the selection matches
/// nothing now.
async fn unknown(
    ctx: &Context,
    agent: &AgentClient,
    record: &MigrationRecord,
) -> Result<Option<(Vec<QualifiedName>, Vec<TableRecord>)>, Fault> {
    let catalog = agent
        .clone()
        .list_tables(wire::ListTablesRequest {})
        .await
        .map_err(|s| crate::fault::agent("cannot list the source's tables", &s))?
        .into_inner()
        .tables;
    // A selection that no longer matches anything is not this watch's
    // business: the migration already has its tables.
    let Ok(planned) = plan(catalog, &record.selection, ctx.settings.split_bytes) else {
        return Ok(None);
    };
    let known: Vec<QualifiedName> = ctx
        .state
        .tables()
        .map_err(crate::fault::journal)?
        .into_iter()
        .map(|t| t.name)
        .collect();
    let new_roots: Vec<QualifiedName> = planned
        .publication_tables
        .iter()
        .filter(|t| !record.publication_tables.contains(t))
        .cloned()
        .collect();
    let new_leaves: Vec<TableRecord> = planned
        .tables
        .into_iter()
        .filter(|t| !known.contains(&t.name))
        .collect();
    Ok(Some((new_roots, new_leaves)))
}

/// The tables created on the source since the last look, named: asked
/// again while the source is fenced, before the point of no return, so
/// that a table created during the cutover's first moments is not left
/// behind on a source that then refuses its writes.
pub async fn unseen(ctx: &Context, agent: &AgentClient, record: &MigrationRecord) -> Result<Vec<String>, Fault> {
    let Some((roots, leaves)) = unknown(ctx, agent, record).await? else {
        return Ok(Vec::new());
    };
    let mut names: Vec<String> = roots.iter().map(ToString::to_string).collect();
    for leaf in leaves {
        let name = leaf.name.to_string();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

/// Looks at the source's catalog now and takes in what is new.
pub async fn look(ctx: &Context, agent: &AgentClient, record: &mut MigrationRecord) -> Result<Look, Fault> {
    let mut look = Look::default();
    let Some((new_roots, new_leaves)) = unknown(ctx, agent, record).await? else {
        return Ok(look);
    };
    if !new_roots.is_empty() {
        add_tables(ctx, agent, record, &new_roots, &new_leaves, &mut look).await?;
    }
    // Partitions of tables already published; those of new tables came
    // with them.
    let partitions: Vec<TableRecord> = new_leaves
        .into_iter()
        .filter(|leaf| {
            leaf.root
                .as_ref()
                .is_some_and(|root| record.publication_tables.contains(root) && !record.syncing.contains(root))
        })
        .collect();
    if !partitions.is_empty() {
        add_partitions(ctx, agent, record, partitions, &mut look).await?;
    }
    finish_synchronised(ctx, agent, record, &mut look).await?;
    look.refusals = record
        .refused_tables
        .iter()
        .map(|r| format!("{}: {}", r.name, r.why))
        .collect();
    look.refusals.extend(
        record
            .syncing
            .iter()
            .map(|t| format!("{t}: created on the source while streaming, the subscription is still copying it")),
    );
    Ok(look)
}

/// New top-level tables: checked, created on the target, published, and
/// synchronised by the subscription.
async fn add_tables(
    ctx: &Context,
    agent: &AgentClient,
    record: &mut MigrationRecord,
    roots: &[QualifiedName],
    leaves: &[TableRecord],
    look: &mut Look,
) -> Result<(), Fault> {
    let findings: Vec<Finding> = agent
        .clone()
        .preflight(wire::SourcePreflightRequest {
            tables: roots.iter().cloned().map(name_to_wire).collect(),
            privileges: false,
            skip_large_objects: true,
        })
        .await
        .map_err(|s| crate::fault::agent("cannot check the new tables", &s))?
        .into_inner()
        .findings
        .into_iter()
        .map(Finding::from)
        .filter(|f| f.is_error() && roots.iter().any(|r| f.object == r.to_string()))
        .collect();
    let mut accepted = Vec::new();
    for root in roots {
        let blocking: Vec<&Finding> = findings.iter().filter(|f| f.object == root.to_string()).collect();
        if blocking.is_empty() {
            record.refused_tables.retain(|r| &r.name != root);
            accepted.push(root.clone());
            continue;
        }
        let why = blocking
            .iter()
            .map(|f| format!("{} (fix: {})", f.message, f.fix))
            .collect::<Vec<_>>()
            .join("; ");
        if !record.refused_tables.iter().any(|r| &r.name == root && r.why == why) {
            let event = format!("table {root} was created on the source but cannot be migrated as it is: {why}");
            tracing::warn!(migration = %record.id, "{event}");
            record.events.push(event);
            record.refused_tables.retain(|r| &r.name != root);
            record.refused_tables.push(RefusedTable {
                name: root.clone(),
                why,
            });
            look.changed = true;
        }
    }
    if accepted.is_empty() {
        return Ok(());
    }
    // A new partitioned table comes with its partitions.
    let belongs = |leaf: &TableRecord| {
        accepted.contains(&leaf.name) || leaf.root.as_ref().is_some_and(|root| accepted.contains(root))
    };
    let mut dumped = accepted.clone();
    dumped.extend(
        leaves
            .iter()
            .filter(|l| belongs(l) && !accepted.contains(&l.name))
            .map(|l| l.name.clone()),
    );
    // A look cut short after this commit (the agent away, a restart)
    // finds the tables on the target next time: created once.
    let client = target::connect(ctx.target()?, Purpose::Control).await?;
    let missing = missing_on_target(&client, &dumped).await?;
    if !missing.is_empty() {
        let pre_data = schema::dump_tables(agent, "pre-data", &missing, record.privileges).await?;
        schema::apply_in_one_transaction(ctx.target()?, &pre_data, None).await?;
    }
    agent
        .clone()
        .publish_tables(wire::PublishTablesRequest {
            publication: record.publication.clone(),
            tables: accepted.iter().cloned().map(name_to_wire).collect(),
            reader: record.subscription_role.clone(),
        })
        .await
        .map_err(|s| crate::fault::agent("cannot publish the new tables", &s))?;
    subscription::refresh_copying_new_tables(&client, &record.subscription).await?;
    for leaf in leaves.iter().filter(|l| belongs(l)) {
        let mut table = leaf.clone();
        table.state = TableState::Syncing;
        ctx.state.save_table(&table).await.map_err(crate::fault::journal)?;
    }
    for root in &accepted {
        record.publication_tables.push(root.clone());
        record.syncing.push(root.clone());
        let event = format!(
            "table {root} was created on the source: created on the target and added to the publication; the \
             subscription copies it"
        );
        tracing::info!(migration = %record.id, "{event}");
        record.events.push(event);
    }
    look.changed = true;
    Ok(())
}

/// Those of `tables` the target does not have yet.
async fn missing_on_target(
    client: &tokio_postgres::Client,
    tables: &[QualifiedName],
) -> Result<Vec<QualifiedName>, Fault> {
    let quoted: Vec<String> = tables.iter().map(QualifiedName::quoted).collect();
    let present: Vec<String> = client
        .query(
            "SELECT t FROM unnest($1::text[]) t WHERE to_regclass(t) IS NOT NULL",
            &[&quoted],
        )
        .await
        .map_err(|e| crate::fault::target("cannot look for the new tables on the target", &e))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok(tables
        .iter()
        .filter(|t| !present.contains(&t.quoted()))
        .cloned()
        .collect())
}

/// New partitions of published tables: created (and attached) on the
/// target unless they are there already.
async fn add_partitions(
    ctx: &Context,
    agent: &AgentClient,
    record: &mut MigrationRecord,
    partitions: Vec<TableRecord>,
    look: &mut Look,
) -> Result<(), Fault> {
    let client = target::connect(ctx.target()?, Purpose::Control).await?;
    let names: Vec<QualifiedName> = partitions.iter().map(|p| p.name.clone()).collect();
    let missing = missing_on_target(&client, &names).await?;
    if !missing.is_empty() {
        let pre_data = schema::dump_tables(agent, "pre-data", &missing, record.privileges).await?;
        schema::apply_in_one_transaction(ctx.target()?, &pre_data, None).await?;
    }
    let source_version = record.source_version_num();
    if source_version != 0 && source_version < PARTITION_ROOTS_PUBLISHED {
        return publish_partitions(ctx, agent, record, partitions, look).await;
    }
    for partition in partitions {
        let created = missing.contains(&partition.name);
        let event = if created {
            format!(
                "partition {} was created on the source: created on the target too",
                partition.name
            )
        } else {
            format!(
                "partition {} was created on the source and on the target",
                partition.name
            )
        };
        tracing::info!(migration = %record.id, "{event}");
        record.events.push(event);
        let mut table = partition;
        table.state = TableState::Streamed;
        ctx.state.save_table(&table).await.map_err(crate::fault::journal)?;
    }
    look.changed = true;
    Ok(())
}

/// The first source version whose publications hold partitioned tables.
const PARTITION_ROOTS_PUBLISHED: u32 = 130000;

/// New partitions on a source before 13, already on the target: added to
/// the publication and copied by the subscription, the cutover waiting
/// until it has (they are `syncing`).
async fn publish_partitions(
    ctx: &Context,
    agent: &AgentClient,
    record: &mut MigrationRecord,
    partitions: Vec<TableRecord>,
    look: &mut Look,
) -> Result<(), Fault> {
    agent
        .clone()
        .publish_tables(wire::PublishTablesRequest {
            publication: record.publication.clone(),
            tables: partitions.iter().map(|p| name_to_wire(p.name.clone())).collect(),
            reader: record.subscription_role.clone(),
        })
        .await
        .map_err(|s| crate::fault::agent("cannot publish the new partitions", &s))?;
    let client = target::connect(ctx.target()?, Purpose::Control).await?;
    subscription::refresh_copying_new_tables(&client, &record.subscription).await?;
    for partition in partitions {
        let event = format!(
            "partition {} was created on the source: created on the target and added to the publication (before \
             PostgreSQL 13 a publication lists partitions, not their root); the subscription copies it",
            partition.name
        );
        tracing::info!(migration = %record.id, "{event}");
        record.events.push(event);
        record.syncing.push(partition.name.clone());
        let mut table = partition;
        table.state = TableState::Syncing;
        ctx.state.save_table(&table).await.map_err(crate::fault::journal)?;
    }
    look.changed = true;
    Ok(())
}

/// Tables the subscription has finished copying get their indexes and
/// constraints.
async fn finish_synchronised(
    ctx: &Context,
    agent: &AgentClient,
    record: &mut MigrationRecord,
    look: &mut Look,
) -> Result<(), Fault> {
    if record.syncing.is_empty() {
        return Ok(());
    }
    let client = target::connect(ctx.target()?, Purpose::Control).await?;
    let names: Vec<String> = record.syncing.iter().map(QualifiedName::quoted).collect();
    let ready: Vec<String> = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_subscription_rel r \
             JOIN pg_subscription s ON s.oid = r.srsubid JOIN pg_class c ON c.oid = r.srrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE s.subname = $1 AND r.srsubstate = 'r' AND r.srrelid = ANY(SELECT to_regclass(x)::oid FROM unnest($2::text[]) x)",
            &[&record.subscription, &names],
        )
        .await
        .map_err(|e| crate::fault::target("cannot read the subscription's tables", &e))?
        .iter()
        .map(|row| QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1)).to_string())
        .collect();
    let done: Vec<QualifiedName> = record
        .syncing
        .iter()
        .filter(|t| ready.contains(&t.to_string()))
        .cloned()
        .collect();
    if done.is_empty() {
        return Ok(());
    }
    let leaves: Vec<TableRecord> = ctx
        .state
        .tables()
        .map_err(crate::fault::journal)?
        .into_iter()
        .filter(|t| {
            t.state == TableState::Syncing
                && (done.contains(&t.name) || t.root.as_ref().is_some_and(|r| done.contains(r)))
        })
        .collect();
    // A partition (published on its own before 13) got its parent's
    // indexes when it was attached on the target.
    let whole_tables: Vec<QualifiedName> = done
        .iter()
        .filter(|t| !leaves.iter().any(|l| &l.name == *t && l.root.is_some()))
        .cloned()
        .collect();
    if !whole_tables.is_empty() {
        let post_data = schema::dump_tables(agent, "post-data", &whole_tables, record.privileges).await?;
        schema::apply_in_one_transaction(ctx.target()?, &post_data, None).await?;
    }
    for mut leaf in leaves {
        leaf.state = TableState::Streamed;
        ctx.state.save_table(&leaf).await.map_err(crate::fault::journal)?;
    }
    for table in &done {
        record.events.push(format!(
            "table {table} is copied by the subscription; its indexes and constraints are built"
        ));
    }
    record.syncing.retain(|t| !done.contains(t));
    look.changed = true;
    Ok(())
}

/// While a migration streams: takes in the source's new tables and
/// compares the schemas (the slot's health is `slot_watch`'s).
pub async fn watch(runner: Arc<Runner>, shutdown: CancellationToken) {
    let ctx = runner.ctx().clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
        let Ok(Some(record)) = ctx.state.current() else {
            continue;
        };
        if record.phase != Phase::Streaming {
            continue;
        }
        runner.watch_catalog().await;
        if let Some(agent) = ctx.registry.get(&record.agent) {
            match crate::drift::detect(&ctx, &agent.client, &record).await {
                Ok(drift) => ctx.state.set_drift(drift),
                Err(e) => tracing::warn!(migration = %record.id, error = %e, "cannot compare the schemas"),
            }
        }
    }
}
