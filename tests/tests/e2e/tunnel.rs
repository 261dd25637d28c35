//! The tunnel across real network separation: the source listens only
//! inside its own network namespace, the controller and the target live in
//! another, and the only way between them is the connection the agent
//! dials out. And the tunnel as a door: open only while a migration's
//! subscription needs it, closing the connections it carried when the
//! migration moves on.

use std::process::Command;
use std::time::Duration;

use harness::Cluster;
use harness::daemons::{AGENT, CONTROLLER, Daemon, eventually, walbridge};

use crate::support::{DATABASE, Install, LINK_TIMEOUT, Migration, Session};

const SOURCE_ADDRESS: &str = "10.231.0.1";
const TARGET_ADDRESS: &str = "10.231.0.2";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair; removed when dropped.
struct Networks {
    source: String,
    target: String,
}

impl Networks {
    fn new() -> Networks {
        let id = std::process::id();
        let networks = Networks {
            source: format!("wb-src-{id}"),
            target: format!("wb-tgt-{id}"),
        };
        let (source_end, target_end) = (format!("wbs{id}"), format!("wbt{id}"));
        ip(&["netns", "add", &networks.source]);
        ip(&["netns", "add", &networks.target]);
        ip(&["link", "add", &source_end, "type", "veth", "peer", "name", &target_end]);
        ip(&["link", "set", &source_end, "netns", &networks.source]);
        ip(&["link", "set", &target_end, "netns", &networks.target]);
        for (namespace, device, address) in [
            (&networks.source, &source_end, SOURCE_ADDRESS),
            (&networks.target, &target_end, TARGET_ADDRESS),
        ] {
            ip(&["-n", namespace, "addr", "add", &format!("{address}/30"), "dev", device]);
            ip(&["-n", namespace, "link", "set", device, "up"]);
            ip(&["-n", namespace, "link", "set", "lo", "up"]);
        }
        networks
    }
}

impl Drop for Networks {
    fn drop(&mut self) {
        for namespace in [&self.source, &self.target] {
            let _ = Command::new("ip").args(["netns", "del", namespace]).status();
        }
    }
}

/// Whether psql run inside `namespace` can connect to host:port.
fn reachable_from(namespace: &str, cluster: &Cluster, host: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", namespace])
        .arg(cluster.install().bin("psql"))
        .arg(format!(
            "host={host} port={} user=postgres password={} dbname={DATABASE} connect_timeout=3",
            cluster.port(),
            cluster.password()
        ))
        .args(["-X", "-c", "SELECT 1"])
        .output()
        .expect("psql runs")
        .status
        .success()
}

#[test]
fn the_subscription_reaches_a_firewalled_source_only_through_the_agents_tunnel() {
    if !nix::unistd::geteuid().is_root() {
        panic!("network namespaces need root: run the tests as root (CI does)");
    }
    let networks = Networks::new();
    let source = Cluster::builder("source").logical().netns(&networks.source).start();
    let target = Cluster::builder("target").netns(&networks.target).start();
    source.create_database(DATABASE);
    target.create_database(DATABASE);
    source.psql(
        DATABASE,
        "CREATE TABLE accounts (id int PRIMARY KEY, balance int); \
         INSERT INTO accounts SELECT i, 100 FROM generate_series(1, 1000) i;",
    );

    // The target's network cannot reach the source: not on its own
    // loopback, not across the link.
    assert!(!reachable_from(&networks.target, &source, "127.0.0.1"));
    assert!(!reachable_from(&networks.target, &source, SOURCE_ADDRESS));
    assert!(reachable_from(&networks.source, &source, "127.0.0.1"));

    let install = Install::new(TARGET_ADDRESS, &["east"]);
    let mut controller_args = install.controller_args();
    let listen = controller_args.iter().position(|a| a == "--listen-agents").unwrap();
    controller_args[listen + 1] = format!("{TARGET_ADDRESS}:{}", install.agent_port);
    controller_args.extend(["--target-url".to_owned(), target.url(DATABASE)]);
    let _controller = Daemon::start_in_netns(
        "controller",
        &networks.target,
        CONTROLLER,
        &controller_args,
        install.path(),
    );
    let _agent = Daemon::start_in_netns(
        "agent-east",
        &networks.source,
        AGENT,
        &install.agent_args("east", &source.url(DATABASE), TARGET_ADDRESS),
        install.path(),
    );
    eventually(LINK_TIMEOUT, "agent east to connect", || {
        install.connected_agent("east")
    });

    let api = install.api();
    let start = walbridge(&["--api", &api, "start", "--agent", "east", "--json"]);
    assert!(
        start.status.success(),
        "start: {}",
        String::from_utf8_lossy(&start.stderr)
    );
    source.psql(DATABASE, "UPDATE accounts SET balance = balance + 1 WHERE id <= 10");
    eventually(LINK_TIMEOUT, "the update to stream through the tunnel", || {
        (target.psql(DATABASE, "SELECT sum(balance) FROM accounts") == "100010").then_some(())
    });
    let cutover = walbridge(&["--api", &api, "cutover", "--timeout", "60s"]);
    assert!(
        cutover.status.success(),
        "cutover: {}{}",
        String::from_utf8_lossy(&cutover.stdout),
        String::from_utf8_lossy(&cutover.stderr)
    );
    let verify = walbridge(&["--api", &api, "verify"]);
    assert!(
        verify.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let cleanup = walbridge(&["--api", &api, "cleanup"]);
    assert!(
        cleanup.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
}

const STREAM_TIMEOUT: Duration = Duration::from_secs(120);

const DOOR_SCHEMA: &str = "CREATE TABLE accounts (id int PRIMARY KEY, balance int); \
     INSERT INTO accounts SELECT i, 100 FROM generate_series(1, 100) i;";

fn through_tunnel(m: &Migration) -> String {
    format!(
        "postgres://postgres:{}@127.0.0.1:{}/{DATABASE}?connect_timeout=10",
        m.source.password(),
        m.install.tunnel_port
    )
}

/// A PostgreSQL session through the tunnel: the source's backend pid, or
/// the client's error. With the right password, only a tunnel that
/// refuses the connection can make it fail.
fn connect_through_tunnel(m: &Migration) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&through_tunnel(m), tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let row = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get::<_, i32>(0).to_string())
    })
}

