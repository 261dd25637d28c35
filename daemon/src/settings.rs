//! Layered settings: a command-line flag, then a `WALBRIDGE_*` environment
//! variable, then the TOML file named by `--config`, then a default.
//!
//! Every setting is declared once, by its file key (`tls.ca_cert`); its flag
//! (`--tls-ca-cert`) and variable (`WALBRIDGE_TLS_CA_CERT`) are derived from
//! that key here and nowhere else. Errors name the key, the flag and the
//! variable, so the operator can fix whichever layer they used.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::{Arg, ArgAction, ArgMatches, Command};

/// The key of the setting that names the config file itself.
pub const CONFIG: &str = "config";

/// One setting a program accepts.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The key in the TOML file, dotted for tables: `tls.ca_cert`.
    pub key: &'static str,
    /// What it is, for `--help`.
    pub help: &'static str,
    /// What its value looks like, for `--help`: `PATH`, `HOST:PORT`, `URL`.
    pub value_name: &'static str,
    /// The value used when no layer sets it.
    pub default: Option<&'static str>,
}

impl Setting {
    /// The command-line flag: `tls.ca_cert` is `--tls-ca-cert`.
    pub fn flag(&self) -> String {
        flag_for(self.key)
    }

    /// The environment variable: `tls.ca_cert` is `WALBRIDGE_TLS_CA_CERT`.
    pub fn env_var(&self) -> String {
        env_var_for(self.key)
    }
}

fn flag_for(key: &str) -> String {
    format!("--{}", key.replace(['.', '_'], "-"))
}

