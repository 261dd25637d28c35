//! A replication-protocol connection (`replication=database`), which
//! tokio-postgres cannot open: its startup message has no `replication`
//! parameter, and the server refuses it through `options`.
//!
//! Built on `postgres-protocol`'s message codecs: startup, authentication
//! (trust, cleartext, md5, SCRAM-SHA-256 without channel binding), and the
//! simple query protocol, which is all the replication commands need.
//! TLS is not spoken here yet: `sslmode=require` is refused with a clear
//! error rather than silently sent in plain text.
//!
//! The exported snapshot of `CREATE_REPLICATION_SLOT` lives only while the
//! connection stays open and runs no other command; [`ReplicationConnection::closed`]
//! watches the connection without sending anything.

use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{Host, SslMode};
use walbridge_migration::ident::quote_ident;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot connect for replication: {0}")]
    Connect(String),
    #[error("replication connection refused: {0}")]
    Auth(String),
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
    #[error("{0}")]
    Unsupported(String),
}

impl ReplicationError {
    /// The fault kind of this error (see `walbridge_migration::fault`).
    pub fn kind(&self) -> walbridge_migration::fault::FaultKind {
        use walbridge_migration::fault::{FaultKind, Side};
        match self {
            ReplicationError::Connect(_) | ReplicationError::Closed => FaultKind::SourceUnavailable,
            ReplicationError::Auth(_) => FaultKind::Privilege,
            ReplicationError::Server { code, .. } => FaultKind::of_sqlstate(code, Side::Source),
            ReplicationError::Protocol(_) | ReplicationError::Unsupported(_) => FaultKind::Internal,
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

pub struct ReplicationConnection {
    stream: Box<dyn Stream>,
    read: BytesMut,
    server_version: String,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("server_version", &self.server_version)
            .finish_non_exhaustive()
    }
}

/// One result set of the simple query protocol, as text.
type Rows = Vec<Vec<Option<String>>>;

impl ReplicationConnection {
    /// Connects with `replication=database` and authenticates.
    pub async fn connect(config: &tokio_postgres::Config, application_name: &str) -> Result<Self, ReplicationError> {
        if config.get_ssl_mode() == SslMode::Require {
            return Err(ReplicationError::Unsupported(
                "TLS to the source (sslmode=require) is not supported by the replication connection yet".to_owned(),
            ));
        }
        let timeout = config.get_connect_timeout().copied().unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        tokio::time::timeout(timeout, Self::connect_inner(config, application_name))
            .await
            .map_err(|_| ReplicationError::Connect(format!("no answer within {timeout:?}")))?
    }

    async fn connect_inner(config: &tokio_postgres::Config, application_name: &str) -> Result<Self, ReplicationError> {
        let user = config
            .get_user()
            .ok_or_else(|| ReplicationError::Connect("no user in the connection settings".to_owned()))?;
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let stream: Box<dyn Stream> = match config.get_hosts().first() {
            Some(Host::Tcp(host)) => {
                let tcp = TcpStream::connect((host.as_str(), port))
                    .await
                    .map_err(|e| ReplicationError::Connect(format!("{host}:{port}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
            Some(Host::Unix(dir)) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                Box::new(
                    UnixStream::connect(&path)
                        .await
                        .map_err(|e| ReplicationError::Connect(format!("{}: {e}", path.display())))?,
                )
            }
            None => {
                return Err(ReplicationError::Connect(
                    "no host in the connection settings".to_owned(),
                ));
            }
        };
        let mut connection = ReplicationConnection {
            stream,
            read: BytesMut::with_capacity(8192),
            server_version: String::new(),
        };
        let database = config.get_dbname().unwrap_or(user);
        let mut buf = BytesMut::new();
        frontend::startup_message(
            [
                ("user", user),
                ("database", database),
                ("replication", "database"),
                ("application_name", application_name),
                ("client_encoding", "UTF8"),
            ],
            &mut buf,
        )
        .map_err(|e| ReplicationError::Protocol(e.to_string()))?;
        connection.send(&buf).await?;
        connection.authenticate(user, config.get_password()).await?;
        Ok(connection)
    }

    async fn authenticate(&mut self, user: &str, password: Option<&[u8]>) -> Result<(), ReplicationError> {
        let need_password = || ReplicationError::Auth("the server asks for a password and none is set".to_owned());
        let mut scram: Option<ScramSha256> = None;
        loop {
            let mut buf = BytesMut::new();
            match self.receive().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password.ok_or_else(need_password)?, &mut buf)
                        .map_err(|e| ReplicationError::Protocol(e.to_string()))?;
                    self.send(&buf).await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hashed = md5_hash(user.as_bytes(), password.ok_or_else(need_password)?, body.salt());
                    frontend::password_message(hashed.as_bytes(), &mut buf)
                        .map_err(|e| ReplicationError::Protocol(e.to_string()))?;
                    self.send(&buf).await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mechanisms: Vec<String> = body
                        .mechanisms()
                        .map(|m| Ok(m.to_owned()))
                        .collect()
                        .map_err(|e| ReplicationError::Protocol(e.to_string()))?;
                    if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(ReplicationError::Auth(format!(
                            "the server offers only {mechanisms:?}; walbridge speaks {SCRAM_SHA_256}"
                        )));
                    }
                    let state = ScramSha256::new(password.ok_or_else(need_password)?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, state.message(), &mut buf)
                        .map_err(|e| ReplicationError::Protocol(e.to_string()))?;
                    self.send(&buf).await?;
                    scram = Some(state);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let state = scram
                        .as_mut()
                        .ok_or_else(|| ReplicationError::Protocol("SASL continue before SASL start".to_owned()))?;
                    state
                        .update(body.data())
                        .map_err(|e| ReplicationError::Auth(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(state.message(), &mut buf)
                        .map_err(|e| ReplicationError::Protocol(e.to_string()))?;
                    self.send(&buf).await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let state = scram
                        .as_mut()
                        .ok_or_else(|| ReplicationError::Protocol("SASL final before SASL start".to_owned()))?;
                    state
                        .finish(body.data())
                        .map_err(|e| ReplicationError::Auth(format!("SCRAM: the server's proof is wrong: {e}")))?;
                }
                Message::ParameterStatus(body) => {
                    if body.name().ok() == Some("server_version") {
                        self.server_version = body.value().unwrap_or_default().to_owned();
                    }
                }
                Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    let error = server_error(&body);
                    // 28P01 / 28000: authentication or authorization refused.
                    return Err(match &error {
                        ReplicationError::Server { code, .. } if code.starts_with("28") => {
                            ReplicationError::Auth(error.to_string())
                        }
                        _ => error,
                    });
                }
                other => return Err(unexpected(&other)),
            }
        }
    }

    /// `server_version_num` computed from the `server_version` the server
    /// reported at startup.
    pub fn server_version_num(&self) -> u32 {
        version_num(&self.server_version)
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
        self.stream.write_all(bytes).await.map_err(|e| io_error(&e))?;
        self.stream.flush().await.map_err(|e| io_error(&e))
    }

    async fn receive(&mut self) -> Result<Message, ReplicationError> {
        loop {
            if let Some(message) =
                Message::parse(&mut self.read).map_err(|e| ReplicationError::Protocol(e.to_string()))?
            {
                return Ok(message);
            }
            let n = self.stream.read_buf(&mut self.read).await.map_err(|e| io_error(&e))?;
            if n == 0 {
                return Err(ReplicationError::Closed);
            }
        }
    }
}

fn io_error(error: &std::io::Error) -> ReplicationError {
    match error.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
            ReplicationError::Closed
        }
        _ => ReplicationError::Connect(error.to_string()),
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

/// `server_version` text to `server_version_num`: "15.18 (Debian ...)" is
/// 150018, "9.6.24" is 90624, "16beta1" is 160000.
pub fn version_num(version: &str) -> u32 {
    let numeric: String = version
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let second = parts.next().unwrap_or(0);
    if major >= 10 {
        major * 10000 + second
    } else {
        major * 10000 + second * 100 + parts.next().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::version_num;

    #[test]
    fn server_versions_become_numbers() {
        assert_eq!(version_num("15.18 (Debian 15.18-0+deb12u1)"), 150018);
        assert_eq!(version_num("10.23"), 100023);
        assert_eq!(version_num("16beta1"), 160000);
        assert_eq!(version_num("9.6.24"), 90624);
        assert_eq!(version_num("18.1"), 180001);
    }
}
