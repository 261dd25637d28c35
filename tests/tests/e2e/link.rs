//! The link: agent and controller in separate processes, mutual TLS with
//! the agent dialing out, Hello, reconnection, and refusals.

use std::time::{Duration, Instant};

use harness::Cluster;
use harness::daemons::{Daemon, eventually};

use crate::support::{Install, LINK_TIMEOUT, Relay};

#[test]
fn agent_and_controller_complete_hello_over_mutual_tls() {
    let source = Cluster::builder("source").logical().start();
    let install = Install::new("localhost", &["east"]);
    let mut controller = install.start_controller();
    let mut agent = Daemon::start(
        "agent-east",
        harness::daemons::AGENT,
        &[
            install.agent_args("east", &source.url("postgres"), "localhost"),
            vec!["--log-format".into(), "json".into()],
        ]
        .concat(),
        install.path(),
    );

    let east = eventually(LINK_TIMEOUT, "agent east to be listed", || {
        install.connected_agent("east")
    });
    let expected_version_num: u32 = source.psql("postgres", "SHOW server_version_num").parse().unwrap();
    let expected_system_id = source.psql("postgres", "SELECT system_identifier FROM pg_control_system()");
    assert_eq!(east["source"]["reachable"], true, "{east}");
    assert_eq!(east["source"]["server_version_num"], expected_version_num, "{east}");
    assert_eq!(
        east["source"]["system_identifier"],
        expected_system_id.as_str(),
        "{east}"
    );
    assert_eq!(east["source"]["database"], "postgres", "{east}");
    assert_eq!(east["agent_version"], env!("CARGO_PKG_VERSION"), "{east}");
    assert!(
        east["peer_address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{east}"
    );

    // The human table shows the same agent.
    let table = harness::daemons::walbridge(&["--api", &install.api(), "agents"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("east") && table.contains("PostgreSQL "), "{table}");

    // --log-format json: every log line is a JSON object.
    let log = agent.log();
    assert!(!log.trim().is_empty());
    for line in log.lines() {
        let parsed: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(parsed.get("level").is_some(), "{line}");
    }
    // The source's password never reaches a log.
    assert!(!log.contains(source.password()), "the agent logged the source password");
    assert!(!controller.log().contains(source.password()));

    assert!(agent.is_running() && controller.is_running());
    assert_eq!(agent.terminate(), Some(0), "the agent exits cleanly on SIGTERM");
    eventually(LINK_TIMEOUT, "the controller to drop the stopped agent", || {
        install.agents().filter(|agents| agents.is_empty())
    });
    assert_eq!(
        controller.terminate(),
        Some(0),
        "the controller exits cleanly on SIGTERM"
    );
}

#[test]
fn controller_refuses_an_agent_certificate_from_another_ca() {
    let install = Install::new("localhost", &["east"]);
    let rogue = Install::new("localhost", &["east"]);
    let mut controller = install.start_controller();
    // Trusts the right CA (so it accepts the controller) but presents a
    // certificate signed by another one.
    let mut args = install.agent_args("east", "postgres://u:p@127.0.0.1:1/db", "localhost");
    let cert_at = args.iter().position(|a| a == "--tls-cert").unwrap();
    args[cert_at + 1] = rogue.cert("east");
    args[cert_at + 3] = rogue.key("east");
    let mut agent = Daemon::start("agent-rogue", harness::daemons::AGENT, &args, install.path());

    // Both CAs bear the same name, so webpki finds the wrong "issuer" and
    // its signature fails (BadSignature); with another name: UnknownIssuer.
    controller.wait_for_log_line(
        LINK_TIMEOUT,
        &[
            "refused an agent connection",
            "is not signed by this side's tls.ca_cert",
        ],
    );
    agent.wait_for_log_line(LINK_TIMEOUT, &["the controller refused this agent's certificate"]);
    assert_eq!(install.agents(), Some(vec![]), "a refused agent is never listed");
    assert!(agent.is_running(), "the refused agent keeps running (and retrying)");
    assert!(controller.is_running(), "the controller keeps running");
}

#[test]
fn agent_refuses_a_controller_certificate_without_the_dialed_host_name() {
    // The controller's certificate names another host than the one dialed.
    let install = Install::new("controller.elsewhere.example", &["east"]);
    let mut controller = install.start_controller();
    let mut agent = install.start_agent("east", "postgres://u:p@127.0.0.1:1/db");

    let refused = agent.wait_for_log_line(LINK_TIMEOUT, &["refused the controller's TLS handshake"]);
    assert!(refused.contains("not valid for name \"localhost\""), "{refused}");
    assert!(refused.contains("does not carry the host name"), "{refused}");
    controller.wait_for_log_line(LINK_TIMEOUT, &["refused an agent connection"]);
    assert_eq!(install.agents(), Some(vec![]));
    assert!(agent.is_running() && controller.is_running());
}

#[test]
fn agent_reconnects_on_its_own_after_the_controller_is_killed_and_restarted() {
    let source = Cluster::builder("source").logical().start();
    let install = Install::new("localhost", &["east"]);
    let mut controller = install.start_controller();
    let mut agent = install.start_agent("east", &source.url("postgres"));
    let first = eventually(LINK_TIMEOUT, "agent east to connect", || {
        install.connected_agent("east")
    });

    controller.kill();
    let restarted_at = Instant::now();
    controller.restart();
    let again = eventually(LINK_TIMEOUT, "agent east to reconnect", || {
        install
            .connected_agent("east")
            .filter(|a| a["source"]["reachable"] == true)
    });
    let took = restarted_at.elapsed();
    // The backoff starts at 200 ms and doubles: a restart that quick must
    // be caught within a few seconds, far inside the 10 s backoff cap.
    assert!(took < Duration::from_secs(10), "reconnection took {took:?}");
    assert_ne!(first["peer_address"], again["peer_address"], "a new connection");
    assert!(agent.is_running());
}

#[test]
fn an_unreachable_source_is_reported_through_hello_and_the_agent_keeps_serving() {
    let mut source = Cluster::builder("source").logical().start();
    let install = Install::new("localhost", &["east"]);
    let _controller = install.start_controller();
    let mut agent = install.start_agent("east", &source.url("postgres"));
    eventually(LINK_TIMEOUT, "east connected, source reachable", || {
        install
            .connected_agent("east")
            .filter(|a| a["source"]["reachable"] == true)
    });

    source.stop();
    let down = install.connected_agent("east").expect("still connected");
    assert_eq!(down["source"]["reachable"], false, "{down}");
    let error = down["source"]["error"].as_str().unwrap();
    assert!(error.contains("connect"), "{error}");
    assert!(!error.contains(source.password()));
    assert!(agent.is_running());

    source.restart();
    let up = install.connected_agent("east").expect("still connected");
    assert_eq!(up["source"]["reachable"], true, "{up}");
}

#[test]
fn keepalive_finds_a_silent_link_within_ten_seconds_on_both_sides() {
    let source = Cluster::builder("source").logical().start();
    let install = Install::new("localhost", &["east"]);
    let _controller = install.start_controller();
    let relay = Relay::start(install.agent_port);
    let mut args = install.agent_args("east", &source.url("postgres"), "localhost");
    let endpoint_at = args.iter().position(|a| a == "--controller-endpoint").unwrap();
    args[endpoint_at + 1] = format!("localhost:{}", relay.port);
    let agent = Daemon::start("agent-east", harness::daemons::AGENT, &args, install.path());
    eventually(LINK_TIMEOUT, "east to connect through the relay", || {
        install.connected_agent("east")
    });

    relay.cut();
    let silent_since = Instant::now();
    eventually(
        Duration::from_secs(15),
        "the controller to drop the silent agent",
        || install.agents().filter(|agents| agents.is_empty()),
    );
    let controller_noticed = silent_since.elapsed();
    agent.wait_for_log_line(Duration::from_secs(15), &["link to the controller lost"]);
    let agent_noticed = silent_since.elapsed();
    assert!(
        controller_noticed <= Duration::from_secs(10),
        "controller took {controller_noticed:?}"
    );
    assert!(agent_noticed <= Duration::from_secs(10), "agent took {agent_noticed:?}");
}
