//! Schema drift: how the published tables on the target differ from the
//! source's right now (a column added on the source while the migration
//! streams, an index, a widened type), each difference with the DDL that
//! brings the target in line. `status` shows it, `sync-schema` applies the
//! additive part, and the cutover refuses while any difference remains.

use walbridge_migration::definition::{self, Drift, TableDefinition};
use walbridge_migration::fault::Fault;
use walbridge_migration::ident::QualifiedName;
use walbridge_proto::convert::name_to_wire;
use walbridge_proto::v1 as wire;

use crate::migration::{Context, MigrationRecord};
use crate::registry::AgentClient;
use crate::target::{self, Purpose};

/// The tables whose definitions must agree: the published ones and every
/// leaf the copy filled.
fn tables(ctx: &Context, record: &MigrationRecord) -> Result<Vec<QualifiedName>, Fault> {
    let mut tables = record.publication_tables.clone();
    for table in ctx.state.tables().map_err(crate::fault::journal)? {
        if !tables.contains(&table.name) {
            tables.push(table.name);
        }
    }
    Ok(tables)
}

/// Every difference now, read on both sides (and kept for `status`).
pub async fn detect(ctx: &Context, agent: &AgentClient, record: &MigrationRecord) -> Result<Vec<Drift>, Fault> {
    let drift = compare_now(ctx, agent, record).await?;
    ctx.state.set_drift(drift.clone());
    Ok(drift)
}

async fn compare_now(ctx: &Context, agent: &AgentClient, record: &MigrationRecord) -> Result<Vec<Drift>, Fault> {
    let tables = tables(ctx, record)?;
    // Both sides at once: the cutover asks this while writes are fenced.
    let source = async {
        agent
            .clone()
            .table_definitions(wire::TableDefinitionsRequest {
                tables: tables.iter().cloned().map(name_to_wire).collect(),
            })
            .await
            .map_err(|s| crate::fault::agent("cannot read the source's table definitions", &s))?
            .into_inner()
            .definitions
            .into_iter()
            .map(|d| TableDefinition::from_row(&d.table, &d.schema, &d.json))
            .collect::<Result<Vec<_>, _>>()
            .map_err(crate::fault::internal)
    };
    let target = async {
        let client = target::connect(ctx.target()?, Purpose::Control).await?;
        client
            .query(definition::DEFINITIONS_SQL, &[&definition::table_list(&tables)])
            .await
            .map_err(|e| crate::fault::target("cannot read the target's table definitions", &e))?
            .iter()
            .map(|row| TableDefinition::from_row(row.get(0), row.get(1), row.get(2)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(crate::fault::internal)
    };
    let (source, target) = tokio::try_join!(source, target)?;
    Ok(definition::compare(&source, &target))
}

/// What [`sync`] did.
#[derive(Debug, Default)]
pub struct Synced {
    pub applied: Vec<Drift>,
    pub remaining: Vec<Drift>,
    pub errors: Vec<String>,
}

/// Applies the additive differences on the target, each in a statement of
/// its own (an index is built while the subscription keeps applying).
pub async fn sync(
    ctx: &Context,
    agent: &AgentClient,
    record: &MigrationRecord,
    dry_run: bool,
) -> Result<Synced, Fault> {
    let drifts = detect(ctx, agent, record).await?;
    let mut synced = Synced::default();
    let client = target::connect(ctx.target()?, Purpose::Schema).await?;
    for drift in drifts {
        if !drift.additive {
            synced.remaining.push(drift);
            continue;
        }
        if dry_run {
            synced.applied.push(drift);
            continue;
        }
        match client.batch_execute(&drift.ddl).await {
            Ok(()) => {
                tracing::info!(table = %drift.table, ddl = %drift.ddl, "schema drift applied on the target");
                synced.applied.push(drift);
            }
            Err(e) => {
                synced
                    .errors
                    .push(format!("{}: {}", drift.ddl, walbridge_daemon::pg::describe(&e)));
                synced.remaining.push(drift);
            }
        }
    }
    detect(ctx, agent, record).await?;
    Ok(synced)
}

/// Differences named in one message at most: a refusal travels as a gRPC
/// status, whose message is an HTTP/2 header, and one naming hundreds of
/// differences is too big a header for the CLI to read (it sees "h2
/// protocol error"). `walbridge status` lists them all.
const DESCRIBED_AT_MOST: usize = 10;

/// One line per difference, for a refusal.
pub fn describe(drifts: &[Drift]) -> String {
    let mut described = drifts
        .iter()
        .take(DESCRIBED_AT_MOST)
        .map(|d| {
            if d.additive {
                format!("{}: {} (sync-schema applies: {})", d.table, d.what, d.ddl)
            } else {
                format!("{}: {} (to do by hand: {})", d.table, d.what, d.ddl)
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    if drifts.len() > DESCRIBED_AT_MOST {
        described.push_str(&format!(
            "; and {} more (`walbridge status` lists every one)",
            drifts.len() - DESCRIBED_AT_MOST
        ));
    }
    described
}

pub fn to_wire(drift: Drift) -> wire::SchemaDrift {
    wire::SchemaDrift {
        table: drift.table,
        what: drift.what,
        ddl: drift.ddl,
        additive: drift.additive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_list_of_differences_is_cut_short() {
        let drift = |i: usize| Drift {
            table: format!("many.t_{i:03}"),
            what: "constraint t_id_not_null is missing".to_owned(),
            ddl: format!("ALTER TABLE many.t_{i:03} ADD CONSTRAINT t_id_not_null NOT NULL id"),
            additive: true,
        };
        let few: Vec<Drift> = (0..3).map(drift).collect();
        assert_eq!(describe(&few).matches("many.t_").count(), 6, "{}", describe(&few));
        let many: Vec<Drift> = (0..332).map(drift).collect();
        let text = describe(&many);
        assert!(
            text.ends_with("; and 322 more (`walbridge status` lists every one)"),
            "{text}"
        );
        assert!(text.len() < 2000, "{} bytes", text.len());
    }
}
