//! Step `SchemaPostData`: indexes, constraints and triggers, built after
//! the data is in (and after the snapshot is released, so the source's
//! vacuum is not held back by index builds on the target). One session
//! carries pg_dump's preamble (`search_path`, timeouts) for every
//! statement; each statement commits together with its record on the
//! target (`bookkeeping`), so after any crash each is applied exactly once.
//! Materialized views arrive empty and are refreshed.

use walbridge_daemon::crash_point;
use walbridge_daemon::pg::describe;
use walbridge_migration::failpoint as fp;
use walbridge_migration::fault::Fault;

use super::{StepError, retrying_on_target, save};
use crate::migration::{Context, MigrationRecord, Phase};
use crate::target::{self, Purpose};
use crate::{bookkeeping, schema};

pub async fn run(ctx: &Context, record: &mut MigrationRecord) -> Result<(), StepError> {
    let target_db = ctx.target()?;
    let statements = record.post_data.clone();
    let applied = retrying_on_target(ctx, "post-data", || apply(ctx, record, &statements)).await?;
    record.post_data_applied = applied;
    retrying_on_target(ctx, "refresh of materialized views", || async {
        Ok(schema::refresh_materialized_views(target_db, &record.materialized_views).await?)
    })
    .await?;
    crash_point!(fp::POST_DATA_DONE);
    record.phase = if record.copy_only {
        tracing::info!(migration = %record.id, "the copy is done: the migration ends here (--copy-only)");
        Phase::Copied
    } else {
        Phase::Subscribe
    };
    save(ctx, record).await?;
    crash_point!(fp::POST_DATA_RECORDED);
    Ok(())
}

/// Applies the statements not yet applied; returns how many are applied.
async fn apply(ctx: &Context, record: &MigrationRecord, statements: &[String]) -> Result<usize, StepError> {
    let client = target::connect(ctx.target()?, Purpose::Schema).await?;
    bookkeeping::ensure(&client).await?;
    let done = bookkeeping::applied_statements(&client, &record.id).await?;
    for setting in statements.iter().filter(|text| is_session_setting(text)) {
        if !crate::schema::setting_exists(&client, setting).await? {
            continue;
        }
        client
            .batch_execute(setting)
            .await
            .map_err(|e| crate::fault::target("pg_dump's preamble failed on the target", &e))?;
    }
    let body = statements
        .iter()
        .enumerate()
        .filter(|(_, text)| !is_session_setting(text));
    let mut applied = done.len();
    for (index, statement) in body {
        if done.contains(&index) {
            continue;
        }
        let outcome = async {
            client.batch_execute("BEGIN").await?;
            client.batch_execute(statement).await?;
            bookkeeping::record_statement(&client, &record.id, index).await?;
            client.batch_execute("COMMIT").await
        }
        .await;
        if let Err(e) = outcome {
            let shown: String = statement.chars().take(2000).collect();
            return Err(Fault::new(
                crate::fault::target_kind(&e),
                format!(
                    "the target rejected post-data statement {}: {}\n{shown}",
                    index + 1,
                    describe(&e)
                ),
            )
            .into());
        }
        crash_point!(fp::POST_DATA_STATEMENT_COMMITTED);
        applied += 1;
    }
    Ok(applied)
}

/// pg_dump's session settings at the top of every script (`SET ...`,
/// `SELECT pg_catalog.set_config(...)`): run on every new session, never
/// recorded.
fn is_session_setting(statement: &str) -> bool {
    let text = statement.trim_start();
    let upper = text.get(..40).unwrap_or(text).to_ascii_uppercase();
    upper.starts_with("SET ") || upper.starts_with("SELECT PG_CATALOG.SET_CONFIG(")
}

#[cfg(test)]
mod tests {
    use super::is_session_setting;

    #[test]
    fn pg_dumps_preamble_is_told_from_the_schema() {
        assert!(is_session_setting("SET statement_timeout = 0"));
        assert!(is_session_setting(
            "SELECT pg_catalog.set_config('search_path', '', false)"
        ));
        assert!(!is_session_setting("CREATE INDEX settings_idx ON public.settings (k)"));
        assert!(!is_session_setting("ALTER TABLE ONLY public.t SET WITHOUT CLUSTER"));
    }
}
