//! An install on this machine: certificates from `walbridge certs init`, a
//! controller and agents configured to use them, each in its own folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::daemons::{AGENT, CONTROLLER, Daemon, free_port, walbridge};
use serde_json::Value;
use tempfile::TempDir;

/// How long a link may take to come up (or come back) in these tests.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Install {
    pub dir: TempDir,
    pub agent_port: u16,
}

impl Install {
    /// Certificates for a controller reachable as `controller_host` and
    /// for the named agents.
    pub fn new(controller_host: &str, agents: &[&str]) -> Install {
        let dir = tempfile::Builder::new().prefix("walbridge-e2e-").tempdir().unwrap();
        let install = Install {
            dir,
            agent_port: free_port(),
        };
        install.issue(controller_host, agents);
        install
    }

    /// Runs `walbridge certs init` in this install's certs folder.
    pub fn issue(&self, controller_host: &str, agents: &[&str]) {
        let certs = self.certs();
        let mut args = vec![
            "certs",
            "init",
            "--dir",
            certs.to_str().unwrap(),
            "--controller-host",
            controller_host,
        ];
        for agent in agents {
            args.extend(["--agent", agent]);
        }
        let out = walbridge(&args);
        assert!(
            out.status.success(),
            "certs init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn certs(&self) -> PathBuf {
        self.path().join("certs")
    }

    pub fn cert(&self, stem: &str) -> String {
        self.certs().join(format!("{stem}.pem")).display().to_string()
    }

    pub fn key(&self, stem: &str) -> String {
        self.certs().join(format!("{stem}-key.pem")).display().to_string()
    }

    pub fn api_socket(&self) -> PathBuf {
        self.path().join("controller").join("api.sock")
    }

    pub fn api(&self) -> String {
        format!("unix://{}", self.api_socket().display())
    }

    pub fn controller_args(&self) -> Vec<String> {
        [
            "--data-dir",
            &self.path().join("controller").display().to_string(),
            "--listen-agents",
            &format!("127.0.0.1:{}", self.agent_port),
            "--tls-ca-cert",
            &self.cert("ca"),
            "--tls-cert",
            &self.cert("controller"),
            "--tls-key",
            &self.key("controller"),
        ]
        .map(String::from)
        .to_vec()
    }

    pub fn start_controller(&self) -> Daemon {
        Daemon::start("controller", CONTROLLER, &self.controller_args(), self.path())
    }

    /// Settings for agent `name`, using certificate files `cert_stem` and
    /// trusting `ca` (both in this install unless a test says otherwise).
    pub fn agent_args(&self, name: &str, source_url: &str, endpoint_host: &str) -> Vec<String> {
        [
            "--data-dir",
            &self.path().join(format!("agent-{name}")).display().to_string(),
            "--source-url",
            source_url,
            "--controller-endpoint",
            &format!("{endpoint_host}:{}", self.agent_port),
            "--tls-ca-cert",
            &self.cert("ca"),
            "--tls-cert",
            &self.cert(name),
            "--tls-key",
            &self.key(name),
        ]
        .map(String::from)
        .to_vec()
    }

    pub fn start_agent(&self, name: &str, source_url: &str) -> Daemon {
        Daemon::start(
            &format!("agent-{name}"),
            AGENT,
            &self.agent_args(name, source_url, "localhost"),
            self.path(),
        )
    }

    /// `walbridge agents --json`, parsed; `None` while the controller is
    /// not answering.
    pub fn agents(&self) -> Option<Vec<Value>> {
        let out = walbridge(&["--api", &self.api(), "agents", "--json"]);
        if !out.status.success() {
            return None;
        }
        let doc: Value = serde_json::from_slice(&out.stdout).expect("agents --json prints JSON");
        Some(doc["agents"].as_array().expect("agents is a list").clone())
    }

    /// The named agent's entry, once it is connected.
    pub fn connected_agent(&self, name: &str) -> Option<Value> {
        self.agents()?.into_iter().find(|a| a["name"] == name)
    }
}
