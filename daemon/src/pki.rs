//! The certificates of one walbridge install: a CA, the controller's
//! certificate, one per agent and one for the operator's CLI (what
//! `walbridge certs init` writes).
//!
//! Existing files are never overwritten: a second run keeps what is there
//! and adds only what is missing, signed by the existing CA.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// The common name in the controller's certificate.
pub const CONTROLLER_NAME: &str = "walbridge-controller";
/// The common name in the operator's certificate.
pub const OPERATOR_NAME: &str = "operator";

const CA_FILE: &str = "ca";
const RESERVED_NAMES: [&str; 3] = [CA_FILE, "controller", OPERATOR_NAME];

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    BadName(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Inconsistent(String),
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Created,
    /// It existed and was left as it was.
    Kept,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WrittenFile {
    pub path: PathBuf,
    pub outcome: Outcome,
}

/// Paths of one certificate and its key inside a certificate folder.
#[derive(Debug, Clone)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPaths {
    /// `<dir>/<stem>.pem` and `<dir>/<stem>-key.pem`.
    pub fn new(dir: &Path, stem: &str) -> CertPaths {
        CertPaths {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        }
    }

    fn state(&self) -> Result<bool, PkiError> {
        match (self.cert.exists(), self.key.exists()) {
            (true, true) => Ok(true),
            (false, false) => Ok(false),
            (true, false) => Err(PkiError::Inconsistent(format!(
                "{} exists without its key {}: move it away or restore the key",
                self.cert.display(),
                self.key.display()
            ))),
            (false, true) => Err(PkiError::Inconsistent(format!(
                "{} exists without its certificate {}: move it away or restore the certificate",
                self.key.display(),
                self.cert.display()
            ))),
        }
    }
}

/// The files of the CA in a certificate folder.
pub fn ca_paths(dir: &Path) -> CertPaths {
    CertPaths::new(dir, CA_FILE)
}

/// The controller's certificate files.
pub fn controller_paths(dir: &Path) -> CertPaths {
    CertPaths::new(dir, "controller")
}

/// An agent's certificate files.
pub fn agent_paths(dir: &Path, agent: &str) -> CertPaths {
    CertPaths::new(dir, agent)
}

/// The operator's certificate files.
pub fn operator_paths(dir: &Path) -> CertPaths {
    CertPaths::new(dir, OPERATOR_NAME)
}

/// Agent names become certificate names and file names: keep them plain.
pub fn check_agent_name(name: &str) -> Result<(), PkiError> {
    let plain = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !plain {
        return Err(PkiError::BadName(format!(
            "agent name {name:?} must be 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'"
        )));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(PkiError::BadName(format!(
            "agent name {name:?} is reserved for walbridge's own files"
        )));
    }
    Ok(())
}

/// Writes (or completes) the certificates of an install in `dir`.
pub fn init(dir: &Path, controller_hosts: &[String], agents: &[String]) -> Result<Vec<WrittenFile>, PkiError> {
    for agent in agents {
        check_agent_name(agent)?;
    }
    if controller_hosts.is_empty() {
        return Err(PkiError::BadName(
            "at least one controller host name or address is needed (the agents verify it)".to_owned(),
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })?;

    let ca = ca_paths(dir);
    let mut leaves = vec![(controller_paths(dir), Leaf::Controller(controller_hosts))];
    leaves.extend(agents.iter().map(|a| (agent_paths(dir, a), Leaf::Agent(a))));
    leaves.push((operator_paths(dir), Leaf::Operator));

    // Check every file before writing any, so a refused run writes nothing.
    let ca_exists = ca.state()?;
    let mut leaf_exists = Vec::with_capacity(leaves.len());
    for (paths, _) in &leaves {
        let exists = paths.state()?;
        if exists && !ca_exists {
            return Err(PkiError::Inconsistent(format!(
                "{} exists but the CA ({}) does not: a new CA would not have signed it",
                paths.cert.display(),
                ca.cert.display()
            )));
        }
        leaf_exists.push(exists);
    }

    let mut written = Vec::new();
    let issuer = if ca_exists {
        written.push(WrittenFile {
            path: ca.cert.clone(),
            outcome: Outcome::Kept,
        });
        load_issuer(&ca)?
    } else {
        let key = KeyPair::generate()?;
        let params = ca_params()?;
        let cert = params.self_signed(&key)?;
        write_new(&ca.key, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&ca.cert, cert.pem().as_bytes(), 0o644)?;
        written.push(WrittenFile {
            path: ca.cert.clone(),
            outcome: Outcome::Created,
        });
        Issuer::new(params, key)
    };

    for ((paths, leaf), exists) in leaves.iter().zip(leaf_exists) {
        if exists {
            written.push(WrittenFile {
                path: paths.cert.clone(),
                outcome: Outcome::Kept,
            });
            continue;
        }
        let key = KeyPair::generate()?;
        let cert = leaf.params()?.signed_by(&key, &issuer)?;
        write_new(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&paths.cert, cert.pem().as_bytes(), 0o644)?;
        written.push(WrittenFile {
            path: paths.cert.clone(),
            outcome: Outcome::Created,
        });
    }
    Ok(written)
}

enum Leaf<'a> {
    Controller(&'a [String]),
    Agent(&'a str),
    Operator,
}

impl Leaf<'_> {
    fn params(&self) -> Result<CertificateParams, PkiError> {
        let (name, sans, usage) = match self {
            Leaf::Controller(hosts) => (CONTROLLER_NAME, hosts.to_vec(), ExtendedKeyUsagePurpose::ServerAuth),
            Leaf::Agent(agent) => (*agent, vec![agent.to_string()], ExtendedKeyUsagePurpose::ClientAuth),
            Leaf::Operator => (
                OPERATOR_NAME,
                vec![OPERATOR_NAME.to_owned()],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        };
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name = distinguished_name(name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, Duration::days(5 * 366));
        Ok(params)
    }
}

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::new())?;
    params.distinguished_name = distinguished_name("walbridge CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, Duration::days(10 * 366));
    Ok(params)
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "walbridge");
    name
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    // An hour of slack for clocks that disagree a little.
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + lifetime;
}

