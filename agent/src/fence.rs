//! The write fence on the source. Held: a transaction that holds
//! `EXCLUSIVE` locks on the published tables, so writes wait and reads go
//! on, for every role. Sealed: statement triggers that refuse writes,
//! committed in that same transaction, so the fence outlives the agent
//! (and no write slips in between lock and trigger). Lifted: the
//! transaction rolls back and nothing was ever changed.
//!
//! Taking the locks never holds the source up for long: each attempt
//! waits at most a short `lock_timeout` for any one table, and when a
//! table's lock cannot be had (or a deadlock with an application
//! transaction is found) every lock is let go, the writers waiting behind
//! them go on, and the attempt is made again until the hold's deadline.
//! The fence's session carries `idle_in_transaction_session_timeout` a
//! little beyond the time the agent may hold it, so a source cut off from
//! its agent ends the fence by itself.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tonic::{Status, Streaming};
use walbridge_daemon::crash_point;
use walbridge_daemon::pg::Database;
use walbridge_migration::failpoint as fp;
use walbridge_migration::fault::{Fault, FaultKind};
use walbridge_migration::ident::{QualifiedName, quote_ident, quote_literal};
use walbridge_proto::convert::name_from_wire;
use walbridge_proto::v1 as wire;
use wire::fence_command::Command;
use wire::fence_event::Event;

use walbridge_daemon::pg::describe;

pub const APPLICATION_NAME: &str = "walbridge-agent-fence";
use walbridge_migration::fence::{RELEASE_SQL, ROLES_TABLE, SEQUENCES_TABLE};
pub use walbridge_migration::fence::{SCHEMA, TRIGGER};

/// How long one attempt waits for any one table's lock when the
/// controller does not say: writers on the tables already locked wait at
/// most about this long per attempt.
const TABLE_LOCK_TIMEOUT: Duration = Duration::from_millis(200);
/// The server ends the fence's idle session this long after the agent
/// should have lifted it itself.
const SERVER_BOUND_MARGIN: Duration = Duration::from_secs(2);

type Events = mpsc::Sender<Result<wire::FenceEvent, Status>>;

async fn send(events: &Events, event: Event) {
    let _ = events.send(Ok(wire::FenceEvent { event: Some(event) })).await;
}

/// How long a hold may take and last, from the moment it arrived.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// How long taking the locks may take, in all...
    lock_timeout: Duration,
    /// ...so give up at this point.
    locks_by: Instant,
    /// Each attempt's wait for one table's lock.
    table_lock_timeout: Duration,
    /// Lift the fence if nobody sealed or lifted it by then.
    hold_until: Instant,
}

