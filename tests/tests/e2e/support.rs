//! An install on this machine: certificates from `walbridge certs init`, a
//! controller and agents configured to use them, each in its own folder.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::daemons::{AGENT, CONTROLLER, Daemon, free_port, walbridge};
use serde_json::Value;
use tempfile::TempDir;

/// How long a link may take to come up (or come back) in these tests.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Install {
    pub dir: TempDir,
    pub agent_port: u16,
    pub tunnel_port: u16,
}

impl Install {
    /// Certificates for a controller reachable as `controller_host` and
    /// for the named agents.
    pub fn new(controller_host: &str, agents: &[&str]) -> Install {
        let dir = tempfile::Builder::new().prefix("walbridge-e2e-").tempdir().unwrap();
        let install = Install {
            dir,
            agent_port: free_port(),
            tunnel_port: free_port(),
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
            "--listen-tunnel",
            &format!("127.0.0.1:{}", self.tunnel_port),
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

/// A source and a target cluster with a controller and an agent between
/// them: everything `walbridge start` needs.
pub struct Migration {
    // Fields drop in this order: the daemons first (printing their logs
    // when a test failed), the folder holding those logs last.
    pub controller: Daemon,
    pub agent: Daemon,
    pub source: harness::Cluster,
    pub target: harness::Cluster,
    pub install: Install,
}

pub const DATABASE: &str = "app";

/// A migration set up by the test: clusters it prepared, the URLs the
/// daemons use, and extra settings for each.
pub struct Spec {
    pub source: harness::Cluster,
    pub target: harness::Cluster,
    pub source_url: String,
    pub target_url: String,
    pub controller_args: Vec<String>,
    pub agent_args: Vec<String>,
    /// The agent's environment (for secrets, which flags would show).
    pub agent_env: Vec<(String, String)>,
}

impl Migration {
    /// Clusters with an `app` database each; `prepare_source` fills the
    /// source before the daemons start.
    pub fn new(source: harness::Cluster, prepare_source: &str) -> Migration {
        Migration::with_controller_args(source, prepare_source, &[])
    }

    pub fn with_controller_args(source: harness::Cluster, prepare_source: &str, extra: &[&str]) -> Migration {
        let target = harness::Cluster::builder("target").start();
        target.create_database(DATABASE);
        let target_url = target.url(DATABASE);
        Migration::with_target(source, prepare_source, target, &target_url, extra)
    }

    /// Into a target the test prepared (its `app` database made), reached
    /// as `target_url`.
    pub fn with_target(
        source: harness::Cluster,
        prepare_source: &str,
        target: harness::Cluster,
        target_url: &str,
        extra: &[&str],
    ) -> Migration {
        Migration::build(source, prepare_source, target, target_url, extra, None)
    }

    /// Like [`Migration::new`], with the agent's link to the controller
    /// going through a [`Relay`] the test can cut.
    pub fn through_relay(source: harness::Cluster, prepare_source: &str) -> (Migration, Relay) {
        let target = harness::Cluster::builder("target").start();
        target.create_database(DATABASE);
        let target_url = target.url(DATABASE);
        let install = Install::new("localhost", &["east"]);
        let relay = Relay::start(install.agent_port);
        let m = Migration::build(
            source,
            prepare_source,
            target,
            &target_url,
            &[],
            Some((install, relay.port)),
        );
        (m, relay)
    }

    fn build(
        source: harness::Cluster,
        prepare_source: &str,
        target: harness::Cluster,
        target_url: &str,
        extra: &[&str],
        relayed: Option<(Install, u16)>,
    ) -> Migration {
        source.create_database(DATABASE);
        if !prepare_source.is_empty() {
            source.psql(DATABASE, prepare_source);
        }
        let (install, agent_port) = match relayed {
            Some((install, relay_port)) => (install, Some(relay_port)),
            None => (Install::new("localhost", &["east"]), None),
        };
        let controller = Daemon::start(
            "controller",
            harness::daemons::CONTROLLER,
            &[
                install.controller_args(),
                vec!["--target-url".into(), target_url.to_owned()],
                extra.iter().map(|a| a.to_string()).collect(),
            ]
            .concat(),
            install.path(),
        );
        let mut agent_args = install.agent_args("east", &source.url(DATABASE), "localhost");
        if let Some(port) = agent_port {
            let endpoint = agent_args.iter().position(|a| a == "--controller-endpoint").unwrap();
            agent_args[endpoint + 1] = format!("localhost:{port}");
        }
        let agent = Daemon::start("agent-east", AGENT, &agent_args, install.path());
        harness::daemons::eventually(LINK_TIMEOUT, "agent east to connect", || {
            install.connected_agent("east")
        });
        Migration {
            source,
            target,
            install,
            controller,
            agent,
        }
    }

    /// Clusters and daemons as `spec` says (TLS, roles, URLs of its own).
    pub fn custom(spec: Spec) -> Migration {
        let Spec {
            source,
            target,
            source_url,
            target_url,
            controller_args,
            agent_args,
            agent_env,
        } = spec;
        let install = Install::new("localhost", &["east"]);
        let controller = Daemon::start(
            "controller",
            harness::daemons::CONTROLLER,
            &[
                install.controller_args(),
                vec!["--target-url".into(), target_url],
                controller_args,
            ]
            .concat(),
            install.path(),
        );
        let env: Vec<(&str, &str)> = agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let agent = Daemon::start_with_env(
            "agent-east",
            AGENT,
            &[install.agent_args("east", &source_url, "localhost"), agent_args].concat(),
            &env,
            install.path(),
        );
        harness::daemons::eventually(LINK_TIMEOUT, "agent east to connect", || {
            install.connected_agent("east")
        });
        Migration {
            source,
            target,
            install,
            controller,
            agent,
        }
    }

    /// Runs `walbridge <args>` against this controller.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let api = self.install.api();
        let mut all = vec!["--api", api.as_str()];
        all.extend_from_slice(args);
        walbridge(&all)
    }

    /// Runs a CLI command that prints JSON and parses it.
    pub fn cli_json(&self, args: &[&str]) -> (Option<i32>, Value, String) {
        let out = self.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.code(), json, stderr)
    }

    pub fn status(&self) -> Value {
        let (code, json, stderr) = self.cli_json(&["status", "--json"]);
        assert_eq!(code, Some(0), "status failed: {stderr}");
        json
    }

    /// `status --json`, or `None` while the controller is not answering
    /// (e.g. just restarted).
    pub fn try_status(&self) -> Option<Value> {
        let (code, json, _) = self.cli_json(&["status", "--json"]);
        (code == Some(0)).then_some(json)
    }

    /// Starts the migration without waiting for it (the CLI follows it in
    /// the background; the test polls `status`).
    /// The state `status` gives the table `name`, if it lists it.
    pub fn table_state(&self, name: &str) -> Option<String> {
        self.status()["tables"]
            .as_array()?
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["state"].as_str().unwrap_or_default().to_owned())
    }

