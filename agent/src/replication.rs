//! A replication-protocol connection (`replication=database`), which
//! tokio-postgres cannot open: its startup message has no `replication`
//! parameter, and the server refuses it through `options`.
//!
//! Built on `postgres-protocol`'s message codecs: startup, authentication
//! (trust, cleartext, md5, SCRAM-SHA-256, and SCRAM-SHA-256-PLUS bound to
//! the TLS connection as tokio-postgres would), and the simple query
//! protocol, which is all the replication commands need. It connects
//! through [`Database::with_encryption`] and [`walbridge_daemon::pg::tls`]:
//! the same `sslmode` attempts, the same rustls configuration and
//! verification as every other session, SSLRequest or direct TLS.
//!
//! The exported snapshot of `CREATE_REPLICATION_SLOT` lives only while the
//! connection stays open and runs no other command; [`ReplicationConnection::closed`]
//! watches the connection without sending anything.

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::Host;
use walbridge_daemon::pg::session::server_version_num;
use walbridge_daemon::pg::ssl::ChannelBinding as ChannelBindingMode;
use walbridge_daemon::pg::tls::{self, Encryption, TlsConnector};
use walbridge_daemon::pg::{ConnectError, Database, Failure, FailureKind, SessionPolicy};
use walbridge_migration::ident::quote_ident;

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("{0}")]
    Connect(ConnectError),
    /// The server refused the replication role (SQLSTATE class 28).
    #[error("{0}")]
    Auth(ConnectError),
    #[error("{}", walbridge_daemon::pg::describe_server_error(message, code, detail.as_deref(), hint.as_deref()))]
    Server {
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    #[error("unexpected reply on the replication connection: {0}")]
    Protocol(String),
    #[error("the server closed the replication connection")]
    Closed,
    #[error("the replication connection failed: {0}")]
    Io(String),
}

impl From<ConnectError> for ReplicationError {
    fn from(error: ConnectError) -> ReplicationError {
        let refused_role =
            error.kind() == FailureKind::Refused && error.sqlstate().is_some_and(|c| c.starts_with("28"));
        if refused_role {
            ReplicationError::Auth(error)
        } else {
            ReplicationError::Connect(error)
        }
    }
}

impl ReplicationError {
    /// The fault kind of this error (see `walbridge_migration::fault`).
    pub fn kind(&self) -> walbridge_migration::fault::FaultKind {
        use walbridge_migration::fault::{FaultKind, Side};
        match self {
            ReplicationError::Connect(e) => crate::fault::connect_kind(e),
            ReplicationError::Closed | ReplicationError::Io(_) => FaultKind::SourceUnavailable,
            ReplicationError::Auth(_) => FaultKind::Privilege,
            ReplicationError::Server { code, .. } => FaultKind::of_sqlstate(code, Side::Source),
            ReplicationError::Protocol(_) => FaultKind::Internal,
        }
    }
}

/// What `CREATE_REPLICATION_SLOT` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub slot_name: String,
    pub consistent_point: String,
    pub snapshot_name: String,
    pub output_plugin: String,
}

/// What `IDENTIFY_SYSTEM` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: String,
    pub database: Option<String>,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The session policy of every replication connection.
const POLICY: SessionPolicy = SessionPolicy::UNBOUNDED;

pub struct ReplicationConnection {
    stream: Box<dyn Stream>,
    read: BytesMut,
    server_version: String,
    backend_pid: Option<i32>,
    /// Set over TLS: describes the alerts a server sends after the handshake.
    tls: Option<TlsConnector>,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("server_version", &self.server_version)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// One result set of the simple query protocol, as text.
type Rows = Vec<Vec<Option<String>>>;

impl ReplicationConnection {
    /// Connects to `source` with `replication=database` and authenticates,
    /// with its `sslmode` attempts, each bounded by its `connect_timeout`.
    pub async fn connect(source: &Database, application_name: &str) -> Result<Self, ReplicationError> {
        Ok(source
            .with_encryption(|encryption| Self::connect_once(source, encryption, application_name))
            .await?)
    }

