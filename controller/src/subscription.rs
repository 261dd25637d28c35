//! The target's subscription: created after the copy, detached at
//! cutover, dropped at cleanup. Dropping never lets PostgreSQL try to drop
//! the remote slot (through a tunnel that may be gone): the slot is
//! detached first and the agent drops it.

use tokio_postgres::Client;
use walbridge_daemon::pg::Database;
use walbridge_migration::ident::{quote_ident, quote_literal};
use walbridge_proto::v1 as wire;

use walbridge_migration::fault::Fault;

use crate::target::Purpose;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Missing,
    /// Its apply worker is connected.
    Streaming,
    /// Enabled, but no apply worker right now (starting or retrying).
    Connecting,
    /// Disabled with its slot: nothing is applied.
    Disabled,
    /// Disabled and without a slot: the target stands alone.
    Detached,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Missing => "",
            State::Streaming => "streaming",
            State::Connecting => "connecting",
            State::Disabled => "disabled",
            State::Detached => "detached",
        }
    }
}

/// The names a subscription is made of.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    pub subscription: &'a str,
    pub publication: &'a str,
    pub slot: &'a str,
}

/// How the target's libpq reaches the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The source's own address (`start --direct`).
    Direct,
    /// The controller's tunnel, as the target reaches it.
    Tunnel { host: String, port: u16 },
}

/// The subscription's TLS, as the controller is told (`subscription.*`):
/// what the target's libpq should use where the source's own settings do
/// not carry over (a root certificate file on the agent's host is not on
/// the target's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionTls {
    /// libpq's sslmode for the subscription; empty: the source.url's.
    pub sslmode: String,
    /// A CA file *on the target server's host*, or `system`; empty: the
    /// source.url's when it is `system`, else libpq's default.
    pub sslrootcert: String,
}

/// The connection string of the subscription (and of preflight's probe):
/// the one place it is written. Through the tunnel, `host` stays the
/// source's name and `hostaddr` is the tunnel's address, because libpq
/// checks the server's certificate against `host` (`verify-full`) and
/// connects to `hostaddr`: the source's certificate is verified end to end
/// although the bytes go through the controller and the agent.
pub fn conninfo(
    source: &wire::SubscriptionConnectionResponse,
    route: &Route,
    tls: &SubscriptionTls,
    target_version: i32,
) -> Result<String, String> {
    let mut params: Vec<(&str, String)> = Vec::new();
    match route {
        Route::Direct => {
            params.push(("host", source.host.clone()));
            params.push(("port", source.port.to_string()));
        }
        Route::Tunnel { host, port } => {
            let names_a_server = !source.host.is_empty() && !source.host.starts_with('/');
            if names_a_server {
                params.push(("host", source.host.clone()));
                params.push(("hostaddr", resolve(host, *port)?));
            } else {
                params.push(("host", host.clone()));
            }
            params.push(("port", port.to_string()));
        }
    }
    params.push(("dbname", source.dbname.clone()));
    params.push(("user", source.user.clone()));
    if !source.password.is_empty() {
        params.push(("password", source.password.clone()));
    }
    let sslmode = if tls.sslmode.is_empty() {
        source.sslmode.clone()
    } else {
        tls.sslmode.clone()
    };
    if !sslmode.is_empty() {
        params.push(("sslmode", sslmode));
    }
    let sslrootcert = if tls.sslrootcert.is_empty() {
        source.sslrootcert.clone()
    } else {
        tls.sslrootcert.clone()
    };
    if sslrootcert == "system" && target_version < 160000 {
        return Err(format!(
            "sslrootcert=system needs libpq 16 or later, and the target runs {target_version}: set \
             subscription.sslrootcert to a CA file on the target server's host"
        ));
    }
    if !sslrootcert.is_empty() {
        params.push(("sslrootcert", sslrootcert));
    }
    // Keywords older libpq versions reject: only where the target's knows them.
    if source.sslnegotiation == "direct" && target_version >= 170000 {
        params.push(("sslnegotiation", source.sslnegotiation.clone()));
    }
    if source.sslsni == "0" && target_version >= 140000 {
        params.push(("sslsni", "0".to_owned()));
    }
    Ok(walbridge_daemon::pg::conninfo::render(
        params.iter().map(|(key, value)| (*key, value.as_str())),
    ))
}

