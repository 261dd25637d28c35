//! End-to-end tests: walbridge's programs as separate OS processes against
//! real PostgreSQL clusters started by the harness. One binary for all of
//! them (one link step, one build of the binaries).

mod application;
mod crash;
mod cutover;
mod cutover_safety;
mod demo;
mod deploy;
mod faults;
mod link;
mod managed;
mod progress;
mod settings;
mod support;
mod sync;
mod target_role;
mod trace;
mod tunnel;
mod versions;
mod versions_pairs;
