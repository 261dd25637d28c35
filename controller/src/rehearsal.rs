//! Preflight's rehearsal of the schema on the target: pre-data, then
//! post-data, dumped now (in a snapshot of pg_dump's own) and executed in
//! one target transaction that is always rolled back, each statement
//! under a savepoint, so that *every* statement the target rejects is
//! found before anything is created — each named by its dump entry, with
//! the target's error and the `--skip` that leaves it out.
//!
//! What it costs, and how it is bounded: the dump, and about what applying
//! the schema to empty tables costs (statements run in batches under one
//! savepoint; only a batch with a rejected statement is run again one
//! statement per savepoint); each statement is limited by
//! `statement_timeout`, the whole rehearsal by [`REHEARSAL_LIMIT`]. Its locks are on the objects it creates, which
//! nobody else can see, and on the few existing ones a statement touches
//! (a schema, an extension, a table already there): it never waits more
//! than `lock_timeout` for one, and holds them only while it runs. Like
//! the real pre-data transaction it needs room for a lock per created
//! object in the target's lock table: running out during pre-data means
//! the real pre-data would too, and is reported as an error; during
//! post-data (applied statement by statement for real), as a warning
//! that the rest was not rehearsed.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use walbridge_daemon::pg::{Database, describe};
use walbridge_migration::finding::{Finding, Side};
use walbridge_migration::ident::{QualifiedName, quote_ident};
use walbridge_migration::script::{Entry, Statement};
use walbridge_migration::skip::{self, Skip, skip_argument};

use crate::registry::AgentClient;
use crate::schema;

/// What of the source's schema the migration would apply.
#[derive(Debug, Clone, Default)]
pub struct SchemaScope {
    /// Tables left out of the dump (not selected).
    pub dump_exclude: Vec<QualifiedName>,
    pub skip: Vec<Skip>,
    /// GRANTs and default privileges are carried (`start --privileges`).
    pub privileges: bool,
    /// Large objects are left out (`start --no-large-objects`).
    pub skip_large_objects: bool,
}

/// Dumps both sections (no snapshot: the migration has none yet) and
/// rehearses them; `Err` is the operator's mistake (a skip that matches
/// nothing). A dump that fails is a warning: the source's findings say why.
pub async fn check_schema(
    agent: &AgentClient,
    target: &Database,
    scope: &SchemaScope,
    explicit: &[Finding],
) -> Result<Vec<Finding>, String> {
    let dumped = async {
        let pre_data = schema::dump(agent, "", "pre-data", &scope.dump_exclude, scope.privileges).await?;
        let post_data = schema::dump(agent, "", "post-data", &scope.dump_exclude, scope.privileges).await?;
        Ok::<_, walbridge_migration::fault::Fault>(Sections { pre_data, post_data })
    };
    match dumped.await {
        Ok(sections) => rehearse(target, sections, &scope.skip, explicit).await,
        Err(e) => Ok(vec![warning(
            "schema_rehearsal",
            "",
            format!("the schema could not be dumped to rehearse it on the target: {e}"),
            "",
        )]),
    }
}

/// The whole rehearsal's limit.
pub const REHEARSAL_LIMIT: Duration = Duration::from_secs(300);
/// Each statement's limit, and the longest wait for a lock.
const STATEMENT_TIMEOUT: &str = "60s";
const LOCK_TIMEOUT: &str = "5s";
/// Rejected statements reported one by one; past this, one summary.
const MAX_REJECTION_FINDINGS: usize = 200;
/// Statements run under one savepoint while the target accepts them: a
/// subtransaction per statement would make a big schema's rehearsal
/// several times slower than applying it.
const BATCH: usize = 64;
const SAVEPOINT: &str = "walbridge_rehearsal";
/// Characters of a rejected statement shown in its finding.
const SHOWN_STATEMENT_CHARS: usize = 300;

/// The sections to rehearse, as dumped.
pub struct Sections {
    pub pre_data: Vec<Statement>,
    pub post_data: Vec<Statement>,
}

/// A statement the target rejected.
struct Rejection {
    section: &'static str,
    statement: Statement,
    code: Option<SqlState>,
    error: String,
}

/// Leaves out what walbridge and the skips leave out, rehearses the rest,
/// and returns the findings; `Err` names the skips that match nothing.
pub async fn rehearse(
    target: &Database,
    sections: Sections,
    skips: &[Skip],
    explicit: &[Finding],
) -> Result<Vec<Finding>, String> {
    let pre_data = skip::filter(sections.pre_data, skips);
    let post_data = skip::filter(sections.post_data, skips);
    let unmatched = skip::unmatched(skips, &[&pre_data.matched, &post_data.matched]);
    if !unmatched.is_empty() {
        let names: Vec<String> = unmatched.iter().map(|s| format!("{:?}", s.as_str())).collect();
        return Err(format!(
            "--skip {} matches no entry of the schema dump (entries are named as pg_dump's headers name them: \
             type, then schema.name, e.g. 'TABLE public.orders', 'EVENT TRIGGER audit_ddl')",
            names.join(", ")
        ));
    }
    Ok(match run(target, &pre_data.statements, &post_data.statements).await {
        Ok(outcome) => findings(outcome, explicit),
        Err(problem) => vec![warning(
            "schema_rehearsal",
            "",
            format!("the schema could not be rehearsed on the target: {problem}"),
            "",
        )],
    })
}

