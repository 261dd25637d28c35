//! Post-data: indexes, constraints and triggers, built once the data is
//! in — each as soon as the tables it needs are copied, several at once.
//!
//! [`apply`] runs in two places. While the copy runs, it takes each table
//! the copy finishes and starts the statements that need only finished
//! tables and change no write to them (`walbridge_migration::post_data`):
//! a table's indexes and keys are built while other tables still copy. It starts nothing more once the copy is
//! over, and a statement it cannot apply is left, not failed on: step
//! `SchemaPostData` then applies everything left — the statements that
//! need every table, those after them, any that failed — and refreshes the
//! materialized views. Either way each statement commits together with
//! its record on the target (`bookkeeping`), so after any crash each is
//! applied exactly once. Every session carries pg_dump's preamble
//! (`search_path`, timeouts).

use std::collections::BTreeSet;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use walbridge_daemon::crash_point;
use walbridge_daemon::pg::describe;
use walbridge_migration::failpoint as fp;
use walbridge_migration::fault::Fault;
use walbridge_migration::ident::QualifiedName;
use walbridge_migration::post_data::{needs, prerequisites};
use walbridge_migration::script::is_session_setting;

use super::{StepError, retrying_on_target, save};
use crate::migration::{Context, MigrationRecord, Phase};
use crate::target::{self, Purpose};
use crate::{bookkeeping, schema};