/// libpq's `hostaddr` takes only a numeric address.
fn resolve(host: &str, port: u16) -> Result<String, String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(host.to_owned());
    }
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| format!("tunnel.advertise: cannot resolve {host}: {e}"))?
        .next()
        .map(|address| address.ip().to_string())
        .ok_or_else(|| format!("tunnel.advertise: {host} resolves to no address"))
}

/// Creates the subscription; returns its oid. One that exists already
/// (made by a step that crashed before the journal heard of it) is kept,
/// and given the connection string made now: the role's password was set
/// anew for this call, and the old one no longer logs in.
pub async fn create(
    client: &Client,
    names: Names<'_>,
    source: &wire::SubscriptionConnectionResponse,
    route: &Route,
    tls: &SubscriptionTls,
) -> Result<u32, Fault> {
    let target_version = server_version(client).await?;
    let source_version = source.server_version_num as i32;
    let connection = conninfo(source, route, tls, target_version).map_err(crate::fault::internal)?;
    if let Some(oid) = oid(client, names.subscription).await? {
        // The statement carries the password: only the server's message
        // is ever reported.
        client
            .batch_execute(&format!(
                "ALTER SUBSCRIPTION {} CONNECTION {}",
                quote_ident(names.subscription),
                quote_literal(&connection)
            ))
            .await
            .map_err(|e| crate::fault::target("ALTER SUBSCRIPTION ... CONNECTION failed on the target", &e))?;
        return Ok(oid);
    }
    let options = options(source_version, target_version, names.slot);
    let statement = format!(
        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH ({})",
        quote_ident(names.subscription),
        quote_literal(&connection),
        quote_ident(names.publication),
        options.join(", ")
    );
    // The statement carries the password: only the server's message is
    // ever reported.
    client
        .batch_execute(&statement)
        .await
        .map_err(|e| crate::fault::target("CREATE SUBSCRIPTION failed on the target", &e))?;
    oid(client, names.subscription)
        .await?
        .ok_or_else(|| crate::fault::internal("the subscription vanished right after its creation"))
}

/// The subscription's options for these two servers' versions
/// (`server_version_num`), on the pre-made slot `slot`.
///
/// * Not `disable_on_error`: PostgreSQL counts a dropped connection as an
///   error too, and the tunnel drops whenever the controller or the agent
///   restarts; a subscription that retries comes back on its own.
/// * `streaming`: large transactions are streamed while in progress
///   instead of spilled (publisher and subscriber 14+); both 16+ apply
///   them in parallel workers (`parallel`; a subscriber 16+ falls back to
///   `on` with an older publisher anyway, so ask for it only when it takes).
/// * `binary`: only between equal majors: a type's binary format may
///   change between majors, and PostgreSQL checks only that the types
///   have send/receive functions.
/// * Left at their defaults: `password_required` (true: a non-superuser
///   owner's connection must use the password, which it does),
///   `run_as_owner` (16+: apply runs as each table's owner, which is the
///   subscription's owner since it created the tables) and `failover`
///   (17+: the slot is the agent's, made before the subscription, and a
///   migration does not outlive a source's failover).
pub fn options(source_version: i32, target_version: i32, slot: &str) -> Vec<String> {
    let mut options = vec![
        "copy_data = false".to_owned(),
        "create_slot = false".to_owned(),
        format!("slot_name = {}", quote_literal(slot)),
    ];
    if target_version >= 160000 && source_version >= 160000 {
        options.push("streaming = parallel".to_owned());
    } else if target_version >= 140000 && source_version >= 140000 {
        options.push("streaming = on".to_owned());
    }
    if target_version / 10000 == source_version / 10000 {
        options.push("binary = true".to_owned());
    }
    options
}

/// Proves that the target can log in to the source the way the
/// subscription will: a subscription that connects (and so checks, for a
/// non-superuser owner, that the source asked for the password) but holds
/// no slot and is never enabled, dropped at once. Its replication origin
/// goes with it.
pub async fn probe(client: &Client, name: &str, connection: &str) -> Result<(), tokio_postgres::Error> {
    let created = client
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION walbridge_probe \
             WITH (connect = true, enabled = false, create_slot = false, slot_name = NONE, copy_data = false)",
            quote_ident(name),
            quote_literal(connection)
        ))
        .await;
    // Dropped whatever happened: a half-made probe must not stay.
    let exists = oid(client, name).await.ok().flatten().is_some();
    if exists {
        let _ = client
            .batch_execute(&format!("DROP SUBSCRIPTION IF EXISTS {}", quote_ident(name)))
            .await;
    }
    created
}