fn env_var_for(key: &str) -> String {
    format!("WALBRIDGE_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// A setting whose value is wrong, named so the operator can find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub key: String,
    pub problem: String,
}

impl SettingError {
    pub fn new(key: &str, problem: impl Into<String>) -> SettingError {
        SettingError {
            key: key.to_owned(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad setting {} ({}, {}): {}",
            self.key,
            flag_for(&self.key),
            env_var_for(&self.key),
            self.problem
        )
    }
}

impl std::error::Error for SettingError {}

/// Where the process environment comes from: the real one in binaries, a map
/// in tests (tests never change their own process's environment).
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

/// `HOST:PORT` (an IPv6 host may be bracketed), naming the setting `key`
/// when it is not.
pub fn parse_host_port(key: &str, raw: &str) -> Result<(String, u16), SettingError> {
    let problem = |p: String| SettingError::new(key, p);
    let (host, port) = raw
        .rsplit_once(':')
        .ok_or_else(|| problem(format!("{raw:?} is not HOST:PORT")))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| problem(format!("{port:?} in {raw:?} is not a port number")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(problem(format!("{raw:?} names no host")));
    }
    Ok((host.to_owned(), port))
}

/// The process's own environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Environment for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Adds one flag per setting (and `--config`) to a clap command, with help
/// that names the file key and the variable.
pub fn add_to_command(mut command: Command, settings: &[Setting]) -> Command {
    command = command.arg(
        Arg::new(CONFIG)
            .long(CONFIG)
            .value_name("PATH")
            .global(true)
            .action(ArgAction::Set)
            .help(format!(
                "TOML file to read settings from (env: {}). Flags win over variables, variables over the file",
                env_var_for(CONFIG)
            )),
    );
    for setting in settings {
        let mut help = format!("{} [file: {}] [env: {}]", setting.help, setting.key, setting.env_var());
        if let Some(default) = setting.default {
            help.push_str(&format!(" [default: {default}]"));
        }
        command = command.arg(
            Arg::new(setting.key)
                .long(setting.flag().trim_start_matches("--").to_owned())
                .value_name(setting.value_name)
                .global(true)
                .action(ArgAction::Set)
                .help(help),
        );
    }
    command
}

/// Which layer a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Flag,
    Environment,
    File,
    Default,
}

/// The settings of one program, resolved through the layers.
#[derive(Debug)]
pub struct Settings {
    values: BTreeMap<&'static str, (String, Layer)>,
    config_file: Option<PathBuf>,
}

impl Settings {
    /// Resolves every declared setting from parsed flags, the environment
    /// and the config file. Unknown keys in the file are an error, so that a
    /// typo is not silently ignored.
    pub fn resolve(
        matches: &ArgMatches,
        settings: &[Setting],
        env: &dyn Environment,
    ) -> Result<Settings, SettingError> {
        let config_file = matches
            .get_one::<String>(CONFIG)
            .cloned()
            .or_else(|| env.var(&env_var_for(CONFIG)))
            .map(PathBuf::from);
        let file = match &config_file {
            Some(path) => read_config_file(path, settings)?,
            None => BTreeMap::new(),
        };
        let mut values = BTreeMap::new();
        for setting in settings {
            let from_flag = matches
                .try_get_one::<String>(setting.key)
                .ok()
                .flatten()
                .map(|v| (v.clone(), Layer::Flag));
            let resolved = from_flag
                .or_else(|| {
                    env.var(&setting.env_var())
                        .filter(|v| !v.is_empty())
                        .map(|v| (v, Layer::Environment))
                })
                .or_else(|| file.get(setting.key).map(|v| (v.clone(), Layer::File)))
                .or_else(|| setting.default.map(|v| (v.to_owned(), Layer::Default)));
            if let Some(value) = resolved {
                values.insert(setting.key, value);
            }
        }
        Ok(Settings { values, config_file })
    }

    /// The config file that was read, if any.
    pub fn config_file(&self) -> Option<&Path> {
        self.config_file.as_deref()
    }

    /// The value of a setting, if any layer set it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|(v, _)| v.as_str())
    }

    /// Which layer set it.
    pub fn layer(&self, key: &str) -> Option<Layer> {
        self.values.get(key).map(|(_, layer)| *layer)
    }

    /// The value of a setting that must be set.
    pub fn required(&self, key: &str) -> Result<&str, SettingError> {
        self.get(key)
            .ok_or_else(|| SettingError::new(key, "is required but not set"))
    }

    /// A path; relative paths in the file are relative to the file's folder,
    /// so a config file can sit beside its certificates.
    pub fn path(&self, key: &str) -> Option<PathBuf> {
        let value = PathBuf::from(self.get(key)?);
        match (self.layer(key), &self.config_file) {
            (Some(Layer::File), Some(file)) if value.is_relative() => {
                Some(file.parent().map(|dir| dir.join(&value)).unwrap_or(value))
            }
            _ => Some(value),
        }
    }

    pub fn required_path(&self, key: &str) -> Result<PathBuf, SettingError> {
        self.required(key)?;
        Ok(self.path(key).expect("checked above"))
    }

    /// A value parsed with `FromStr`; the parse error becomes the problem.
    pub fn parse<T>(&self, key: &str) -> Result<Option<T>, SettingError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.get(key)
            .map(|raw| {
                raw.parse::<T>()
                    .map_err(|e| SettingError::new(key, format!("cannot parse {raw:?}: {e}")))
            })
            .transpose()
    }
}