    /// `verify`, which must find every table exact — and some tables: a
    /// report of none would pass any check of "all match".
    pub fn verify_exact(&self) -> serde_json::Value {
        let (code, verify, stderr) = self.cli_json(&["verify", "--json"]);
        assert_eq!(code, Some(0), "verify: {stderr} {verify}");
        assert_eq!(verify["matches"], true, "{verify}");
        assert!(
            verify["tables"].as_array().is_some_and(|tables| !tables.is_empty()),
            "verify compared no table: {verify}"
        );
        verify
    }

    pub fn start_in_background(&self, extra: &[&str]) -> std::process::Child {
        let api = self.install.api();
        let mut command = std::process::Command::new(harness::daemons::binary(harness::daemons::CLI));
        command
            .args(["--api", &api, "start", "--agent", "east", "--json"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        command.spawn().expect("walbridge start runs")
    }

    /// Waits for the migration to reach `phase`, failing fast if it fails.
    pub fn wait_for_phase(&self, phase: &str, timeout: Duration) -> Value {
        harness::daemons::eventually(timeout, &format!("phase {phase}"), || {
            let status = self.try_status()?;
            assert!(
                status["phase"] != "failed" || phase == "failed",
                "the migration failed: {status}"
            );
            (status["phase"] == phase).then_some(status)
        })
    }

    /// Names of walbridge's slots and publications on the source.
    pub fn source_replication_objects(&self) -> (String, String) {
        (
            self.source.psql(
                DATABASE,
                "SELECT coalesce(string_agg(slot_name, ',' ORDER BY slot_name), '') FROM pg_replication_slots",
            ),
            self.source.psql(
                DATABASE,
                "SELECT coalesce(string_agg(pubname, ',' ORDER BY pubname), '') FROM pg_publication",
            ),
        )
    }
}

/// A database session the test keeps open (to hold a transaction, or to
/// see each write acknowledged), on its own small runtime.
pub struct Session {
    // Dropped first: the connection's task goes with it, so dropping a
    // Session closes the socket without a goodbye, like a crashed client.
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl Session {
    pub fn open(url: &str) -> Session {
        Session::try_open(url).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A session, or why the server would not give one (it is down).
    pub fn try_open(url: &str) -> Result<Session, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // walbridge's own connection builder: libpq's URL keys, TLS included.
        let database = walbridge_daemon::pg::Database::parse("test session", url).expect("a valid URL");
        let client = runtime
            .block_on(database.connect("walbridge-test"))
            .map_err(|e| e.to_string())?;
        Ok(Session { runtime, client })
    }

    pub fn execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.runtime.block_on(self.client.batch_execute(sql))
    }

    /// Whether the server's side has closed the connection (drives the
    /// connection's task for a moment to let it notice).
    pub fn is_closed(&self) -> bool {
        self.runtime
            .block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        self.client.is_closed()
    }

    /// The first column of the first row, as text.
    pub fn value(&self, sql: &str) -> Result<String, tokio_postgres::Error> {
        let rows = self.runtime.block_on(self.client.simple_query(sql))?;
        Ok(rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or("").to_owned()),
                _ => None,
            })
            .unwrap_or_default())
    }
}

