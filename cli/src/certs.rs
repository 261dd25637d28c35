//! `walbridge certs init`: the CA and certificates of an install.

use std::path::Path;

use walbridge_daemon::pki::{self, Outcome};

use crate::output::Failure;

pub fn init(dir: &Path, controller_hosts: &[String], agents: &[String], json: bool) -> Result<(), Failure> {
    let written = pki::init(dir, controller_hosts, agents).map_err(|e| match e {
        pki::PkiError::BadName(problem) => Failure::Usage(problem),
        other => Failure::Operation(other.to_string()),
    })?;
    if json {
        crate::output::print_json(&serde_json::json!({ "files": written }));
        return Ok(());
    }
    for file in &written {
        let what = match file.outcome {
            Outcome::Created => "created",
            Outcome::Kept => "kept (exists)",
        };
        println!("{what:<14} {}", file.path.display());
    }
    println!("Private keys (*-key.pem) are mode 0600: copy each only to the host that uses it.");
    Ok(())
}
