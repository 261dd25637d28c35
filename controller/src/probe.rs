//! Preflight's proof that the subscription will be able to log in, made
//! before anything of the migration exists: the agent creates a throwaway
//! role the way it will create the subscription's (or hands over the
//! operator's `subscription.user`), and the target creates a subscription
//! that connects through the same route (tunnel or direct) with the same
//! TLS, then drops it. So a source that lets the role in without a
//! password (which a non-superuser's subscription refuses), a pg_hba.conf
//! without a line for it, a certificate the target cannot verify or a
//! tunnel the target cannot reach shows up here, not after hours of copying.

use tokio_postgres::Client;
use walbridge_daemon::pg::describe;
use walbridge_migration::finding::{Finding, Side};
use walbridge_proto::v1 as wire;

use crate::registry::AgentClient;
use crate::subscription::{self, Route, SubscriptionTls};

const CHECK: &str = "subscription_connection";

/// Runs the probe; a finding when it fails. `None` when all went well.
pub async fn subscription_login(
    target: &Client,
    agent: &AgentClient,
    route: &Route,
    tls: &SubscriptionTls,
) -> Option<Finding> {
    let nonce = match nonce() {
        Ok(nonce) => nonce,
        Err(problem) => return Some(finding(problem, String::new())),
    };
    let name = format!("walbridge_probe_{nonce}");
    let source = match agent
        .clone()
        .subscription_connection(wire::SubscriptionConnectionRequest { role: name.clone() })
        .await
    {
        Ok(source) => source.into_inner(),
        // The source's preflight says why the role cannot be made.
        Err(status) if status.code() == tonic::Code::PermissionDenied => return None,
        Err(status) => {
            return Some(finding(
                format!("the agent could not prepare the probe's role: {}", status.message()),
                String::new(),
            ));
        }
    };
    let outcome = probe(target, &name, &source, route, tls).await;
    if source.role_created
        && let Err(status) = agent
            .clone()
            .drop_subscription_role(wire::DropSubscriptionRoleRequest { role: name.clone() })
            .await
    {
        tracing::warn!(role = %name, error = %status.message(), "the probe's role could not be dropped on the source");
    }
    outcome.err().map(|(problem, fix)| finding(problem, fix))
}

async fn probe(
    target: &Client,
    name: &str,
    source: &wire::SubscriptionConnectionResponse,
    route: &Route,
    tls: &SubscriptionTls,
) -> Result<(), (String, String)> {
    let version = subscription::server_version(target)
        .await
        .map_err(|e| (format!("cannot read the target's version: {e}"), String::new()))?;
    let connection = subscription::conninfo(source, route, tls, version).map_err(|e| (e, String::new()))?;
    subscription::probe(target, name, &connection).await.map_err(|e| {
        let problem = describe(&e);
        let fix = fix_for(&problem, &source.user, route);
        (
            format!(
                "the target could not log in to the source as the subscription will ({}): {problem}",
                match route {
                    Route::Direct => "directly".to_owned(),
                    Route::Tunnel { host, port } => format!("through the tunnel at {host}:{port}"),
                }
            ),
            fix,
        )
    })
}

/// The fix for what the target's libpq (or the source) said.
fn fix_for(problem: &str, user: &str, route: &Route) -> String {
    if problem.contains("password is required") || problem.contains("does not request a password") {
        format!(
            "the source let role {user} in without asking for a password (trust or peer): a subscription owned by \
             a non-superuser must authenticate with its password. Change the source's pg_hba.conf line that \
             matches it to scram-sha-256, then SELECT pg_reload_conf();"
        )
    } else if problem.contains("no pg_hba.conf entry") {
        format!(
            "add a line for role {user} to the source's pg_hba.conf (e.g. `hostssl <database> {user} <agent's \
             address>/32 scram-sha-256`, or `all` instead of the role), then SELECT pg_reload_conf();"
        )
    } else if problem.contains("root certificate") || problem.contains("certificate verify failed") {
        "set the controller's subscription.sslrootcert to the CA of the source's certificate, as a file on the \
         target server's host (or `system`), or subscription.sslmode=require to encrypt without verifying"
            .to_owned()
    } else if problem.contains("Connection refused") || problem.contains("timeout") || problem.contains("timed out") {
        match route {
            Route::Tunnel { .. } => "make the tunnel reachable from the target server (tunnel.advertise, \
                                     tunnel.allow, firewalls), or start with --direct if it can reach the source"
                .to_owned(),
            Route::Direct => {
                "the target server cannot reach the source's address: use the tunnel (drop --direct)".to_owned()
            }
        }
    } else {
        String::new()
    }
}

fn finding(message: String, fix: String) -> Finding {
    Finding::error(Side::Target, CHECK, "", message, fix)
}

fn nonce() -> Result<String, String> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for the probe's name: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
