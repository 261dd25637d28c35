//! What the controller asks of the source once the copy is done: how far
//! the slot is behind, the sequences' values, how the subscription
//! reaches the source.

use tokio_postgres::Client;
use walbridge_daemon::pg::Database;
use walbridge_daemon::pg::ssl::RootCert;
use walbridge_migration::ident::QualifiedName;
use walbridge_proto::convert::name_to_wire;
use walbridge_proto::v1 as wire;

use crate::subscription_role::Credentials;

pub async fn slot_status(client: &Client, slot: &str) -> Result<wire::SlotStatusResponse, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT pg_current_wal_lsn()::text, coalesce(s.confirmed_flush_lsn::text, ''), s.active, \
                    greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn), 0)::int8, \
                    greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn), 0)::int8, \
                    coalesce(extract(epoch FROM r.replay_lag), 0)::float8 \
             FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
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
            lag_seconds: row.get(5),
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
