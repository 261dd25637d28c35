//! The write fence on the source. Held: a transaction that holds
//! `EXCLUSIVE` locks on the published tables, so writes wait and reads go
//! on, for every role. Sealed: statement triggers that refuse writes,
//! committed in that same transaction, so the fence outlives the agent
//! (and no write slips in between lock and trigger). Lifted: the
//! transaction rolls back and nothing was ever changed.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::Client;
use tonic::{Status, Streaming};
use walbridge_daemon::crash_point;
use walbridge_daemon::pg::Database;
use walbridge_migration::failpoint as fp;
use walbridge_migration::fault::{Fault, FaultKind};
use walbridge_migration::ident::QualifiedName;
use walbridge_proto::convert::name_from_wire;
use walbridge_proto::v1 as wire;
use wire::fence_command::Command;
use wire::fence_event::Event;

use walbridge_daemon::pg::describe;

pub const APPLICATION_NAME: &str = "walbridge-agent-fence";
/// The schema that holds the fence's trigger function.
pub const SCHEMA: &str = "walbridge_fence";
/// The name of the fence's trigger on each table.
pub const TRIGGER: &str = "walbridge_fence";

type Events = mpsc::Sender<Result<wire::FenceEvent, Status>>;

async fn send(events: &Events, event: Event) {
    let _ = events.send(Ok(wire::FenceEvent { event: Some(event) })).await;
}

/// Runs one fence conversation to its end.
pub async fn run(source: Database, mut commands: Streaming<wire::FenceCommand>, events: Events) {
    let hold = match commands.message().await {
        Ok(Some(wire::FenceCommand {
            command: Some(Command::Hold(hold)),
        })) => hold,
        _ => {
            let _ = events
                .send(Err(Status::invalid_argument("a fence starts with `hold`")))
                .await;
            return;
        }
    };
    let tables: Vec<QualifiedName> = hold.tables.into_iter().map(name_from_wire).collect();
    let client = match take(&source, &tables, hold.lock_timeout_ms).await {
        Ok((client, lsn)) => {
            tracing::warn!(migration = %hold.migration, tables = tables.len(), %lsn, "writes on the source are fenced");
            send(&events, Event::Held(wire::FenceHeld { lsn })).await;
            crash_point!(fp::AGENT_FENCE_HELD);
            client
        }
        Err(status) => {
            let _ = events.send(Err(status)).await;
            return;
        }
    };
    let next = tokio::time::timeout(Duration::from_millis(hold.max_hold_ms.max(1)), commands.message()).await;
    match next {
        Ok(Ok(Some(wire::FenceCommand {
            command: Some(Command::Seal(_)),
        }))) => match seal(&client, &tables).await {
            Ok(()) => {
                crash_point!(fp::AGENT_FENCE_SEALED);
                tracing::warn!(migration = %hold.migration, "the source's write fence is sealed: writes fail until it is released");
                send(&events, Event::Sealed(wire::FenceSealed {})).await;
            }
            Err(e) => {
                let _ = events
                    .send(Err(crate::fault::source_status("cannot seal the fence", &e)))
                    .await;
            }
        },
        other => {
            // Lift, a stream that ended or broke, or nobody answered in
            // time: roll back, the source is as it was.
            let _ = client.batch_execute("ROLLBACK").await;
            let why = match other {
                Ok(Ok(Some(_))) => "lifted",
                Ok(_) => "the controller went away",
                Err(_) => "nobody sealed it in time",
            };
            tracing::warn!(migration = %hold.migration, why, "the write fence is lifted");
            send(&events, Event::Lifted(wire::FenceLifted {})).await;
        }
    }
}

