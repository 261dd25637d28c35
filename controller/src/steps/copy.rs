//! Step `Copy`: every table (or page range of a large one) streams from
//! the snapshot into one target transaction of its own, in parallel; each
//! finished table is recorded, analyzed, handed to post-data (its indexes
//! are built while other tables still copy) and (unless `--no-verify`)
//! proven equal to the snapshot. A unit that hits a transient fault is retried alone while
//! the others go on; a unit that finds the snapshot gone ends the step,
//! and [`restart`] starts the copy over from a new slot. The target
//! records each unit in the unit's own transaction, under the slot of the
//! attempt (`bookkeeping`): a resumed step copies only what is not there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Instant;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use walbridge_daemon::crash_point;
use walbridge_migration::copy::PageRange;
use walbridge_migration::failpoint as fp;
use walbridge_migration::fault::{Fault, FaultKind};
use walbridge_migration::ident::QualifiedName;

use super::{StepError, post_data, retrying, retrying_on_target, save, snapshot};
use crate::migration::{Context, MigrationRecord, Phase, TableRecord, TableState, slot_name};
use crate::{bookkeeping, transfer};

/// How many times a lost snapshot may restart the copy before the
/// migration asks for a person (something keeps killing the agent's
/// replication connection).
pub const MAX_RESTARTS: u32 = 5;

