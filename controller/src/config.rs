//! The controller's settings, resolved and checked (certificates loaded,
//! ports bound) before it serves anything.

use std::net::SocketAddr;
use std::path::PathBuf;

use walbridge_daemon::pg::Database;
use walbridge_daemon::settings::{Setting, SettingError, Settings, parse_host_port};
use walbridge_daemon::telemetry::{LOG_FORMAT, LOG_SETTINGS, LogFormat};
use walbridge_daemon::tls::{Identity, TLS_SETTINGS};

pub const DATA_DIR: &str = "data_dir";
pub const LISTEN_AGENTS: &str = "listen.agents";
pub const LISTEN_API: &str = "listen.api";
pub const TARGET_URL: &str = "target.url";
pub const COPY_SPLIT_BYTES: &str = "copy.split_bytes";
pub const LISTEN_TUNNEL: &str = "listen.tunnel";
pub const TUNNEL_ADVERTISE: &str = "tunnel.advertise";
pub const TUNNEL_MAX_CONNECTIONS: &str = "tunnel.max_connections";
pub const TUNNEL_ALLOW: &str = "tunnel.allow";
pub const RETAINED_WAL_WARNING: &str = "streaming.retained_wal_warning";
pub const SNAPSHOT_CREATE_TIMEOUT: &str = "snapshot.create_timeout";
pub const SUBSCRIPTION_SSLMODE: &str = "subscription.sslmode";
pub const SUBSCRIPTION_SSLROOTCERT: &str = "subscription.sslrootcert";
pub use walbridge_daemon::metrics::LISTEN_METRICS;

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
        Setting {
            key: LISTEN_TUNNEL,
            help: "address the target's subscription connects to, HOST:PORT; each connection is carried through \
                   the agent to the source (not needed with `start --direct`)",
            value_name: "HOST:PORT",
            default: None,
        },
        Setting {
            key: TUNNEL_ADVERTISE,
            help: "HOST:PORT the target server uses to reach the tunnel [default: listen.tunnel]",
            value_name: "HOST:PORT",
            default: None,
        },
        Setting {
            key: TUNNEL_MAX_CONNECTIONS,
            help: "tunnel connections open at once; more are refused",
            value_name: "N",
            default: Some("16"),
        },
        Setting {
            key: TUNNEL_ALLOW,
            help: "client networks that may use the tunnel, comma-separated CIDRs (e.g. the target provider's \
                   egress addresses); required when listen.tunnel listens beyond loopback [default: any local \
                   client, for a loopback listen.tunnel only]",
            value_name: "CIDRS",
            default: None,
        },
        walbridge_daemon::metrics::METRICS_SETTING,
        Setting {
            key: SUBSCRIPTION_SSLMODE,
            help: "libpq's sslmode for the target's subscription to the source [default: source.url's]",
            value_name: "MODE",
            default: None,
        },
        Setting {
            key: SUBSCRIPTION_SSLROOTCERT,
            help: "the CA the target's subscription checks the source's certificate with: a file on the *target \
                   server's* host, or `system` (libpq 16+) [default: source.url's when it is `system`]",
            value_name: "PATH|system",
            default: None,
        },
        Setting {
            key: RETAINED_WAL_WARNING,
            help: "warn (status and log) when the slot holds more WAL than this many bytes on the source",
            value_name: "BYTES",
            default: Some("10737418240"),
        },
        Setting {
            key: SNAPSHOT_CREATE_TIMEOUT,
            help: "how long creating the replication slot may wait for transactions open on the source (it waits \
                   for every one holding a transaction ID); past it, it is cancelled and the error names them",
            value_name: "DURATION",
            default: Some("5m"),
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

/// The tunnel's settings.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    pub listen: Option<SocketAddr>,
    /// HOST:PORT for the subscription's connection string.
    pub advertise: Option<(String, u16)>,
    pub max_connections: usize,
    /// Empty: any client (only when `listen` is a loopback address).
    pub allow: Vec<ipnet::IpNet>,
}

