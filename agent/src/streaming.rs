//! What the controller asks of the source once the copy is done: how far
//! the slot is behind and how safe it is (asked over and over, on one
//! session kept while it is used: [`Monitor`]), the sequences' values, how
//! the subscription reaches the source.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use walbridge_daemon::pg::ssl::RootCert;
use walbridge_daemon::pg::{Database, SessionError};
use walbridge_migration::ident::QualifiedName;
use walbridge_proto::convert::name_to_wire;
use walbridge_proto::v1 as wire;

use crate::subscription_role::Credentials;

pub const MONITOR_APPLICATION_NAME: &str = "walbridge-agent-monitor";

/// A monitoring session unused this long is closed: an agent whose slot
/// nobody watches holds no backend on the source.
const MONITOR_IDLE: Duration = Duration::from_secs(20);

/// The one session the slot's status is read on. The controller asks
/// every second while a slot exists, and every few milliseconds while a
/// cutover waits; a connection per question would cost the source a
/// backend start (and a password exchange) each time.
pub struct Monitor {
    session: Arc<tokio::sync::Mutex<Watched>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// The session, and whether a task watches it for idleness (both changed
/// under the one lock).
#[derive(Default)]
struct Watched {
    open: Option<MonitorSession>,
    reaper: bool,
}

struct MonitorSession {
    client: Client,
    server_version_num: u32,
    last_used: Instant,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").finish_non_exhaustive()
    }
}

impl Monitor {
    /// Its idle session is closed by a task on `tasks`, which ends with `shutdown`.
    pub fn new(tasks: TaskTracker, shutdown: CancellationToken) -> Monitor {
        Monitor {
            session: Arc::new(tokio::sync::Mutex::new(Watched::default())),
            tasks,
            shutdown,
        }
    }

    /// The slot's status, read on the monitoring session (opened when
    /// there is none, or the last one broke).
    pub async fn slot_status(&self, source: &Database, slot: &str) -> Result<wire::SlotStatusResponse, SessionError> {
        let mut watched = self.session.lock().await;
        if watched.open.as_ref().is_none_or(|s| s.client.is_closed()) {
            let client = source
                .connect_with(MONITOR_APPLICATION_NAME, &crate::source::QUESTIONS)
                .await?;
            let version: i32 = client
                .query_one("SELECT current_setting('server_version_num')::int4", &[])
                .await?
                .get(0);
            watched.open = Some(MonitorSession {
                client,
                server_version_num: version.max(0) as u32,
                last_used: Instant::now(),
            });
            if !watched.reaper {
                watched.reaper = true;
                self.tasks
                    .spawn(close_when_idle(self.session.clone(), self.shutdown.clone()));
            }
        }
        let open = watched.open.as_mut().expect("a session was just opened");
        open.last_used = Instant::now();
        let status = slot_status(&open.client, open.server_version_num, slot).await;
        if status.is_err() {
            // Broken or not, the next question gets a new session.
            watched.open = None;
        }
        Ok(status?)
    }
}

async fn close_when_idle(session: Arc<tokio::sync::Mutex<Watched>>, shutdown: CancellationToken) {
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(MONITOR_IDLE / 2) => false,
            _ = shutdown.cancelled() => true,
        };
        let mut watched = session.lock().await;
        let idle = watched
            .open
            .as_ref()
            .is_none_or(|s| s.last_used.elapsed() >= MONITOR_IDLE);
        if stopping || idle {
            watched.open = None;
            watched.reaper = false;
            return;
        }
    }
}

/// Where the slot stands: positions, lag in bytes, retained WAL, the
/// subscriber's last reply (12+), and whether `max_slot_wal_keep_size`
/// threatens it (13+). Columns newer than the server are left out.
pub async fn slot_status(
    client: &Client,
    server_version_num: u32,
    slot: &str,
) -> Result<wire::SlotStatusResponse, tokio_postgres::Error> {
    let reply_age = if server_version_num >= 120000 {
        "extract(epoch FROM clock_timestamp() - r.reply_time)::float8"
    } else {
        "NULL::float8"
    };
    let (wal_status, safe_wal_size) = if server_version_num >= 130000 {
        ("coalesce(s.wal_status, '')", "s.safe_wal_size::int8")
    } else {
        ("''::text", "NULL::int8")
    };
    let row = client
        .query_opt(
            &format!(
                "SELECT pg_current_wal_lsn()::text, coalesce(s.confirmed_flush_lsn::text, ''), s.active, \
                        greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn), 0)::int8, \
                        greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn), 0)::int8, \
                        extract(epoch FROM r.replay_lag)::float8, {reply_age}, {wal_status}, {safe_wal_size} \
                 FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
                 WHERE s.slot_name = $1"
            ),
            &[&slot],
        )
        .await?;
    Ok(match row {
        None => wire::SlotStatusResponse::default(),
        Some(row) => wire::SlotStatusResponse {
            exists: true,
            current_lsn: row.get(0),
            confirmed_flush_lsn: row.get(1),
            active: row.get(2),
            lag_bytes: row.get::<_, Option<i64>>(3).unwrap_or_default() as u64,
            retained_wal_bytes: row.get::<_, Option<i64>>(4).unwrap_or_default() as u64,
            replay_lag_seconds: row.get(5),
            // A reply stamped by a clock a little ahead is no older than now.
            reply_age_seconds: row.get::<_, Option<f64>>(6).map(|age| age.max(0.0)),
            wal_status: row.get(7),
            safe_wal_bytes: row.get(8),
        },
    })
}

/// Every user sequence with its state (`last_value`, `is_called`), read
/// in one statement so the values belong to one moment.
pub async fn sequences(client: &Client) -> Result<Vec<wire::SequenceState>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname, c.relname, coalesce(pg_sequence_last_value(c.oid), s.seqstart), \
                    pg_sequence_last_value(c.oid) IS NOT NULL \
             FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
             ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| wire::SequenceState {
            name: Some(name_to_wire(QualifiedName::new(
                row.get::<_, String>(0),
                row.get::<_, String>(1),
            ))),
            last_value: row.get(2),
            is_called: row.get(3),
        })
        .collect())
}

/// The source as the agent reaches it, logging in as `credentials`
/// (password included).
pub fn subscription_connection(
    source: &Database,
    server_version_num: u32,
    credentials: Credentials,
) -> wire::SubscriptionConnectionResponse {
    let ssl = source.ssl();
    wire::SubscriptionConnectionResponse {
        host: source.libpq_host().unwrap_or_default(),
        port: source.endpoint().map_or(0, |(_, port)| u32::from(port)),
        user: credentials.user,
        password: credentials.password,
        dbname: source.database_name().to_owned(),
        server_version_num,
        role_created: credentials.created,
        sslmode: ssl.mode().as_str().to_owned(),
        // A file names a path on the agent's host, which the target's
        // server does not have; `system` means the same everywhere.
        sslrootcert: match ssl.root_cert() {
            Some(RootCert::System(_)) => "system".to_owned(),
            _ => String::new(),
        },
        sslnegotiation: ssl.negotiation().as_str().to_owned(),
        sslsni: if ssl.sni() { "1" } else { "0" }.to_owned(),
    }
}
