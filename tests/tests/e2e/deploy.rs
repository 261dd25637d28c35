//! Every file under deploy/ is exercised: systemd units are verified by
//! `systemd-analyze` where the machine has it (and their hardening checked
//! either way), and each example config is loaded by its daemon.

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::daemons::{AGENT, CONTROLLER, binary, run_program};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `[Service]` and friends as (key, value) pairs, in order.
fn unit_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not key=value: {l}"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

#[test]
fn the_systemd_units_verify_and_are_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for (unit, program) in [
        ("walbridge-agent.service", AGENT),
        ("walbridge-controller.service", CONTROLLER),
    ] {
        let text = std::fs::read_to_string(deploy().join("systemd").join(unit)).unwrap();
        let entries = unit_entries(&text);
        let get = |key: &str| {
            entries
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        for (key, value) in [
            ("DynamicUser", "yes"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("Restart", "always"),
        ] {
            assert_eq!(get(key), [value], "{unit}: {key}");
        }
        assert_eq!(
            get("StateDirectory").len(),
            1,
            "{unit}: the journal has a StateDirectory"
        );
        let exec = get("ExecStart")[0];
        assert!(
            exec.starts_with(&format!("/usr/local/bin/{program} --config /etc/walbridge/")),
            "{exec}"
        );
        // systemd-analyze wants the binary to exist: point it at the built one.
        let local = text.replace(
            &format!("/usr/local/bin/{program}"),
            &binary(program).display().to_string(),
        );
        let path = dir.path().join(unit);
        std::fs::write(&path, local).unwrap();
        units.push(path);
    }
    let analyze = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output();
    match analyze {
        Ok(out) => assert!(
            out.status.success() && out.stderr.is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("systemd-analyze is not on this machine ({e}): the units were parsed only"),
    }
}

#[test]
fn each_example_config_is_accepted_by_its_daemon() {
    for (file, program) in [("agent.toml", AGENT), ("controller.toml", CONTROLLER)] {
        let path = deploy().join("systemd").join(file);
        let out = run_program(program, &["--config".into(), path.display().to_string()], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Every key is known and every value parses; what is left to fail
        // is the first file the example names that this machine lacks.
        assert_eq!(out.status.code(), Some(2), "{file}: {stderr}");
        assert!(!stderr.contains("not a setting"), "{file}: {stderr}");
        assert!(
            stderr.contains("tls."),
            "{file} fails only on its certificates here: {stderr}"
        );
    }
}

/// A daemon's `--help`, which names every setting's variable.
fn help_of(program: &str) -> String {
    let out = run_program(program, &["--help".into()], &[]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Dockerfile instructions, continuation lines joined.
fn instructions(text: &str) -> Vec<String> {
    let mut all = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                all.push(std::mem::take(&mut current));
            }
        }
    }
    all
}

#[test]
fn the_container_images_are_multi_stage_non_root_with_the_journal_on_a_volume() {
    for (file, program, package) in [
        ("agent.Dockerfile", AGENT, "walbridge-agent"),
        ("controller.Dockerfile", CONTROLLER, "walbridge-controller"),
    ] {
        let text = std::fs::read_to_string(deploy().join("container").join(file)).unwrap();
        let all = instructions(&text);
        let stages = all.iter().filter(|i| i.starts_with("FROM ")).count();
        assert!(stages >= 2, "{file}: multi-stage");
        let last = all.iter().rposition(|i| i.starts_with("FROM ")).unwrap();
        let runtime = &all[last..];
        let find = |prefix: &str| {
            runtime
                .iter()
                .filter(|i| i.starts_with(prefix))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert!(
            all.iter()
                .any(|i| i.starts_with("RUN cargo build --release --locked") && i.contains(&format!("-p {package}"))),
            "{file}: builds {package}"
        );
        let user = find("USER ");
        assert_eq!(user.len(), 1, "{file}");
        assert!(!["USER root", "USER 0"].contains(&user[0].as_str()), "{file}: non-root");
        let env = find("ENV ").join(" ");
        let help = help_of(program);
        for variable in env.split_whitespace().filter_map(|w| w.split_once('=')).map(|(k, _)| k) {
            assert!(help.contains(variable), "{file}: {variable} is a setting of {program}");
        }
        let data_dir = env
            .split_whitespace()
            .find_map(|w| w.strip_prefix("WALBRIDGE_DATA_DIR="))
            .unwrap_or_else(|| panic!("{file}: sets WALBRIDGE_DATA_DIR"));
        assert_eq!(
            find("VOLUME "),
            [format!("VOLUME [\"{data_dir}\"]")],
            "{file}: the journal is a volume"
        );
        assert_eq!(
            find("ENTRYPOINT "),
            [format!("ENTRYPOINT [\"/usr/local/bin/{program}\"]")],
            "{file}"
        );
        assert!(
            find("COPY ")
                .iter()
                .any(|c| c.ends_with(&format!("target/release/{program} /usr/local/bin/{program}"))),
            "{file}: copies the built {program}"
        );
        if program == AGENT {
            let pg_dump = env
                .split_whitespace()
                .find_map(|w| w.strip_prefix("WALBRIDGE_SOURCE_PG_DUMP="))
                .expect("the agent image names its pg_dump");
            let major = pg_dump
                .strip_prefix("/usr/lib/postgresql/")
                .and_then(|rest| rest.split('/').next())
                .unwrap();
            assert!(
                runtime
                    .iter()
                    .any(|i| i.contains(&format!("postgresql-client-{major}"))),
                "{file}: installs the pg_dump it names ({pg_dump})"
            );
        }
    }
}

fn yaml_documents(file: &str) -> Vec<yaml_rust2::Yaml> {
    let text = std::fs::read_to_string(deploy().join("kubernetes").join(file)).unwrap();
    yaml_rust2::YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn of_kind<'a>(docs: &'a [yaml_rust2::Yaml], kind: &str) -> Vec<&'a yaml_rust2::Yaml> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

/// The container's WALBRIDGE_* variables with literal values.
fn env_of(container: &yaml_rust2::Yaml) -> Vec<(String, Option<String>)> {
    container["env"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn value<'a>(env: &'a [(String, Option<String>)], name: &str) -> &'a str {
    env.iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.as_deref())
        .unwrap_or_else(|| panic!("{name} is set"))
}

fn port_of(address: &str) -> i64 {
    address.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Checks what ties a workload together: settings are the daemon's, the
/// journal is the mounted volume, TLS files come from the mounted secret.
fn check_workload(file: &str, workload: &yaml_rust2::Yaml, program: &str) -> Vec<(String, Option<String>)> {
    let pod = &workload["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env = env_of(container);
    let help = help_of(program);
    for (name, _) in &env {
        assert!(help.contains(name.as_str()), "{file}: {name} is a setting of {program}");
    }
    let mounts = container["volumeMounts"].as_vec().unwrap();
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"].as_str() == Some(name))
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("{file}: mounts {name}"))
    };
    assert_eq!(
        value(&env, "WALBRIDGE_DATA_DIR"),
        mount("journal"),
        "{file}: the journal is on its volume"
    );
    for key in ["WALBRIDGE_TLS_CA_CERT", "WALBRIDGE_TLS_CERT", "WALBRIDGE_TLS_KEY"] {
        assert!(
            value(&env, key).starts_with(&format!("{}/", mount("tls"))),
            "{file}: {key} in the secret"
        );
    }
    let volumes = pod["volumes"].as_vec().unwrap();
    assert!(
        volumes
            .iter()
            .any(|v| v["name"].as_str() == Some("tls") && v["secret"]["secretName"].as_str().is_some()),
        "{file}: tls is a secret"
    );
    let labels = &workload["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        &workload["spec"]["selector"]["matchLabels"], labels,
        "{file}: selector matches"
    );
    env
}

#[test]
fn the_kubernetes_manifests_agree_with_each_other_and_with_the_daemons() {
    let docs = yaml_documents("controller.yaml");
    let statefulset = of_kind(&docs, "StatefulSet")[0];
    let env = check_workload("controller.yaml", statefulset, CONTROLLER);
    let container = &statefulset["spec"]["template"]["spec"]["containers"][0];
    let ports: Vec<(&str, i64)> = container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["containerPort"].as_i64().unwrap()))
        .collect();
    let port = |name: &str| ports.iter().find(|(n, _)| *n == name).map(|(_, p)| *p);
    for (setting, name) in [
        ("WALBRIDGE_LISTEN_AGENTS", "agents"),
        ("WALBRIDGE_LISTEN_TUNNEL", "tunnel"),
        ("WALBRIDGE_LISTEN_METRICS", "metrics"),
    ] {
        assert_eq!(
            Some(port_of(value(&env, setting))),
            port(name),
            "{setting} is the {name} port"
        );
    }
    assert!(
        statefulset["spec"]["volumeClaimTemplates"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|c| c["metadata"]["name"].as_str() == Some("journal")),
        "the journal is a persistent volume"
    );
    let labels = &statefulset["spec"]["template"]["metadata"]["labels"];
    let services = of_kind(&docs, "Service");
    for service in &services {
        assert_eq!(
            &service["spec"]["selector"], labels,
            "{:?} selects the controller",
            service["metadata"]["name"]
        );
        for p in service["spec"]["ports"].as_vec().unwrap() {
            let target = p["targetPort"].as_str().unwrap();
            assert!(port(target).is_some(), "service port {target} exists on the container");
        }
    }
    // The subscription reaches the tunnel by its Service.
    let (host, advertised) = value(&env, "WALBRIDGE_TUNNEL_ADVERTISE").rsplit_once(':').unwrap();
    let tunnel = services
        .iter()
        .find(|s| s["metadata"]["name"].as_str() == Some(host))
        .expect("tunnel.advertise names a Service");
    assert!(
        tunnel["spec"]["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .any(|p| p["port"].as_i64() == advertised.parse().ok() && p["targetPort"].as_str() == Some("tunnel")),
        "the advertised port leads to the tunnel"
    );

    let docs = yaml_documents("agent.yaml");
    let deployment = of_kind(&docs, "Deployment")[0];
    check_workload("agent.yaml", deployment, AGENT);
    assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(1), "one agent at a time");
    let claim = deployment["spec"]["template"]["spec"]["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
        .expect("the agent's journal is a claim");
    assert!(
        of_kind(&docs, "PersistentVolumeClaim")
            .iter()
            .any(|c| c["metadata"]["name"].as_str() == Some(claim)),
        "the claim {claim} is defined"
    );
}
