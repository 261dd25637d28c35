//! walbridge's own programs as separate OS processes, for end-to-end tests:
//! built once per test run, each with a log file, killed when dropped, and
//! their logs printed when a test fails. The daemons with crash points
//! (`<program>-failpoints`, cargo feature `failpoints`) are built only
//! when a test asks for one, once per run, beside the shipped ones and
//! from the same dependencies.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The programs the end-to-end tests run.
pub const AGENT: &str = "walbridge-agent";
pub const CONTROLLER: &str = "walbridge-controller";
pub const CLI: &str = "walbridge";

/// The path of one of walbridge's binaries, built (once per test process)
/// with the profile the tests themselves were built with, so a test never
/// runs a stale binary.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build(&["--bins"])).join(name)
}

/// The path of daemon `name` (`AGENT`, `CONTROLLER`) built with its crash
/// points (`walbridge_daemon::failpoint`). Its own binary, so the shipped
/// ones never contain them; built the first time a test asks, with the
/// same packages selected as [`binary`], so that only walbridge's crates
/// are compiled again, not their dependencies.
pub fn failpoint_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let with_failpoints = |program: &str| format!("{program}-failpoints");
    BUILT
        .get_or_init(|| {
            build(&[
                "--features",
                "walbridge-agent/failpoints,walbridge-controller/failpoints",
                "--bin",
                &with_failpoints(AGENT),
                "--bin",
                &with_failpoints(CONTROLLER),
            ])
        })
        .join(with_failpoints(name))
}

/// Runs `cargo build` of walbridge's programs with `what`, in the profile
/// and target folder the tests were built in; returns the profile's folder.
fn build(what: &[&str]) -> PathBuf {
    // <target>/<profile>/deps/<test binary>
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in <target>/<profile>/deps")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("a profile dir has a parent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--quiet"])
        .args([
            "-p",
            "walbridge-agent",
            "-p",
            "walbridge-controller",
            "-p",
            "walbridge-cli",
        ])
        .args(what)
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building walbridge's binaries ({what:?}) failed");
    profile_dir
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming
/// what was awaited. Polling with a deadline, never a bare sleep.
pub fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running walbridge daemon.
pub struct Daemon {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts `program` with `args`; its stdout and stderr go to
    /// `<log_dir>/<name>.log` (appended to across restarts).
    pub fn start(name: &str, program: &str, args: &[String], log_dir: &Path) -> Daemon {
        Daemon::start_with_env(name, program, args, &[], log_dir)
    }

    pub fn start_with_env(name: &str, program: &str, args: &[String], envs: &[(&str, &str)], log_dir: &Path) -> Daemon {
        let mut daemon = Daemon {
            name: name.to_owned(),
            program: binary(program),
            args: args.to_vec(),
            envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            log_path: log_dir.join(format!("{name}.log")),
            child: None,
        };
        daemon.restart();
        daemon
    }

    /// Starts daemon `program` built with its crash points, arming those
    /// `failpoints` names (`FAILPOINTS` syntax: `name=return;...`; empty:
    /// none).
    pub fn start_with_failpoints(
        name: &str,
        program: &str,
        args: &[String],
        failpoints: &str,
        log_dir: &Path,
    ) -> Daemon {
        let mut daemon = Daemon {
            name: name.to_owned(),
            program: failpoint_binary(program),
            args: args.to_vec(),
            envs: Vec::new(),
            log_path: log_dir.join(format!("{name}.log")),
            child: None,
        };
        daemon.arm(failpoints);
        daemon.restart();
        daemon
    }

    /// Arms `failpoints` (empty: none) for the next start.
    pub fn arm(&mut self, failpoints: &str) {
        self.envs.retain(|(key, _)| key != "FAILPOINTS");
        if !failpoints.is_empty() {
            self.envs.push(("FAILPOINTS".to_owned(), failpoints.to_owned()));
        }
    }

    /// Starts `program` inside a network namespace (`ip netns exec`, which
    /// execs it: the pid is the program's).
    pub fn start_in_netns(name: &str, namespace: &str, program: &str, args: &[String], log_dir: &Path) -> Daemon {
        let mut all = vec![
            "netns".to_owned(),
            "exec".to_owned(),
            namespace.to_owned(),
            binary(program).display().to_string(),
        ];
        all.extend_from_slice(args);
        let mut daemon = Daemon {
            name: name.to_owned(),
            program: PathBuf::from("ip"),
            args: all,
            envs: Vec::new(),
            log_path: log_dir.join(format!("{name}.log")),
            child: None,
        };
        daemon.restart();
        daemon
    }

    /// Starts the process again with the same arguments (after `kill`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file opens");
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file clones"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    /// SIGKILL, as a crash or an operator's kill -9 would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit; returns its status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        child.wait().ok().and_then(|s| s.code())
    }

    /// Waits (with a deadline) for the process to end by itself, e.g. at a
    /// crash point; returns how it ended.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let status = eventually(timeout, &format!("{} to exit", self.name), || {
            self.child.as_mut()?.try_wait().ok().flatten()
        });
        self.child = None;
        status
    }

    /// Whether the process is still running (it has not crashed or exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Waits until the log holds a line containing every one of `needles`;
    /// returns that line.
    pub fn wait_for_log_line(&self, timeout: Duration, needles: &[&str]) -> String {
        eventually(
            timeout,
            &format!("{} to log a line with {needles:?}", self.name),
            || {
                self.log()
                    .lines()
                    .find(|line| needles.iter().all(|n| line.contains(n)))
                    .map(str::to_owned)
            },
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- last lines of {} ({}):", self.name, self.log_path.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Runs the `walbridge` CLI to completion.
pub fn walbridge(args: &[&str]) -> Output {
    Command::new(binary(CLI))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("walbridge runs")
}

/// Runs any walbridge program to completion (for settings errors).
pub fn run_program(program: &str, args: &[String], envs: &[(&str, &str)]) -> Output {
    Command::new(binary(program))
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("program runs")
}