fn error(check: &str, object: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding::error(Side::Target, check, object, message, fix)
}

fn warning(check: &str, object: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding::warning(Side::Target, check, object, message, fix)
}

/// How the rehearsal ended.
#[derive(Default)]
struct Outcome {
    rejections: Vec<Rejection>,
    /// The lock table filled up: in which section, after how many of its
    /// statements, with the settings that size it.
    locks_ran_out: Option<LockShortage>,
    /// It stopped at its time limit after this many statements.
    timed_out_after: Option<usize>,
    total: usize,
}

struct LockShortage {
    section: &'static str,
    done: usize,
    total: usize,
    max_locks_per_transaction: i64,
    max_connections: i64,
}

/// pg_dump's own timeouts would undo the rehearsal's bounds.
fn is_timeout_setting(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    [
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "transaction_timeout",
    ]
    .iter()
    .any(|setting| lower.starts_with(&format!("set {setting} ")))
}

async fn run(target: &Database, pre_data: &[Statement], post_data: &[Statement]) -> Result<Outcome, String> {
    let client = schema::connect(target).await.map_err(|e| e.to_string())?;
    let failed = |e: tokio_postgres::Error| describe(&e);
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; \
             SAVEPOINT {SAVEPOINT}"
        ))
        .await
        .map_err(failed)?;
    let started = Instant::now();
    let mut outcome = Outcome {
        total: pre_data.len() + post_data.len(),
        ..Outcome::default()
    };
    let mut ran = 0;
    'sections: for (section, statements) in [("pre-data", pre_data), ("post-data", post_data)] {
        let runnable: Vec<(usize, &Statement)> = statements
            .iter()
            .enumerate()
            .filter(|(_, s)| !is_timeout_setting(&s.text))
            .collect();
        for batch in runnable.chunks(BATCH) {
            if started.elapsed() > REHEARSAL_LIMIT {
                outcome.timed_out_after = Some(ran);
                break 'sections;
            }
            if run_batch(&client, batch).await? {
                ran += batch.len();
                continue;
            }
            // Something in it was rejected: again, one statement per
            // savepoint, to find each one.
            for &(done, statement) in batch {
                ran += 1;
                let Some(e) = run_one(&client, statement).await? else {
                    continue;
                };
                if schema::is_lock_table_full(&e) {
                    let settings = client
                        .query_one(
                            "SELECT current_setting('max_locks_per_transaction')::int8, \
                                    current_setting('max_connections')::int8",
                            &[],
                        )
                        .await
                        .map_err(failed)?;
                    outcome.locks_ran_out = Some(LockShortage {
                        section,
                        done,
                        total: statements.len(),
                        max_locks_per_transaction: settings.get(0),
                        max_connections: settings.get(1),
                    });
                    break 'sections;
                }
                outcome.rejections.push(Rejection {
                    section,
                    statement: statement.clone(),
                    code: e.code().cloned(),
                    error: describe(&e),
                });
            }
        }
    }
    client.batch_execute("ROLLBACK").await.map_err(failed)?;
    tracing::info!(
        statements = ran,
        rejected = outcome.rejections.len(),
        seconds = started.elapsed().as_secs_f64(),
        "schema rehearsed on the target and rolled back"
    );
    Ok(outcome)
}

/// Runs a batch under one savepoint: `true` if the target accepted every
/// statement (kept), `false` if it rejected one (the batch rolled back).
async fn run_batch(client: &tokio_postgres::Client, batch: &[(usize, &Statement)]) -> Result<bool, String> {
    client
        .batch_execute(&format!("RELEASE SAVEPOINT {SAVEPOINT}; SAVEPOINT {SAVEPOINT}"))
        .await
        .map_err(|e| describe(&e))?;
    for (_, statement) in batch {
        if let Err(e) = client.batch_execute(&statement.text).await {
            rolled_back(client, e).await?;
            return Ok(false);
        }
    }
    Ok(true)
}