/// Reads the TOML file into dotted keys, refusing keys no setting declares.
fn read_config_file(path: &Path, settings: &[Setting]) -> Result<BTreeMap<String, String>, SettingError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SettingError::new(CONFIG, format!("cannot read {}: {e}", path.display())))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        SettingError::new(CONFIG, format!("{} is not valid TOML: {}", path.display(), e.message()))
    })?;
    let mut flat = BTreeMap::new();
    flatten("", &table, &mut flat)
        .map_err(|problem| SettingError::new(CONFIG, format!("in {}: {problem}", path.display())))?;
    let known: BTreeSet<&str> = settings.iter().map(|s| s.key).collect();
    if let Some(unknown) = flat.keys().find(|k| !known.contains(k.as_str())) {
        return Err(SettingError::new(
            CONFIG,
            format!(
                "{} sets {unknown:?}, which is not a setting of this program (see --help)",
                path.display()
            ),
        ));
    }
    Ok(flat)
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) -> Result<(), String> {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let text = match value {
            toml::Value::Table(inner) => {
                flatten(&key, inner, out)?;
                continue;
            }
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|item| match item {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(format!("{key}: list items must be strings, not {other}")),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            toml::Value::Datetime(d) => d.to_string(),
        };
        out.insert(key, text);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    const SETTINGS: &[Setting] = &[
        Setting {
            key: "data_dir",
            help: "where the journal lives",
            value_name: "PATH",
            default: Some("/var/lib/walbridge"),
        },
        Setting {
            key: "tls.ca_cert",
            help: "CA certificate",
            value_name: "PATH",
            default: None,
        },
        Setting {
            key: "source.url",
            help: "source",
            value_name: "URL",
            default: None,
        },
    ];

    fn resolve(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, SettingError> {
        let command = add_to_command(Command::new("t"), SETTINGS);
        let matches = command
            .try_get_matches_from(std::iter::once("t").chain(args.iter().copied()).map(OsString::from))
            .expect("flags parse");
        let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::resolve(&matches, SETTINGS, &env)
    }

    #[test]
    fn host_port_takes_names_ips_and_bracketed_ipv6_and_names_the_setting() {
        assert_eq!(parse_host_port("k", "db:5432").unwrap(), ("db".to_owned(), 5432));
        assert_eq!(parse_host_port("k", "[::1]:7401").unwrap(), ("::1".to_owned(), 7401));
        for bad in ["db", "db:port", ":7401", "db:70000"] {
            assert_eq!(
                parse_host_port("tunnel.advertise", bad).unwrap_err().key,
                "tunnel.advertise",
                "{bad}"
            );
        }
    }

    #[test]
    fn naming_rule_links_key_flag_and_variable() {
        assert_eq!(SETTINGS[1].flag(), "--tls-ca-cert");
        assert_eq!(SETTINGS[1].env_var(), "WALBRIDGE_TLS_CA_CERT");
        assert_eq!(SETTINGS[2].flag(), "--source-url");
        assert_eq!(SETTINGS[0].flag(), "--data-dir");
        assert_eq!(SETTINGS[0].env_var(), "WALBRIDGE_DATA_DIR");
    }

    #[test]
    fn flag_beats_variable_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.toml");
        std::fs::write(
            &file,
            "data_dir = \"from-file\"\n[tls]\nca_cert = \"ca.pem\"\n[source]\nurl = \"postgres://file\"\n",
        )
        .unwrap();
        let config = file.to_str().unwrap();

        let s = resolve(&["--config", config], &[]).unwrap();
        assert_eq!(s.get("source.url"), Some("postgres://file"));
        assert_eq!(s.layer("source.url"), Some(Layer::File));
        // Relative paths in the file are relative to the file.
        assert_eq!(s.path("tls.ca_cert").unwrap(), dir.path().join("ca.pem"));

        let s = resolve(&["--config", config], &[("WALBRIDGE_SOURCE_URL", "postgres://env")]).unwrap();
        assert_eq!(s.get("source.url"), Some("postgres://env"));

        let s = resolve(
            &["--config", config, "--source-url", "postgres://flag"],
            &[("WALBRIDGE_SOURCE_URL", "postgres://env")],
        )
        .unwrap();
        assert_eq!(s.get("source.url"), Some("postgres://flag"));
        assert_eq!(s.layer("source.url"), Some(Layer::Flag));

        let s = resolve(&[], &[]).unwrap();
        assert_eq!(s.get("data_dir"), Some("/var/lib/walbridge"));
        assert_eq!(s.layer("data_dir"), Some(Layer::Default));
        assert_eq!(s.get("source.url"), None);
    }

    #[test]
    fn config_file_problems_name_the_config_setting() {
        let missing = resolve(&["--config", "/nonexistent/w.toml"], &[]).unwrap_err();
        assert_eq!(missing.key, "config");
        assert!(missing.problem.contains("/nonexistent/w.toml"), "{missing}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.toml");
        std::fs::write(&file, "[tls]\nca_crt = \"typo\"\n").unwrap();
        let unknown = resolve(&["--config", file.to_str().unwrap()], &[]).unwrap_err();
        assert!(unknown.problem.contains("tls.ca_crt"), "{unknown}");

        std::fs::write(&file, "data_dir = \n").unwrap();
        let invalid = resolve(&["--config", file.to_str().unwrap()], &[]).unwrap_err();
        assert!(invalid.problem.contains("not valid TOML"), "{invalid}");
    }

    #[test]
    fn error_names_key_flag_and_variable() {
        let e = SettingError::new("tls.ca_cert", "cannot read /x: gone");
        assert_eq!(
            e.to_string(),
            "bad setting tls.ca_cert (--tls-ca-cert, WALBRIDGE_TLS_CA_CERT): cannot read /x: gone"
        );
    }
}
