//! What walbridge's daemons are built from.
//!
//! * [`settings`]: flag > `WALBRIDGE_*` variable > TOML file > default, one
//!   declaration per setting, errors that name the setting.
//! * [`tls`]: a process's certificate identity and its rustls configs.
//! * [`pki`]: the CA and certificates of an install (`walbridge certs init`).
//! * [`connection`]: a connection that tells when it ends; link keepalive.
//! * [`coalesce`]: the tunnel's bytes read as chunks HTTP/2 does not refuse.
//! * [`journal`]: the durable, typed step journal over sled.
//! * [`telemetry`]: logs, OTLP traces, trace context over gRPC.
//! * [`failpoint`]: crash points for the tests (feature `failpoints`).

pub mod coalesce;
pub mod connection;
pub mod failpoint;
pub mod journal;
pub mod metrics;
pub mod net;
pub mod pg;
pub mod pki;
pub mod process;
pub mod settings;
pub mod telemetry;
pub mod tls;

/// The version of this build, as every walbridge program reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
