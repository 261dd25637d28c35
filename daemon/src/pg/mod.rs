//! Connections to PostgreSQL, made one way for source and target alike.
//!
//! A [`Database`] is a `source.url` / `target.url` read with libpq's
//! meaning ([`conninfo`]: both spellings, every keyword libpq knows, the
//! `PG*` variables under the string's values; [`ssl`]: `sslmode` up to
//! `verify-full`, `sslrootcert` incl. `system`, client certificates,
//! direct TLS). Every session it opens says who it is
//! (`application_name`), gives up connecting after `connect_timeout`, runs
//! in UTC under a [`SessionPolicy`] (the timeouts walbridge sets whatever
//! the role's defaults: [`session`]), and speaks TLS through [`tls`], the
//! one rustls configuration that the replication connection uses too. A connection that fails says
//! why in one line naming the setting ([`ConnectError`]). Connection
//! strings are shown only with their password removed.

pub mod conninfo;
pub mod session;
pub mod ssl;
pub mod tls;

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio_postgres::config::{Host, TargetSessionAttrs};
use tokio_postgres::{Client, Config, NoTls};

use self::conninfo::Parameters;
pub use self::session::SessionPolicy;
use self::ssl::{SslMode, SslParams};
use self::tls::{Encryption, TlsConnector};
use crate::settings::{Environment, ProcessEnvironment, SettingError};

/// How long a connection attempt may take when the URL sets no
/// `connect_timeout` (libpq would wait forever).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// libpq's port when a URL names none.
const DEFAULT_PORT: u16 = 5432;

/// A database to connect to, parsed from a libpq URL or key=value string.
#[derive(Clone)]
pub struct Database {
    /// The setting it was read from (`source.url`), for errors.
    setting: String,
    /// libpq's `host`: a name, an address or a socket folder.
    host: Option<Host>,
    /// libpq's `hostaddr`: where to connect when given; `host` still names
    /// the server for TLS.
    hostaddr: Option<IpAddr>,
    /// Where connections go: `hostaddr`, else `host`.
    endpoint: Host,
    port: u16,
    user: String,
    password: Option<String>,
    dbname: String,
    options: Option<String>,
    connect_timeout: Option<Duration>,
    keepalives: Option<bool>,
    keepalives_idle: Option<Duration>,
    keepalives_interval: Option<Duration>,
    keepalives_count: Option<u32>,
    tcp_user_timeout: Option<Duration>,
    target_session_attrs: TargetSessionAttrs,
    ssl: SslParams,
    /// The name TLS checks (`verify-full`) and sends (SNI).
    server_name: ServerName<'static>,
    /// Whether SNI is sent: `sslsni=1` and a host name (not an address).
    sni: bool,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A parameter's value as a number, or the error naming it.
fn integer(params: &Parameters<'_>, name: &str) -> Result<Option<i64>, SettingError> {
    params
        .get(name)
        .map(|given| {
            given
                .value
                .trim()
                .parse::<i64>()
                .map_err(|_| params.invalid(&given, "is not an integer"))
        })
        .transpose()
}

fn seconds(params: &Parameters<'_>, name: &str) -> Result<Option<Duration>, SettingError> {
    Ok(integer(params, name)?.map(|s| Duration::from_secs(s.max(0).unsigned_abs())))
}

impl Database {
    /// Parses the setting `key`, with the process's `PG*` variables as
    /// libpq's defaults. The error never repeats the password.
    pub fn parse(key: &str, raw: &str) -> Result<Database, SettingError> {
        Database::parse_in(key, raw, &ProcessEnvironment)
    }