pub async fn server_version(client: &Client) -> Result<i32, Fault> {
    Ok(client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| crate::fault::target("reading the subscription", &e))?
        .get(0))
}

async fn oid(client: &Client, name: &str) -> Result<Option<u32>, Fault> {
    Ok(client
        .query_opt(
            "SELECT oid FROM pg_subscription WHERE subname = $1 \
             AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&name],
        )
        .await
        .map_err(|e| crate::fault::target("reading the subscription", &e))?
        .map(|row| row.get(0)))
}

pub async fn state(client: &Client, name: &str) -> Result<State, Fault> {
    let row = client
        .query_opt(
            "SELECT s.subenabled, s.subslotname IS NULL, EXISTS (SELECT 1 FROM pg_stat_subscription st \
               WHERE st.subid = s.oid AND st.relid IS NULL AND st.pid IS NOT NULL) \
             FROM pg_subscription s WHERE s.subname = $1 \
             AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&name],
        )
        .await
        .map_err(|e| crate::fault::target("reading the subscription", &e))?;
    Ok(match row {
        None => State::Missing,
        Some(row) => match (row.get::<_, bool>(0), row.get::<_, bool>(1), row.get::<_, bool>(2)) {
            (_, true, _) => State::Detached,
            (false, false, _) => State::Disabled,
            (true, false, true) => State::Streaming,
            (true, false, false) => State::Connecting,
        },
    })
}

/// Its state and how many errors its workers have hit (PostgreSQL 15's
/// `pg_stat_subscription_stats`; 0 on older targets, which only log
/// them). The messages themselves are in the target's server log.
pub async fn health(client: &Client, name: &str) -> Result<(State, u64), Fault> {
    let state = state(client, name).await?;
    if state == State::Missing || server_version(client).await? < 150000 {
        return Ok((state, 0));
    }
    let errors = client
        .query_opt(
            "SELECT (apply_error_count + sync_error_count)::int8 FROM pg_stat_subscription_stats \
             WHERE subname = $1",
            &[&name],
        )
        .await
        .map_err(|e| crate::fault::target("reading the subscription", &e))?
        .map_or(0, |r| r.get::<_, i64>(0) as u64);
    Ok((state, errors))
}

/// Has the subscription learn the tables its publication gained, and copy
/// them (its table synchronisation: a consistent copy, then the changes
/// since, with no gap).
pub async fn refresh_copying_new_tables(client: &Client, name: &str) -> Result<(), Fault> {
    alter(client, name, "REFRESH PUBLICATION WITH (copy_data = true)").await
}

/// Stops the subscription's apply worker: the first half of detaching.
pub async fn disable(client: &Client, name: &str) -> Result<(), Fault> {
    alter(client, name, "DISABLE").await
}

/// Starts it again (a cutover rolled back before the point of no return).
pub async fn enable(client: &Client, name: &str) -> Result<(), Fault> {
    alter(client, name, "ENABLE").await
}

/// Forgets its slot, so that the target stands alone and dropping the
/// subscription never reaches for the source: the second half of detaching.
pub async fn release_slot(client: &Client, name: &str) -> Result<(), Fault> {
    alter(client, name, "SET (slot_name = NONE)").await
}

async fn alter(client: &Client, name: &str, change: &str) -> Result<(), Fault> {
    let statement = format!("ALTER SUBSCRIPTION {} {change}", quote_ident(name));
    client
        .batch_execute(&statement)
        .await
        .map_err(|e| crate::fault::target(format!("{statement} failed on the target"), &e))
}

/// What [`remove`] did, and what it could not do (with the statement
/// that does it).
#[derive(Debug, Default)]
pub struct Removed {
    pub removed: Vec<String>,
    pub remaining: Vec<String>,
}