/// Step `SchemaPostData`: what the copy left of post-data, then the
/// materialized views.
pub async fn run(ctx: &Context, record: &mut MigrationRecord) -> Result<(), StepError> {
    let target_db = ctx.target()?;
    let jobs = record.parallel.max(1) as usize;
    let applied = retrying_on_target(ctx, "post-data", || {
        apply(ctx, record, Copied::All, jobs, fp::POST_DATA_STATEMENT_COMMITTED)
    })
    .await?;
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

/// Which tables are copied, as [`apply`] is told.
pub enum Copied {
    /// All of them: the post-data step.
    All,
    /// The copy is running. `tables` are the migration's tables; each one
    /// copied arrives on `finished` (those copied before too); the channel
    /// closes when the copy is over, and nothing more is started then.
    AsTheyFinish {
        tables: BTreeSet<QualifiedName>,
        finished: mpsc::UnboundedReceiver<QualifiedName>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    Pending,
    Running,
    Done,
}

/// Applies the statements not yet applied, up to `jobs` at once, each when
/// what it needs is copied and every statement before it that it must
/// follow is done; `committed` is the crash point after each commit.
/// Returns how many statements are applied in all. While the copy runs
/// (`Copied::AsTheyFinish`) a failure only stops it starting more.
pub async fn apply(
    ctx: &Context,
    record: &MigrationRecord,
    copied: Copied,
    jobs: usize,
    committed: &'static str,
) -> Result<usize, StepError> {
    let statements = &record.post_data;
    let (during_copy, tables, mut finished) = match copied {
        Copied::All => (false, BTreeSet::new(), None),
        Copied::AsTheyFinish { tables, finished } => (true, tables, Some(finished)),
    };
    let first = target::connect(ctx.target()?, Purpose::Schema).await?;
    bookkeeping::ensure(&first).await?;
    let done = bookkeeping::applied_statements(&first, &record.id).await?;
    let mut preamble = Vec::new();
    for setting in statements.iter().filter(|text| is_session_setting(text)) {
        if schema::setting_exists(&first, setting).await? {
            preamble.push(setting.as_str());
        }
    }
    start_session(&first, &preamble).await?;
    let needs = needs(statements);
    let prerequisites = prerequisites(&needs);
    let mut progress: Vec<Progress> = statements
        .iter()
        .enumerate()
        .map(|(index, text)| {
            if is_session_setting(text) || done.contains(&index) {
                Progress::Done
            } else {
                Progress::Pending
            }
        })
        .collect();
    let mut applied = done.len();
    let mut copied_tables: BTreeSet<QualifiedName> = BTreeSet::new();
    let mut idle = vec![first];
    let mut sessions = 1;
    let mut running = FuturesUnordered::new();
    // During the copy: false once it is over, or once something failed.
    let mut starting = true;
    loop {
        if starting {
            let ready = |index: usize, progress: &[Progress]| {
                let copied = match needs[index].tables() {
                    _ if !during_copy => true,
                    _ if !needs[index].during_copy() => false,
                    // Not a table the copy fills (a partitioned parent, a
                    // view): it waits for the whole copy, like Everything.
                    Some(list) => list.iter().all(|t| tables.contains(t) && copied_tables.contains(t)),
                    None => false,
                };
                copied && prerequisites[index].iter().all(|p| progress[*p] == Progress::Done)
            };
            for index in 0..statements.len() {
                if running.len() >= jobs {
                    break;
                }
                if progress[index] != Progress::Pending || !ready(index, &progress) {
                    continue;
                }
                let session = match idle.pop() {
                    Some(session) => session,
                    None if sessions < jobs => match open_session(ctx, &preamble).await {
                        Ok(session) => {
                            sessions += 1;
                            session
                        }
                        Err(error) if during_copy => {
                            tracing::warn!(%error, "post-data stops during the copy; the post-data step goes on");
                            starting = false;
                            break;
                        }
                        Err(error) => return Err(error),
                    },
                    None => break,
                };
                progress[index] = Progress::Running;
                running.push(apply_one(session, record, index));
            }
        }
        if running.is_empty() && (!progress.contains(&Progress::Pending) || !starting) {
            break;
        }
        if running.is_empty() && finished.is_none() {
            // The first statement not applied is always ready once every
            // table is copied.
            return Err(crate::fault::internal("post-data cannot go on: no statement is ready").into());
        }
        let event = tokio::select! {
            Some(applied) = running.next() => Event::Applied(applied),
            table = next_finished(&mut finished) => Event::Finished(table),
        };
        match event {
            Event::Applied((index, session, Ok(()))) => {
                crash_point!(committed);
                progress[index] = Progress::Done;
                applied += 1;
                idle.push(session);
            }
            Event::Applied((index, _, Err(error))) if during_copy => {
                // Left for the post-data step, which reports it.
                tracing::warn!(statement = index + 1, %error, "a post-data statement failed during the copy; the post-data step applies it");
                progress[index] = Progress::Pending;
                starting = false;
            }
            Event::Applied((_, _, Err(error))) => return Err(error),
            Event::Finished(Some(table)) => {
                copied_tables.insert(table);
            }
            Event::Finished(None) => {
                finished = None;
                starting = false;
            }
        }
    }
    Ok(applied)
}

enum Event {
    Applied((usize, Client, Result<(), StepError>)),
    /// A table copied; `None`: the copy is over.
    Finished(Option<QualifiedName>),
}

/// The next table the copy finishes; never, when there is no copy.
async fn next_finished(finished: &mut Option<mpsc::UnboundedReceiver<QualifiedName>>) -> Option<QualifiedName> {
    match finished {
        Some(finished) => finished.recv().await,
        None => std::future::pending().await,
    }
}

/// A session for post-data, with pg_dump's preamble.
async fn open_session(ctx: &Context, preamble: &[&str]) -> Result<Client, StepError> {
    let session = target::connect(ctx.target()?, Purpose::Schema).await?;
    start_session(&session, preamble).await?;
    Ok(session)
}

/// pg_dump's preamble (the settings this target knows) on a new session.
async fn start_session(session: &Client, preamble: &[&str]) -> Result<(), StepError> {
    for setting in preamble {
        session
            .batch_execute(setting)
            .await
            .map_err(|e| crate::fault::target("pg_dump's preamble failed on the target", &e))?;
    }
    Ok(())
}

/// One statement in a transaction with its record; gives the session back.
async fn apply_one(session: Client, record: &MigrationRecord, index: usize) -> (usize, Client, Result<(), StepError>) {
    let statement = &record.post_data[index];
    let outcome = async {
        session.batch_execute("BEGIN").await?;
        session.batch_execute(statement).await?;
        bookkeeping::record_statement(&session, &record.id, index).await?;
        session.batch_execute("COMMIT").await
    }
    .await;
    let outcome = outcome.map_err(|e| {
        let shown: String = statement.chars().take(2000).collect();
        StepError::from(Fault::new(
            crate::fault::target_kind(&e),
            format!(
                "the target rejected post-data statement {}: {}\n{shown}",
                index + 1,
                describe(&e)
            ),
        ))
    });
    if outcome.is_err() {
        // A failed statement leaves its transaction open: closed here, so
        // the session can take the next one.
        let _ = session.batch_execute("ROLLBACK").await;
    }
    (index, session, outcome)
}