impl Limits {
    fn of(hold: &wire::FenceHold, arrived: Instant) -> Limits {
        let table_lock_timeout = match hold.table_lock_timeout_ms {
            0 => TABLE_LOCK_TIMEOUT,
            ms => Duration::from_millis(ms),
        };
        let lock_timeout = Duration::from_millis(hold.lock_timeout_ms.max(1));
        Limits {
            lock_timeout,
            locks_by: arrived + lock_timeout,
            table_lock_timeout,
            hold_until: arrived + Duration::from_millis(hold.max_hold_ms.max(1)),
        }
    }
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
    let limits = Limits::of(&hold, Instant::now());
    let tables = lock_order(hold.tables.into_iter().map(name_from_wire).collect());
    let mark = hold.mark.clone().map(name_from_wire);
    let client = match take(&source, &tables, &hold.nologin_roles, mark.as_ref(), limits).await {
        Ok(Taken {
            client,
            lsn,
            attempts,
            marked,
        }) => {
            tracing::warn!(migration = %hold.migration, tables = tables.len(), %lsn, attempts, marked, "writes on the source are fenced");
            send(&events, Event::Held(wire::FenceHeld { lsn, attempts, marked })).await;
            crash_point!(fp::AGENT_FENCE_HELD);
            client
        }
        Err(status) => {
            let _ = events.send(Err(status)).await;
            return;
        }
    };
    let next = tokio::time::timeout_at(limits.hold_until, commands.message()).await;
    match next {
        Ok(Ok(Some(wire::FenceCommand {
            command: Some(Command::Seal(_)),
        }))) => match seal(&client, &tables, &hold.nologin_roles, limits).await {
            Ok(sealed) => {
                crash_point!(fp::AGENT_FENCE_SEALED);
                tracing::warn!(
                    migration = %hold.migration,
                    tables = sealed.tables,
                    sequences = sealed.sequences,
                    roles = sealed.roles,
                    notes = ?sealed.notes,
                    "the source's write fence is sealed: writes fail until it is released"
                );
                let sealed = wire::FenceSealed {
                    tables: sealed.tables,
                    sequences: sealed.sequences,
                    roles: sealed.roles,
                    notes: sealed.notes,
                };
                send(&events, Event::Sealed(sealed)).await;
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

/// The tables in one fixed order, each once: two fences (or a fence and
/// an application that locks in name order) do not take them crosswise.
fn lock_order(mut tables: Vec<QualifiedName>) -> Vec<QualifiedName> {
    tables.sort_by_key(|t| t.to_string());
    tables.dedup();
    tables
}

/// Whether a failed attempt at the locks is worth another: a lock that
/// was not free in time, or a deadlock with an application transaction
/// (this attempt lost; the next one finds the locks free).
fn worth_another_attempt(code: Option<&SqlState>) -> bool {
    // query_canceled: the statement's own bound (the hold's deadline)
    // passed mid-attempt; the caller then gives up, naming the holders.
    matches!(
        code,
        Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::QUERY_CANCELED
    )
}

/// Pauses between attempts: the writers that queued behind the locks
/// just let go get their turn.
fn pauses() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(1))
        .with_jitter()
        .without_max_times()
        .build()
}

struct Taken {
    client: Client,
    lsn: String,
    attempts: u32,
    /// The mark is a row of the mark table.
    marked: bool,
}

/// Takes the locks and returns the WAL position behind which every
/// committed write on these tables lies.
async fn take(
    source: &Database,
    tables: &[QualifiedName],
    nologin_roles: &[String],
    mark: Option<&QualifiedName>,
    limits: Limits,
) -> Result<Taken, Status> {
    let client = source
        .connect(APPLICATION_NAME)
        .await
        .map_err(|e| crate::fault::connect_status(&e))?;
    // The mark's session is opened before any lock is taken: connecting
    // (TLS, authentication) is not paid while writes wait.
    let marker = source
        .connect(APPLICATION_NAME)
        .await
        .map_err(|e| crate::fault::connect_status(&e))?;
    let mark = match mark {
        Some(table) => marker
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.quoted()])
            .await
            .map_err(|e| crate::fault::source_status("cannot look for the cutover's mark table", &e))?
            .get::<_, bool>(0)
            .then_some(table),
        None => None,
    };
    check_nologin_roles(&client, nologin_roles).await?;
    let list: Vec<String> = tables.iter().map(QualifiedName::quoted).collect();
    let mut pauses = pauses();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let now = Instant::now();
        let remaining = limits.locks_by.saturating_duration_since(now);
        let table_wait = limits.table_lock_timeout.min(remaining).max(Duration::from_millis(1));
        // Set whatever the role's defaults: a statement bounded by the
        // hold's deadline, and a server-side end to a session whose agent
        // can no longer lift the fence.
        let idle_bound = limits.hold_until.saturating_duration_since(now) + SERVER_BOUND_MARGIN;
        let lock = format!(
            "BEGIN; SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = {}; \
             SET LOCAL idle_in_transaction_session_timeout = {}; LOCK TABLE {} IN EXCLUSIVE MODE",
            table_wait.as_millis(),
            remaining.max(table_wait).as_millis(),
            idle_bound.as_millis(),
            list.join(", ")
        );
        let error = match client.batch_execute(&lock).await {
            Ok(()) => break,
            Err(e) => e,
        };
        // Let go of every lock this attempt took: writers to those tables
        // go on while the fence waits for its next try.
        let _ = client.batch_execute("ROLLBACK").await;
        if !worth_another_attempt(error.code()) {
            return Err(crate::fault::source_status("could not fence writes", &error));
        }
        let pause = pauses.next().unwrap_or(Duration::from_secs(1));
        if Instant::now() + pause >= limits.locks_by {
            let holders = lock_holders(&client, tables)
                .await
                .unwrap_or_else(|e| vec![format!("who holds them cannot be read: {}", describe(&e))]);
            let kind = if error.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) {
                FaultKind::Contention
            } else {
                FaultKind::Timeout
            };
            return Err(crate::fault::status(Fault::new(
                kind,
                format!(
                    "could not fence writes within {} ms: {attempts} attempts, each waiting at most {} ms for a \
                     table's lock and letting go of all of them in between (last: {}); {}; the source carries on \
                     unchanged",
                    limits.lock_timeout.as_millis(),
                    limits.table_lock_timeout.as_millis(),
                    describe(&error),
                    if holders.is_empty() {
                        "no conflicting lock is held now".to_owned()
                    } else {
                        holders.join("; ")
                    }
                ),
            )));
        }
        tracing::info!(attempt = attempts, ?pause, error = %describe(&error), "the fence could not take every lock; it let go of them and tries again");
        tokio::time::sleep(pause).await;
    }
    // Every transaction that wrote to these tables has ended now (the
    // locks waited for them). A committed transaction of our own marks the
    // point: committed in its own session so that it is flushed at once
    // (an unflushed record waits for the WAL writer, and with writers
    // fenced nothing else flushes it), giving the walsender something to
    // pass even on an idle source. With a mark table it is a row the
    // subscription carries to the target, where the controller sees it
    // arrive; without (a migration begun before there was one), a WAL
    // message, which only the slot's confirmed position shows passed.
    let marking = async {
        marker.batch_execute("BEGIN; SET LOCAL synchronous_commit = on").await?;
        let row =
            match mark {
                Some(table) => marker
                    .query_one(
                        &format!(
                            "INSERT INTO {} (fence_lsn) SELECT pg_current_wal_insert_lsn()::text RETURNING fence_lsn",
                            table.quoted()
                        ),
                        &[],
                    )
                    .await?,
                None => {
                    marker
                        .query_one("SELECT pg_logical_emit_message(true, 'walbridge', 'fence')::text", &[])
                        .await?
                }
            };
        marker.batch_execute("COMMIT").await?;
        Ok::<String, tokio_postgres::Error>(row.get(0))
    };
    let lsn = marking
        .await
        .map_err(|e| crate::fault::source_status("cannot mark the fence in the WAL", &e))?;
    Ok(Taken {
        client,
        lsn,
        attempts,
        marked: mark.is_some(),
    })
}

