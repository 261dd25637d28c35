//! Certificates for TLS tests, made with rcgen: a CA per test (its PEM on
//! disk, for `sslrootcert`), server certificates for the names and
//! addresses a test chooses (valid, expired, or from another CA), and
//! client certificates whose key files libpq accepts (mode 0600).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;
use time::{Duration, OffsetDateTime};

/// A certificate authority made for one test.
pub struct TestCa {
    name: String,
    dir: TempDir,
    cert_path: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A server's certificate and key, in PEM, with the CA that issued it.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// The issuing CA's certificate, PEM.
    pub ca_pem: String,
}

/// A client certificate and its key, as files (the key mode 0600).
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl TestCa {
    /// A new CA whose common name is `name`.
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name = distinguished_name(&format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let (not_before, not_after) = valid_now();
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key).expect("a self-signed CA");
        let cert_pem = cert.pem();
        let dir = tempfile::Builder::new()
            .prefix(&format!("walbridge-ca-{name}-"))
            .tempdir()
            .expect("a temp folder");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let cert_path = dir.path().join("ca.pem");
        std::fs::write(&cert_path, &cert_pem).expect("CA certificate written");
        TestCa {
            name: name.to_owned(),
            dir,
            cert_path,
            cert_pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA's certificate file, for `sslrootcert`.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `names` (host names, or IP addresses, which
    /// become IP subject alternative names), valid from yesterday for a year.
    pub fn server(&self, names: &[&str]) -> ServerCert {
        let (not_before, not_after) = valid_now();
        self.server_valid(names, not_before, not_after)
    }

    /// A server certificate for `names` that expired yesterday.
    pub fn expired_server(&self, names: &[&str]) -> ServerCert {
        let now = OffsetDateTime::now_utc();
        self.server_valid(names, now - Duration::days(30), now - Duration::days(1))
    }

    fn server_valid(&self, names: &[&str], not_before: OffsetDateTime, not_after: OffsetDateTime) -> ServerCert {
        let key = KeyPair::generate().expect("a server key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("server names");
        params.distinguished_name = distinguished_name(names.first().copied().unwrap_or("server"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).expect("a server certificate");
        ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        }
    }

    /// A client certificate whose common name is `user` (what
    /// `clientcert=verify-full` would compare), written beside the CA.
    pub fn client(&self, user: &str) -> ClientCert {
        let key = KeyPair::generate().expect("a client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client parameters");
        params.distinguished_name = distinguished_name(user);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (not_before, not_after) = valid_now();
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer).expect("a client certificate");
        let stem = self.dir.path().join(format!("client-{user}-{}", unique()));
        let cert_path = stem.with_extension("crt");
        let key_path = stem.with_extension("key");
        std::fs::write(&cert_path, cert.pem()).expect("client certificate written");
        write_private(&key_path, &key.serialize_pem());
        ClientCert { cert_path, key_path }
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn valid_now() -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - Duration::days(1), now + Duration::days(365))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A file only its owner may read, as libpq and the server demand of keys.
pub(crate) fn write_private(path: &Path, contents: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("a private file opens");
    file.write_all(contents.as_bytes()).expect("a private file is written");
}
