//! Step `Subscribe`: the target's subscription, on the slot the copy's
//! snapshot came from (`copy_data = false, create_slot = false`), so the
//! changes since the consistent point stream in with no gap and no
//! duplicate. It logs in as the role the agent makes for this migration,
//! whose name is journaled before it exists so the migration's end always
//! drops it; the password passes through for this one statement and is
//! kept nowhere by walbridge.

use walbridge_daemon::crash_point;
use walbridge_migration::failpoint as fp;
use walbridge_migration::mark;
use walbridge_proto::v1 as wire;

use super::{StepError, save};
use crate::migration::{Context, MigrationRecord, Phase};
use crate::registry::AgentClient;
use crate::subscription::{self, Names};
use crate::target::{self, Purpose};

pub async fn run(ctx: &Context, agent: &AgentClient, record: &mut MigrationRecord) -> Result<(), StepError> {
    let route = ctx.route(record.direct).map_err(crate::fault::internal)?;
    let role = format!("walbridge_{}", record.id);
    if record.subscription_role != role {
        record.subscription_role = role.clone();
        save(ctx, record).await?;
    }
    let source = agent
        .clone()
        .subscription_connection(wire::SubscriptionConnectionRequest { role })
        .await
        .map_err(|s| crate::fault::agent("cannot prepare the subscription's role on the source", &s))?
        .into_inner();
    let client = target::connect(ctx.target()?, Purpose::Control).await?;
    let names = Names {
        subscription: &record.subscription,
        publication: &record.publication,
        slot: &record.slot,
    };
    // The publication carries the cutover's mark table: the target needs
    // it under the same name before the first mark arrives.
    client
        .batch_execute(&mark::create_sql(&mark::table(&record.id)))
        .await
        .map_err(|e| crate::fault::target("cannot create walbridge's mark table on the target", &e))?;
    let oid = subscription::create(&client, names, &source, &route, &ctx.settings.subscription_tls).await?;
    tracing::info!(subscription = %record.subscription, role = %source.user, direct = record.direct, "subscription created");
    crash_point!(fp::SUBSCRIBE_CREATED);
    record.subscription_oid = oid;
    record.phase = Phase::Streaming;
    save(ctx, record).await?;
    crash_point!(fp::SUBSCRIBE_RECORDED);
    Ok(())
}