/// Who holds a lock on the fenced tables (or their partitions) that an
/// `EXCLUSIVE` lock must wait for — every mode but `ACCESS SHARE` — each
/// with the statement that ends it. Read from `pg_locks`, which every role
/// may read; `pg_stat_activity` adds user, state and age where the role may
/// see them. Never the query text: it may carry the application's values.
async fn lock_holders(client: &Client, tables: &[QualifiedName]) -> Result<Vec<String>, tokio_postgres::Error> {
    let names: Vec<String> = tables.iter().map(QualifiedName::quoted).collect();
    let rows = client
        .query(
            &format!(
                "WITH RECURSIVE fenced(oid) AS ( \
               SELECT to_regclass(n)::oid FROM unnest($1::text[]) n WHERE to_regclass(n) IS NOT NULL \
               UNION SELECT i.inhrelid FROM pg_inherits i JOIN fenced f ON i.inhparent = f.oid) \
             SELECT l.relation::regclass::text, l.mode, l.pid, {activity}, p.gid \
             FROM pg_locks l \
             LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
             LEFT JOIN pg_locks x ON l.pid IS NULL AND x.pid IS NULL AND x.locktype = 'transactionid' \
                  AND x.virtualtransaction = l.virtualtransaction \
             LEFT JOIN pg_prepared_xacts p ON p.transaction = x.transactionid \
             WHERE l.locktype = 'relation' AND l.granted AND l.mode <> 'AccessShareLock' \
               AND l.relation IN (SELECT oid FROM fenced) AND l.pid IS DISTINCT FROM pg_backend_pid() \
             ORDER BY a.xact_start NULLS FIRST LIMIT 10",
                activity = crate::blocker::ACTIVITY_COLUMNS
            ),
            &[&names],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let table: String = row.get(0);
            let mode: String = row.get(1);
            match (row.get::<_, Option<i32>>(2), row.get::<_, Option<String>>(7)) {
                (Some(pid), _) => format!(
                    "{table} is locked ({mode}) by {}",
                    crate::blocker::describe(pid, &row, 3, None)
                ),
                (None, Some(gid)) => format!(
                    "{table} is locked ({mode}) by prepared transaction '{gid}': COMMIT PREPARED {} or ROLLBACK \
                     PREPARED {}",
                    quote_literal(&gid),
                    quote_literal(&gid)
                ),
                (None, None) => format!("{table} is locked ({mode}) by a prepared transaction (see pg_prepared_xacts)"),
            }
        })
        .collect())
}

