//! The TLS half of a connection string, with libpq's meaning: `sslmode`,
//! `sslrootcert` (a file or `system`), `sslcert`/`sslkey`, `sslnegotiation`,
//! `sslsni`, `channel_binding` and the protocol range, each defaulting to
//! its `PG*` variable and then to libpq's default files under
//! `~/.postgresql/`. Resolved once, when the setting is read, so that a bad
//! value is a bad setting; the files are read again at each connection
//! (certificates get rotated), by [`super::tls`].

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::conninfo::Parameters;
use crate::settings::{Environment, SettingError};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether a connection without TLS is ever acceptable.
    pub fn requires_tls(self) -> bool {
        self >= SslMode::Require
    }
}

/// libpq's `sslnegotiation` (PostgreSQL 17): an SSLRequest first, or a TLS
/// handshake straight away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslNegotiation {
    Postgres,
    Direct,
}

impl SslNegotiation {
    pub fn as_str(self) -> &'static str {
        match self {
            SslNegotiation::Postgres => "postgres",
            SslNegotiation::Direct => "direct",
        }
    }
}

/// libpq's `channel_binding`: whether SCRAM binds the authentication to
/// the TLS connection (`SCRAM-SHA-256-PLUS`, `tls-server-end-point`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBinding {
    Disable,
    Prefer,
    Require,
}

impl ChannelBinding {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelBinding::Disable => "disable",
            ChannelBinding::Prefer => "prefer",
            ChannelBinding::Require => "require",
        }
    }
}

/// The certificates a server's chain must lead to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file: `sslrootcert=/path`, or libpq's `~/.postgresql/root.crt`.
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's trust store, as
    /// OpenSSL finds it (`SSL_CERT_FILE`, `SSL_CERT_DIR`, then the
    /// distribution's bundle).
    System(SystemRoots),
}

/// Where the operating system keeps its trusted roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemRoots {
    /// One PEM bundle (Debian: `/etc/ssl/certs/ca-certificates.crt`).
    pub file: Option<PathBuf>,
    /// A folder of hashed certificates.
    pub dir: Option<PathBuf>,
}

impl SystemRoots {
    /// As OpenSSL (and so libpq) finds them: `SSL_CERT_FILE` and
    /// `SSL_CERT_DIR` when set, else the bundle the distribution installs.
    pub fn find(env: &dyn Environment) -> SystemRoots {
        let var = |name: &str| env.var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let (file, dir) = (var("SSL_CERT_FILE"), var("SSL_CERT_DIR"));
        if file.is_some() || dir.is_some() {
            return SystemRoots { file, dir };
        }
        let probed = openssl_probe::probe();
        SystemRoots {
            file: probed.cert_file,
            dir: probed.cert_dir.into_iter().next(),
        }
    }
}

/// A client certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A TLS protocol version rustls speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// What the server's certificate is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Nothing: the connection is encrypted, the server unauthenticated
    /// (`require` without a root certificate, and `prefer`/`allow`).
    None,
    /// The chain leads to a root in `sslrootcert` (`verify-ca`, and
    /// `require` when a root certificate is given, as libpq does).
    Chain,
    /// The chain, and the name in `host` (`verify-full`).
    ChainAndName,
}

/// The TLS parameters of one database, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SslParams {
    mode: SslMode,
    root_cert: Option<RootCert>,
    /// Whether `root_cert` is libpq's default file rather than a setting.
    root_cert_is_default: bool,
    client_cert: Option<ClientCert>,
    negotiation: SslNegotiation,
    sni: bool,
    channel_binding: ChannelBinding,
    versions: Vec<TlsVersion>,
}

impl SslParams {
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    pub fn root_cert(&self) -> Option<&RootCert> {
        self.root_cert.as_ref()
    }

    pub fn client_cert(&self) -> Option<&ClientCert> {
        self.client_cert.as_ref()
    }

    pub fn negotiation(&self) -> SslNegotiation {
        self.negotiation
    }

    /// Whether the host name is sent as SNI (never for an IP address).
    pub fn sni(&self) -> bool {
        self.sni
    }

    pub fn channel_binding(&self) -> ChannelBinding {
        self.channel_binding
    }

    /// The TLS versions offered, oldest first.
    pub fn versions(&self) -> &[TlsVersion] {
        &self.versions
    }