/// Drops the subscription (detaching it first) and its replication
/// origin if PostgreSQL left it behind. Says what it removed; an origin
/// only a superuser may drop is reported with the statement, not an error.
pub async fn remove(target: &Database, name: &str, oid: u32) -> Result<Removed, Fault> {
    let client = crate::target::connect(target, Purpose::Control).await?;
    let mut outcome = Removed::default();
    let current = state(&client, name).await?;
    if current != State::Missing {
        if current != State::Detached {
            if current != State::Disabled {
                disable(&client, name).await?;
            }
            release_slot(&client, name).await?;
        }
        client
            .batch_execute(&format!("DROP SUBSCRIPTION {}", quote_ident(name)))
            .await
            .map_err(|e| crate::fault::target(format!("DROP SUBSCRIPTION {name} failed on the target"), &e))?;
        outcome.removed.push(format!("subscription {name} on the target"));
    }
    if oid != 0 {
        let origin = format!("pg_{oid}");
        let leaked = client
            .query_opt("SELECT 1 FROM pg_replication_origin WHERE roname = $1", &[&origin])
            .await
            .map_err(|e| crate::fault::target("reading the subscription", &e))?
            .is_some();
        if leaked {
            match client
                .execute("SELECT pg_replication_origin_drop($1)", &[&origin])
                .await
            {
                Ok(_) => outcome
                    .removed
                    .push(format!("replication origin {origin} on the target")),
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
                    outcome.remaining.push(format!(
                        "replication origin {origin} on the target (only a superuser may drop it; it holds no \
                         WAL): SELECT pg_replication_origin_drop('{origin}');"
                    ))
                }
                Err(e) => {
                    return Err(crate::fault::target(
                        format!("cannot drop replication origin {origin}"),
                        &e,
                    ));
                }
            }
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_follow_both_versions() {
        let with = |source, target| options(source, target, "s").join(", ");
        assert_eq!(
            with(100023, 170000),
            "copy_data = false, create_slot = false, slot_name = 's'"
        );
        assert!(
            with(140000, 150000).ends_with("streaming = on"),
            "{}",
            with(140000, 150000)
        );
        assert!(
            with(150000, 180000).ends_with("streaming = on"),
            "{}",
            with(150000, 180000)
        );
        assert!(with(160000, 180000).ends_with("streaming = parallel"));
        assert!(with(170004, 170009).ends_with("streaming = parallel, binary = true"));
        assert!(with(150018, 150018).ends_with("streaming = on, binary = true"));
        assert!(!with(130000, 150000).contains("streaming"));
    }

    fn source() -> wire::SubscriptionConnectionResponse {
        wire::SubscriptionConnectionResponse {
            host: "db.internal".into(),
            port: 5432,
            user: "walbridge_1".into(),
            password: "p'w".into(),
            dbname: "app".into(),
            server_version_num: 150000,
            role_created: true,
            sslmode: "verify-full".into(),
            sslrootcert: "system".into(),
            sslnegotiation: "direct".into(),
            sslsni: "1".into(),
        }
    }

    #[test]
    fn through_the_tunnel_libpq_checks_the_sources_name_and_connects_to_the_tunnel() {
        let tunnel = Route::Tunnel {
            host: "10.1.2.3".into(),
            port: 7401,
        };
        let text = conninfo(&source(), &tunnel, &SubscriptionTls::default(), 170000).unwrap();
        assert_eq!(
            text,
            "host='db.internal' hostaddr='10.1.2.3' port='7401' dbname='app' user='walbridge_1' password='p\\'w' \
             sslmode='verify-full' sslrootcert='system' sslnegotiation='direct'"
        );
        let direct = conninfo(&source(), &Route::Direct, &SubscriptionTls::default(), 170000).unwrap();
        assert!(direct.starts_with("host='db.internal' port='5432' "), "{direct}");
    }

    #[test]
    fn the_controllers_settings_win_and_older_targets_get_only_what_their_libpq_knows() {
        let tls = SubscriptionTls {
            sslmode: "verify-ca".into(),
            sslrootcert: "/etc/target/source-ca.pem".into(),
        };
        let text = conninfo(&source(), &Route::Direct, &tls, 150000).unwrap();
        assert!(
            text.contains("sslmode='verify-ca' sslrootcert='/etc/target/source-ca.pem'"),
            "{text}"
        );
        assert!(!text.contains("sslnegotiation"), "libpq 15 rejects it: {text}");
        let refused = conninfo(&source(), &Route::Direct, &SubscriptionTls::default(), 150000).unwrap_err();
        assert!(refused.contains("subscription.sslrootcert"), "{refused}");
    }
}
