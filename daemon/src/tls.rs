//! TLS identities: a process's certificate, key and CA, loaded from the
//! `tls.*` settings and checked before any port is bound, and the rustls
//! configurations built from them (TLS 1.3 only, mutual authentication, the
//! `ring` provider).

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::settings::{Setting, SettingError, Settings};

pub const CA_CERT: &str = "tls.ca_cert";
pub const CERT: &str = "tls.cert";
pub const KEY: &str = "tls.key";

/// The `tls.*` settings, shared by every program that speaks mutual TLS.
pub const TLS_SETTINGS: [Setting; 3] = [
    Setting {
        key: CA_CERT,
        help: "PEM file of the CA that signs every walbridge certificate; peers must present a certificate it signed",
        value_name: "PATH",
        default: None,
    },
    Setting {
        key: CERT,
        help: "PEM file of this process's certificate (its name is this process's identity)",
        value_name: "PATH",
        default: None,
    },
    Setting {
        key: KEY,
        help: "PEM file of the private key for tls.cert (keep it mode 0600)",
        value_name: "PATH",
        default: None,
    },
];

/// The crypto provider for every TLS configuration in walbridge.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate, its key and the CA that peers' certificates must chain to.
#[derive(Clone)]
pub struct Identity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    name: String,
}

impl std::fmt::Debug for Identity {
    // The key never appears in a log or an error.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads and checks the `tls.*` settings: each file readable, holding
    /// what it should, and the key matching the certificate.
    pub fn from_settings(settings: &Settings) -> Result<Identity, SettingError> {
        let ca_path = settings.required_path(CA_CERT)?;
        let cert_path = settings.required_path(CERT)?;
        let key_path = settings.required_path(KEY)?;
        Identity::load(&ca_path, &cert_path, &key_path)
    }

    pub fn load(ca_path: &Path, cert_path: &Path, key_path: &Path) -> Result<Identity, SettingError> {
        let ca = read_certificates(CA_CERT, ca_path)?;
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|e| {
                SettingError::new(
                    CA_CERT,
                    format!("{} is not a usable CA certificate: {e}", ca_path.display()),
                )
            })?;
        }
        let chain = read_certificates(CERT, cert_path)?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
            SettingError::new(
                KEY,
                format!(
                    "cannot read a private key from {}: {}",
                    key_path.display(),
                    pem_problem(&e)
                ),
            )
        })?;
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()).map_err(|e| {
            SettingError::new(
                KEY,
                format!(
                    "the key in {} does not match the certificate in {} ({CERT}): {e}",
                    key_path.display(),
                    cert_path.display()
                ),
            )
        })?;
        let name = certificate_name(&chain[0]).ok_or_else(|| {
            SettingError::new(
                CERT,
                format!("the certificate in {} has no common name", cert_path.display()),
            )
        })?;
        Ok(Identity {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
            name,
        })
    }

    /// The name in this identity's certificate (its common name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// For the side that accepts connections: requires a client certificate
    /// signed by the CA.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
            .build()
            .expect("a non-empty root store makes a valid client verifier");
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .expect("key and certificate were checked when loaded");
        Arc::new(config)
    }

    /// For the side that dials: verifies the server's certificate against
    /// the CA and the expected host name, and presents this identity.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let provider = provider();
        let verifier = WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider.clone())
            .build()
            .expect("a non-empty root store makes a valid server verifier");
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .expect("key and certificate were checked when loaded");
        Arc::new(config)
    }
}

fn read_certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, SettingError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            SettingError::new(
                key,
                format!("cannot read certificates from {}: {}", path.display(), pem_problem(&e)),
            )
        })?;
    if certs.is_empty() {
        return Err(SettingError::new(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

fn pem_problem(error: &rustls_pki_types::pem::Error) -> String {
    match error {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM item of that kind in the file".to_owned(),
        other => format!("{other:?}"),
    }
}

/// The common name of a certificate: a walbridge process's identity.
pub fn certificate_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let name = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_owned())
}

/// The identity of the peer on an established connection.
pub fn peer_name(state: &rustls::CommonState) -> Option<String> {
    state.peer_certificates()?.first().and_then(certificate_name)
}

/// Says in words why a handshake failed, for a one-line log.
pub fn describe_handshake_error(error: &std::io::Error) -> String {
    let text = error.to_string();
    if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        format!("{text} (the peer's certificate is not signed by this side's tls.ca_cert)")
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        format!("{text} (the peer's certificate does not carry the host name this side dialed)")
    } else if text.contains("Expired") || text.contains("NotValidYet") {
        format!("{text} (the peer's certificate is outside its validity period)")
    } else {
        text
    }
}
