//! `walbridge-controller`: resolves its settings, binds its ports, then
//! serves until SIGINT or SIGTERM.

use std::process::ExitCode;

use walbridge_controller::config::settings;
use walbridge_controller::{BoundController, ControllerConfig};
use walbridge_daemon::settings::{ProcessEnvironment, Settings, add_to_command};
use walbridge_daemon::{VERSION, process};

const ABOUT: &str = "walbridge's controller: accepts the agents' links, drives the migration, serves the CLI.";
const LONG_ABOUT: &str = "walbridge's controller runs near the target PostgreSQL database. Agents dial its agent \
port over mutual TLS and the controller calls them over those connections; the walbridge CLI talks to its API \
(a unix socket in data_dir by default).\n\n\
Every setting can come from a flag, a WALBRIDGE_* environment variable or the TOML file named by --config, \
in that order of precedence. A bad setting exits with status 2.";

pub fn main() -> ExitCode {
    let command = add_to_command(
        clap::Command::new("walbridge-controller")
            .version(VERSION)
            .about(ABOUT)
            .long_about(LONG_ABOUT),
        &settings(),
    );
    let matches = command.get_matches();
    let bound = Settings::resolve(&matches, &settings(), &ProcessEnvironment)
        .and_then(|resolved| ControllerConfig::from_settings(&resolved))
        .and_then(BoundController::bind);
    let (bound, log_format) = match bound {
        Ok(bound) => {
            let log_format = bound.log_format();
            (bound, log_format)
        }
        Err(e) => return process::bad_setting("walbridge-controller", &e),
    };
    process::run("walbridge-controller", log_format, |shutdown| async move {
        match bound.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}
