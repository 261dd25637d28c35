//! The agent's settings, resolved and checked before it dials anything.

use std::path::PathBuf;

use walbridge_daemon::pg::Database;
use walbridge_daemon::settings::{Setting, SettingError, Settings, parse_host_port};
use walbridge_daemon::telemetry::{LOG_FORMAT, LOG_SETTINGS, LogFormat};
use walbridge_daemon::tls::{Identity, TLS_SETTINGS};

use crate::pg_dump::PgDumpChoice;
use crate::subscription_role::SubscriptionRole;

pub const NAME: &str = "name";
pub const DATA_DIR: &str = "data_dir";
pub const SOURCE_URL: &str = "source.url";
pub const CONTROLLER_ENDPOINT: &str = "controller.endpoint";
pub const SOURCE_PG_DUMP: &str = "source.pg_dump";

/// Every setting the agent reads.
pub fn settings() -> Vec<Setting> {
    let mut all = vec![
        Setting {
            key: NAME,
            help: "this agent's name; must be the name in tls.cert, which is the identity the controller sees (default: that name)",
            value_name: "NAME",
            default: None,
        },
        Setting {
            key: DATA_DIR,
            help: "folder for the agent's journal (what it created on the source, any fence it holds)",
            value_name: "PATH",
            default: Some("/var/lib/walbridge/agent"),
        },
        Setting {
            key: SOURCE_URL,
            help: "libpq URL of the source database, e.g. postgres://walbridge:PASSWORD@127.0.0.1:5432/app",
            value_name: "URL",
            default: None,
        },
        Setting {
            key: SOURCE_PG_DUMP,
            help: "the pg_dump that dumps the source's schema; it must not be older than the source server (default: the \
                   newest found on PATH, beside pg_config --bindir, under /usr/lib/postgresql/*/bin or /usr/pgsql-*/bin)",
            value_name: "PATH",
            default: None,
        },
        Setting {
            key: CONTROLLER_ENDPOINT,
            help: "the controller's agent port, HOST:PORT; HOST must be a name in the controller's certificate",
            value_name: "HOST:PORT",
            default: None,
        },
        Setting {
            key: crate::subscription_role::SUBSCRIPTION_USER,
            help: "a role made for the target's subscription (LOGIN REPLICATION, nothing else); when unset, walbridge \
                   creates one per migration with a generated password and drops it at cleanup (needs superuser, or \
                   on PostgreSQL 16+ CREATEROLE and REPLICATION)",
            value_name: "ROLE",
            default: None,
        },
        Setting {
            key: crate::subscription_role::SUBSCRIPTION_PASSWORD,
            help: "the password of subscription.user (prefer the variable or the file to the flag: a flag shows in ps)",
            value_name: "PASSWORD",
            default: None,
        },
        // The agent's only listener, off by default: for a Prometheus on the
        // source host (bind it to 127.0.0.1).
        walbridge_daemon::metrics::METRICS_SETTING,
    ];
    all.extend(TLS_SETTINGS);
    all.extend(LOG_SETTINGS);
    all
}

/// Where the controller is and the name its certificate must carry.
#[derive(Debug, Clone)]
pub struct ControllerEndpoint {
    /// What to dial, as given: `host:port`.
    pub address: String,
    /// The host part, checked against the controller's certificate.
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl ControllerEndpoint {
    pub fn parse(raw: &str) -> Result<ControllerEndpoint, SettingError> {
        let (host, _) = parse_host_port(CONTROLLER_ENDPOINT, raw)?;
        let server_name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| {
            SettingError::new(
                CONTROLLER_ENDPOINT,
                format!("{host:?} is neither a host name nor an IP address"),
            )
        })?;
        Ok(ControllerEndpoint {
            address: raw.to_owned(),
            server_name,
        })
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The name in this agent's certificate.
    pub name: String,
    pub data_dir: PathBuf,
    pub source: Database,
    pub pg_dump: PgDumpChoice,
    pub controller: ControllerEndpoint,
    pub identity: Identity,
    pub log_format: LogFormat,
    pub listen_metrics: Option<std::net::SocketAddr>,
    pub subscription_role: SubscriptionRole,
}

impl AgentConfig {
    pub fn from_settings(settings: &Settings) -> Result<AgentConfig, SettingError> {
        let log_format = settings.parse::<LogFormat>(LOG_FORMAT)?.unwrap_or(LogFormat::Human);
        let source = Database::parse(SOURCE_URL, settings.required(SOURCE_URL)?)?;
        let controller = ControllerEndpoint::parse(settings.required(CONTROLLER_ENDPOINT)?)?;
        let identity = Identity::from_settings(settings)?;
        let name = match settings.get(NAME) {
            Some(name) if name != identity.name() => {
                return Err(SettingError::new(
                    NAME,
                    format!(
                        "is {name:?}, but tls.cert is issued to {:?}: an agent's identity is the name in its certificate",
                        identity.name()
                    ),
                ));
            }
            _ => identity.name().to_owned(),
        };
        let data_dir = settings.required_path(DATA_DIR)?;
        let pg_dump = match settings.get(SOURCE_PG_DUMP).filter(|p| !p.is_empty()) {
            Some(program) => PgDumpChoice::Configured(program.to_owned()),
            None => PgDumpChoice::Newest,
        };
        let listen_metrics = settings.parse::<std::net::SocketAddr>(walbridge_daemon::metrics::LISTEN_METRICS)?;
        let subscription_role = match (
            settings.get(crate::subscription_role::SUBSCRIPTION_USER),
            settings.get(crate::subscription_role::SUBSCRIPTION_PASSWORD),
        ) {
            (Some(user), password) => SubscriptionRole::Configured {
                user: user.to_owned(),
                password: password.unwrap_or_default().to_owned(),
            },
            (None, Some(_)) => {
                return Err(SettingError::new(
                    crate::subscription_role::SUBSCRIPTION_PASSWORD,
                    "is set without subscription.user",
                ));
            }
            (None, None) => SubscriptionRole::PerMigration,
        };
        Ok(AgentConfig {
            subscription_role,
            listen_metrics,
            name,
            data_dir,
            source,
            pg_dump,
            controller,
            identity,
            log_format,
        })
    }
}
