//! The tunnel across real network separation: the source listens only
//! inside its own network namespace, the controller and the target live in
//! another, and the only way between them is the connection the agent
//! dials out.

use std::process::Command;

use harness::Cluster;
use harness::daemons::{AGENT, CONTROLLER, Daemon, eventually, walbridge};

use crate::support::{DATABASE, Install, LINK_TIMEOUT};

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