/// What a committed seal covers.
struct Sealed {
    tables: u32,
    sequences: u32,
    roles: u32,
    /// What it could not do, each naming the object and why.
    notes: Vec<String>,
}

/// Seals the fence and commits: a trigger that refuses writes (TRUNCATE
/// too) on every table of the database, firing for every session
/// (`ENABLE ALWAYS`, so `session_replication_role = replica` does not pass
/// it) where the role owns the table; with `nologin_roles`, those roles
/// made NOLOGIN; the sequences recorded to be set to their limit once it
/// has committed. The published tables (and their partitions) must all be
/// sealed; another table that cannot be (no TRIGGER privilege, a lock that
/// does not come within `lock_wait`) is named in the notes, not an error.
async fn seal(
    client: &Client,
    published: &[QualifiedName],
    nologin_roles: &[String],
    limits: Limits,
) -> Result<Sealed, tokio_postgres::Error> {
    // The lock step's statement_timeout (what was left of its deadline)
    // would otherwise bound the seal too: the seal gets what is left of
    // the hold. Tables the hold did not lock wait for theirs at most one
    // attempt's bound; the published ones are locked already.
    client
        .batch_execute(&format!(
            "SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}",
            limits
                .hold_until
                .saturating_duration_since(Instant::now())
                .as_millis()
                .max(1),
            limits.table_lock_timeout.as_millis().max(1)
        ))
        .await?;
    let names: Vec<String> = published.iter().map(QualifiedName::quoted).collect();
    // Every table of the database, the published ones (with their
    // partitions) first; walbridge's own schemas and temporary tables
    // are not the application's.
    let rows = client
        .query(
            "WITH RECURSIVE published(oid) AS ( \
               SELECT unnest($1::text[])::regclass::oid \
               UNION SELECT i.inhrelid FROM pg_inherits i JOIN published p ON i.inhparent = p.oid) \
             SELECT format('%I.%I', n.nspname, c.relname), c.oid IN (SELECT oid FROM published), \
                    has_table_privilege(c.oid, 'TRIGGER'), pg_has_role(c.relowner, 'USAGE') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', $2, $3) \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' \
             ORDER BY 2 DESC, 1",
            &[&names, &SCHEMA, &walbridge_migration::mark::STATE_SCHEMA],
        )
        .await?;
    let mut notes = Vec::new();
    let mut origin_only = Vec::new();
    let mut script = format!(
        "CREATE SCHEMA IF NOT EXISTS {SCHEMA}; \
         CREATE OR REPLACE FUNCTION {SCHEMA}.refuse_write() RETURNS trigger LANGUAGE plpgsql AS $fence$ \
         BEGIN RAISE EXCEPTION 'writes to %.% are fenced: this database was migrated by walbridge', \
         TG_TABLE_SCHEMA, TG_TABLE_NAME USING ERRCODE = 'read_only_sql_transaction', \
         HINT = 'walbridge release-source lifts the fence'; END $fence$; \
         CREATE TABLE IF NOT EXISTS {SEQUENCES_TABLE} (name text PRIMARY KEY, value bigint NOT NULL, \
           is_called boolean NOT NULL); \
         CREATE TABLE IF NOT EXISTS {ROLES_TABLE} (name text PRIMARY KEY);"
    );
    let trigger = |table: &str, owned: bool| {
        let mut sql = format!(
            "DROP TRIGGER IF EXISTS {TRIGGER} ON {table}; \
             CREATE TRIGGER {TRIGGER} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} \
             FOR EACH STATEMENT EXECUTE PROCEDURE {SCHEMA}.refuse_write();"
        );
        if owned {
            sql.push_str(&format!(" ALTER TABLE ONLY {table} ENABLE ALWAYS TRIGGER {TRIGGER};"));
        }
        sql
    };
    let mut others = Vec::new();
    let mut tables = 0;
    for row in &rows {
        let (table, is_published, may_trigger, owned): (String, bool, bool, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if !owned && may_trigger {
            origin_only.push(table.clone());
        }
        if is_published {
            // Already locked by the hold; without the privilege this fails,
            // and so does the seal (preflight checked it).
            script.push_str(&trigger(&table, owned));
            tables += 1;
        } else if may_trigger {
            others.push((table, owned));
        } else {
            notes.push(format!(
                "{table} is not fenced: the role has no TRIGGER privilege on it"
            ));
        }
    }
    client.batch_execute(&script).await?;
    // Not locked by the hold: a table whose lock does not come soon is
    // named, not waited for with every write held. All in one round trip
    // first (writes wait meanwhile); one at a time only if that fails.
    let all: String = others.iter().map(|(table, owned)| trigger(table, *owned)).collect();
    let at_once = client
        .batch_execute(&format!(
            "SAVEPOINT walbridge_fence_tables; {all} RELEASE SAVEPOINT walbridge_fence_tables"
        ))
        .await;
    if at_once.is_ok() {
        tables += others.len() as u32;
    } else {
        client
            .batch_execute("ROLLBACK TO SAVEPOINT walbridge_fence_tables")
            .await?;
        for (table, owned) in others {
            let attempt = format!(
                "SAVEPOINT walbridge_fence_table; {} RELEASE SAVEPOINT walbridge_fence_table",
                trigger(&table, owned)
            );
            match client.batch_execute(&attempt).await {
                Ok(()) => tables += 1,
                Err(e) => {
                    client
                        .batch_execute("ROLLBACK TO SAVEPOINT walbridge_fence_table")
                        .await?;
                    notes.push(format!("{table} is not fenced: {}", describe(&e)));
                }
            }
        }
    }
    if !origin_only.is_empty() {
        notes.push(format!(
            "the role does not own {}: their fence fires for ordinary sessions, not for those with \
             session_replication_role = replica",
            origin_only.join(", ")
        ));
    }
    // The roles that could log in are recorded (only those are let in
    // again); then, in one round trip, the roles, the sequences recorded to
    // be moved after the commit (setval is not transactional, and a seal
    // that rolls back must leave them as they were; the first seal's
    // values stay if a seal is repeated), and the commit.
    let roles = client
        .execute(
            &format!(
                "INSERT INTO {ROLES_TABLE} SELECT rolname FROM pg_roles WHERE rolname = ANY($1) AND rolcanlogin \
                 ON CONFLICT DO NOTHING"
            ),
            &[&nologin_roles],
        )
        .await? as u32;
    let mut finish: String = nologin_roles
        .iter()
        .map(|role| format!("ALTER ROLE {} NOLOGIN; ", quote_ident(role)))
        .collect();
    finish.push_str(&format!(
        "INSERT INTO {SEQUENCES_TABLE} (name, value, is_called) \
         SELECT format('%I.%I', schemaname, sequencename), coalesce(last_value, start_value), \
                last_value IS NOT NULL \
         FROM pg_sequences \
         WHERE NOT cycle AND has_sequence_privilege(format('%I.%I', schemaname, sequencename), 'SELECT, UPDATE') \
         ON CONFLICT DO NOTHING; \
         COMMIT"
    ));
    client.batch_execute(&finish).await?;

    // Sealed. What follows makes stray use fail sooner; its failure is a
    // note (release-source puts back whatever it did).
    let moved = client
        .query_one(
            &format!(
                "SELECT count(setval(s.name::regclass, CASE WHEN q.increment_by > 0 THEN q.max_value \
                                                          ELSE q.min_value END)) \
                 FROM {SEQUENCES_TABLE} s \
                 JOIN pg_sequences q ON format('%I.%I', q.schemaname, q.sequencename) = s.name"
            ),
            &[],
        )
        .await;
    let sequences = match moved {
        Ok(row) => row.get::<_, i64>(0) as u32,
        Err(e) => {
            notes.push(format!(
                "the source's sequences were not moved to their limit: {}",
                describe(&e)
            ));
            0
        }
    };
    if !nologin_roles.is_empty() {
        let ended = client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE usename = ANY($1) AND pid <> pg_backend_pid()",
                &[&nologin_roles],
            )
            .await;
        if let Err(e) = ended {
            notes.push(format!(
                "the sessions of {} could not be ended: {}",
                nologin_roles.join(", "),
                describe(&e)
            ));
        }
    }
    Ok(Sealed {
        tables,
        sequences,
        roles,
        notes,
    })
}

