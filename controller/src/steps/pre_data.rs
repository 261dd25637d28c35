//! Step `SchemaPreData`: pg_dump's pre-data and post-data sections are
//! dumped in the snapshot (post-data is kept in the journal, so applying it
//! later does not need the snapshot), and pre-data is applied to the
//! target: tables exist, without the indexes, constraints and triggers
//! that would slow the copy. Pre-data is one target transaction: a
//! statement the target rejects leaves nothing of it behind, and the
//! entries the operator skipped (`--skip`) are left out.

use walbridge_migration::skip;

use super::{StepError, save, snapshot};
use crate::migration::{Context, MigrationRecord, Phase};
use crate::registry::AgentClient;
use crate::schema;

pub async fn run(ctx: &Context, agent: &AgentClient, record: &mut MigrationRecord) -> Result<(), StepError> {
    let snapshot = snapshot::held(agent, record).await?;
    let target = ctx.target()?;
    let post_data = schema::dump(agent, &snapshot, "post-data", &record.dump_exclude, record.privileges).await?;
    let pre_data = schema::dump(agent, &snapshot, "pre-data", &record.dump_exclude, record.privileges).await?;
    let (pre_data, post_data) = (
        skip::filter(pre_data, &record.skip),
        skip::filter(post_data, &record.skip),
    );
    let left_out: Vec<&String> = pre_data.left_out.iter().chain(&post_data.left_out).collect();
    if !left_out.is_empty() {
        tracing::info!(?left_out, "schema entries left out");
    }
    schema::apply_in_one_transaction(target, &pre_data.statements).await?;
    record.post_data = post_data.statements.into_iter().map(|s| s.text).collect();
    record.pre_data_applied = true;
    record.phase = Phase::Copy;
    save(ctx, record).await
}