/// A table being copied: its record and how many of its units remain.
struct TableRun {
    record: TableRecord,
    remaining: usize,
    started: Instant,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

pub async fn run(ctx: &Context, record: &mut MigrationRecord) -> Result<(), StepError> {
    let tables = ctx.state.tables()?;
    // A table copied just before a restart may still await its check.
    if record.verify {
        for table in tables.iter().filter(|t| t.state == TableState::Copied) {
            verify(ctx, record, table.clone()).await?;
        }
    }
    let target = ctx.target()?.clone();
    // What the target already committed (a crash may have come before the
    // journal heard of it): those units are not copied again.
    let session = crate::target::connect(&target, crate::target::Purpose::Copy).await?;
    bookkeeping::ensure(&session).await?;
    let mut done: BTreeMap<String, Vec<bookkeeping::CopiedUnit>> = BTreeMap::new();
    for (table, unit) in bookkeeping::copied_units(&session, &record.slot).await? {
        done.entry(table).or_default().push(unit);
    }
    let parallel = record.parallel.max(1) as usize;
    ctx.state.clear_progress(None);
    // Post-data runs beside the copy: each table copied is handed to it.
    let (to_post_data, copied_tables) = mpsc::unbounded_channel();
    let all_tables: BTreeSet<QualifiedName> = tables.iter().map(|t| t.name.clone()).collect();
    for table in tables.iter().filter(|t| t.state.is_done()) {
        let _ = to_post_data.send(table.name.clone());
    }

    // Units of work: a whole table, or one page range of a split table.
    // A split table is emptied once, before any of its ranges is copied,
    // since its ranges commit separately; an unsplit one is emptied inside
    // its copy.
    let mut units = Vec::new();
    let mut runs = BTreeMap::new();
    for mut table in tables.into_iter().filter(|t| !t.state.is_done()) {
        let committed = done.remove(&table.name.to_string()).unwrap_or_default();
        let wanted: Vec<Option<PageRange>> = if table.ranges.len() > 1 {
            table.ranges.iter().copied().map(Some).collect()
        } else {
            vec![None]
        };
        let todo: Vec<Option<PageRange>> = wanted
            .into_iter()
            .filter(|range| {
                let first_page = range.map_or(0, |r| r.first_page);
                !committed.iter().any(|unit| unit.first_page == first_page)
            })
            .collect();
        table.rows = committed.iter().map(|u| u.rows).sum();
        table.bytes = committed.iter().map(|u| u.bytes).sum();
        table.wire_bytes = committed.iter().map(|u| u.wire_bytes).sum();
        if todo.is_empty() {
            // Committed on the target before a crash: recorded now (its
            // statistics may not have been gathered yet).
            analyze(ctx, &table.name).await?;
            table.state = TableState::Copied;
            ctx.state.save_table(&table).await?;
            let _ = to_post_data.send(table.name.clone());
            if record.verify {
                verify(ctx, record, table).await?;
            }
            continue;
        }
        table.state = TableState::Copying;
        table.copy_attempts += 1;
        ctx.state.save_table(&table).await?;
        if table.ranges.len() > 1 && committed.is_empty() {
            transfer::truncate(&target, std::slice::from_ref(&table.name)).await?;
        }
        let remaining = todo.len();
        let unit_bytes = table.size_bytes / table.ranges.len().max(1) as u64;
        units.extend(todo.into_iter().map(|range| (unit_bytes, table.name.clone(), range)));
        runs.insert(
            table.name.clone(),
            TableRun {
                record: table,
                remaining,
                started: Instant::now(),
            },
        );
    }
    drop(session);
    // Largest first: the last unit to start is a small one, so the copy
    // does not end with one big table copying alone.
    units.sort_by_key(|(bytes, _, _)| std::cmp::Reverse(*bytes));
    tracing::info!(tables = runs.len(), units = units.len(), parallel, "copying");
    let runs = Mutex::new(runs);
    let record_now = record.clone();
    let copying = async {
        // The first fault a unit cannot retry ends the step: dropping the
        // stream cancels the units still running (their target
        // transactions roll back).
        let to_post_data = to_post_data;
        let mut results = futures_util::stream::iter(units)
            .map(|(_, name, range)| copy_unit(ctx, &record_now, &runs, &to_post_data, name, range))
            .buffer_unordered(parallel);
        while let Some(result) = results.next().await {
            result?;
        }
        Ok::<_, StepError>(())
        // `to_post_data` closes here: post-data starts nothing more.
    };
    let post_data = post_data::apply(
        ctx,
        &record_now,
        post_data::Copied::AsTheyFinish {
            tables: all_tables,
            finished: copied_tables,
        },
        parallel,
        fp::COPY_POST_DATA_COMMITTED,
    );
    let (copied, post_data) = tokio::join!(copying, post_data);
    copied?;
    match post_data {
        Ok(applied) => tracing::info!(applied, "post-data statements applied during the copy"),
        Err(error) => tracing::warn!(%error, "post-data did not run during the copy; the post-data step applies it"),
    }
    if !record.skip_large_objects && !record.large_objects_copied {
        let now = record.clone();
        let copied = retrying(ctx, &now, "copy of the large objects", |agent| {
            let now = &now;
            async move {
                let snapshot = snapshot::held(&agent, now).await?;
                Ok::<_, StepError>(crate::large_objects::sync(ctx, &agent, &snapshot).await?)
            }
        })
        .await?;
        if copied.copied > 0 {
            record.events.push(format!(
                "{} large objects copied ({} bytes); those changed later are copied again at the cutover",
                copied.copied, copied.bytes
            ));
        }
        record.large_objects_copied = true;
    }
    crash_point!(fp::COPY_DONE);
    record.phase = Phase::ReleaseSnapshot;
    save(ctx, record).await?;
    crash_point!(fp::COPY_RECORDED);
    Ok(())
}

/// Copies one unit (retried alone on transient faults); the last unit of a
/// table records the table copied and, when asked, proves it exact.
async fn copy_unit(
    ctx: &Context,
    record: &MigrationRecord,
    runs: &Mutex<BTreeMap<QualifiedName, TableRun>>,
    to_post_data: &mpsc::UnboundedSender<QualifiedName>,
    name: QualifiedName,
    range: Option<PageRange>,
) -> Result<(), StepError> {
    let columns = lock(runs)
        .get(&name)
        .map(|r| r.record.columns.clone())
        .unwrap_or_default();
    let unit = match range {
        Some(range) => format!("copy of {name} pages {}..{}", range.first_page, range.end_page),
        None => format!("copy of {name}"),
    };
    let target = ctx.target()?;
    let progress = |rows: u64, bytes: u64| ctx.state.add_progress(&name, rows, bytes);
    let copied = retrying(ctx, record, &unit, |agent| {
        let (columns, name, progress) = (&columns, &name, &progress);
        async move {
            let snapshot = snapshot::held(&agent, record).await?;
            let copied = transfer::copy_table(
                &agent,
                target,
                &record.slot,
                &snapshot,
                name,
                columns,
                range,
                record.compression,
                progress,
            )
            .await;
            Ok::<_, StepError>(copied?)
        }
    })
    .await?;
    crash_point!(fp::COPY_UNIT_COMMITTED);
    let finished = {
        let mut runs = lock(runs);
        let run = runs.get_mut(&name).expect("every unit belongs to a run");
        run.record.rows += copied.rows;
        run.record.bytes += copied.bytes;
        run.record.wire_bytes += copied.wire_bytes;
        run.remaining -= 1;
        (run.remaining == 0).then(|| {
            let mut table = run.record.clone();
            table.copy_seconds = run.started.elapsed().as_secs_f64();
            table.state = TableState::Copied;
            table
        })
    };
    let Some(table) = finished else {
        return Ok(());
    };
    // Before the table counts as copied: a crash in between analyzes it
    // again on resume (the committed-before-a-crash path above).
    analyze(ctx, &name).await?;
    ctx.state.clear_progress(Some(&name));
    ctx.state.save_table(&table).await?;
    let _ = to_post_data.send(table.name.clone());
    tracing::info!(table = %table.name, rows = table.rows, bytes = table.bytes, seconds = table.copy_seconds, "table copied");
    if record.verify {
        verify(ctx, record, table).await?;
    }
    Ok(())
}

/// The planner's statistics of a copied table, gathered on the target.
async fn analyze(ctx: &Context, table: &QualifiedName) -> Result<(), StepError> {
    let target = ctx.target()?;
    retrying_on_target(ctx, &format!("ANALYZE of {table}"), || async {
        Ok(transfer::analyze(target, table).await?)
    })
    .await
}

/// Proves a copied table equal to the snapshot: row count and checksum on
/// both sides, the source read in the snapshot.
async fn verify(ctx: &Context, record: &MigrationRecord, mut table: TableRecord) -> Result<(), StepError> {
    let target = ctx.target()?;
    let unit = format!("verification of {}", table.name);
    let check = retrying(ctx, record, &unit, |agent| {
        let table = &table;
        async move {
            let snapshot = snapshot::held(&agent, record).await?;
            Ok::<_, StepError>(
                transfer::compare(
                    &agent,
                    target,
                    record.source_version_num(),
                    &snapshot,
                    &table.name,
                    &table.columns,
                )
                .await?,
            )
        }
    })
    .await?;
    if check.matches() {
        table.state = TableState::Verified;
        ctx.state.save_table(&table).await?;
        return Ok(());
    }
    table.state = TableState::Failed;
    ctx.state.save_table(&table).await?;
    Err(Fault::new(
        FaultKind::Mismatch,
        format!(
            "verification of {} failed right after its copy: source {} rows (checksum {}), target {} rows \
             (checksum {})",
            table.name, check.source.0, check.source.1, check.target.0, check.target.1
        ),
    )
    .into())
}

/// The snapshot is gone: the copy cannot go on against it. The copied
/// tables are emptied and the copy starts again from a new slot and
/// snapshot, recorded as an event (and bounded: see [`MAX_RESTARTS`]).
pub async fn restart(ctx: &Context, record: &mut MigrationRecord, why: &Fault) -> Result<(), StepError> {
    if record.copy_restarts >= MAX_RESTARTS {
        return Err(Fault::new(
            FaultKind::Internal,
            format!(
                "the copy lost its snapshot {} times in a row (last: {why}); something keeps ending the agent's \
                 replication connection (the agent's process, idle_session_timeout, a proxy): fix that, then start \
                 again",
                record.copy_restarts + 1
            ),
        )
        .into());
    }
    let lost = record.snapshot.as_ref().map(|s| s.name.clone()).unwrap_or_default();
    let event = format!("the copy restarts from a new slot and snapshot: snapshot {lost} was lost ({why})");
    tracing::warn!("{event}");
    record.events.push(event);
    record.copy_restarts += 1;
    // The target's record of copied units belongs to the old slot: the new
    // attempt starts with none, and each unit empties what it replaces.
    for mut table in ctx.state.tables()? {
        table.state = TableState::Pending;
        table.rows = 0;
        table.bytes = 0;
        table.wire_bytes = 0;
        ctx.state.save_table(&table).await?;
    }
    record.snapshot = None;
    record.stale_slots.push(record.slot.clone());
    record.slot = slot_name(&record.id, record.copy_restarts);
    record.phase = Phase::Snapshot;
    // The agent may not be back yet: the next step waits for it, then
    // drops the stale slot before making the new one.
    save(ctx, record).await
}
