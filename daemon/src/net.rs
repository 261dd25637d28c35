//! Listening sockets: bound while settings are checked (so a port in use
//! is a bad setting, exit 2), served later on the async runtime.

use std::net::SocketAddr;

use crate::settings::SettingError;

/// Binds `address`, naming the setting `key` when it cannot.
pub fn bind(key: &str, address: SocketAddr) -> Result<std::net::TcpListener, SettingError> {
    std::net::TcpListener::bind(address).map_err(|e| SettingError::new(key, format!("cannot listen on {address}: {e}")))
}

/// Hands a bound listener to the async runtime.
pub fn into_tokio(listener: std::net::TcpListener) -> Result<tokio::net::TcpListener, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())
}