    /// Parses the setting `key` with `env` standing for the process's
    /// environment (`PGSSLMODE`, `HOME` for `~/.postgresql/`, ...).
    pub fn parse_in(key: &str, raw: &str, env: &dyn Environment) -> Result<Database, SettingError> {
        let params = Parameters::read(key, raw, env)?;
        for list in ["host", "hostaddr", "port"] {
            if let Some(given) = params.get(list)
                && given.value.contains(',')
            {
                return Err(params.invalid(
                    &given,
                    "names several servers: walbridge connects to one, because the snapshot it exports and the slot \
                     it creates exist on that server alone; name the primary",
                ));
            }
        }
        let hostaddr = params
            .get("hostaddr")
            .map(|given| {
                given
                    .value
                    .trim()
                    .parse::<IpAddr>()
                    .map_err(|_| params.invalid(&given, "is not a numeric IP address"))
            })
            .transpose()?;
        let host = params.get("host").map(|given| {
            if given.value.starts_with('/') {
                Host::Unix(PathBuf::from(given.value))
            } else {
                Host::Tcp(given.value)
            }
        });
        let endpoint = match (&host, hostaddr) {
            (_, Some(address)) => Host::Tcp(address.to_string()),
            (Some(host), None) => host.clone(),
            (None, None) => {
                return Err(
                    params.problem("names no host (and PGHOST is not set): give host=<name> or host=/socket/folder")
                );
            }
        };
        let port = match params.get("port") {
            Some(given) => given
                .value
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| params.invalid(&given, "is not a port number (1-65535)"))?,
            None => DEFAULT_PORT,
        };
        let user = params
            .get("user")
            .map(|u| u.value)
            .ok_or_else(|| params.problem("names no user (and PGUSER is not set)"))?;
        let password = params.get("password").map(|p| p.value);
        let dbname = match params.get("dbname") {
            Some(given)
                if given.value.contains('=')
                    || conninfo::parse(&given.value).is_ok_and(|_| {
                        given.value.starts_with("postgres://") || given.value.starts_with("postgresql://")
                    }) =>
            {
                return Err(params.invalid(
                    &given,
                    "is a connection string: walbridge does not expand one inside dbname; write its parameters directly",
                ));
            }
            Some(given) => given.value,
            None => user.clone(),
        };
        // libpq: zero or less waits forever, and 1 s is taken as 2 s.
        let connect_timeout = match integer(&params, "connect_timeout")? {
            None => Some(CONNECT_TIMEOUT),
            Some(s) if s <= 0 => None,
            Some(s) => Some(Duration::from_secs(s.max(2).unsigned_abs())),
        };
        if let Some(given) = params.get("client_encoding")
            && !matches!(
                given.value.to_ascii_lowercase().as_str(),
                "utf8" | "utf-8" | "unicode" | "auto"
            )
        {
            return Err(params.invalid(&given, "is not UTF8: walbridge's sessions speak UTF8"));
        }
        let target_session_attrs = match params.get("target_session_attrs") {
            None => TargetSessionAttrs::Any,
            Some(given) => match given.value.as_str() {
                "any" => TargetSessionAttrs::Any,
                "read-write" => TargetSessionAttrs::ReadWrite,
                "read-only" => TargetSessionAttrs::ReadOnly,
                "primary" | "standby" | "prefer-standby" => {
                    return Err(params.invalid(
                        &given,
                        "is not supported by walbridge (any, read-write and read-only are)",
                    ));
                }
                _ => {
                    return Err(params.invalid(
                        &given,
                        "is not one of any, read-write, read-only, primary, standby, prefer-standby",
                    ));
                }
            },
        };
        if let Some(given) = params.get("load_balance_hosts")
            && !matches!(given.value.as_str(), "disable" | "random")
        {
            return Err(params.invalid(&given, "is neither disable nor random"));
        }
        let keepalives = integer(&params, "keepalives")?.map(|k| k != 0);
        let keepalives_idle = seconds(&params, "keepalives_idle")?;
        let keepalives_interval = seconds(&params, "keepalives_interval")?;
        let keepalives_count =
            integer(&params, "keepalives_count")?.map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX));
        let tcp_user_timeout =
            integer(&params, "tcp_user_timeout")?.map(|ms| Duration::from_millis(ms.max(0).unsigned_abs()));

        let ssl = SslParams::resolve(&params, env)?;
        // The name TLS checks is `host`'s (libpq checks no hostaddr), and
        // with only a hostaddr, the address.
        let (server_name, named) = match (&host, hostaddr) {
            (Some(Host::Tcp(name)), _) => match ServerName::try_from(name.clone()) {
                Ok(server_name) => (server_name, true),
                Err(_) if ssl.mode() == SslMode::VerifyFull => {
                    return Err(params.problem(format!(
                        "host \"{name}\" is not a name a certificate can carry, and sslmode=verify-full checks it"
                    )));
                }
                Err(_) => (ServerName::try_from("invalid.invalid").expect("a valid name"), false),
            },
            (_, Some(address)) => (ServerName::IpAddress(address.into()), false),
            (_, None) => (ServerName::try_from("localhost").expect("a valid name"), false),
        };
        if ssl.mode() == SslMode::VerifyFull && !named && hostaddr.is_some() {
            return Err(params.problem(
                "sslmode=verify-full checks the server's name in host, and only hostaddr is given: \
                 add host=<the name on the server's certificate>",
            ));
        }
        let sni = ssl.sni() && named && matches!(server_name, ServerName::DnsName(_));
        Ok(Database {
            setting: key.to_owned(),
            host,
            hostaddr,
            endpoint,
            port,
            user,
            password,
            dbname,
            options: params.get("options").map(|o| o.value),
            connect_timeout,
            keepalives,
            keepalives_idle,
            keepalives_interval,
            keepalives_count,
            tcp_user_timeout,
            target_session_attrs,
            ssl,
            server_name,
            sni,
        })
    }

    /// The setting this database was read from (`source.url`).
    pub fn setting(&self) -> &str {
        &self.setting
    }

    /// `postgres://user@host:port/dbname`, without the password.
    pub fn redacted(&self) -> String {
        let host = self.libpq_host().unwrap_or_default();
        let host = if host.contains(':') && !host.starts_with('/') {
            format!("[{host}]")
        } else {
            host
        };
        format!("postgres://{}@{}:{}/{}", self.user, host, self.port, self.dbname)
    }

    /// The database name (libpq's default: the user name).
    pub fn database_name(&self) -> &str {
        &self.dbname
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The password, for a connection string handed to another libpq (the
    /// subscription's); never log it.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// libpq's `hostaddr`, when given.
    pub fn hostaddr(&self) -> Option<IpAddr> {
        self.hostaddr
    }

    /// libpq's `options` (`-c name=value ...`), when given.
    pub fn options(&self) -> Option<&str> {
        self.options.as_deref()
    }

    /// The startup packet's `options` for a session under `policy`: the
    /// URL's own, then the policy's (the replication client sends these;
    /// sessions and pg_dump get them from [`Database::connect_with`] and
    /// [`Database::libpq_environment`]).
    pub fn startup_options(&self, policy: &SessionPolicy) -> String {
        session::combined_options(self.options.as_deref(), policy)
    }

    /// How long one connection attempt may take; `None`: forever.
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout
    }

    /// The TLS parameters.
    pub fn ssl(&self) -> &SslParams {
        &self.ssl
    }

    /// The name TLS checks under `verify-full` and sends as SNI: `host`,
    /// or `hostaddr` when there is no `host`.
    pub fn tls_server_name(&self) -> String {
        self.server_name.to_str().into_owned()
    }

    /// Where connections go and its port: `hostaddr` when given, else
    /// `host` (a name, or a socket folder).
    pub fn endpoint(&self) -> Option<(&Host, u16)> {
        Some((&self.endpoint, self.port))
    }

    /// libpq's `host` as text: a name, or a socket folder; `hostaddr`
    /// when only that is given.
    pub fn libpq_host(&self) -> Option<String> {
        match (&self.host, self.hostaddr) {
            (Some(Host::Tcp(name)), _) => Some(name.clone()),
            (Some(Host::Unix(path)), _) => Some(path.display().to_string()),
            (None, Some(address)) => Some(address.to_string()),
            (None, None) => None,
        }
    }

    /// Every parameter as libpq keywords, password included, for a
    /// connection string that another libpq reads (render it with
    /// [`conninfo::render`]). TLS file paths are this machine's.
    pub fn keyword_values(&self) -> Vec<(&'static str, String)> {
        let mut values = Vec::new();
        if let Some(host) = &self.host {
            values.push((
                "host",
                match host {
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => path.display().to_string(),
                },
            ));
        }
        if let Some(address) = self.hostaddr {
            values.push(("hostaddr", address.to_string()));
        }
        values.push(("port", self.port.to_string()));
        values.push(("user", self.user.clone()));
        if let Some(password) = &self.password {
            values.push(("password", password.clone()));
        }
        values.push(("dbname", self.dbname.clone()));
        if let Some(options) = &self.options {
            values.push(("options", options.clone()));
        }
        values.push((
            "connect_timeout",
            self.connect_timeout.map_or(0, |t| t.as_secs()).to_string(),
        ));
        values.extend(self.ssl.keyword_values());
        values
    }

    /// libpq's environment variables for this database, for a child process
    /// such as pg_dump: the password travels in the child's environment,
    /// never on a command line that `ps` shows. Every TLS parameter goes
    /// as its `PG*` variable (`sslrootcert=system` as the system's bundle
    /// file, for a libpq older than 16). `PGOPTIONS` carries `policy`'s
    /// startup options after the URL's own; the settings only newer
    /// servers have are the child's to set (pg_dump sets its own timeouts,
    /// and holds a transaction throughout, so no idle timeout applies).
    pub fn libpq_environment(&self, application_name: &str, policy: &SessionPolicy) -> Vec<(String, String)> {
        let mut env = vec![
            ("PGAPPNAME".to_owned(), application_name.to_owned()),
            ("PGDATABASE".to_owned(), self.dbname.clone()),
            (
                "PGCONNECT_TIMEOUT".to_owned(),
                self.connect_timeout.map_or(0, |t| t.as_secs()).to_string(),
            ),
            ("PGPORT".to_owned(), self.port.to_string()),
            ("PGUSER".to_owned(), self.user.clone()),
        ];
        match (&self.host, self.hostaddr) {
            (Some(Host::Tcp(name)), _) => env.push(("PGHOST".to_owned(), name.clone())),
            (Some(Host::Unix(path)), _) => env.push(("PGHOST".to_owned(), path.display().to_string())),
            (None, _) => {}
        }
        if let Some(address) = self.hostaddr {
            env.push(("PGHOSTADDR".to_owned(), address.to_string()));
        }
        if let Some(password) = &self.password {
            env.push(("PGPASSWORD".to_owned(), password.clone()));
        }
        env.push(("PGOPTIONS".to_owned(), self.startup_options(policy)));
        env.extend(self.ssl.libpq_environment());
        env
    }

    /// The TLS connector for this database, its certificate files read now.
    pub fn tls_connector(&self) -> Result<TlsConnector, Failure> {
        TlsConnector::new(&self.ssl, self.server_name.clone(), self.sni)
    }

    /// The attempts `sslmode` makes, in libpq's order: `allow` tries plain
    /// text first and TLS when the server refuses; `prefer` TLS first and
    /// plain text when TLS fails or the server refuses. Unix sockets never
    /// speak TLS (libpq ignores sslmode there).
    fn encryption_plan(&self) -> &'static [Encryption] {
        if matches!(self.endpoint, Host::Unix(_)) {
            return &[Encryption::Plain];
        }
        match self.ssl.mode() {
            SslMode::Disable => &[Encryption::Plain],
            SslMode::Allow => &[Encryption::Plain, Encryption::Required],
            SslMode::Prefer => &[Encryption::IfOffered, Encryption::Plain],
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => &[Encryption::Required],
        }
    }

    /// Runs `attempt` for each encryption `sslmode` allows, in libpq's
    /// order, each bounded by `connect_timeout`, until one connects; the
    /// next is tried only after a TLS failure or a server's refusal (never
    /// after a network failure). A `verify-*` or `require` mode has one
    /// attempt: it never falls back to plain text. Both clients (sessions
    /// and the replication connection) connect through here.
    pub async fn with_encryption<T, F, Fut>(&self, mut attempt: F) -> Result<T, ConnectError>
    where
        F: FnMut(Encryption) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut failures = Vec::new();
        for &encryption in self.encryption_plan() {
            let outcome = match self.connect_timeout {
                Some(limit) => tokio::time::timeout(limit, attempt(encryption))
                    .await
                    .unwrap_or_else(|_| Err(Failure::timeout(limit))),
                None => attempt(encryption).await,
            };
            match outcome {
                Ok(connected) => return Ok(connected),
                Err(failure) => {
                    let next = !failure.last && matches!(failure.kind, FailureKind::Tls | FailureKind::Refused);
                    failures.push((encryption, failure));
                    if !next {
                        break;
                    }
                }
            }
        }
        Err(self.connect_error(failures))
    }

    fn connect_error(&self, attempts: Vec<(Encryption, Failure)>) -> ConnectError {
        ConnectError {
            setting: self.setting.clone(),
            target: self.redacted(),
            attempts,
        }
    }

    /// Opens a session named `application_name` under the unbounded
    /// policy: nothing the role or the database sets cuts it off.
    pub async fn connect(&self, application_name: &str) -> Result<Client, ConnectError> {
        self.connect_with(application_name, &SessionPolicy::UNBOUNDED).await
    }

    /// Opens a session named `application_name` under `policy`: its
    /// timeouts in the startup packet, the settings only newer servers
    /// know set once the server said its version, then `policy.setup`,
    /// all before the caller's first statement. The connection's task
    /// ends when the returned client is dropped.
    pub async fn connect_with(&self, application_name: &str, policy: &SessionPolicy) -> Result<Client, ConnectError> {
        let (client, server_version_num) = self
            .with_encryption(|encryption| self.connect_once(application_name, policy, encryption))
            .await?;
        let setup = format!(
            "SET TIME ZONE 'UTC'; {} {}",
            policy.versioned_statements(server_version_num),
            policy.setup
        );
        client.batch_execute(&setup).await.map_err(|e| {
            let mut failure = Failure::new(
                FailureKind::Session,
                format!("setting the session up: {}", describe(&e)),
            );
            failure.sqlstate = e.code().map(|c| c.code().to_owned());
            self.connect_error(vec![(Encryption::Plain, failure)])
        })?;
        Ok(client)
    }

    /// One attempt; returns the session and the server's version.
    async fn connect_once(
        &self,
        application_name: &str,
        policy: &SessionPolicy,
        encryption: Encryption,
    ) -> Result<(Client, u32), Failure> {
        use tokio_postgres::config::{SslMode as Mode, SslNegotiation as Negotiation};
        let mut config = self.session_config(application_name, policy);
        let version = |parameter: Option<&str>| session::server_version_num(parameter.unwrap_or_default());
        match encryption {
            Encryption::Plain => {
                config.ssl_mode(Mode::Disable);
                let (client, connection) = config
                    .connect(NoTls)
                    .await
                    .map_err(|e| Failure::from_postgres(&e, None))?;
                let server_version_num = version(connection.parameter("server_version"));
                spawn_connection(connection);
                Ok((client, server_version_num))
            }
            Encryption::IfOffered | Encryption::Required => {
                let connector = self.tls_connector()?;
                if encryption == Encryption::IfOffered {
                    config.ssl_mode(Mode::Prefer);
                } else {
                    config.ssl_mode(Mode::Require);
                    if self.ssl.negotiation() == ssl::SslNegotiation::Direct {
                        config.ssl_negotiation(Negotiation::Direct);
                    }
                }
                let (client, connection) = config.connect(connector.clone()).await.map_err(|e| {
                    let failure = Failure::from_postgres(&e, Some(&connector));
                    // The server declined TLS and refused in plain text:
                    // trying plain text again would only repeat that.
                    if connector.started() {
                        failure
                    } else {
                        failure.last_attempt()
                    }
                })?;
                let server_version_num = version(connection.parameter("server_version"));
                spawn_connection(connection);
                Ok((client, server_version_num))
            }
        }
    }

    /// tokio-postgres's view of this database, TLS aside.
    fn session_config(&self, application_name: &str, policy: &SessionPolicy) -> Config {
        let mut config = Config::new();
        match (&self.host, self.hostaddr) {
            (Some(Host::Tcp(name)), _) => config.host(name),
            (Some(Host::Unix(path)), None) => config.host_path(path),
            // tokio-postgres verifies TLS against `host`: give it the
            // address; the connector holds the name libpq would check.
            (_, Some(address)) => config.host(address.to_string()),
            (None, None) => unreachable!("parse requires a host or hostaddr"),
        };
        if let Some(address) = self.hostaddr {
            config.hostaddr(address);
        }
        config.port(self.port).user(&self.user).dbname(&self.dbname);
        config.application_name(application_name);
        if let Some(password) = &self.password {
            config.password(password);
        }
        config.options(self.startup_options(policy));
        if let Some(limit) = self.connect_timeout {
            config.connect_timeout(limit);
        }
        if let Some(on) = self.keepalives {
            config.keepalives(on);
        }
        if let Some(idle) = self.keepalives_idle {
            config.keepalives_idle(idle);
        }
        if let Some(interval) = self.keepalives_interval {
            config.keepalives_interval(interval);
        }
        if let Some(count) = self.keepalives_count {
            config.keepalives_retries(count);
        }
        if let Some(timeout) = self.tcp_user_timeout {
            config.tcp_user_timeout(timeout);
        }
        config.target_session_attrs(self.target_session_attrs);
        config.channel_binding(match self.ssl.channel_binding() {
            ssl::ChannelBinding::Disable => tokio_postgres::config::ChannelBinding::Disable,
            ssl::ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
            ssl::ChannelBinding::Require => tokio_postgres::config::ChannelBinding::Require,
        });
        config
    }
}

fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Owned by its client: the task ends when the client is dropped.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
}

/// What kind of thing stopped one connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No server answered: refused, unreachable, a name that does not resolve.
    Unreachable,
    /// No answer within `connect_timeout`.
    Timeout,
    /// TLS: the handshake, the certificates, a server without TLS.
    Tls,
    /// The server refused the session (authentication, pg_hba, no such
    /// database): it said why, with a SQLSTATE.
    Refused,
    /// The server said something the protocol does not allow.
    Protocol,
    /// Connected, and the session's own setup failed.
    Session,
}

/// Why one connection attempt failed, in words that never carry a password.
#[derive(Debug, Clone)]
pub struct Failure {
    kind: FailureKind,
    reason: String,
    sqlstate: Option<String>,
    /// No other attempt would fare differently.
    last: bool,
}

impl Failure {
    pub fn new(kind: FailureKind, reason: impl Into<String>) -> Failure {
        Failure {
            kind,
            reason: reason.into(),
            sqlstate: None,
            last: false,
        }
    }

    /// Marks this failure as one that another attempt (`prefer`'s plain
    /// text after the server declined TLS) would only repeat.
    pub fn last_attempt(mut self) -> Failure {
        self.last = true;
        self
    }

    /// The server's refusal, as it said it.
    pub fn server(message: &str, sqlstate: &str, detail: Option<&str>, hint: Option<&str>) -> Failure {
        Failure {
            kind: FailureKind::Refused,
            reason: describe_server_error(message, sqlstate, detail, hint),
            sqlstate: Some(sqlstate.to_owned()),
            last: false,
        }
    }

