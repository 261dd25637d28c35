//! TLS to PostgreSQL servers over rustls, with libpq's meaning of
//! [`SslParams`]: `require` encrypts and trusts any certificate (unless a
//! root certificate is given), `verify-ca` checks the chain, `verify-full`
//! the chain and the name in `host`; a client certificate when there is
//! one; ALPN `postgresql` (PostgreSQL 17's direct TLS insists on it); SNI
//! per `sslsni`, never for an IP address; `tls-server-end-point` channel
//! binding for SCRAM-SHA-256-PLUS.
//!
//! [`TlsConnector`] is the one place that builds this configuration: it is
//! tokio-postgres's `MakeTlsConnect`, and [`negotiate`] speaks SSLRequest
//! or direct TLS for clients that tokio-postgres cannot be (the
//! replication connection). Handshake failures are described in one line
//! (unknown issuer, name mismatch with the names the certificate has,
//! expiry, a refused client certificate...).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::ssl::{RootCert, SslNegotiation, SslParams, SystemRoots, TlsVersion, Verification};
use super::{Failure, FailureKind};

/// The ALPN protocol name PostgreSQL registered (sent by libpq 17+).
pub const ALPN: &[u8] = b"postgresql";

/// Wraps connections to one database in TLS, as its [`SslParams`] say.
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    context: Arc<Described>,
    /// Whether a handshake was started (`prefer` knows from it whether the
    /// server declined TLS).
    started: Arc<AtomicBool>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// What error messages say about the configuration.
#[derive(Debug)]
struct Described {
    roots: String,
    client_cert: Option<String>,
    direct: bool,
    versions: String,
}

