//! The migration commands: `preflight`, `start`, `status`, `verify`.

use std::time::Duration;

use serde::Serialize;
use walbridge_proto::v1 as wire;

use crate::client::{ApiAddress, connect};
use crate::output::{Failure, print_json, print_table};
use crate::progress::Follow;

/// How often `start` and `status --watch` ask the controller.
const POLL: Duration = Duration::from_millis(200);
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
const CUTOVER_POLL: Duration = Duration::from_millis(100);

/// How long `start` keeps trying to follow a migration whose controller
/// stopped answering (it restarts, say) before it leaves it to `status`.
const FOLLOW_OUTAGE: Duration = Duration::from_secs(60);
/// What a controller that stopped answering means for the migration.
const GOES_ON: &str = "the migration goes on in the controller, and `walbridge status` shows it once the controller \
                       answers again";

/// Whether a failed call means the controller did not answer (it is down
/// or restarting), rather than that it answered no. Only for calls the
/// controller never refuses with these codes (`status`).
fn controller_away(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
    )
}

/// Why the controller did not answer, in the words of the innermost
/// cause ("connection closed before message completed", "No such file or
/// directory"), not tonic's bare "transport error".
fn why_away(status: &tonic::Status) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    let mut innermost = None;
    while let Some(inner) = cause {
        innermost = Some(inner.to_string());
        cause = inner.source();
    }
    innermost.unwrap_or_else(|| status.message().to_owned())
}

fn call_failed(status: tonic::Status) -> Failure {
    match status.code() {
        tonic::Code::InvalidArgument => Failure::Usage(status.message().to_owned()),
        _ => Failure::Operation(status.message().to_owned()),
    }
}

fn selection(tables: &[String], exclude: &[String]) -> Option<wire::TableSelection> {
    Some(wire::TableSelection {
        tables: tables.to_vec(),
        exclude: exclude.to_vec(),
    })
}

#[derive(Debug, Serialize)]
struct FindingView<'a> {
    severity: &'a str,
    side: &'a str,
    check: &'a str,
    object: &'a str,
    message: &'a str,
    fix: &'a str,
}

pub struct PreflightOptions {
    pub agent: String,
    pub tables: Vec<String>,
    pub exclude: Vec<String>,
    pub skip: Vec<String>,
    pub privileges: bool,
    pub skip_large_objects: bool,
    pub direct: bool,
    pub copy_only: bool,
    pub json: bool,
}

pub async fn preflight(address: &ApiAddress, options: PreflightOptions) -> Result<(), Failure> {
    let json = options.json;
    let mut client = connect(address).await.map_err(Failure::Operation)?;
    let findings = client
        .preflight(wire::PreflightRequest {
            agent: options.agent,
            selection: selection(&options.tables, &options.exclude),
            skip: options.skip,
            privileges: options.privileges,
            skip_large_objects: options.skip_large_objects,
            direct: options.direct,
            copy_only: options.copy_only,
        })
        .await
        .map_err(call_failed)?
        .into_inner()
        .findings;
    let errors = findings.iter().filter(|f| f.severity == "error").count();
    if json {
        let views: Vec<FindingView> = findings
            .iter()
            .map(|f| FindingView {
                severity: &f.severity,
                side: &f.side,
                check: &f.check,
                object: &f.object,
                message: &f.message,
                fix: &f.fix,
            })
            .collect();
        print_json(&serde_json::json!({ "errors": errors, "findings": views }));
    } else if findings.is_empty() {
        println!("Preflight found nothing to fix.");
    } else {
        let rows: Vec<[String; 5]> = findings
            .iter()
            .map(|f| {
                [
                    f.severity.to_uppercase(),
                    f.side.clone(),
                    f.check.clone(),
                    f.object.clone(),
                    f.message.clone(),
                ]
            })
            .collect();
        print_table(&["SEVERITY", "SIDE", "CHECK", "OBJECT", "WHY"], &rows);
        println!();
        for f in findings.iter().filter(|f| !f.fix.is_empty()) {
            let object = if f.object.is_empty() { &f.check } else { &f.object };
            println!("fix {object}: {}", f.fix);
        }
    }
    if errors > 0 {
        return Err(Failure::Operation(format!("preflight found {errors} error(s)")));
    }
    Ok(())
}