    /// What a TLS connection checks of the server's certificate.
    pub fn verification(&self) -> Verification {
        match (self.mode, &self.root_cert) {
            (SslMode::VerifyFull, _) => Verification::ChainAndName,
            (SslMode::VerifyCa, _) => Verification::Chain,
            (_, Some(_)) => Verification::Chain,
            (_, None) => Verification::None,
        }
    }

    /// The parameters as libpq keywords, for a connection string that
    /// another libpq reads (the subscription's): only what differs from
    /// libpq's defaults, plus `sslmode` always. File paths are this
    /// machine's; `sslrootcert=system` stays `system`.
    pub fn keyword_values(&self) -> Vec<(&'static str, String)> {
        let mut values = vec![("sslmode", self.mode.as_str().to_owned())];
        match &self.root_cert {
            Some(RootCert::System(_)) => values.push(("sslrootcert", "system".to_owned())),
            Some(RootCert::File(path)) => values.push(("sslrootcert", path.display().to_string())),
            None => {}
        }
        if let Some(client) = &self.client_cert {
            values.push(("sslcert", client.cert.display().to_string()));
            values.push(("sslkey", client.key.display().to_string()));
        }
        if self.negotiation == SslNegotiation::Direct {
            values.push(("sslnegotiation", "direct".to_owned()));
        }
        if !self.sni {
            values.push(("sslsni", "0".to_owned()));
        }
        if self.channel_binding != ChannelBinding::Prefer {
            values.push(("channel_binding", self.channel_binding.as_str().to_owned()));
        }
        if self.versions.first() == Some(&TlsVersion::Tls13) {
            values.push(("ssl_min_protocol_version", "TLSv1.3".to_owned()));
        }
        if self.versions.last() == Some(&TlsVersion::Tls12) {
            values.push(("ssl_max_protocol_version", "TLSv1.2".to_owned()));
        }
        values
    }

    /// The same as libpq's `PG*` variables, for a child process such as
    /// pg_dump, whose libpq may be older than 16: `sslrootcert=system`
    /// becomes the system's bundle file (an older libpq would take
    /// `system` for a file name), with `verify-full`.
    pub fn libpq_environment(&self) -> Vec<(String, String)> {
        let env_name = |keyword: &str| {
            super::conninfo::keyword(keyword)
                .and_then(|k| k.env)
                .expect("every TLS keyword has a PG variable")
        };
        self.keyword_values()
            .into_iter()
            .map(|(keyword, value)| {
                let value = match (keyword, &self.root_cert) {
                    ("sslrootcert", Some(RootCert::System(roots))) => roots
                        .file
                        .as_ref()
                        .map(|f| f.display().to_string())
                        // No bundle file (only a folder): an older libpq
                        // then fails closed on a missing file "system".
                        .unwrap_or(value),
                    _ => value,
                };
                (env_name(keyword).to_owned(), value)
            })
            .collect()
    }