/// A TCP relay (between agent and controller) that can be cut as a dead
/// network path is: from [`Relay::cut`] it forwards nothing and closes
/// nothing, so only keepalives notice; connections made during the cut
/// are as dead. After [`Relay::restore`], new connections go through (a
/// connection cut stays dead, as one that lost its packets would).
pub struct Relay {
    pub port: u16,
    state: Arc<Mutex<RelayState>>,
}

#[derive(Default)]
struct RelayState {
    cut: bool,
    /// Each connection's "dead" flag.
    connections: Vec<Arc<AtomicBool>>,
}

impl Relay {
    pub fn start(to_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(RelayState::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for inbound in listener.incoming().flatten() {
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", to_port)) else {
                    continue;
                };
                let dead = {
                    let mut state = shared.lock().unwrap();
                    let dead = Arc::new(AtomicBool::new(state.cut));
                    state.connections.push(dead.clone());
                    dead
                };
                for (mut from, mut to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    let dead = dead.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if dead.load(Ordering::SeqCst) {
                                // Swallow everything, close nothing.
                                continue;
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Relay { port, state }
    }

    /// Cuts the path: every connection, and any made until `restore`.
    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.cut = true;
        for dead in &state.connections {
            dead.store(true, Ordering::SeqCst);
        }
    }

    /// New connections go through again.
    pub fn restore(&self) {
        self.state.lock().unwrap().cut = false;
    }
}

/// Stops the target's apply worker: a transaction holds a lock on
/// `orders` that its inserts wait for, and the source writes one row there.
/// ROLLBACK on the returned session lets it go.
pub fn stall_the_target(m: &Migration) -> Session {
    let stall = Session::open(&m.target.url(DATABASE));
    // SHARE blocks the apply worker's ROW EXCLUSIVE but not the catalog
    // reads (ACCESS SHARE) the cutover makes before it fences.
    stall.execute("BEGIN; LOCK TABLE orders IN SHARE MODE").unwrap();
    m.source.psql(DATABASE, "INSERT INTO orders (amount) VALUES (7)");
    stall
}

/// Whether status shows every table verified right after its copy.
pub fn every_table_verified(status: &serde_json::Value) -> bool {
    status["tables"]
        .as_array()
        .is_some_and(|tables| !tables.is_empty() && tables.iter().all(|t| t["state"] == "verified"))
}

/// `release-source`, which must succeed: the fence a cutover left goes.
pub fn release_source(m: &Migration) -> serde_json::Value {
    let (code, released, stderr) = m.cli_json(&["release-source", "--json"]);
    assert_eq!(code, Some(0), "release-source: {stderr} {released}");
    released
}
