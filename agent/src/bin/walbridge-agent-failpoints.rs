//! `walbridge-agent` with its crash points compiled in (cargo feature
//! `failpoints`; `walbridge_daemon::failpoint`). The end-to-end tests that
//! kill the agent at a chosen point build and run this one; no shipped build
//! contains it. The program is `main.rs`'s, unchanged.

#[path = "../main.rs"]
mod program;

fn main() -> std::process::ExitCode {
    program::main()
}