    /// The server answered the SSLRequest with N.
    pub fn no_tls() -> Failure {
        Failure::new(
            FailureKind::Tls,
            "the server does not support TLS (it declined the SSLRequest), and sslmode requires TLS",
        )
    }

    pub fn timeout(limit: Duration) -> Failure {
        Failure::new(
            FailureKind::Timeout,
            format!("no answer within {} s (connect_timeout)", limit.as_secs()),
        )
    }

    /// A tokio-postgres connection error: the server's report, a TLS
    /// failure in words, or the I/O error.
    pub fn from_postgres(error: &tokio_postgres::Error, connector: Option<&TlsConnector>) -> Failure {
        if let Some(db) = error.as_db_error() {
            return Failure::server(db.message(), db.code().code(), db.detail(), db.hint());
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(inner) = cause {
            if let Some(handshake) = inner.downcast_ref::<tls::HandshakeError>() {
                return Failure::new(FailureKind::Tls, handshake.0.clone());
            }
            if let (Some(io), Some(connector)) = (inner.downcast_ref::<std::io::Error>(), connector)
                && tls::rustls_error(io).is_some()
            {
                return Failure::new(FailureKind::Tls, connector.describe_io(io));
            }
            // tokio-postgres's own words when the SSLRequest is declined.
            if inner.to_string() == "server does not support TLS" {
                return Failure::no_tls();
            }
            cause = inner.source();
        }
        let text = describe(error);
        let kind = if text.contains("timed out") {
            FailureKind::Timeout
        } else {
            FailureKind::Unreachable
        };
        Failure::new(kind, text)
    }

    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The server's SQLSTATE, when the server refused.
    pub fn sqlstate(&self) -> Option<&str> {
        self.sqlstate.as_deref()
    }
}

/// A database that could not be connected to: one line naming the setting
/// and why, for each attempt `sslmode` made.
#[derive(Debug, Clone)]
pub struct ConnectError {
    setting: String,
    target: String,
    attempts: Vec<(Encryption, Failure)>,
}

impl ConnectError {
    /// The setting whose database this is.
    pub fn setting(&self) -> &str {
        &self.setting
    }

    /// The last attempt's failure.
    pub fn failure(&self) -> &Failure {
        &self.attempts.last().expect("at least one attempt").1
    }

    pub fn kind(&self) -> FailureKind {
        self.failure().kind
    }

    pub fn sqlstate(&self) -> Option<&str> {
        self.failure().sqlstate()
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot connect to {} ({}): ", self.target, self.setting)?;
        if let [(_, only)] = self.attempts.as_slice() {
            return f.write_str(&only.reason);
        }
        let described: Vec<String> = self
            .attempts
            .iter()
            .map(|(encryption, failure)| {
                let how = match encryption {
                    Encryption::Plain => "without TLS",
                    Encryption::IfOffered | Encryption::Required => "with TLS",
                };
                format!("{how}: {}", failure.reason)
            })
            .collect();
        f.write_str(&described.join("; then "))
    }
}

impl std::error::Error for ConnectError {}

/// A session that could not be opened, or a statement that failed in it.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("{}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
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
mod tests;
