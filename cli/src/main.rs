//! `walbridge`, the operator's command line. It drives the controller over
//! its API; `certs` needs no controller.

mod agents;
mod certs;
mod client;
mod demo;
mod migrate;
mod output;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use walbridge_daemon::settings::{ProcessEnvironment, Settings, add_to_command};

use crate::client::ApiAddress;
use crate::output::Failure;

/// walbridge moves a live PostgreSQL database to another server over logical replication.
///
/// This CLI talks to the walbridge controller's API (--api). Every setting can
/// come from a flag, a WALBRIDGE_* environment variable or the TOML file named
/// by --config, in that order. Exit status: 0 success, 1 the operation failed,
/// 2 bad usage or configuration.
#[derive(Debug, Parser)]
#[command(name = "walbridge", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the agents connected to the controller and what each sees of its source.
    Agents {
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check the source (through its agent) and the target; creates nothing. Exit 1 on any error finding.
    ///
    /// As `start` will run it, it also proves that the target can log in to the source the way
    /// the subscription will (a throwaway subscription that connects through the tunnel, or
    /// directly with --direct, and is dropped at once); --copy-only leaves that out.
    Preflight {
        /// The agent next to the source.
        #[arg(long)]
        agent: String,
        #[command(flatten)]
        tables: TableArgs,
        #[command(flatten)]
        schema: SchemaArgs,
        #[command(flatten)]
        route: RouteArgs,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a migration: preflight, publication, slot and snapshot, schema, parallel copy, verification, subscription.
    ///
    /// Follows the migration until it streams (or, with --copy-only, until the copy is done);
    /// Ctrl-C leaves it running in the controller.
    Start {
        /// The agent next to the source.
        #[arg(long)]
        agent: String,
        #[command(flatten)]
        tables: TableArgs,
        #[command(flatten)]
        schema: SchemaArgs,
        /// Tables copied at once (default: the agent host's CPUs, at least 2).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        parallel: u32,
        /// Do not checksum each table right after its copy.
        #[arg(long)]
        no_verify: bool,
        /// Table data over the link: `auto` compresses with zstd while it saves at least half
        /// the bytes (measured on each stream's first chunks, and again now and then), `zstd`
        /// always, `none` never (a fast link, a busy agent host).
        #[arg(long, value_enum, default_value_t = migrate::Compression::Auto)]
        compression: migrate::Compression,
        #[command(flatten)]
        route: RouteArgs,
        /// Print the final status as one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Show the phase, each table's copy, and while streaming the lag, retained WAL and subscription state.
    Status {
        /// Redraw every second, like `top`, until Ctrl-C.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
    },
    /// Switch to the target: wait for lag, fence writes on the source, catch up, copy sequences, detach.
    ///
    /// Any failure or timeout before the subscription is detached lifts the fence, and the
    /// source carries on as before (exit 1). After a cutover the source stays write-protected
    /// until `release-source`: every table of the database refuses writes (for every session,
    /// `session_replication_role = replica` too, where walbridge's role owns the table), and its
    /// sequences stand at their limit so a stray nextval() fails.
    Cutover {
        /// Lag to wait for before fencing (e.g. 500ms, 2s).
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
        max_lag: std::time::Duration,
        /// Limit for the whole cutover, lag wait included (e.g. 30s, 2m).
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Check lag and sequences; fence nothing, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Hard fence: make ROLE NOLOGIN at the seal and end its sessions, for writers that
        /// bypass triggers (superusers, other replication tools). Repeatable; `release-source`
        /// lets the roles log in again.
        #[arg(long, value_name = "ROLE")]
        hard_fence: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Bring the target's tables in line with the source's while the migration streams.
    ///
    /// Applies the additive differences `status` shows under schema_drift — columns added on
    /// the source, indexes, widened types — each as its own statement on the target, and lists
    /// the rest (dropped or narrowed columns, changed constraints) with the DDL a person may run.
    /// The cutover refuses while any difference remains.
    SyncSchema {
        /// Say what would be applied; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Lift the write fence a cutover left on the source.
    ///
    /// Removes the triggers, sets the sequences back where the seal found them and lets the
    /// hard fence's roles log in again. `cleanup` leaves the fence in place: only this lifts it.
    ReleaseSource {
        #[arg(long)]
        json: bool,
    },
    /// Stop the migration in any phase and remove its subscription, slots, publication and fence.
    ///
    /// The target keeps the tables and rows already copied.
    Abort {
        /// Also when the agent or the source is gone: remove what walbridge made on the target and
        /// print what remains on the source, with the SQL that removes it there.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// After cutover: drop the subscription, slot, publication and leaked replication origins.
    ///
    /// The source's write fence stays, so nothing writes there by mistake: `release-source`
    /// lifts it. Safe to run twice.
    Cleanup {
        #[arg(long)]
        json: bool,
    },
    /// Count and checksum every table on both sides; exit 1 when any differs.
    ///
    /// Exact when the source is quiet: each side reads a consistent snapshot of its own.
    Verify {
        #[command(flatten)]
        tables: TableArgs,
        #[arg(long)]
        json: bool,
    },
    /// The whole product on this machine, in under a minute: throwaway source and target clusters,
    /// a live application, agent and controller in-process over mutual TLS, copy, streaming
    /// through the tunnel, cutover, verify, a report; then everything is removed.
    ///
    /// Needs only PostgreSQL's server binaries (pg_config --bindir, WALBRIDGE_PG_BIN or PATH).
    Demo {
        /// Print the report as one JSON document on standard output (the narration goes to
        /// standard error).
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (e.g. `walbridge completions bash > /etc/bash_completion.d/walbridge`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `walbridge man > /usr/local/share/man/man1/walbridge.1`.
    Man,
    /// Make the certificates of an install (no controller needed).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

/// Which tables: patterns match `schema.table` (unquoted) with `*` and `?`;
/// a pattern without a dot matches the table name in any schema.
#[derive(Debug, clap::Args)]
struct TableArgs {
    /// Only these tables (repeat or comma-separate); default: every user table.
    #[arg(long, value_name = "PATTERN", value_delimiter = ',')]
    tables: Vec<String>,
    /// Leave these tables out.
    #[arg(long, value_name = "PATTERN", value_delimiter = ',')]
    exclude: Vec<String>,
}

/// What of the source's schema the migration carries.
#[derive(Debug, clap::Args)]
struct SchemaArgs {
    /// Leave this entry of the schema dump out (repeatable), named as pg_dump's header names it:
    /// its type, then its name, schema-qualified or not — e.g. --skip 'EVENT TRIGGER audit_ddl',
    /// --skip 'EXTENSION pg_stat_statements', --skip 'FUNCTION public.audit()'. The type is matched
    /// case-insensitively, the name exactly; a skip that matches nothing is an error. Preflight
    /// names every statement the target would reject with the --skip that leaves it out.
    /// (walbridge itself leaves out comments on extensions and on the public schema.)
    #[arg(long, value_name = "ENTRY")]
    skip: Vec<String>,
    /// Carry GRANTs and default privileges to the target, so that the application's roles can use
    /// their tables there after the cutover. Their roles must exist on the target: preflight lists
    /// those that do not, each with the CREATE ROLE that makes it (without its password). Without
    /// this the target has none of the source's grants, and the migration says so.
    #[arg(long)]
    privileges: bool,
    /// Leave large objects out. Logical replication does not carry them, so by default walbridge
    /// copies them with the tables and again, those changed since, while the cutover holds writes;
    /// preflight says how many there are either way.
    #[arg(long)]
    no_large_objects: bool,
}

/// How the migration's changes will reach the target.
#[derive(Debug, clap::Args)]
struct RouteArgs {
    /// The subscription connects to the source itself instead of through the controller's tunnel.
    #[arg(long)]
    direct: bool,
    /// Stop after the initial copy: no subscription, no streaming.
    #[arg(long)]
    copy_only: bool,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a CA, the controller's certificate, one per agent and the operator's.
    ///
    /// Existing files are never overwritten: run it again with another --agent
    /// to add that agent, signed by the existing CA. Private keys are written
    /// with mode 0600.
    Init {
        /// Folder to write ca.pem, controller.pem, <agent>.pem, operator.pem and their -key.pem files to.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Host names or IP addresses the agents and the CLI use to reach the controller (comma-separated or repeated).
        #[arg(
            long = "controller-host",
            value_name = "HOST",
            value_delimiter = ',',
            required = true
        )]
        controller_hosts: Vec<String>,
        /// An agent's name (lowercase letters, digits, '-'); repeat for several agents.
        #[arg(long = "agent", value_name = "NAME")]
        agents: Vec<String>,
        /// Print one JSON document listing the files.
        #[arg(long)]
        json: bool,
    },
}

/// The CLI's definition with its settings: what parses the arguments, and
/// what completions and the manual page are generated from.
fn cli_command() -> clap::Command {
    add_to_command(Cli::command(), &client::settings())
}

fn main() -> ExitCode {
    let matches = cli_command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Certs {
            command:
                CertsCommand::Init {
                    dir,
                    controller_hosts,
                    agents,
                    json,
                },
        } => certs::init(&dir, &controller_hosts, &agents, json),
        Command::Demo { json } => demo::run(json),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut cli_command(), "walbridge", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(cli_command())
            .render(&mut std::io::stdout())
            .map_err(|e| Failure::Operation(format!("cannot write the manual page: {e}"))),
        Command::Agents { json } => {
            with_controller(&matches, |address| async move { agents::run(&address, json).await })
        }
        Command::Preflight {
            agent,
            tables,
            schema,
            route,
            json,
        } => with_controller(&matches, |address| async move {
            let options = migrate::PreflightOptions {
                agent,
                tables: tables.tables,
                exclude: tables.exclude,
                skip: schema.skip,
                privileges: schema.privileges,
                skip_large_objects: schema.no_large_objects,
                direct: route.direct,
                copy_only: route.copy_only,
                json,
            };
            migrate::preflight(&address, options).await
        }),
        Command::Start {
            agent,
            tables,
            schema,
            parallel,
            no_verify,
            compression,
            route: RouteArgs { direct, copy_only },
            json,
        } => with_controller(&matches, |address| async move {
            let options = migrate::StartOptions {
                compression,
                agent,
                tables: tables.tables,
                exclude: tables.exclude,
                skip: schema.skip,
                privileges: schema.privileges,
                skip_large_objects: schema.no_large_objects,
                parallel,
                no_verify,
                direct,
                copy_only,
                json,
            };
            migrate::start(&address, options).await
        }),
        Command::Status { json, watch } => with_controller(&matches, |address| async move {
            migrate::status(&address, json, watch).await
        }),
        Command::Cutover {
            max_lag,
            timeout,
            dry_run,
            hard_fence,
            json,
        } => with_controller(&matches, |address| async move {
            let options = migrate::CutoverOptions {
                max_lag,
                timeout,
                dry_run,
                hard_fence,
                json,
            };
            migrate::cutover(&address, options).await
        }),
        Command::ReleaseSource { json } => with_controller(&matches, |address| async move {
            migrate::removal(&address, migrate::Removal::ReleaseSource, json).await
        }),
        Command::SyncSchema { dry_run, json } => with_controller(&matches, |address| async move {
            migrate::sync_schema(&address, dry_run, json).await
        }),
        Command::Abort { force, json } => with_controller(&matches, |address| async move {
            migrate::removal(&address, migrate::Removal::Abort { force }, json).await
        }),
        Command::Cleanup { json } => with_controller(&matches, |address| async move {
            migrate::removal(&address, migrate::Removal::Cleanup, json).await
        }),
        Command::Verify { tables, json } => with_controller(&matches, |address| async move {
            migrate::verify(&address, &tables.tables, &tables.exclude, json).await
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// Resolves the API address and runs an async command against it.
fn with_controller<F, Fut>(matches: &clap::ArgMatches, command: F) -> Result<(), Failure>
where
    F: FnOnce(ApiAddress) -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    let address = Settings::resolve(matches, &client::settings(), &ProcessEnvironment)
        .and_then(|settings| ApiAddress::from_settings(&settings))
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Operation(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(command(address))
}