/// Runs one statement under its own savepoint; the target's error if it
/// rejected it (rolled back).
async fn run_one(
    client: &tokio_postgres::Client,
    statement: &Statement,
) -> Result<Option<tokio_postgres::Error>, String> {
    let result = client
        .batch_execute(&format!(
            "RELEASE SAVEPOINT {SAVEPOINT}; SAVEPOINT {SAVEPOINT}; {}",
            statement.text
        ))
        .await;
    match result {
        Ok(()) => Ok(None),
        Err(e) => rolled_back(client, e).await.map(Some),
    }
}

/// Back to the savepoint after a rejected statement; a broken connection
/// (no server error) ends the rehearsal.
async fn rolled_back(
    client: &tokio_postgres::Client,
    e: tokio_postgres::Error,
) -> Result<tokio_postgres::Error, String> {
    if e.as_db_error().is_none() {
        return Err(describe(&e));
    }
    client
        .batch_execute(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}"))
        .await
        .map_err(|e| describe(&e))?;
    Ok(e)
}

/// What an undefined-object error after an earlier rejection most likely is.
fn is_consequence(code: Option<&SqlState>) -> bool {
    [
        SqlState::UNDEFINED_TABLE,
        SqlState::UNDEFINED_OBJECT,
        SqlState::UNDEFINED_FUNCTION,
        SqlState::INVALID_SCHEMA_NAME,
        SqlState::UNDEFINED_COLUMN,
    ]
    .iter()
    .any(|c| code == Some(c))
}

/// Whether an explicit target finding already says why this was rejected.
fn explained(rejection: &Rejection, explicit: &[Finding]) -> bool {
    let Some(entry) = &rejection.statement.entry else {
        return false;
    };
    let has = |check: &str, object: &str| explicit.iter().any(|f| f.check == check && f.object == object);
    let code = rejection.code.as_ref();
    let schema_of_entry = entry.schema.as_deref().map(quote_ident);
    if code == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        if schema_of_entry.is_some_and(|s| has("schema_create_privilege", &s)) {
            return true;
        }
        if matches!(entry.kind.as_str(), "SCHEMA" | "EXTENSION")
            && explicit.iter().any(|f| f.check == "database_create_privilege")
        {
            return true;
        }
    }
    // A GRANT to a role the target lacks: `missing_role` names it.
    if matches!(entry.kind.as_str(), "ACL" | "DEFAULT ACL")
        && code == Some(&SqlState::UNDEFINED_OBJECT)
        && explicit.iter().any(|f| f.check == "missing_role")
    {
        return true;
    }
    match entry.kind.as_str() {
        "SCHEMA" => has("leftover_schema", &quote_ident(&entry.name)),
        "EXTENSION" => {
            let name = quote_ident(&entry.name);
            has("missing_extension", &name) || has("extension_privilege", &name)
        }
        "TABLE" if code == Some(&SqlState::DUPLICATE_TABLE) => entry.schema.as_ref().is_some_and(|schema| {
            has(
                "conflicting_table",
                &QualifiedName::new(schema.clone(), entry.name.clone()).to_string(),
            )
        }),
        _ => false,
    }
}

fn findings(outcome: Outcome, explicit: &[Finding]) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut consequences: Vec<&Rejection> = Vec::new();
    let mut reported = 0usize;
    let mut unreported = 0usize;
    let mut earlier_rejection = false;
    for rejection in &outcome.rejections {
        let after_another = earlier_rejection;
        earlier_rejection = true;
        if explained(rejection, explicit) {
            continue;
        }
        if after_another && is_consequence(rejection.code.as_ref()) {
            consequences.push(rejection);
            continue;
        }
        if reported == MAX_REJECTION_FINDINGS {
            unreported += 1;
            continue;
        }
        reported += 1;
        findings.push(rejection_finding(rejection));
    }
    if unreported > 0 {
        findings.push(error(
            "schema_statement",
            "",
            format!("and {unreported} more statements the target rejects (only the first {MAX_REJECTION_FINDINGS} are listed)"),
            "fix the ones listed, then run preflight again",
        ));
    }
    if let Some(first) = consequences.first() {
        findings.push(error(
            "schema_statement_consequence",
            first.statement.entry.as_ref().map(Entry::label).unwrap_or_default(),
            format!(
                "{} more schema statement(s) fail, most likely because of a statement reported above (the first: {})",
                consequences.len(),
                first.error
            ),
            "fix the statements reported above, then run preflight again",
        ));
    }
    if let Some(shortage) = outcome.locks_ran_out {
        findings.push(lock_finding(&shortage));
    }
    if let Some(ran) = outcome.timed_out_after {
        findings.push(warning(
            "schema_rehearsal",
            "",
            format!(
                "the schema rehearsal stopped at its limit ({}s) after {ran} of {} statements: the rest was not \
                 rehearsed",
                REHEARSAL_LIMIT.as_secs(),
                outcome.total
            ),
            "",
        ));
    }
    findings
}