impl TunnelConfig {
    fn from_settings(settings: &Settings) -> Result<TunnelConfig, SettingError> {
        let listen = settings.parse::<SocketAddr>(LISTEN_TUNNEL)?;
        let advertise = match settings.get(TUNNEL_ADVERTISE) {
            Some(raw) => Some(parse_host_port(TUNNEL_ADVERTISE, raw)?),
            None => match listen {
                Some(address) if address.ip().is_unspecified() => {
                    return Err(SettingError::new(
                        TUNNEL_ADVERTISE,
                        format!("is required when listen.tunnel ({address}) listens on every address"),
                    ));
                }
                Some(address) => Some((address.ip().to_string(), address.port())),
                None => None,
            },
        };
        let max_connections = settings
            .parse::<usize>(TUNNEL_MAX_CONNECTIONS)?
            .filter(|&n| n > 0)
            .ok_or_else(|| SettingError::new(TUNNEL_MAX_CONNECTIONS, "must be a positive number"))?;
        let allow = match settings.get(TUNNEL_ALLOW) {
            None => Vec::new(),
            Some(raw) => raw
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|cidr| {
                    cidr.parse::<ipnet::IpNet>()
                        .or_else(|_| cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .map_err(|_| SettingError::new(TUNNEL_ALLOW, format!("{cidr:?} is not a network (CIDR)")))
                })
                .collect::<Result<_, _>>()?,
        };
        // The tunnel carries connections to the source: beyond loopback it
        // must say whom it lets in.
        if let Some(address) = listen
            && !address.ip().is_loopback()
            && allow.is_empty()
        {
            return Err(SettingError::new(
                TUNNEL_ALLOW,
                format!(
                    "is required when listen.tunnel ({address}) listens beyond loopback: list the networks the \
                     target's servers connect from"
                ),
            ));
        }
        Ok(TunnelConfig {
            listen,
            advertise,
            max_connections,
            allow,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub data_dir: PathBuf,
    pub listen_agents: SocketAddr,
    pub listen_api: ApiAddress,
    pub target: Option<Database>,
    pub split_bytes: u64,
    pub tunnel: TunnelConfig,
    pub retained_wal_warning: u64,
    pub snapshot_create_timeout: std::time::Duration,
    pub subscription_tls: crate::subscription::SubscriptionTls,
    pub listen_metrics: Option<SocketAddr>,
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
        let tunnel = TunnelConfig::from_settings(settings)?;
        let retained_wal_warning = settings
            .parse::<u64>(RETAINED_WAL_WARNING)?
            .ok_or_else(|| SettingError::new(RETAINED_WAL_WARNING, "must be a number of bytes"))?;
        let snapshot_create_timeout = settings
            .get(SNAPSHOT_CREATE_TIMEOUT)
            .map(|raw| {
                humantime::parse_duration(raw)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        SettingError::new(
                            SNAPSHOT_CREATE_TIMEOUT,
                            format!("{raw:?} is not a duration above zero (e.g. 5m, 90s)"),
                        )
                    })
            })
            .transpose()?
            .unwrap_or(std::time::Duration::from_secs(300));
        let identity = Identity::from_settings(settings)?;
        let listen_metrics = settings.parse::<SocketAddr>(LISTEN_METRICS)?;
        let sslmode = settings.get(SUBSCRIPTION_SSLMODE).unwrap_or_default().to_owned();
        const SSLMODES: [&str; 6] = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"];
        if !sslmode.is_empty() && !SSLMODES.contains(&sslmode.as_str()) {
            return Err(SettingError::new(
                SUBSCRIPTION_SSLMODE,
                format!("{sslmode:?} is not one of {}", SSLMODES.join(", ")),
            ));
        }
        let subscription_tls = crate::subscription::SubscriptionTls {
            sslmode,
            sslrootcert: settings.get(SUBSCRIPTION_SSLROOTCERT).unwrap_or_default().to_owned(),
        };
        Ok(ControllerConfig {
            subscription_tls,
            tunnel,
            retained_wal_warning,
            snapshot_create_timeout,
            listen_metrics,
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
