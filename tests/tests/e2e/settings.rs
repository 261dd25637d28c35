//! Bad settings: each exits with status 2 and one line naming the setting,
//! before the program does anything else.

use std::process::Output;

use harness::daemons::{AGENT, CLI, CONTROLLER, run_program};

use crate::support::Install;

fn assert_bad_setting(out: &Output, setting: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit status; stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(&format!("bad setting {setting} ")),
        "names {setting}: {stderr}"
    );
}

fn replace(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut args = args.to_vec();
    let at = args.iter().position(|a| a == flag).expect("flag present");
    args[at + 1] = value.to_owned();
    args
}

const SOURCE: &str = "postgres://walbridge:s3cret-pw@127.0.0.1:5432/app";

#[test]
fn each_bad_agent_setting_exits_2_naming_it() {
    let install = Install::new("localhost", &["east"]);
    let good = install.agent_args("east", SOURCE, "localhost");
    let garbage = install.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let garbage = garbage.display().to_string();
    let missing = install.path().join("missing.pem").display().to_string();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();

    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "config",
            [good.clone(), vec!["--config".into(), missing.clone()]].concat(),
        ),
        (
            "source.url",
            replace(&good, "--source-url", "postgres://walbridge:s3cret-pw@db:notaport/app"),
        ),
        (
            "controller.endpoint",
            replace(&good, "--controller-endpoint", "localhost"),
        ),
        ("tls.cert", replace(&good, "--tls-cert", &missing)),
        ("tls.ca_cert", replace(&good, "--tls-ca-cert", &garbage)),
        ("tls.key", replace(&good, "--tls-key", &install.key("operator"))),
        ("name", [good.clone(), vec!["--name".into(), "west".into()]].concat()),
        (
            "listen.metrics",
            [good.clone(), vec!["--listen-metrics".into(), taken.clone()]].concat(),
        ),
        (
            "log.format",
            [good.clone(), vec!["--log-format".into(), "xml".into()]].concat(),
        ),
    ];
    for (setting, args) in cases {
        let out = run_program(AGENT, &args, &[]);
        assert_bad_setting(&out, setting);
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("s3cret-pw"),
            "a setting error must not repeat the password"
        );
    }

    // The same through a variable and through the file.
    let without_cert = {
        let at = good.iter().position(|a| a == "--tls-cert").unwrap();
        let mut args = good.clone();
        args.drain(at..at + 2);
        args
    };
    let out = run_program(AGENT, &without_cert, &[("WALBRIDGE_TLS_CERT", "/nonexistent/east.pem")]);
    assert_bad_setting(&out, "tls.cert");

    let file = install.path().join("agent.toml");
    std::fs::write(&file, "[source]\nurl = \"::not a url::\"\n").unwrap();
    let without_url = {
        let at = good.iter().position(|a| a == "--source-url").unwrap();
        let mut args = good.clone();
        args.drain(at..at + 2);
        args
    };
    let out = run_program(
        AGENT,
        &[without_url, vec!["--config".into(), file.display().to_string()]].concat(),
        &[],
    );
    assert_bad_setting(&out, "source.url");
}

#[test]
fn each_bad_controller_setting_exits_2_naming_it() {
    let install = Install::new("localhost", &["east"]);
    let good = install.controller_args();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let file = install.path().join("controller.toml");
    std::fs::write(&file, "[listen]\nagent = \"127.0.0.1:1\"\n").unwrap();

    let cases: Vec<(&str, Vec<String>)> = vec![
        ("listen.agents", replace(&good, "--listen-agents", &taken)),
        ("listen.agents", replace(&good, "--listen-agents", "not-an-address")),
        ("listen.tunnel", replace(&good, "--listen-tunnel", &taken)),
        (
            "listen.metrics",
            [good.clone(), vec!["--listen-metrics".into(), taken.clone()]].concat(),
        ),
        ("listen.tunnel", replace(&good, "--listen-tunnel", "not-an-address")),
        ("tunnel.advertise", replace(&good, "--listen-tunnel", "0.0.0.0:0")),
        (
            "tunnel.allow",
            [
                good.clone(),
                vec!["--tunnel-allow".into(), "10.0.0.0/8,999.1.1.1/8".into()],
            ]
            .concat(),
        ),
        // Beyond loopback, the tunnel must say whom it lets in. (The CA is
        // missing too: were the tunnel check gone, that would be named.)
        (
            "tunnel.allow",
            [
                replace(
                    &replace(&good, "--listen-tunnel", "0.0.0.0:0"),
                    "--tls-ca-cert",
                    "/nonexistent/ca.pem",
                ),
                vec!["--tunnel-advertise".into(), "127.0.0.1:7401".into()],
            ]
            .concat(),
        ),
        (
            "tunnel.allow",
            [
                replace(
                    &replace(&good, "--listen-tunnel", "0.0.0.0:0"),
                    "--tls-ca-cert",
                    "/nonexistent/ca.pem",
                ),
                vec!["--tunnel-advertise".into(), "127.0.0.1:7401".into()],
                vec!["--tunnel-allow".into(), " , ".into()],
            ]
            .concat(),
        ),
        (
            "tunnel.max_connections",
            [good.clone(), vec!["--tunnel-max-connections".into(), "0".into()]].concat(),
        ),
        (
            "listen.api",
            [good.clone(), vec!["--listen-api".into(), taken.clone()]].concat(),
        ),
        (
            "listen.api",
            [good.clone(), vec!["--listen-api".into(), "unix://relative.sock".into()]].concat(),
        ),
        ("tls.key", replace(&good, "--tls-key", &install.key("east"))),
        ("tls.ca_cert", replace(&good, "--tls-ca-cert", "/nonexistent/ca.pem")),
        (
            "config",
            [good.clone(), vec!["--config".into(), file.display().to_string()]].concat(),
        ),
        (
            "target.url",
            [
                good.clone(),
                vec!["--target-url".into(), "postgres://x:y@h:99999/db".into()],
            ]
            .concat(),
        ),
    ];
    for (setting, args) in cases {
        assert_bad_setting(&run_program(CONTROLLER, &args, &[]), setting);
    }
}

#[test]
fn a_bad_api_address_in_the_cli_exits_2_naming_it() {
    let out = run_program(CLI, &["--api".into(), "ftp://somewhere".into(), "agents".into()], &[]);
    assert_bad_setting(&out, "api");
    // No controller there: the operation fails (1), it is not bad usage.
    let out = run_program(
        CLI,
        &["--api".into(), "unix:///nonexistent/api.sock".into(), "agents".into()],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    // Bad usage of a command is status 2 too.
    let out = run_program(CLI, &["agents".into(), "--frobnicate".into()], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn completions_and_the_manual_page_come_from_the_cli_definition() {
    let bash = run_program(CLI, &["completions".into(), "bash".into()], &[]);
    assert!(bash.status.success());
    let bash = String::from_utf8_lossy(&bash.stdout);
    for word in ["cutover", "release-source", "--max-lag", "--copy-only", "demo"] {
        assert!(bash.contains(word), "{word} in the bash completions");
    }
    let zsh = run_program(CLI, &["completions".into(), "zsh".into()], &[]);
    assert!(String::from_utf8_lossy(&zsh.stdout).starts_with("#compdef walbridge"));
    let man = run_program(CLI, &["man".into()], &[]);
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(man.contains(".TH walbridge 1"), "{man}");
    assert!(man.contains("cutover"), "the manual lists the commands");
    let bad = run_program(CLI, &["completions".into(), "tcsh".into()], &[]);
    assert_eq!(bad.status.code(), Some(2), "an unknown shell is bad usage");
}
