//! Step `SchemaPreData`: pg_dump's pre-data and post-data sections are
//! dumped in the snapshot (post-data is kept in the journal, so applying it
//! later does not need the snapshot), and pre-data is applied to the
//! target: tables exist, without the indexes, constraints and triggers
//! that would slow the copy. Pre-data is one target transaction that also
//! records it applied (`bookkeeping`): a statement the target rejects
//! leaves nothing of it behind, and a step resumed after a crash that
//! came between that commit and the journal's write finds it applied and
//! does not apply it again. The entries the operator skipped (`--skip`)
//! are left out.

use walbridge_daemon::crash_point;
use walbridge_migration::failpoint as fp;
use walbridge_migration::skip;

use super::{StepError, save, snapshot};
use crate::migration::{Context, MigrationRecord, Phase};
use crate::registry::AgentClient;
use crate::target::{self, Purpose};
use crate::{bookkeeping, schema};

pub async fn run(ctx: &Context, agent: &AgentClient, record: &mut MigrationRecord) -> Result<(), StepError> {
    let snapshot = snapshot::held(agent, record).await?;
    let target = ctx.target()?;
    let post_data = skip::filter(
        schema::dump(agent, &snapshot, "post-data", &record.dump_exclude, record.privileges).await?,
        &record.skip,
    );
    let applied = {
        let client = target::connect(target, Purpose::Control).await?;
        bookkeeping::pre_data_applied(&client, &record.id).await?
    };
    if applied {
        tracing::info!(migration = %record.id, "pre-data was committed before a restart: it is not applied again");
    } else {
        let pre_data = skip::filter(
            schema::dump(agent, &snapshot, "pre-data", &record.dump_exclude, record.privileges).await?,
            &record.skip,
        );
        let left_out: Vec<&String> = pre_data.left_out.iter().chain(&post_data.left_out).collect();
        if !left_out.is_empty() {
            tracing::info!(?left_out, "schema entries left out");
        }
        schema::apply_in_one_transaction(target, &pre_data.statements, Some(&record.id)).await?;
    }
    crash_point!(fp::PRE_DATA_COMMITTED);
    record.post_data = post_data.statements.into_iter().map(|s| s.text).collect();
    record.pre_data_applied = true;
    record.phase = Phase::Copy;
    save(ctx, record).await?;
    crash_point!(fp::PRE_DATA_RECORDED);
    Ok(())
}
