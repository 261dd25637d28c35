//! `walbridge-agent`: resolves its settings, checks them, then runs the
//! agent until SIGINT or SIGTERM.

use std::process::ExitCode;

use walbridge_agent::AgentConfig;
use walbridge_agent::config::{DATA_DIR, settings};
use walbridge_daemon::journal::Journal;
use walbridge_daemon::settings::{ProcessEnvironment, SettingError, Settings, add_to_command};
use walbridge_daemon::{VERSION, process};

const ABOUT: &str = "walbridge's agent: runs next to the source PostgreSQL database and dials the controller.";
const LONG_ABOUT: &str = "walbridge's agent runs next to the source PostgreSQL database. It never listens: it \
dials the controller's agent port over mutual TLS (its identity is the name in its certificate) and serves \
the controller's calls over that connection, redialing with backoff whenever the link drops.\n\n\
Every setting can come from a flag, a WALBRIDGE_* environment variable or the TOML file named by --config, \
in that order of precedence. A bad setting exits with status 2.";

pub fn main() -> ExitCode {
    let command = add_to_command(
        clap::Command::new("walbridge-agent")
            .version(VERSION)
            .about(ABOUT)
            .long_about(LONG_ABOUT),
        &settings(),
    );
    let matches = command.get_matches();
    let checked = Settings::resolve(&matches, &settings(), &ProcessEnvironment)
        .and_then(|resolved| AgentConfig::from_settings(&resolved))
        .and_then(|config| {
            let journal = Journal::open(&config.data_dir.join("journal"))
                .map_err(|e| SettingError::new(DATA_DIR, e.to_string()))?;
            let metrics = walbridge_daemon::metrics::bind(config.listen_metrics)?;
            Ok((config, journal, metrics))
        });
    let (config, journal, metrics) = match checked {
        Ok(checked) => checked,
        Err(e) => return process::bad_setting("walbridge-agent", &e),
    };
    process::run("walbridge-agent", config.log_format, |shutdown| async move {
        walbridge_agent::run(config, journal, metrics, shutdown).await;
        ExitCode::SUCCESS
    })
}
