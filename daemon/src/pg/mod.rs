//! Connections to PostgreSQL, made one way for source and target alike:
//! every session says who it is (`application_name`), gives up connecting
//! after a bound, and runs in UTC. Connection strings are shown only with
//! their password removed.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::settings::SettingError;

/// How long a connection attempt may take before it is reported as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// libpq's port when a URL names none.
const DEFAULT_PORT: u16 = 5432;

/// A database to connect to, parsed from a libpq URL or key=value string.
#[derive(Clone)]
pub struct Database {
    config: Config,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Database {
    /// Parses the setting `key`. The error never repeats the value, which
    /// may hold a password.
    pub fn parse(key: &str, raw: &str) -> Result<Database, SettingError> {
        let config = Config::from_str(raw)
            .map_err(|e| SettingError::new(key, format!("not a valid PostgreSQL connection URL: {e}")))?;
        if config.get_hosts().is_empty() {
            return Err(SettingError::new(key, "names no host"));
        }
        if config.get_user().is_none() {
            return Err(SettingError::new(key, "names no user"));
        }
        Ok(Database { config })
    }

    /// `postgres://user@host:port/dbname`, without the password.
    pub fn redacted(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(name)) => name.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => String::new(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "postgres://{}@{}:{}/{}",
            self.config.get_user().unwrap_or_default(),
            host,
            port,
            self.database_name()
        )
    }

    /// The database name (libpq's default: the user name).
    pub fn database_name(&self) -> &str {
        self.config
            .get_dbname()
            .or_else(|| self.config.get_user())
            .unwrap_or_default()
    }

    /// The parsed connection settings (for clients other than
    /// tokio-postgres, such as the replication connection).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The first host and its port (libpq's default port when none).
    pub fn endpoint(&self) -> Option<(&Host, u16)> {
        let port = self.config.get_ports().first().copied().unwrap_or(DEFAULT_PORT);
        self.config.get_hosts().first().map(|host| (host, port))
    }

    /// The first host as libpq takes it: a name, or a socket folder.
    pub fn libpq_host(&self) -> Option<String> {
        self.endpoint().map(|(host, _)| match host {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
    }

    /// libpq's environment variables for this database, for a child process
    /// such as pg_dump: the password travels in the child's environment,
    /// never on a command line that `ps` shows.
    pub fn libpq_environment(&self, application_name: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("PGAPPNAME".to_owned(), application_name.to_owned()),
            ("PGDATABASE".to_owned(), self.database_name().to_owned()),
            ("PGCONNECT_TIMEOUT".to_owned(), CONNECT_TIMEOUT.as_secs().to_string()),
        ];
        if let (Some(host), Some((_, port))) = (self.libpq_host(), self.endpoint()) {
            env.push(("PGHOST".to_owned(), host));
            env.push(("PGPORT".to_owned(), port.to_string()));
        }
        if let Some(user) = self.config.get_user() {
            env.push(("PGUSER".to_owned(), user.to_owned()));
        }
        if let Some(password) = self.config.get_password() {
            env.push(("PGPASSWORD".to_owned(), String::from_utf8_lossy(password).into_owned()));
        }
        let sslmode = match self.config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => "disable",
            tokio_postgres::config::SslMode::Require => "require",
            _ => "prefer",
        };
        env.push(("PGSSLMODE".to_owned(), sslmode.to_owned()));
        env
    }

    /// Opens a session named `application_name`. The connection's task ends
    /// when the returned client is dropped.
    pub async fn connect(&self, application_name: &str) -> Result<Client, tokio_postgres::Error> {
        let mut config = self.config.clone();
        config.application_name(application_name);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "database connection ended");
            }
        });
        client.batch_execute("SET TIME ZONE 'UTC'").await?;
        Ok(client)
    }
}

/// What went wrong, in one line, as the server said it: its message,
/// SQLSTATE, DETAIL and HINT for a database error; for anything else
/// (TLS, I/O, a refused connection) the error and each of its causes.
/// Never the statement, which may carry a password.
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => describe_server_error(db.message(), db.code().code(), db.detail(), db.hint()),
        None => {
            let mut text = error.to_string();
            let mut cause = std::error::Error::source(error);
            while let Some(inner) = cause {
                let inner_text = inner.to_string();
                if !text.ends_with(&inner_text) {
                    text.push_str(": ");
                    text.push_str(&inner_text);
                }
                cause = inner.source();
            }
            text
        }
    }
}

/// The one rendering of a server's error report (also used by the
/// replication client, which parses the report itself).
pub fn describe_server_error(message: &str, sqlstate: &str, detail: Option<&str>, hint: Option<&str>) -> String {
    let one_line = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut text = format!("{} (SQLSTATE {sqlstate})", one_line(message));
    if let Some(detail) = detail.filter(|d| !d.is_empty()) {
        text.push_str(&format!("; DETAIL: {}", one_line(detail)));
    }
    if let Some(hint) = hint.filter(|h| !h.is_empty()) {
        text.push_str(&format!("; HINT: {}", one_line(hint)));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_the_first_host_with_libpqs_default_port() {
        let tcp = Database::parse("source.url", "postgres://app@db.example/shop").unwrap();
        assert_eq!(tcp.libpq_host().as_deref(), Some("db.example"));
        assert_eq!(tcp.endpoint().map(|(_, port)| port), Some(5432));
        let socket = Database::parse("source.url", "postgres://app@%2Frun%2Fpg:6000/shop").unwrap();
        assert_eq!(socket.libpq_host().as_deref(), Some("/run/pg"));
        assert!(matches!(socket.endpoint(), Some((Host::Unix(_), 6000))));
    }

    #[test]
    fn redacts_the_password_and_names_the_setting() {
        let db = Database::parse("source.url", "postgres://app:s3cret@db.example:5433/shop").unwrap();
        assert_eq!(db.redacted(), "postgres://app@db.example:5433/shop");
        assert!(!format!("{db:?}").contains("s3cret"));

        let err = Database::parse("source.url", "postgres://app:s3cret@db.example:notaport/shop").unwrap_err();
        assert_eq!(err.key, "source.url");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}