/// Whether the target rejected it because the object exists already.
fn already_exists(code: Option<&SqlState>) -> bool {
    [
        SqlState::DUPLICATE_TABLE,
        SqlState::DUPLICATE_OBJECT,
        SqlState::DUPLICATE_FUNCTION,
        SqlState::DUPLICATE_SCHEMA,
    ]
    .iter()
    .any(|c| code == Some(c))
}

/// `DROP ...` for an entry whose kind drops by its plain name (a function
/// drops by its signature, which the header does not quote).
fn drop_statement(entry: &Entry) -> Option<String> {
    let kind = entry.kind.as_str();
    if !matches!(
        kind,
        "TABLE" | "TYPE" | "DOMAIN" | "SEQUENCE" | "VIEW" | "MATERIALIZED VIEW" | "SCHEMA"
    ) {
        return None;
    }
    let name = match &entry.schema {
        Some(schema) => QualifiedName::new(schema.clone(), entry.name.clone()).to_string(),
        None => quote_ident(&entry.name),
    };
    Some(format!("DROP {kind} {name} CASCADE;"))
}

fn rejection_finding(rejection: &Rejection) -> Finding {
    let statement = &rejection.statement;
    let mut shown: String = statement.text.chars().take(SHOWN_STATEMENT_CHARS).collect();
    if statement.text.chars().count() > SHOWN_STATEMENT_CHARS {
        shown.push_str(" ...");
    }
    let exists = already_exists(rejection.code.as_ref());
    let (object, fix) = match &statement.entry {
        Some(entry) => {
            let skip = format!(
                "leave it out: walbridge start {} (and preflight with the same --skip)",
                skip_argument(entry)
            );
            let fix = match (exists, drop_statement(entry)) {
                (true, Some(drop)) => format!(
                    "{drop} -- on the target, once you are sure it holds nothing you need; or, if the \
                     application does not need it, {skip}"
                ),
                (true, None) => format!("drop it on the target; or, if the application does not need it, {skip}"),
                (false, _) => format!("make the target accept it, or, if the application does not need it, {skip}"),
            };
            (entry.label(), fix)
        }
        None => (
            format!("{} line {}", rejection.section, statement.line),
            "make the target accept this setting".to_owned(),
        ),
    };
    let leftover = if exists {
        " — it may be a leftover of an earlier attempt (walbridge never drops what it created on the target)"
    } else {
        ""
    };
    error(
        "schema_statement",
        object,
        format!(
            "the target rejects this {} statement (line {} of the dump): {}{leftover}\n{shown}",
            rejection.section, statement.line, rejection.error
        ),
        fix,
    )
}

fn lock_finding(shortage: &LockShortage) -> Finding {
    let per_transaction = shortage.max_locks_per_transaction;
    // Enough for the whole section at the rate it ran out, with room.
    let needed = per_transaction as f64 * shortage.total as f64 / shortage.done.max(1) as f64 * 1.25;
    let suggested = ((needed / 64.0).ceil() as i64 * 64).max(per_transaction * 2);
    let message = format!(
        "the target's lock table filled up after {} of {} {} statements (max_locks_per_transaction = \
         {per_transaction}, max_connections = {}): a transaction holds a lock on every object it creates until it \
         ends",
        shortage.done, shortage.total, shortage.section, shortage.max_connections
    );
    let fix = format!(
        "ALTER SYSTEM SET max_locks_per_transaction = {suggested}; -- on the target, then restart it (on a managed \
         server: its parameter settings); or migrate fewer tables at once (--tables)"
    );
    if shortage.section == "pre-data" {
        error(
            "pre_data_locks",
            "max_locks_per_transaction",
            format!(
                "{message}; pre-data is applied in one transaction (so a failure leaves nothing), and would fail the same way"
            ),
            fix,
        )
    } else {
        warning(
            "schema_rehearsal",
            "max_locks_per_transaction",
            format!(
                "{message}; post-data is applied statement by statement, so this does not stop the migration, but the rest of post-data was not rehearsed"
            ),
            fix,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_dumps_timeouts_are_recognised() {
        assert!(is_timeout_setting("SET statement_timeout = 0"));
        assert!(is_timeout_setting("SET lock_timeout = 0"));
        assert!(is_timeout_setting("SET idle_in_transaction_session_timeout = 0"));
        assert!(is_timeout_setting("SET transaction_timeout = 0"));
        assert!(!is_timeout_setting("SET client_encoding = 'UTF8'"));
    }

    #[test]
    fn the_suggested_lock_setting_covers_the_section() {
        let finding = lock_finding(&LockShortage {
            section: "pre-data",
            done: 1000,
            total: 3000,
            max_locks_per_transaction: 64,
            max_connections: 100,
        });
        assert!(finding.is_error());
        assert!(
            finding.fix.contains("max_locks_per_transaction = 256"),
            "{}",
            finding.fix
        );
    }
}