/// The roles of a hard fence exist and are not the agent's own: a fence
/// that locked walbridge out could never be lifted.
async fn check_nologin_roles(client: &Client, roles: &[String]) -> Result<(), Status> {
    if roles.is_empty() {
        return Ok(());
    }
    let rows = client
        .query(
            "SELECT r.name, p.rolname IS NOT NULL, \
                    r.name IN (current_user, session_user) OR r.name LIKE 'walbridge\\_%' \
             FROM unnest($1::text[]) AS r(name) LEFT JOIN pg_roles p ON p.rolname = r.name",
            &[&roles],
        )
        .await
        .map_err(|e| crate::fault::source_status("cannot read the hard fence's roles", &e))?;
    for row in rows {
        let (name, exists, ours): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
        if !exists {
            return Err(Status::invalid_argument(format!(
                "--hard-fence: role {name} does not exist on the source"
            )));
        }
        if ours {
            return Err(Status::invalid_argument(format!(
                "--hard-fence: role {name} is walbridge's own (the agent or the subscription logs in with it)"
            )));
        }
    }
    Ok(())
}

/// What a release removed.
pub struct Released {
    pub tables: u32,
    pub sequences: u32,
    pub roles: u32,
}

/// Removes a sealed fence and puts back what it changed.
pub async fn release(source: &Database) -> Result<Released, Status> {
    // Bounded: dropping the triggers waits for each table's lock, and a
    // release that waits gives up (and is run again) rather than queue
    // the application's readers behind it.
    let client = source
        .connect_with(APPLICATION_NAME, &crate::source::QUESTIONS)
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
    // The seal makes both tables at once; a fence sealed by an older
    // agent has neither.
    let recorded: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&SEQUENCES_TABLE])
        .await
        .map_err(fail)?
        .get(0);
    let (sequences, roles) = if recorded {
        let row = client
            .query_one(
                &format!("SELECT (SELECT count(*) FROM {SEQUENCES_TABLE}), (SELECT count(*) FROM {ROLES_TABLE})"),
                &[],
            )
            .await
            .map_err(fail)?;
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    } else {
        (0, 0)
    };
    client.batch_execute(RELEASE_SQL).await.map_err(fail)?;
    Ok(Released {
        tables: tables as u32,
        sequences: sequences as u32,
        roles: roles as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_timeout_or_a_deadlock_is_tried_again_anything_else_is_not() {
        assert!(worth_another_attempt(Some(&SqlState::LOCK_NOT_AVAILABLE)));
        assert!(worth_another_attempt(Some(&SqlState::T_R_DEADLOCK_DETECTED)));
        assert!(worth_another_attempt(Some(&SqlState::QUERY_CANCELED)));
        assert!(!worth_another_attempt(Some(&SqlState::INSUFFICIENT_PRIVILEGE)));
        assert!(!worth_another_attempt(Some(&SqlState::UNDEFINED_TABLE)));
        assert!(!worth_another_attempt(None));
    }

    #[test]
    fn tables_are_locked_in_one_order_each_once() {
        let t = |s: &str, n: &str| QualifiedName::new(s, n);
        assert_eq!(
            lock_order(vec![
                t("public", "b"),
                t("app", "z"),
                t("public", "a"),
                t("public", "b")
            ]),
            vec![t("app", "z"), t("public", "a"), t("public", "b")]
        );
    }

    #[test]
    fn the_hold_is_bounded_from_its_arrival() {
        let arrived = Instant::now();
        let hold = wire::FenceHold {
            lock_timeout_ms: 3000,
            max_hold_ms: 8000,
            table_lock_timeout_ms: 0,
            ..Default::default()
        };
        let limits = Limits::of(&hold, arrived);
        assert_eq!(limits.locks_by - arrived, Duration::from_secs(3));
        assert_eq!(limits.hold_until - arrived, Duration::from_secs(8));
        assert_eq!(limits.table_lock_timeout, TABLE_LOCK_TIMEOUT);
    }
}