    /// Resolves the TLS keywords of `params`, their variables and libpq's
    /// default files.
    pub(crate) fn resolve(params: &Parameters<'_>, env: &dyn Environment) -> Result<SslParams, SettingError> {
        let home = env.var("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
        let default_file = |name: &str| home.as_ref().map(|h| h.join(".postgresql").join(name));

        let mut mode = match params.get("sslmode") {
            Some(given) => Some(SslMode::parse(&given.value).ok_or_else(|| {
                params.invalid(
                    &given,
                    "is not one of disable, allow, prefer, require, verify-ca, verify-full",
                )
            })?),
            None => None,
        };
        if mode.is_none()
            && let Some(requiressl) = params.get("requiressl")
        {
            mode = match requiressl.value.as_str() {
                "1" => Some(SslMode::Require),
                "0" => None,
                _ => return Err(params.invalid(&requiressl, "is neither 0 nor 1")),
            };
        }

        let (root_cert, root_cert_is_default) = match params.get("sslrootcert") {
            Some(given) if given.value == "system" => {
                let roots = SystemRoots::find(env);
                if roots.file.is_none() && roots.dir.is_none() {
                    return Err(params.invalid(
                        &given,
                        "names the system's trusted roots, and none were found: set SSL_CERT_FILE to a PEM bundle",
                    ));
                }
                if let Some(weak) = mode.filter(|m| *m != SslMode::VerifyFull) {
                    return Err(params.problem(format!(
                        "sslmode={} is too weak with sslrootcert=system (use verify-full, the default with system roots): \
                         anyone can get a publicly trusted certificate for a name they own",
                        weak.as_str()
                    )));
                }
                mode = Some(SslMode::VerifyFull);
                (Some(RootCert::System(roots)), false)
            }
            Some(given) => {
                let path = PathBuf::from(&given.value);
                read_certificates(&path).map_err(|problem| params.invalid(&given, &problem))?;
                (Some(RootCert::File(path)), false)
            }
            None => match default_file("root.crt").filter(|p| p.exists()) {
                Some(path) => {
                    read_certificates(&path).map_err(|problem| {
                        params.problem(format!(
                            "libpq's default root certificate {}: {problem}",
                            path.display()
                        ))
                    })?;
                    (Some(RootCert::File(path)), true)
                }
                None => (None, false),
            },
        };
        let mode = mode.unwrap_or(SslMode::Prefer);
        if mode >= SslMode::VerifyCa && root_cert.is_none() {
            let where_ = match default_file("root.crt") {
                Some(path) => format!("no sslrootcert and no {}", path.display()),
                None => "no sslrootcert (and no HOME for ~/.postgresql/root.crt)".to_owned(),
            };
            return Err(params.problem(format!(
                "sslmode={} checks the server's certificate, but there is no root certificate to check it with: {where_}; \
                 give sslrootcert=<CA file>, use sslrootcert=system, or choose sslmode=require",
                mode.as_str()
            )));
        }

        let negotiation = match params.get("sslnegotiation") {
            None => SslNegotiation::Postgres,
            Some(given) => match given.value.as_str() {
                "postgres" => SslNegotiation::Postgres,
                "direct" => SslNegotiation::Direct,
                _ => return Err(params.invalid(&given, "is neither postgres nor direct")),
            },
        };
        if negotiation == SslNegotiation::Direct && !mode.requires_tls() {
            return Err(params.problem(format!(
                "sslmode={} is too weak with sslnegotiation=direct (use require, verify-ca or verify-full)",
                mode.as_str()
            )));
        }

        let sni = match params.get("sslsni") {
            None => true,
            Some(given) => match given.value.as_str() {
                "1" => true,
                "0" => false,
                _ => return Err(params.invalid(&given, "is neither 1 nor 0")),
            },
        };

        let channel_binding = match params.get("channel_binding") {
            None => ChannelBinding::Prefer,
            Some(given) => match given.value.as_str() {
                "disable" => ChannelBinding::Disable,
                "prefer" => ChannelBinding::Prefer,
                "require" => ChannelBinding::Require,
                _ => return Err(params.invalid(&given, "is not one of disable, prefer, require")),
            },
        };
        if channel_binding == ChannelBinding::Require && mode == SslMode::Disable {
            return Err(params
                .problem("channel_binding=require binds authentication to TLS, and sslmode=disable turns TLS off"));
        }

        let client_cert = resolve_client_cert(params, &default_file)?;
        let versions = resolve_versions(params)?;

        if let Some(gss) = params.get("gssencmode")
            && !matches!(gss.value.as_str(), "disable" | "prefer")
        {
            return Err(match gss.value.as_str() {
                "require" => params.invalid(&gss, "asks for GSSAPI encryption, which walbridge does not speak"),
                _ => params.invalid(&gss, "is not one of disable, prefer, require"),
            });
        }

        Ok(SslParams {
            mode,
            root_cert,
            root_cert_is_default,
            client_cert,
            negotiation,
            sni,
            channel_binding,
            versions,
        })
    }

    /// Whether the root certificate came from libpq's default file (so
    /// errors can say where it came from).
    pub fn root_cert_is_default(&self) -> bool {
        self.root_cert_is_default
    }
}

fn resolve_client_cert(
    params: &Parameters<'_>,
    default_file: &dyn Fn(&str) -> Option<PathBuf>,
) -> Result<Option<ClientCert>, SettingError> {
    let cert_mode = params.get("sslcertmode");
    if let Some(given) = &cert_mode {
        match given.value.as_str() {
            "disable" => return Ok(None),
            "allow" => {}
            "require" => {
                return Err(params.invalid(
                    given,
                    "is not supported by walbridge (disable and allow are: a server that asks for a certificate gets one)",
                ));
            }
            _ => return Err(params.invalid(given, "is not one of disable, allow, require")),
        }
    }
    let cert = match params.get("sslcert") {
        Some(given) => {
            let path = PathBuf::from(&given.value);
            read_certificates(&path).map_err(|problem| params.invalid(&given, &problem))?;
            Some(path)
        }
        None => default_file("postgresql.crt").filter(|p| p.exists()),
    };
    let key_given = params.get("sslkey");
    let Some(cert) = cert else {
        return match key_given {
            Some(given) => Err(params.invalid(
                &given,
                "names a client key, but there is no client certificate (sslcert) to go with it",
            )),
            None => Ok(None),
        };
    };
    let key = match &key_given {
        Some(given) => PathBuf::from(&given.value),
        None => default_file("postgresql.key").unwrap_or_default(),
    };
    if !key.exists() {
        return Err(params.problem(format!(
            "the client certificate {} has no private key: {} does not exist (sslkey)",
            cert.display(),
            key.display()
        )));
    }
    check_client_key(&cert, &key).map_err(|problem| params.problem(format!("sslkey {}: {problem}", key.display())))?;
    Ok(Some(ClientCert { cert, key }))
}

fn resolve_versions(params: &Parameters<'_>) -> Result<Vec<TlsVersion>, SettingError> {
    // libpq's names, compared as libpq does (ignoring case). The ordinal
    // orders them; rustls speaks 1.2 and 1.3.
    let ordinal = |name: &str, given: &super::conninfo::Parameter| {
        Ok(match name.to_ascii_lowercase().as_str() {
            "tlsv1" => 10,
            "tlsv1.1" => 11,
            "tlsv1.2" => 12,
            "tlsv1.3" => 13,
            _ => return Err(params.invalid(given, "is not one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3")),
        })
    };
    let min = match params.get("ssl_min_protocol_version") {
        Some(given) => ordinal(&given.value, &given)?,
        None => 12,
    };
    let max = match params.get("ssl_max_protocol_version") {
        Some(given) => ordinal(&given.value, &given)?,
        None => 13,
    };
    if min > max {
        return Err(params.problem("ssl_min_protocol_version is above ssl_max_protocol_version"));
    }
    let versions: Vec<TlsVersion> = [(12, TlsVersion::Tls12), (13, TlsVersion::Tls13)]
        .into_iter()
        .filter(|(n, _)| (min..=max).contains(n))
        .map(|(_, v)| v)
        .collect();
    if versions.is_empty() {
        return Err(params.problem("ssl_max_protocol_version is below TLSv1.2: walbridge speaks TLS 1.2 and 1.3"));
    }
    Ok(versions)
}

/// The certificates in a PEM file, or why there are none.
pub(crate) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {}", path.display(), pem_problem(&e)))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The client's certificate chain and key, checked as libpq checks them
/// (a key file readable by others is refused) and against each other.
pub(crate) fn read_client_identity(
    client: &ClientCert,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = read_certificates(&client.cert)?;
    check_key_permissions(&client.key)?;
    let key = PrivateKeyDer::from_pem_file(&client.key).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!(
            "{} holds no unencrypted PEM private key (an encrypted key needs sslpassword, which walbridge does not support)",
            client.key.display()
        ),
        other => format!("cannot read a private key from {}: {}", client.key.display(), pem_problem(&other)),
    })?;
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &crate::tls::provider()).map_err(|e| {
        format!(
            "the key in {} does not match the certificate in {} (sslcert): {e}",
            client.key.display(),
            client.cert.display()
        )
    })?;
    Ok((chain, key))
}

fn check_client_key(cert: &Path, key: &Path) -> Result<(), String> {
    read_client_identity(&ClientCert {
        cert: cert.to_owned(),
        key: key.to_owned(),
    })
    .map(drop)
}

/// libpq refuses a key file that others may read: `u=rw` (0600) at most
/// when this user owns it, `u=rw,g=r` (0640) when root does.
fn check_key_permissions(key: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", key.display()));
    }
    let mode = meta.mode();
    let too_open = if meta.uid() == nix::unistd::geteuid().as_raw() {
        mode & 0o077 != 0
    } else {
        meta.uid() == 0 && mode & 0o037 != 0
    };
    if too_open {
        return Err(format!(
            "{} has group or world access (mode {:o}); it must be u=rw (0600) or less when owned by this user, \
             or u=rw,g=r (0640) or less when owned by root",
            key.display(),
            mode & 0o777
        ));
    }
    Ok(())
}

fn pem_problem(error: &rustls_pki_types::pem::Error) -> String {
    match error {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM item of that kind in the file".to_owned(),
        other => format!("{other:?}"),
    }
}