fn backend_alive(m: &Migration, pid: &str) -> bool {
    m.source.psql(
        DATABASE,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
    ) == "1"
}

/// `start` to streaming, then a session of our own through the tunnel.
fn stream_and_open_a_session(m: &Migration) -> (Session, String) {
    let (code, status, stderr) = m.cli_json(&["start", "--agent", "east", "--json"]);
    assert_eq!(code, Some(0), "start: {stderr} {status}");
    eventually(STREAM_TIMEOUT, "the subscription's worker to stream", || {
        (m.status()["subscription"] == "streaming").then_some(())
    });
    let session = Session::open(&through_tunnel(m));
    let pid = session.value("SELECT pg_backend_pid()").unwrap();
    assert!(
        backend_alive(m, &pid),
        "while streaming, the tunnel leads to the source"
    );
    (session, pid)
}

/// After the migration leaves the tunnel's phases: the session carried
/// before is closed at both ends, a new connection is refused, and the
/// controller says why.
fn assert_tunnel_closed(m: &Migration, session: &Session, pid: &str, phase: &str) {
    eventually(Duration::from_secs(10), "the carried session to be closed", || {
        session.is_closed().then_some(())
    });
    eventually(Duration::from_secs(10), "its backend on the source to end", || {
        (!backend_alive(m, pid)).then_some(())
    });
    m.controller.wait_for_log_line(
        Duration::from_secs(10),
        &["tunnel connection closed", "closed by the controller", phase],
    );
    let refused = connect_through_tunnel(m);
    assert!(
        refused.is_err(),
        "a new connection must not reach the source: {refused:?}"
    );
    m.controller.wait_for_log_line(
        Duration::from_secs(10),
        &["tunnel connection refused", "the tunnel is closed", phase],
    );
}

#[test]
fn the_tunnel_is_closed_without_a_migration_and_closes_its_connections_at_cutover() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, DOOR_SCHEMA);
    let refused = connect_through_tunnel(&m);
    assert!(refused.is_err(), "no migration: the tunnel leads nowhere: {refused:?}");
    m.controller.wait_for_log_line(
        Duration::from_secs(10),
        &["tunnel connection refused", "no migration needs the tunnel"],
    );

    let (session, pid) = stream_and_open_a_session(&m);
    let (code, cutover, stderr) = m.cli_json(&["cutover", "--timeout", "60s", "--json"]);
    assert_eq!(code, Some(0), "cutover: {stderr} {cutover}");
    assert_eq!(m.status()["phase"], "cut_over");
    assert_tunnel_closed(&m, &session, &pid, "cut_over");
}

#[test]
fn abort_closes_the_tunnel_and_the_connections_it_carried() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::new(source, DOOR_SCHEMA);
    let (session, pid) = stream_and_open_a_session(&m);
    let (code, aborted, stderr) = m.cli_json(&["abort", "--json"]);
    assert_eq!(code, Some(0), "abort: {stderr} {aborted}");
    assert_eq!(m.status()["phase"], "aborted");
    assert_tunnel_closed(&m, &session, &pid, "aborted");
}

/// A raw TCP connection to the tunnel from `client_address` (any address
/// of 127.0.0.0/8 is this machine's): whether the controller closed it at
/// once, without a byte.
fn closed_at_once_from(client_address: &str, m: &Migration) -> bool {
    use std::io::Read;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{client_address}:0").parse().unwrap()).unwrap();
        socket
            .connect(format!("127.0.0.1:{}", m.install.tunnel_port).parse().unwrap())
            .await
            .unwrap()
            .into_std()
            .unwrap()
    });
    let mut stream = stream;
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    matches!(stream.read(&mut [0u8; 16]), Ok(0))
}

#[test]
fn the_tunnel_refuses_clients_outside_tunnel_allow_even_while_it_is_open() {
    let source = Cluster::builder("source").logical().start();
    let m = Migration::with_controller_args(source, DOOR_SCHEMA, &["--tunnel-allow", "127.0.0.1/32"]);
    // Open: the subscription (from 127.0.0.1) streams through it, and so
    // does a session of ours from the same address.
    let (_session, _pid) = stream_and_open_a_session(&m);
    assert!(
        closed_at_once_from("127.0.0.2", &m),
        "a client outside tunnel.allow is closed at once"
    );
    m.controller.wait_for_log_line(
        Duration::from_secs(10),
        &["tunnel connection refused", "not in tunnel.allow", "127.0.0.2"],
    );
    assert!(
        connect_through_tunnel(&m).is_ok(),
        "a client inside it still gets through"
    );
    assert_eq!(m.status()["subscription"], "streaming");
}
