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