fn load_issuer(ca: &CertPaths) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| PkiError::Io {
            path: path.to_owned(),
            source,
        })
    };
    let key = KeyPair::from_pem(&read(&ca.key)?)
        .map_err(|e| PkiError::Inconsistent(format!("{} is not a usable key: {e}", ca.key.display())))?;
    Issuer::from_ca_cert_pem(&read(&ca.cert)?, key)
        .map_err(|e| PkiError::Inconsistent(format!("{} is not a usable CA certificate: {e}", ca.cert.display())))
}

/// Creates a file that must not exist yet, with the given mode from the
/// start (a key is never readable by others, not even for a moment).
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::tls::Identity;

    #[test]
    fn writes_an_install_whose_identities_load() {
        let dir = tempfile::tempdir().unwrap();
        let written = init(dir.path(), &["localhost".into(), "127.0.0.1".into()], &["east".into()]).unwrap();
        assert!(written.iter().all(|w| w.outcome == Outcome::Created));
        assert_eq!(written.len(), 4);

        let ca = ca_paths(dir.path()).cert;
        for (paths, name) in [
            (controller_paths(dir.path()), CONTROLLER_NAME),
            (agent_paths(dir.path(), "east"), "east"),
            (operator_paths(dir.path()), OPERATOR_NAME),
        ] {
            let identity = Identity::load(&ca, &paths.cert, &paths.key).unwrap();
            assert_eq!(identity.name(), name);
            let mode = std::fs::metadata(&paths.key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", paths.key.display());
        }
        let ca_key_mode = std::fs::metadata(ca_paths(dir.path()).key)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(ca_key_mode, 0o600);
    }

    #[test]
    fn a_second_run_keeps_existing_keys_and_adds_new_agents() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["localhost".into()], &["east".into()]).unwrap();
        let east_key = std::fs::read(agent_paths(dir.path(), "east").key).unwrap();
        let ca_key = std::fs::read(ca_paths(dir.path()).key).unwrap();

        let written = init(dir.path(), &["localhost".into()], &["east".into(), "west".into()]).unwrap();
        let outcome = |p: &Path| written.iter().find(|w| w.path == p).unwrap().outcome;
        assert_eq!(outcome(&agent_paths(dir.path(), "east").cert), Outcome::Kept);
        assert_eq!(outcome(&agent_paths(dir.path(), "west").cert), Outcome::Created);
        assert_eq!(outcome(&ca_paths(dir.path()).cert), Outcome::Kept);
        assert_eq!(std::fs::read(agent_paths(dir.path(), "east").key).unwrap(), east_key);
        assert_eq!(std::fs::read(ca_paths(dir.path()).key).unwrap(), ca_key);

        // The new agent is signed by the kept CA.
        let west = agent_paths(dir.path(), "west");
        Identity::load(&ca_paths(dir.path()).cert, &west.cert, &west.key).unwrap();
    }

    #[test]
    fn refuses_half_present_files_and_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["localhost".into()], &["east".into()]).unwrap();
        std::fs::remove_file(agent_paths(dir.path(), "east").key).unwrap();
        let err = init(dir.path(), &["localhost".into()], &["east".into()]).unwrap_err();
        assert!(err.to_string().contains("without its key"), "{err}");

        assert!(check_agent_name("Bad_Name").is_err());
        assert!(check_agent_name("operator").is_err());
        assert!(check_agent_name("db-1").is_ok());
    }
}