    async fn connect_once(source: &Database, encryption: Encryption, application_name: &str) -> Result<Self, Failure> {
        let connector = match encryption {
            Encryption::Plain => None,
            Encryption::IfOffered | Encryption::Required => Some(source.tls_connector()?),
        };
        let unreachable =
            |what: String, e: std::io::Error| Failure::new(FailureKind::Unreachable, format!("{what}: {e}"));
        let (host, port) = source.endpoint().expect("a parsed database has an endpoint");
        let (stream, binding, over_tls): (Box<dyn Stream>, Option<Vec<u8>>, bool) = match host {
            Host::Tcp(host) => {
                let tcp = TcpStream::connect((host.as_str(), port))
                    .await
                    .map_err(|e| unreachable(format!("{host}:{port}"), e))?;
                let _ = tcp.set_nodelay(true);
                let stream = tls::negotiate(tcp, encryption, connector.as_ref()).await?;
                let (binding, over_tls) = (stream.tls_server_end_point(), stream.is_tls());
                (Box::new(stream), binding, over_tls)
            }
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let unix = UnixStream::connect(&path)
                    .await
                    .map_err(|e| unreachable(path.display().to_string(), e))?;
                // libpq speaks no TLS over a Unix socket, whatever sslmode says.
                (Box::new(unix), None, false)
            }
        };
        let mut connection = ReplicationConnection {
            stream,
            read: BytesMut::with_capacity(8192),
            server_version: String::new(),
            backend_pid: None,
            tls: connector.filter(|_| over_tls),
        };
        let user = source.user();
        // A replication connection is bulk work: the walsender that holds
        // the exported snapshot sits idle in its transaction for as long
        // as the copy runs, and slot creation may wait for long
        // transactions to end.
        let options = source.startup_options(&POLICY);
        let parameters = vec![
            ("user", user),
            ("database", source.database_name()),
            ("replication", "database"),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
            ("options", options.as_str()),
        ];
        let mut buf = BytesMut::new();
        frontend::startup_message(parameters, &mut buf)
            .map_err(|e| Failure::new(FailureKind::Protocol, e.to_string()))?;
        let as_failure = |e: ReplicationError| match e {
            ReplicationError::Server {
                code,
                message,
                detail,
                hint,
            } => Failure::server(&message, &code, detail.as_deref(), hint.as_deref()),
            ReplicationError::Closed => Failure::new(
                FailureKind::Unreachable,
                "the server closed the connection before authentication completed",
            ),
            ReplicationError::Protocol(p) => Failure::new(FailureKind::Protocol, p),
            ReplicationError::Io(text) => Failure::new(FailureKind::Tls, text),
            other => Failure::new(FailureKind::Refused, other.to_string()),
        };
        connection.send(&buf).await.map_err(as_failure)?;
        let channel_binding = binding.filter(|_| source.ssl().channel_binding() != ChannelBindingMode::Disable);
        connection
            .authenticate(
                user,
                source.password().map(str::as_bytes),
                channel_binding,
                source.ssl().channel_binding() == ChannelBindingMode::Require,
            )
            .await
            .and_then(|outcome| outcome.map_err(as_failure))
            // The server declined TLS and then refused: plain text again
            // (prefer's second attempt) would only repeat that.
            .map_err(|failure| match encryption {
                Encryption::IfOffered if !over_tls => failure.last_attempt(),
                _ => failure,
            })?;
        // The settings only newer servers know, before any replication
        // command (SQL is allowed on a `replication=database` connection).
        let versioned = POLICY.versioned_statements(connection.server_version_num());
        if !versioned.is_empty() {
            connection
                .simple_query(&versioned)
                .await
                .map_err(|e| Failure::new(FailureKind::Session, format!("setting the session up: {e}")))?;
        }
        Ok(connection)
    }