impl TlsConnector {
    /// Reads the certificate files now (they may have been rotated since
    /// the setting was read). `server_name` is what `verify-full` checks
    /// and SNI sends: `host`, or `hostaddr` when only that is given.
    pub fn new(ssl: &SslParams, server_name: ServerName<'static>, sni: bool) -> Result<TlsConnector, Failure> {
        let setup = |reason: String| Failure::new(FailureKind::Tls, reason);
        let provider = crate::tls::provider();
        let roots = match ssl.root_cert() {
            None => None,
            Some(RootCert::File(path)) => {
                let mut store = RootCertStore::empty();
                for cert in super::ssl::read_certificates(path).map_err(|p| setup(format!("sslrootcert: {p}")))? {
                    store.add(cert).map_err(|e| {
                        setup(format!(
                            "sslrootcert: {} is not a usable CA certificate: {e}",
                            path.display()
                        ))
                    })?;
                }
                Some(Arc::new(store))
            }
            Some(RootCert::System(roots)) => Some(system_store(roots).map_err(setup)?),
        };
        let versions: Vec<&'static rustls::SupportedProtocolVersion> = ssl
            .versions()
            .iter()
            .map(|v| match v {
                TlsVersion::Tls12 => &rustls::version::TLS12,
                TlsVersion::Tls13 => &rustls::version::TLS13,
            })
            .collect();
        let verifier = Arc::new(ServerVerifier {
            roots,
            check_name: ssl.verification() == Verification::ChainAndName,
            algorithms: provider.signature_verification_algorithms,
        });
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| setup(format!("TLS versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match ssl.client_cert() {
            Some(client) => {
                let (chain, key) =
                    super::ssl::read_client_identity(client).map_err(|p| setup(format!("bad client key: {p}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| setup(format!("bad client key {}: {e}", client.key.display())))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.enable_sni = sni;
        let roots = match ssl.root_cert() {
            None => "no root certificate".to_owned(),
            Some(RootCert::File(path)) if ssl.root_cert_is_default() => {
                format!("libpq's default root certificate {}", path.display())
            }
            Some(RootCert::File(path)) => format!("sslrootcert ({})", path.display()),
            Some(RootCert::System(_)) => "the system's trusted roots (sslrootcert=system)".to_owned(),
        };
        let versions = ssl
            .versions()
            .iter()
            .map(|v| match v {
                TlsVersion::Tls12 => "TLS 1.2",
                TlsVersion::Tls13 => "TLS 1.3",
            })
            .collect::<Vec<_>>()
            .join(" and ");
        Ok(TlsConnector {
            config: Arc::new(config),
            server_name,
            context: Arc::new(Described {
                roots,
                client_cert: ssl.client_cert().map(|c| c.cert.display().to_string()),
                direct: ssl.negotiation() == SslNegotiation::Direct,
                versions,
            }),
            started: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Whether this connector (or a clone) has started a handshake.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// The TLS handshake over `stream`.
    pub async fn handshake<S>(&self, stream: S) -> Result<TlsStream<S>, HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.started.store(true, Ordering::Relaxed);
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), stream)
            .await
            .map(|inner| TlsStream { inner })
            .map_err(|e| HandshakeError(self.describe_io(&e)))
    }

    /// A TLS failure in words; also for the alerts a server sends after
    /// the handshake (with TLS 1.3, a refused client certificate arrives
    /// with the first read).
    pub fn describe_io(&self, error: &io::Error) -> String {
        match rustls_error(error) {
            Some(tls) => self.describe(tls),
            None if error.kind() == io::ErrorKind::UnexpectedEof => {
                let mut text = "the server closed the connection during the TLS handshake".to_owned();
                if self.context.direct {
                    text.push_str(DIRECT_HINT);
                }
                text
            }
            None => format!("TLS handshake failed: {error}"),
        }
    }

    /// A rustls error in words.
    pub fn describe(&self, error: &rustls::Error) -> String {
        let roots = &self.context.roots;
        let certificate_error = |e: &CertificateError| match e {
            CertificateError::UnknownIssuer => {
                format!("the server's certificate is not signed by a CA in {roots} (unknown issuer)")
            }
            CertificateError::BadSignature => {
                format!("the server's certificate chain has a bad signature (not signed by a CA in {roots})")
            }
            CertificateError::NotValidForNameContext { expected, presented } => format!(
                "the server's certificate is not valid for host name \"{}\" (sslmode=verify-full checks the name in host); \
                 it is for {}",
                expected.to_str(),
                if presented.is_empty() {
                    "no host name at all".to_owned()
                } else {
                    presented
                        .iter()
                        .map(|name| presented_name(name))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
            CertificateError::NotValidForName => format!(
                "the server's certificate is not valid for host name \"{}\" (sslmode=verify-full checks the name in host)",
                self.server_name.to_str()
            ),
            CertificateError::Expired => "the server's certificate has expired".to_owned(),
            CertificateError::ExpiredContext { not_after, .. } => {
                format!("the server's certificate expired on {}", utc(*not_after))
            }
            CertificateError::NotValidYet => "the server's certificate is not valid yet".to_owned(),
            CertificateError::NotValidYetContext { not_before, .. } => {
                format!("the server's certificate is not valid before {}", utc(*not_before))
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "the server's certificate is not for TLS servers (its extended key usage)".to_owned()
            }
            other => format!("the server's certificate was refused: {other}"),
        };
        match error {
            rustls::Error::InvalidCertificate(e) => certificate_error(e),
            rustls::Error::AlertReceived(alert) => match (alert, &self.context.client_cert) {
                (AlertDescription::CertificateRequired, _) => {
                    "the server requires a client certificate: set sslcert and sslkey".to_owned()
                }
                (
                    AlertDescription::UnknownCA
                    | AlertDescription::BadCertificate
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::CertificateExpired
                    | AlertDescription::CertificateRevoked
                    | AlertDescription::UnsupportedCertificate
                    | AlertDescription::AccessDenied
                    | AlertDescription::DecryptError,
                    Some(cert),
                ) => format!("the server refused the client certificate {cert} (sslcert): TLS alert {alert:?}"),
                (AlertDescription::NoApplicationProtocol, _) => {
                    "the server refused the TLS handshake: no application protocol (ALPN) in common".to_owned()
                }
                (AlertDescription::ProtocolVersion, _) => format!(
                    "the server speaks no TLS version walbridge offers ({})",
                    self.context.versions
                ),
                (other, _) => format!("the server refused the TLS handshake: TLS alert {other:?}"),
            },
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } if self.context.direct => {
                format!("the server did not answer the TLS handshake{DIRECT_HINT}")
            }
            other => format!("TLS handshake failed: {other}"),
        }
    }
}

/// webpki's presented names read `DnsName("db.example")` and
/// `IpAddress(10.0.0.1)`: the name alone.
fn presented_name(name: &str) -> &str {
    name.strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| name.strip_prefix("IpAddress(").and_then(|n| n.strip_suffix(')')))
        .unwrap_or(name)
}

const DIRECT_HINT: &str = " (sslnegotiation=direct needs PostgreSQL 17 or later with ssl = on)";

/// The rustls error inside an I/O error from tokio-rustls, if any.
pub fn rustls_error(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

fn utc(time: UnixTime) -> String {
    let secs = i64::try_from(time.as_secs()).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{secs} (UNIX time)"))
}

/// The system's roots, read once per process (the bundle is large; it
/// changes with the distribution's updates, not between connections).
fn system_store(roots: &SystemRoots) -> Result<Arc<RootCertStore>, String> {
    static LOADED: Mutex<Option<(SystemRoots, Arc<RootCertStore>)>> = Mutex::new(None);
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((paths, store)) = loaded.as_ref()
        && paths == roots
    {
        return Ok(store.clone());
    }
    let found = rustls_native_certs::load_certs_from_paths(roots.file.as_deref(), roots.dir.as_deref());
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        let place = [roots.file.as_ref(), roots.dir.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ");
        return Err(format!("sslrootcert=system: no usable certificate in {place}"));
    }
    let store = Arc::new(store);
    *loaded = Some((roots.clone(), store.clone()));
    Ok(store)
}

/// libpq's checks of the server's certificate: none, the chain, or the
/// chain and the name; the handshake's signatures are always checked
/// (they prove the server holds the certificate's key, which channel
/// binding relies on).
#[derive(Debug)]
struct ServerVerifier {
    roots: Option<Arc<RootCertStore>>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
            if self.check_name {
                verify_name(&cert, end_entity, server_name)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The name in `host` against the certificate's subject alternative
/// names, or, as libpq does when the certificate has no DNS name there,
/// against its common name.
fn verify_name(
    cert: &ParsedCertificate<'_>,
    der: &CertificateDer<'_>,
    server_name: &ServerName<'_>,
) -> Result<(), rustls::Error> {
    let error = match rustls::client::verify_server_name(cert, server_name) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return Err(error);
    };
    let has_dns_name = parsed.subject_alternative_name().ok().flatten().is_some_and(|san| {
        san.value
            .general_names
            .iter()
            .any(|n| matches!(n, x509_parser::extensions::GeneralName::DNSName(_)))
    });
    if has_dns_name {
        return Err(error);
    }
    let common_names: Vec<&str> = parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .collect();
    if let ServerName::DnsName(name) = server_name
        && common_names.iter().any(|cn| name_matches(cn, name.as_ref()))
    {
        return Ok(());
    }
    Err(match error {
        rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected,
            mut presented,
        }) => {
            presented.extend(common_names.iter().map(|cn| format!("common name {cn}")));
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { expected, presented })
        }
        other => other,
    })
}

/// A certificate name against a host name: case-insensitive, `*` only as
/// the whole leftmost label, matching one label.
fn name_matches(pattern: &str, host: &str) -> bool {
    let (pattern, host) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

/// A failed handshake, already in words.
#[derive(Debug)]
pub struct HandshakeError(pub String);

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HandshakeError {}

/// A TLS connection to a server.
pub struct TlsStream<S> {
    inner: tokio_rustls::client::TlsStream<S>,
}

impl<S> TlsStream<S> {
    /// RFC 5929's `tls-server-end-point`: the hash of the server's
    /// certificate, with SHA-256 for MD5 and SHA-1 signatures, else the
    /// signature's own hash. `None` for a signature without one (Ed25519,
    /// RSA-PSS): SCRAM then goes without channel binding, as libpq does.
    pub fn tls_server_end_point(&self) -> Option<Vec<u8>> {
        let (_, connection) = self.inner.get_ref();
        let cert = connection.peer_certificates()?.first()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let algorithm = match parsed.signature_algorithm.algorithm.to_id_string().as_str() {
            // md5WithRSA, sha1WithRSA, sha256WithRSA, ecdsa-with-SHA1/256, dsa-with-SHA1/256
            "1.2.840.113549.1.1.4"
            | "1.2.840.113549.1.1.5"
            | "1.2.840.113549.1.1.11"
            | "1.2.840.10045.4.1"
            | "1.2.840.10045.4.3.2"
            | "1.2.840.10040.4.3"
            | "2.16.840.1.101.3.4.3.2" => &ring::digest::SHA256,
            "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &ring::digest::SHA384,
            "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &ring::digest::SHA512,
            _ => return None,
        };
        Some(ring::digest::digest(algorithm, cert.as_ref()).as_ref().to_vec())
    }

    /// The negotiated TLS version, e.g. "TLSv1.3".
    pub fn protocol_version(&self) -> Option<String> {
        self.inner.get_ref().1.protocol_version().map(|v| format!("{v:?}"))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match self.tls_server_end_point() {
            Some(hash) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(hash),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for TlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = TlsConnector;
    type Error = HandshakeError;

    /// The domain tokio-postgres passes is its `host`; the connector
    /// already holds the name libpq would check (the same `host`, or
    /// `hostaddr` when there is no `host`).
    fn make_tls_connect(&mut self, _domain: &str) -> Result<TlsConnector, HandshakeError> {
        Ok(self.clone())
    }
}

impl<S> tokio_postgres::tls::TlsConnect<S> for TlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = HandshakeError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsStream<S>, HandshakeError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move { self.handshake(stream).await })
    }
}

/// How one connection attempt treats TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// No TLS.
    Plain,
    /// TLS if the server offers it, else plain text on the same
    /// connection (`prefer`'s first attempt).
    IfOffered,
    /// TLS or nothing.
    Required,
}

/// A connection to a server, in TLS or not.
pub enum PgStream<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

impl<S> PgStream<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, PgStream::Tls(_))
    }

    /// The channel binding data, over TLS.
    pub fn tls_server_end_point(&self) -> Option<Vec<u8>> {
        match self {
            PgStream::Plain(_) => None,
            PgStream::Tls(tls) => tls.tls_server_end_point(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Negotiates TLS on a fresh connection, as tokio-postgres does for its
/// own: an SSLRequest answered `S` or `N`, or with `sslnegotiation=direct`
/// the handshake at once.
pub async fn negotiate<S>(
    mut stream: S,
    encryption: Encryption,
    connector: Option<&TlsConnector>,
) -> Result<PgStream<S>, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let connector = match (encryption, connector) {
        (Encryption::Plain, _) | (_, None) => return Ok(PgStream::Plain(stream)),
        (_, Some(connector)) => connector,
    };
    if !(connector.context.direct && encryption == Encryption::Required) {
        let mut request = bytes::BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut request);
        let io_failure = |e: io::Error| Failure::new(FailureKind::Unreachable, format!("sending SSLRequest: {e}"));
        stream.write_all(&request).await.map_err(io_failure)?;
        stream.flush().await.map_err(io_failure)?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await.map_err(io_failure)?;
        match (answer[0], encryption) {
            (b'S', _) => {}
            (b'N', Encryption::IfOffered) => return Ok(PgStream::Plain(stream)),
            (b'N', _) => return Err(Failure::no_tls()),
            (other, _) => {
                return Err(Failure::new(
                    FailureKind::Protocol,
                    format!(
                        "the server answered the SSLRequest with {:?}, not S or N",
                        other as char
                    ),
                ));
            }
        }
    }
    let tls = connector
        .handshake(stream)
        .await
        .map_err(|e| Failure::new(FailureKind::Tls, e.0))?;
    Ok(PgStream::Tls(Box::new(tls)))
}

#[cfg(test)]
mod tests {
    use super::name_matches;

    #[test]
    fn common_names_match_as_libpq_matches_them() {
        assert!(name_matches("db.example", "DB.example"));
        assert!(name_matches("*.example", "db.example"));
        assert!(!name_matches("*.example", "a.db.example"));
        assert!(!name_matches("*.example", "example"));
        assert!(!name_matches("db.example", "other.example"));
    }

    #[test]
    fn presented_names_are_shown_bare() {
        assert_eq!(super::presented_name("DnsName(\"db.example\")"), "db.example");
        assert_eq!(super::presented_name("IpAddress(10.0.0.1)"), "10.0.0.1");
        assert_eq!(super::presented_name("common name db"), "common name db");
    }
}
