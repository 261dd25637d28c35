//! The controller's settings, resolved and checked (certificates loaded,
//! ports bound) before it serves anything.

use std::net::SocketAddr;
use std::path::PathBuf;

use walbridge_daemon::pg::Database;
use walbridge_daemon::settings::{Setting, SettingError, Settings};
use walbridge_daemon::telemetry::{LOG_FORMAT, LOG_SETTINGS, LogFormat};
use walbridge_daemon::tls::{Identity, TLS_SETTINGS};

pub const DATA_DIR: &str = "data_dir";
pub const LISTEN_AGENTS: &str = "listen.agents";
pub const LISTEN_API: &str = "listen.api";
pub const TARGET_URL: &str = "target.url";
pub const COPY_SPLIT_BYTES: &str = "copy.split_bytes";

/// Every setting the controller reads.
pub fn settings() -> Vec<Setting> {
    let mut all = vec![
        Setting {
            key: DATA_DIR,
            help: "folder for the controller's journal and, by default, its API socket",
            value_name: "PATH",
            default: Some("/var/lib/walbridge/controller"),
        },
        Setting {
            key: LISTEN_AGENTS,
            help: "address the agents dial, HOST:PORT (mutual TLS; open it to the source hosts)",
            value_name: "HOST:PORT",
            default: Some("0.0.0.0:7400"),
        },
        Setting {
            key: LISTEN_API,
            help: "where the CLI reaches the controller: unix:///PATH (file permissions are the access control) \
                   or HOST:PORT (mutual TLS, operator certificate required) [default: unix://<data_dir>/api.sock]",
            value_name: "ADDR",
            default: None,
        },
        Setting {
            key: TARGET_URL,
            help: "libpq URL of the target database",
            value_name: "URL",
            default: None,
        },
        Setting {
            key: COPY_SPLIT_BYTES,
            help: "tables larger than this many bytes are copied as page ranges of about this size, in parallel",
            value_name: "BYTES",
            default: Some("268435456"),
        },
    ];
    all.extend(TLS_SETTINGS);
    all.extend(LOG_SETTINGS);
    all
}

/// Where the API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddress {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl ApiAddress {
    pub fn parse(raw: &str) -> Result<ApiAddress, SettingError> {
        if let Some(path) = raw.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(SettingError::new(
                    LISTEN_API,
                    format!("{raw:?}: a unix socket path must be absolute"),
                ));
            }
            return Ok(ApiAddress::Unix(PathBuf::from(path)));
        }
        raw.parse::<SocketAddr>()
            .map(ApiAddress::Tcp)
            .map_err(|_| SettingError::new(LISTEN_API, format!("{raw:?} is neither unix:///PATH nor IP:PORT")))
    }
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub data_dir: PathBuf,
    pub listen_agents: SocketAddr,
    pub listen_api: ApiAddress,
    pub target: Option<Database>,
    pub split_bytes: u64,
    pub identity: Identity,
    pub log_format: LogFormat,
}

impl ControllerConfig {
    pub fn from_settings(settings: &Settings) -> Result<ControllerConfig, SettingError> {
        let log_format = settings.parse::<LogFormat>(LOG_FORMAT)?.unwrap_or(LogFormat::Human);
        let data_dir = settings.required_path(DATA_DIR)?;
        let listen_agents = settings
            .parse::<SocketAddr>(LISTEN_AGENTS)?
            .ok_or_else(|| SettingError::new(LISTEN_AGENTS, "is required but not set"))?;
        let listen_api = match settings.get(LISTEN_API) {
            Some(raw) => ApiAddress::parse(raw)?,
            None => ApiAddress::Unix(data_dir.join("api.sock")),
        };
        let target = settings
            .get(TARGET_URL)
            .map(|raw| Database::parse(TARGET_URL, raw))
            .transpose()?;
        let split_bytes = settings
            .parse::<u64>(COPY_SPLIT_BYTES)?
            .filter(|&bytes| bytes > 0)
            .ok_or_else(|| SettingError::new(COPY_SPLIT_BYTES, "must be a positive number of bytes"))?;
        let identity = Identity::from_settings(settings)?;
        Ok(ControllerConfig {
            split_bytes,
            data_dir,
            listen_agents,
            listen_api,
            target,
            identity,
            log_format,
        })
    }
}
