//! The CLI's connection to the controller's API: `unix:///PATH`, or
//! `https://HOST:PORT` with the operator's certificate (mutual TLS).

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};
use walbridge_daemon::settings::{Setting, SettingError, Settings};
use walbridge_daemon::tls::{Identity, TLS_SETTINGS};
use walbridge_proto::v1::controller_api_client::ControllerApiClient;

pub const API: &str = "api";

/// The CLI's settings.
pub fn settings() -> Vec<Setting> {
    let mut all = vec![Setting {
        key: API,
        help: "the controller's API: unix:///PATH, or https://HOST:PORT (then tls.* must name the operator's certificate)",
        value_name: "ADDR",
        default: Some("unix:///var/lib/walbridge/controller/api.sock"),
    }];
    all.extend(TLS_SETTINGS);
    all
}

#[derive(Debug, Clone)]
pub enum ApiAddress {
    Unix(PathBuf),
    Https {
        host: String,
        port: u16,
        identity: Box<Identity>,
    },
}

impl ApiAddress {
    pub fn from_settings(settings: &Settings) -> Result<ApiAddress, SettingError> {
        let raw = settings.required(API)?;
        if let Some(path) = raw.strip_prefix("unix://") {
            return Ok(ApiAddress::Unix(PathBuf::from(path)));
        }
        let Some(authority) = raw.strip_prefix("https://") else {
            return Err(SettingError::new(
                API,
                format!("{raw:?} is neither unix:///PATH nor https://HOST:PORT"),
            ));
        };
        let authority = authority.trim_end_matches('/');
        let (host, port) = authority
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .ok_or_else(|| SettingError::new(API, format!("{raw:?} has no port: use https://HOST:PORT")))?;
        let identity = Identity::from_settings(settings)?;
        Ok(ApiAddress::Https {
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port,
            identity: Box::new(identity),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            ApiAddress::Unix(path) => format!("unix://{}", path.display()),
            ApiAddress::Https { host, port, .. } => format!("https://{host}:{port}"),
        }
    }
}

/// Connects to the controller; the error says where it tried.
pub async fn connect(address: &ApiAddress) -> Result<ControllerApiClient<Channel>, String> {
    let endpoint = Endpoint::from_static("http://controller.walbridge.invalid");
    let channel = match address.clone() {
        ApiAddress::Unix(path) => {
            endpoint
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
        }
        ApiAddress::Https { host, port, identity } => {
            let connector = TlsConnector::from(identity.client_config());
            endpoint
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let (connector, host) = (connector.clone(), host.clone());
                    async move {
                        let server_name = rustls::pki_types::ServerName::try_from(host.clone())
                            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                        let tcp = TcpStream::connect((host.as_str(), port)).await?;
                        connector.connect(server_name, tcp).await.map(TokioIo::new)
                    }
                }))
                .await
        }
    };
    let channel = channel.map_err(|e| {
        let cause = std::error::Error::source(&e).map(|c| c.to_string()).unwrap_or_default();
        format!("cannot reach the controller at {}: {e} {cause}", address.describe())
    })?;
    Ok(ControllerApiClient::new(channel))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_tls_settings_are_the_shared_ones() {
        let keys: Vec<_> = super::settings().iter().map(|s| s.key).collect();
        assert_eq!(keys, ["api", "tls.ca_cert", "tls.cert", "tls.key"]);
    }
}