/// Takes the locks and returns the WAL position behind which every
/// committed write on these tables lies.
async fn take(source: &Database, tables: &[QualifiedName], lock_timeout_ms: u64) -> Result<(Client, String), Status> {
    let client = source
        .connect(APPLICATION_NAME)
        .await
        .map_err(|e| crate::fault::connect_status(&e))?;
    let list: Vec<String> = tables.iter().map(QualifiedName::quoted).collect();
    let lock = format!(
        "BEGIN; SET LOCAL lock_timeout = {}; LOCK TABLE {} IN EXCLUSIVE MODE",
        lock_timeout_ms.max(1),
        list.join(", ")
    );
    if let Err(e) = client.batch_execute(&lock).await {
        let waiting = e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
        return Err(if waiting {
            crate::fault::status(Fault::new(
                FaultKind::Timeout,
                format!(
                    "could not fence writes within {lock_timeout_ms} ms: a transaction holds a lock that conflicts \
                     ({}); the source carries on unchanged",
                    describe(&e)
                ),
            ))
        } else {
            crate::fault::source_status("could not fence writes", &e)
        });
    }
    // Every transaction that wrote to these tables has ended now (the
    // locks waited for them). A committed WAL record of our own marks the
    // point: committed in its own session so that it is flushed at once
    // (an unflushed record waits for the WAL writer, and with writers
    // fenced nothing else flushes it), giving the walsender something to
    // pass even on an idle source.
    let marker = source
        .connect(APPLICATION_NAME)
        .await
        .map_err(|e| crate::fault::connect_status(&e))?;
    let mark = async {
        marker.batch_execute("BEGIN; SET LOCAL synchronous_commit = on").await?;
        let row = marker
            .query_one("SELECT pg_logical_emit_message(true, 'walbridge', 'fence')::text", &[])
            .await?;
        marker.batch_execute("COMMIT").await?;
        Ok::<String, tokio_postgres::Error>(row.get(0))
    };
    let lsn = mark
        .await
        .map_err(|e| crate::fault::source_status("cannot mark the fence in the WAL", &e))?;
    Ok((client, lsn))
}

/// Installs the refusing triggers on the tables and their partitions and
/// commits: the locks go, the triggers stay.
async fn seal(client: &Client, tables: &[QualifiedName]) -> Result<(), tokio_postgres::Error> {
    let names: Vec<String> = tables.iter().map(QualifiedName::quoted).collect();
    let rows = client
        .query(
            "WITH RECURSIVE fenced(oid) AS ( \
               SELECT unnest($1::text[])::regclass::oid \
               UNION SELECT i.inhrelid FROM pg_inherits i JOIN fenced f ON i.inhparent = f.oid) \
             SELECT format('%I.%I', n.nspname, c.relname) FROM fenced f \
             JOIN pg_class c ON c.oid = f.oid JOIN pg_namespace n ON n.oid = c.relnamespace",
            &[&names],
        )
        .await?;
    let mut script = format!(
        "CREATE SCHEMA IF NOT EXISTS {SCHEMA}; \
         CREATE OR REPLACE FUNCTION {SCHEMA}.refuse_write() RETURNS trigger LANGUAGE plpgsql AS $fence$ \
         BEGIN RAISE EXCEPTION 'writes to %.% are fenced: this database was migrated by walbridge', \
         TG_TABLE_SCHEMA, TG_TABLE_NAME USING ERRCODE = 'read_only_sql_transaction', \
         HINT = 'walbridge release-source (or cleanup) lifts the fence'; END $fence$;"
    );
    for row in rows {
        let table: String = row.get(0);
        script.push_str(&format!(
            " DROP TRIGGER IF EXISTS {TRIGGER} ON {table}; \
             CREATE TRIGGER {TRIGGER} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} \
             FOR EACH STATEMENT EXECUTE PROCEDURE {SCHEMA}.refuse_write();"
        ));
    }
    script.push_str(" COMMIT");
    client.batch_execute(&script).await
}

/// Removes a sealed fence; returns on how many tables it was.
pub async fn release(source: &Database) -> Result<u32, Status> {
    let client = source
        .connect(APPLICATION_NAME)
        .await
        .map_err(|e| crate::fault::connect_status(&e))?;
    let fail = |e: tokio_postgres::Error| crate::fault::source_status("cannot release the fence", &e);
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE t.tgname = $1 AND n.nspname = $2 AND p.proname = 'refuse_write'",
            &[&TRIGGER, &SCHEMA],
        )
        .await
        .map_err(fail)?
        .get(0);
    // CASCADE takes the triggers with the function; the schema is ours.
    client
        .batch_execute(&format!(
            "DROP FUNCTION IF EXISTS {SCHEMA}.refuse_write() CASCADE; DROP SCHEMA IF EXISTS {SCHEMA}"
        ))
        .await
        .map_err(fail)?;
    Ok(tables as u32)
}