/// `start --compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    Auto,
    Zstd,
    None,
}

pub struct StartOptions {
    pub compression: Compression,
    pub agent: String,
    pub tables: Vec<String>,
    pub exclude: Vec<String>,
    pub skip: Vec<String>,
    pub privileges: bool,
    pub skip_large_objects: bool,
    pub parallel: u32,
    pub no_verify: bool,
    pub direct: bool,
    pub copy_only: bool,
    pub json: bool,
}

/// Starts the migration, then follows it until it streams (with
/// `--copy-only`, until the copy is done).
pub async fn start(address: &ApiAddress, options: StartOptions) -> Result<(), Failure> {
    let mut client = connect(address).await.map_err(Failure::Operation)?;
    let started = client
        .start(wire::StartRequest {
            agent: options.agent,
            selection: selection(&options.tables, &options.exclude),
            parallel: options.parallel,
            no_verify: options.no_verify,
            direct: options.direct,
            copy_only: options.copy_only,
            skip: options.skip,
            privileges: options.privileges,
            skip_large_objects: options.skip_large_objects,
            compression: match options.compression {
                Compression::Auto => wire::Compression::Auto,
                Compression::Zstd => wire::Compression::Zstd,
                Compression::None => wire::Compression::None,
            } as i32,
        })
        .await
        .map_err(call_failed)?
        .into_inner();
    if !options.json {
        println!("migration {} started: {} tables", started.migration, started.tables);
    }
    let mut follow = Follow::new(options.json);
    // Since when the controller has not answered, while it does not.
    let mut away: Option<std::time::Instant> = None;
    loop {
        let status = match client.status(wire::StatusRequest {}).await {
            Ok(status) => status.into_inner(),
            Err(e) if controller_away(&e) => {
                let since = *away.get_or_insert_with(|| {
                    eprintln!(
                        "walbridge: the controller at {} stopped answering ({}): {GOES_ON}; still following",
                        address.describe(),
                        why_away(&e)
                    );
                    std::time::Instant::now()
                });
                if since.elapsed() > FOLLOW_OUTAGE {
                    follow.finish();
                    return Err(Failure::Operation(format!(
                        "the controller at {} has not answered for {} s: {GOES_ON}",
                        address.describe(),
                        FOLLOW_OUTAGE.as_secs()
                    )));
                }
                tokio::time::sleep(POLL).await;
                if let Ok(again) = connect(address).await {
                    client = again;
                }
                continue;
            }
            Err(e) => return Err(call_failed(e)),
        };
        if away.take().is_some() {
            eprintln!("walbridge: the controller answers again");
        }
        follow.update(&status);
        match status.phase.as_str() {
            "copied" | "streaming" => {
                follow.finish();
                if options.json {
                    print_json(&StatusView::from(&status));
                } else {
                    let rows: u64 = status.tables.iter().map(|t| t.rows).sum();
                    let bytes: u64 = status.tables.iter().map(|t| t.bytes).sum();
                    println!(
                        "migration {}: {} tables, {rows} rows, {:.1} MB copied; phase {} (details: walbridge status)",
                        status.migration,
                        status.tables.len(),
                        bytes as f64 / 1e6,
                        status.phase
                    );
                    for event in &status.events {
                        println!("note: {event}");
                    }
                }
                return Ok(());
            }
            "failed" => {
                follow.finish();
                if options.json {
                    print_json(&StatusView::from(&status));
                }
                return Err(Failure::Operation(format!(
                    "the migration failed: {}",
                    status.errors.join("; ")
                )));
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

#[derive(Debug, Serialize)]
struct TableView {
    name: String,
    state: String,
    rows: u64,
    bytes: u64,
    copy_seconds: f64,
    rows_per_second: f64,
    copy_attempts: u32,
    ranges: u32,
    wire_bytes: u64,
}

#[derive(Debug, Serialize)]
struct StatusView {
    phase: String,
    migration: String,
    agent: String,
    slot: String,
    consistent_lsn: String,
    tables: Vec<TableView>,
    errors: Vec<String>,
    events: Vec<String>,
    copy_restarts: u32,
    /// Absent (null) while it cannot be known, e.g. with the agent away.
    lag_bytes: Option<u64>,
    lag_seconds: Option<f64>,
    retained_wal_bytes: Option<u64>,
    /// Seconds since the subscriber last reported to the source.
    reply_age_seconds: Option<f64>,
    /// The slot's wal_status (reserved, extended, unreserved, lost).
    wal_status: String,
    /// WAL the source may still write before the slot is invalidated.
    safe_wal_bytes: Option<i64>,
    slot_active: bool,
    /// What the controller runs now: "" when the migration rests.
    running: String,
    schema_drift: Vec<DriftView>,
    retries: Vec<RetryView>,
    waiting: Option<WaitView>,
    subscription: String,
    subscription_errors: u64,
    warnings: Vec<String>,
    cutover: Option<CutoverView>,
}

#[derive(Debug, Serialize)]
struct RetryView {
    unit: String,
    count: u32,
    kind: String,
    hint: String,
    last_error: String,
    since_unix_ms: i64,
}

#[derive(Debug, Serialize)]
struct WaitView {
    agent: String,
    phase: String,
    since_unix_ms: i64,
    reason: String,
}

#[derive(Debug, Serialize)]
struct CutoverView {
    done: bool,
    steps: Vec<serde_json::Value>,
    write_downtime_seconds: f64,
    fence_lsn: String,
    error: String,
}

impl From<&wire::CutoverResponse> for CutoverView {
    fn from(c: &wire::CutoverResponse) -> Self {
        CutoverView {
            done: c.done,
            steps: c
                .steps
                .iter()
                .map(|s| serde_json::json!({"name": s.name, "seconds": s.seconds, "detail": s.detail}))
                .collect(),
            write_downtime_seconds: c.write_downtime_seconds,
            fence_lsn: c.fence_lsn.clone(),
            error: c.error.clone(),
        }
    }
}

impl From<&wire::StatusResponse> for StatusView {
    fn from(status: &wire::StatusResponse) -> Self {
        StatusView {
            phase: status.phase.clone(),
            migration: status.migration.clone(),
            agent: status.agent.clone(),
            slot: status.slot.clone(),
            consistent_lsn: status.consistent_lsn.clone(),
            tables: status
                .tables
                .iter()
                .map(|t| TableView {
                    name: t.name.clone(),
                    state: t.state.clone(),
                    rows: t.rows,
                    bytes: t.bytes,
                    copy_seconds: t.copy_seconds,
                    copy_attempts: t.copy_attempts,
                    ranges: t.ranges,
                    wire_bytes: t.wire_bytes,
                    rows_per_second: if t.copy_seconds > 0.0 {
                        t.rows as f64 / t.copy_seconds
                    } else {
                        0.0
                    },
                })
                .collect(),
            errors: status.errors.clone(),
            events: status.events.clone(),
            copy_restarts: status.copy_restarts,
            lag_bytes: status.lag_bytes,
            lag_seconds: status.lag_seconds,
            retained_wal_bytes: status.retained_wal_bytes,
            reply_age_seconds: status.reply_age_seconds,
            wal_status: status.wal_status.clone(),
            safe_wal_bytes: status.safe_wal_bytes,
            slot_active: status.slot_active,
            running: status.running.clone(),
            schema_drift: status.schema_drift.iter().map(DriftView::from).collect(),
            retries: status
                .retries
                .iter()
                .map(|r| RetryView {
                    unit: r.unit.clone(),
                    count: r.count,
                    kind: r.kind.clone(),
                    hint: r.hint.clone(),
                    last_error: r.last_error.clone(),
                    since_unix_ms: r.since_unix_ms,
                })
                .collect(),
            waiting: status.waiting.as_ref().map(|w| WaitView {
                agent: w.agent.clone(),
                phase: w.phase.clone(),
                since_unix_ms: w.since_unix_ms,
                reason: w.reason.clone(),
            }),
            subscription: status.subscription.clone(),
            subscription_errors: status.subscription_errors,
            warnings: status.warnings.clone(),
            cutover: status.cutover.as_ref().map(CutoverView::from),
        }
    }
}

fn print_status(status: &wire::StatusResponse) {
    println!(
        "migration {}  phase {}  agent {}",
        status.migration, status.phase, status.agent
    );
    if !status.slot.is_empty() {
        println!("slot {}  consistent at {}", status.slot, status.consistent_lsn);
    }
    if !status.wal_status.is_empty() || status.safe_wal_bytes.is_some() {
        println!(
            "slot WAL: {}{}",
            if status.wal_status.is_empty() {
                "unknown"
            } else {
                &status.wal_status
            },
            status
                .safe_wal_bytes
                .map(|b| format!(", {b} bytes more before max_slot_wal_keep_size invalidates it"))
                .unwrap_or_default()
        );
    }
    if !status.subscription.is_empty() {
        let known = |value: Option<String>| value.unwrap_or_else(|| "unknown".to_owned());
        println!(
            "subscription {}  lag {} s / {} bytes  last report {} s ago  slot {}  WAL retained {} bytes",
            status.subscription,
            known(status.lag_seconds.map(|s| format!("{s:.1}"))),
            known(status.lag_bytes.map(|b| b.to_string())),
            known(status.reply_age_seconds.map(|s| format!("{s:.1}"))),
            if status.slot_active { "active" } else { "inactive" },
            known(status.retained_wal_bytes.map(|b| b.to_string())),
        );
    }
    if !status.running.is_empty() {
        println!("running: {}", status.running);
    }
    for drift in &status.schema_drift {
        let how = if drift.additive {
            "sync-schema applies"
        } else {
            "by hand"
        };
        println!("schema drift on {}: {} ({how}: {})", drift.table, drift.what, drift.ddl);
    }
    if let Some(waiting) = &status.waiting {
        println!(
            "WAITING for agent {} since {} (phase {}): {}; the migration goes on when it can use it",
            waiting.agent,
            crate::output::local_time(waiting.since_unix_ms),
            waiting.phase,
            if waiting.reason.is_empty() {
                "not connected"
            } else {
                &waiting.reason
            }
        );
    }
    for retry in &status.retries {
        println!(
            "retrying {} ({} times since {}, {}): {} ({})",
            retry.unit,
            retry.count,
            crate::output::local_time(retry.since_unix_ms),
            retry.kind,
            retry.last_error,
            retry.hint
        );
    }
    if let Some(cutover) = &status.cutover {
        print_cutover(cutover);
    }
    let view = StatusView::from(status);
    let rows: Vec<[String; 5]> = view
        .tables
        .iter()
        .map(|t| {
            [
                t.name.clone(),
                t.state.clone(),
                t.rows.to_string(),
                t.bytes.to_string(),
                format!("{:.0}", t.rows_per_second),
            ]
        })
        .collect();
    print_table(&["TABLE", "STATE", "ROWS", "BYTES", "ROWS/S"], &rows);
    for event in &status.events {
        println!("note: {event}");
    }
    for warning in &status.warnings {
        println!("WARNING: {warning}");
    }
    for error in &status.errors {
        println!("error: {error}");
    }
}

fn print_cutover(cutover: &wire::CutoverResponse) {
    print_cutover_steps(cutover, 0);
    print_cutover_outcome(cutover);
}

/// Prints the steps after the first `printed`; returns how many are printed.
fn print_cutover_steps(cutover: &wire::CutoverResponse, printed: usize) -> usize {
    for step in cutover.steps.iter().skip(printed) {
        println!("cutover {:<10} {:>8.3} s  {}", step.name, step.seconds, step.detail);
    }
    printed.max(cutover.steps.len())
}

fn print_cutover_outcome(cutover: &wire::CutoverResponse) {
    if cutover.done {
        println!(
            "cutover done: write downtime {:.3} s (fence at {})",
            cutover.write_downtime_seconds, cutover.fence_lsn
        );
    } else if !cutover.error.is_empty() {
        println!("cutover failed: {}", cutover.error);
    }
}

pub async fn status(address: &ApiAddress, json: bool, watch: bool) -> Result<(), Failure> {
    let mut client = connect(address).await.map_err(Failure::Operation)?;
    let mut away = false;
    loop {
        let status = match client.status(wire::StatusRequest {}).await {
            Ok(status) => status.into_inner(),
            Err(e) if watch && controller_away(&e) => {
                if !away {
                    eprintln!(
                        "walbridge: the controller at {} is not answering ({}): {GOES_ON}; watching for it",
                        address.describe(),
                        why_away(&e)
                    );
                    away = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
                if let Ok(again) = connect(address).await {
                    client = again;
                }
                continue;
            }
            Err(e) => return Err(call_failed(e)),
        };
        if std::mem::take(&mut away) {
            eprintln!("walbridge: the controller answers again");
        }
        if watch && !json {
            // Home and clear, like `top`: the next screen replaces this one.
            print!("\x1b[H\x1b[2J");
        }
        if json {
            print_json(&StatusView::from(&status));
        } else if status.phase == "none" {
            println!("No migration.");
        } else {
            print_status(&status);
        }
        if !watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

pub struct CutoverOptions {
    pub max_lag: std::time::Duration,
    pub timeout: std::time::Duration,
    pub dry_run: bool,
    pub hard_fence: Vec<String>,
    pub json: bool,
}

pub async fn cutover(address: &ApiAddress, options: CutoverOptions) -> Result<(), Failure> {
    let mut client = connect(address).await.map_err(Failure::Operation)?;
    let request = wire::CutoverRequest {
        max_lag_seconds: options.max_lag.as_secs_f64(),
        timeout_seconds: options.timeout.as_secs_f64(),
        dry_run: options.dry_run,
        hard_fence_roles: options.hard_fence.clone(),
    };
    let mut call = {
        let mut client = client.clone();
        tokio::spawn(async move { client.cutover(request).await })
    };
    // The steps as they complete, read from status while the call runs.
    let mut printed = 0;
    let report = loop {
        tokio::select! {
            done = &mut call => {
                break done
                    .map_err(|e| Failure::Operation(format!("the cutover call failed: {e}")))?
                    .map_err(call_failed)?
                    .into_inner();
            }
            _ = tokio::time::sleep(CUTOVER_POLL) => {
                if options.json {
                    continue;
                }
                if let Ok(status) = client.status(wire::StatusRequest {}).await
                    && let Some(live) = status.into_inner().cutover
                {
                    printed = print_cutover_steps(&live, printed);
                }
            }
        }
    };
    if options.json {
        print_json(&CutoverView::from(&report));
    } else {
        print_cutover_steps(&report, printed);
        print_cutover_outcome(&report);
    }
    if report.done || (options.dry_run && report.error.is_empty()) {
        Ok(())
    } else {
        Err(Failure::Operation(format!("cutover failed: {}", report.error)))
    }
}

/// release-source, abort and cleanup: each says what it removed.
pub async fn removal(address: &ApiAddress, which: Removal, json: bool) -> Result<(), Failure> {
    let mut client = connect(address).await.map_err(Failure::Operation)?;
    let response = match which {
        Removal::ReleaseSource => client.release_source(wire::ReleaseSourceRequest {}).await,
        Removal::Abort { force } => client.abort(wire::AbortRequest { force }).await,
        Removal::Cleanup => client.cleanup(wire::CleanupRequest {}).await,
    }
    .map_err(call_failed)?
    .into_inner();
    if json {
        print_json(&serde_json::json!({
            "phase": response.phase,
            "removed": response.removed,
            "remaining": response.remaining,
            "source_sql": response.source_sql,
        }));
    } else {
        if response.removed.is_empty() && response.remaining.is_empty() {
            println!("nothing to remove");
        }
        for removed in &response.removed {
            println!("removed {removed}");
        }
        for remaining in &response.remaining {
            println!("left behind: {remaining}");
        }
        if !response.source_sql.is_empty() {
            println!("run on the source, in the migration's database, to remove what remains there:");
            for sql in &response.source_sql {
                println!("  {sql}");
            }
        }
        println!("phase {}", response.phase);
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct DriftView {
    table: String,
    what: String,
    ddl: String,
    additive: bool,
}

impl From<&wire::SchemaDrift> for DriftView {
    fn from(d: &wire::SchemaDrift) -> Self {
        DriftView {
            table: d.table.clone(),
            what: d.what.clone(),
            ddl: d.ddl.clone(),
            additive: d.additive,
        }
    }
}

pub async fn sync_schema(address: &ApiAddress, dry_run: bool, json: bool) -> Result<(), Failure> {
    let mut client = connect(address).await.map_err(Failure::Operation)?;
    let synced = client
        .sync_schema(wire::SyncSchemaRequest { dry_run })
        .await
        .map_err(call_failed)?
        .into_inner();
    if json {
        let views = |list: &[wire::SchemaDrift]| list.iter().map(DriftView::from).collect::<Vec<_>>();
        print_json(&serde_json::json!({
            "applied": views(&synced.applied),
            "remaining": views(&synced.remaining),
            "errors": synced.errors,
        }));
    } else {
        let verb = if dry_run { "would apply" } else { "applied" };
        for drift in &synced.applied {
            println!("{verb} on {}: {}", drift.table, drift.ddl);
        }
        for drift in &synced.remaining {
            println!("left to you on {}: {} ({})", drift.table, drift.what, drift.ddl);
        }
        for error in &synced.errors {
            println!("error: {error}");
        }
        if synced.applied.is_empty() && synced.remaining.is_empty() {
            println!("the target's tables match the source's");
        }
    }
    if synced.errors.is_empty() {
        Ok(())
    } else {
        Err(Failure::Operation(format!(
            "the target refused {} statement(s)",
            synced.errors.len()
        )))
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Removal {
    ReleaseSource,
    Abort { force: bool },
    Cleanup,
}

pub async fn verify(address: &ApiAddress, tables: &[String], exclude: &[String], json: bool) -> Result<(), Failure> {
    let mut client = connect(address).await.map_err(Failure::Operation)?;
    let results = client
        .verify(wire::VerifyRequest {
            selection: selection(tables, exclude),
        })
        .await
        .map_err(call_failed)?
        .into_inner()
        .tables;
    let bad: Vec<&wire::TableVerification> = results.iter().filter(|t| !t.matches).collect();
    if json {
        let tables: Vec<_> = results
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "matches": t.matches,
                    "source_rows": t.source_rows, "target_rows": t.target_rows,
                    "source_checksum": t.source_checksum, "target_checksum": t.target_checksum,
                    "error": (!t.error.is_empty()).then_some(&t.error),
                })
            })
            .collect();
        print_json(&serde_json::json!({ "matches": bad.is_empty(), "tables": tables }));
    } else {
        let rows: Vec<[String; 4]> = results
            .iter()
            .map(|t| {
                let verdict = if !t.error.is_empty() {
                    format!("ERROR: {}", t.error)
                } else if t.matches {
                    "exact".to_owned()
                } else {
                    "MISMATCH".to_owned()
                };
                [
                    t.name.clone(),
                    t.source_rows.to_string(),
                    t.target_rows.to_string(),
                    verdict,
                ]
            })
            .collect();
        print_table(&["TABLE", "SOURCE ROWS", "TARGET ROWS", "RESULT"], &rows);
    }
    if !bad.is_empty() {
        let names: Vec<&str> = bad.iter().map(|t| t.name.as_str()).collect();
        return Err(Failure::Operation(format!(
            "{} table(s) differ between source and target: {}",
            bad.len(),
            names.join(", ")
        )));
    }
    Ok(())
}