    /// The authentication exchange. The outer error is a refusal decided
    /// here (no password, no channel binding); the inner one what the
    /// server or the connection did.
    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
        channel_binding: Option<Vec<u8>>,
        binding_required: bool,
    ) -> Result<Result<(), ReplicationError>, Failure> {
        let refused = |reason: &str| Failure::new(FailureKind::Refused, reason.to_owned());
        let need_password = || refused("the server asks for a password and none is set");
        let unbound = || refused("channel_binding=require, and the server authenticated without SCRAM-SHA-256-PLUS");
        let protocol = |e: std::io::Error| ReplicationError::Protocol(e.to_string());
        let mut scram: Option<(ScramSha256, bool)> = None;
        loop {
            let mut buf = BytesMut::new();
            let message = match self.receive().await {
                Ok(message) => message,
                Err(e) => return Ok(Err(e)),
            };
            let sent = match message {
                Message::AuthenticationOk => {
                    if binding_required && !scram.as_ref().is_some_and(|(_, bound)| *bound) {
                        return Err(unbound());
                    }
                    continue;
                }
                Message::AuthenticationCleartextPassword => {
                    if binding_required {
                        return Err(unbound());
                    }
                    frontend::password_message(password.ok_or_else(need_password)?, &mut buf).map_err(protocol)
                }
                Message::AuthenticationMd5Password(body) => {
                    if binding_required {
                        return Err(unbound());
                    }
                    let hashed = md5_hash(user.as_bytes(), password.ok_or_else(need_password)?, body.salt());
                    frontend::password_message(hashed.as_bytes(), &mut buf).map_err(protocol)
                }
                Message::AuthenticationSasl(body) => {
                    let mechanisms: Vec<String> = match body.mechanisms().map(|m| Ok(m.to_owned())).collect() {
                        Ok(m) => m,
                        Err(e) => return Ok(Err(protocol(e))),
                    };
                    let offers = |name: &str| mechanisms.iter().any(|m| m == name);
                    // As tokio-postgres chooses: bind when both sides can;
                    // tell a server that offers no binding whether we could.
                    let (binding, mechanism) = match (&channel_binding, offers(SCRAM_SHA_256_PLUS)) {
                        (Some(hash), true) => (ChannelBinding::tls_server_end_point(hash.clone()), SCRAM_SHA_256_PLUS),
                        (Some(_), false) if offers(SCRAM_SHA_256) => (ChannelBinding::unrequested(), SCRAM_SHA_256),
                        (None, _) if offers(SCRAM_SHA_256) => (ChannelBinding::unsupported(), SCRAM_SHA_256),
                        _ => {
                            return Err(refused(&format!(
                                "the server offers only {mechanisms:?}; walbridge speaks {SCRAM_SHA_256}"
                            )));
                        }
                    };
                    let bound = mechanism == SCRAM_SHA_256_PLUS;
                    if binding_required && !bound {
                        return Err(unbound());
                    }
                    let state = ScramSha256::new(password.ok_or_else(need_password)?, binding);
                    let sent = frontend::sasl_initial_response(mechanism, state.message(), &mut buf).map_err(protocol);
                    scram = Some((state, bound));
                    sent
                }
                Message::AuthenticationSaslContinue(body) => {
                    let Some((state, _)) = scram.as_mut() else {
                        return Ok(Err(ReplicationError::Protocol(
                            "SASL continue before SASL start".to_owned(),
                        )));
                    };
                    state.update(body.data()).map_err(|e| refused(&format!("SCRAM: {e}")))?;
                    frontend::sasl_response(state.message(), &mut buf).map_err(protocol)
                }
                Message::AuthenticationSaslFinal(body) => {
                    let Some((state, _)) = scram.as_mut() else {
                        return Ok(Err(ReplicationError::Protocol(
                            "SASL final before SASL start".to_owned(),
                        )));
                    };
                    state
                        .finish(body.data())
                        .map_err(|e| refused(&format!("SCRAM: the server's proof is wrong: {e}")))?;
                    continue;
                }
                Message::ParameterStatus(body) => {
                    if body.name().ok() == Some("server_version") {
                        self.server_version = body.value().unwrap_or_default().to_owned();
                    }
                    continue;
                }
                Message::BackendKeyData(body) => {
                    self.backend_pid = Some(body.process_id());
                    continue;
                }
                Message::NoticeResponse(_) => continue,
                Message::ReadyForQuery(_) => return Ok(Ok(())),
                Message::ErrorResponse(body) => return Ok(Err(server_error(&body))),
                other => return Ok(Err(unexpected(&other))),
            };
            if let Err(e) = sent {
                return Ok(Err(e));
            }
            if let Err(e) = self.send(&buf).await {
                return Ok(Err(e));
            }
        }
    }

    /// The server process serving this connection (its walsender), as
    /// `pg_stat_replication.pid` and `pg_stat_ssl.pid` show it.
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_pid
    }

    /// `server_version_num` computed from the `server_version` the server
    /// reported at startup.
    pub fn server_version_num(&self) -> u32 {
        server_version_num(&self.server_version)
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .into_iter()
            .next()
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".to_owned()))?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemIdentity {
            system_id: field(0),
            timeline: field(1).parse().unwrap_or_default(),
            xlogpos: field(2),
            database: row.get(3).cloned().flatten(),
        })
    }

    /// Creates a logical slot with pgoutput and exports its snapshot.
    pub async fn create_logical_slot_exporting_snapshot(
        &mut self,
        slot: &str,
    ) -> Result<CreatedSlot, ReplicationError> {
        let command = if self.server_version_num() >= 150000 {
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
                quote_ident(slot)
            )
        } else {
            format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(slot)
            )
        };
        let rows = self.simple_query(&command).await?;
        let row = rows
            .into_iter()
            .next()
            .ok_or_else(|| ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".to_owned()))?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let created = CreatedSlot {
            slot_name: field(0),
            consistent_point: field(1),
            snapshot_name: field(2),
            output_plugin: field(3),
        };
        if created.snapshot_name.is_empty() {
            return Err(ReplicationError::Protocol("the server exported no snapshot".to_owned()));
        }
        Ok(created)
    }

    /// Drops a slot (waiting for it to become inactive, where the server
    /// knows how).
    pub async fn drop_slot(&mut self, slot: &str) -> Result<(), ReplicationError> {
        let wait = if self.server_version_num() >= 130000 {
            " WAIT"
        } else {
            ""
        };
        self.simple_query(&format!("DROP_REPLICATION_SLOT {}{wait}", quote_ident(slot)))
            .await
            .map(drop)
    }

    /// Resolves when the connection ends; sends nothing, so an exported
    /// snapshot stays valid while this waits.
    pub async fn closed(&mut self) -> ReplicationError {
        loop {
            match self.receive().await {
                Ok(Message::ErrorResponse(body)) => return server_error(&body),
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    }

    /// Says goodbye and closes.
    pub async fn close(mut self) {
        let mut buf = BytesMut::new();
        frontend::terminate(&mut buf);
        let _ = self.send(&buf).await;
        let _ = self.stream.shutdown().await;
    }

    async fn simple_query(&mut self, query: &str) -> Result<Rows, ReplicationError> {
        tracing::debug!(query, "replication command");
        let mut buf = BytesMut::new();
        frontend::query(query, &mut buf).map_err(|e| ReplicationError::Protocol(e.to_string()))?;
        self.send(&buf).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.receive().await? {
                Message::DataRow(body) => {
                    let buffer = body.buffer();
                    let values = body
                        .ranges()
                        .map(|range| Ok(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned())))
                        .collect()
                        .map_err(|e| ReplicationError::Protocol(e.to_string()))?;
                    rows.push(values);
                }
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => {
                    return match error {
                        Some(error) => Err(error),
                        None => Ok(rows),
                    };
                }
                Message::RowDescription(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse
                | Message::NoticeResponse(_)
                | Message::ParameterStatus(_) => {}
                other => return Err(unexpected(&other)),
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), ReplicationError> {
        self.stream.write_all(bytes).await.map_err(|e| self.io_error(&e))?;
        let flushed = self.stream.flush().await;
        flushed.map_err(|e| self.io_error(&e))
    }

    /// An I/O error in words: over TLS, a server's alert (a refused client
    /// certificate arrives after the handshake with TLS 1.3).
    fn io_error(&self, error: &std::io::Error) -> ReplicationError {
        if let Some(connector) = &self.tls
            && tls::rustls_error(error).is_some()
        {
            return ReplicationError::Io(connector.describe_io(error));
        }
        match error.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => ReplicationError::Closed,
            _ => ReplicationError::Io(error.to_string()),
        }
    }

    async fn receive(&mut self) -> Result<Message, ReplicationError> {
        loop {
            if let Some(message) =
                Message::parse(&mut self.read).map_err(|e| ReplicationError::Protocol(e.to_string()))?
            {
                return Ok(message);
            }
            let read = self.stream.read_buf(&mut self.read).await;
            let n = read.map_err(|e| self.io_error(&e))?;
            if n == 0 {
                return Err(ReplicationError::Closed);
            }
        }
    }
}

fn server_error(body: &postgres_protocol::message::backend::ErrorResponseBody) -> ReplicationError {
    let (mut code, mut message, mut detail, mut hint) = (String::new(), String::new(), None, None);
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
    }
    ReplicationError::Server {
        code,
        message,
        detail,
        hint,
    }
}

fn unexpected(message: &Message) -> ReplicationError {
    let name = match message {
        Message::CopyData(_) => "CopyData",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::CopyInResponse(_) => "CopyInResponse",
        _ => "a message",
    };
    ReplicationError::Protocol(format!("{name} was not expected here"))
}
