//! libpq's two spellings of a connection string — `postgresql://` URLs and
//! `keyword=value` lists — read into keyword/value pairs, and written back
//! as a keyword/value list quoted the way libpq reads it. This module is
//! the syntax and the table of keywords libpq knows (with their `PG*`
//! variables); what the values mean is decided in [`super::Database`].
//!
//! Errors never repeat a value from the user-information part of a URL or
//! a `password` keyword.

use std::collections::BTreeMap;

use crate::settings::{Environment, SettingError};

/// A connection string libpq would not read, in words that never carry
/// the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError(pub String);

/// How walbridge treats one of libpq's keywords.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Honoured as libpq does.
    Yes,
    /// Accepted and without effect, as in a libpq built without the
    /// feature (GSSAPI) or because libpq itself ignores it now.
    Ignored,
    /// Refused with this reason: ignoring it would weaken or change what
    /// the operator asked for.
    Refused(&'static str),
}

/// One keyword libpq knows.
#[derive(Debug, Clone, Copy)]
pub struct Keyword {
    pub name: &'static str,
    /// The environment variable libpq takes its default from.
    pub env: Option<&'static str>,
    pub support: Support,
}

const fn kw(name: &'static str, env: Option<&'static str>, support: Support) -> Keyword {
    Keyword { name, env, support }
}

/// Every keyword of libpq 18's connection strings.
pub const KEYWORDS: &[Keyword] = &[
    kw("host", Some("PGHOST"), Support::Yes),
    kw("hostaddr", Some("PGHOSTADDR"), Support::Yes),
    kw("port", Some("PGPORT"), Support::Yes),
    kw("dbname", Some("PGDATABASE"), Support::Yes),
    kw("user", Some("PGUSER"), Support::Yes),
    kw("password", Some("PGPASSWORD"), Support::Yes),
    kw("connect_timeout", Some("PGCONNECT_TIMEOUT"), Support::Yes),
    kw("options", Some("PGOPTIONS"), Support::Yes),
    kw("application_name", Some("PGAPPNAME"), Support::Yes),
    kw("fallback_application_name", None, Support::Yes),
    kw("client_encoding", Some("PGCLIENTENCODING"), Support::Yes),
    kw("keepalives", None, Support::Yes),
    kw("keepalives_idle", None, Support::Yes),
    kw("keepalives_interval", None, Support::Yes),
    kw("keepalives_count", None, Support::Yes),
    kw("tcp_user_timeout", None, Support::Yes),
    kw("target_session_attrs", Some("PGTARGETSESSIONATTRS"), Support::Yes),
    kw("load_balance_hosts", Some("PGLOADBALANCEHOSTS"), Support::Yes),
    kw("sslmode", Some("PGSSLMODE"), Support::Yes),
    kw("requiressl", Some("PGREQUIRESSL"), Support::Yes),
    kw("sslnegotiation", Some("PGSSLNEGOTIATION"), Support::Yes),
    kw("sslrootcert", Some("PGSSLROOTCERT"), Support::Yes),
    kw("sslcert", Some("PGSSLCERT"), Support::Yes),
    kw("sslkey", Some("PGSSLKEY"), Support::Yes),
    kw("sslcertmode", Some("PGSSLCERTMODE"), Support::Yes),
    kw("sslsni", Some("PGSSLSNI"), Support::Yes),
    kw("channel_binding", Some("PGCHANNELBINDING"), Support::Yes),
    kw(
        "ssl_min_protocol_version",
        Some("PGSSLMINPROTOCOLVERSION"),
        Support::Yes,
    ),
    kw(
        "ssl_max_protocol_version",
        Some("PGSSLMAXPROTOCOLVERSION"),
        Support::Yes,
    ),
    kw("gssencmode", Some("PGGSSENCMODE"), Support::Yes),
    kw("sslcompression", Some("PGSSLCOMPRESSION"), Support::Ignored),
    kw("krbsrvname", Some("PGKRBSRVNAME"), Support::Ignored),
    kw("gsslib", Some("PGGSSLIB"), Support::Ignored),
    kw("gssdelegation", Some("PGGSSDELEGATION"), Support::Ignored),
    kw(
        "passfile",
        Some("PGPASSFILE"),
        Support::Refused("walbridge reads no password file: put the password in the URL or in PGPASSWORD"),
    ),
    kw(
        "service",
        Some("PGSERVICE"),
        Support::Refused("walbridge reads no service file: write the service's parameters in the URL"),
    ),
    kw(
        "require_auth",
        Some("PGREQUIREAUTH"),
        Support::Refused("walbridge cannot restrict the authentication methods (require_auth)"),
    ),
    kw(
        "requirepeer",
        Some("PGREQUIREPEER"),
        Support::Refused("walbridge cannot check the server process's user (requirepeer)"),
    ),
    kw(
        "sslcrl",
        Some("PGSSLCRL"),
        Support::Refused("walbridge does not check certificate revocation lists (sslcrl)"),
    ),
    kw(
        "sslcrldir",
        Some("PGSSLCRLDIR"),
        Support::Refused("walbridge does not check certificate revocation lists (sslcrldir)"),
    ),
    kw(
        "sslpassword",
        None,
        Support::Refused(
            "walbridge cannot read an encrypted client key (sslpassword): decrypt it into a file of mode 0600",
        ),
    ),
    kw(
        "sslkeylogfile",
        Some("PGSSLKEYLOGFILE"),
        Support::Refused("walbridge never writes TLS session keys (sslkeylogfile)"),
    ),
    kw(
        "replication",
        None,
        Support::Refused("walbridge opens its replication connections itself"),
    ),
    kw(
        "min_protocol_version",
        Some("PGMINPROTOCOLVERSION"),
        Support::Refused("walbridge speaks protocol 3.0 only"),
    ),
    kw(
        "max_protocol_version",
        Some("PGMAXPROTOCOLVERSION"),
        Support::Refused("walbridge speaks protocol 3.0 only"),
    ),
    kw(
        "oauth_issuer",
        None,
        Support::Refused("walbridge does not do OAuth authentication"),
    ),
    kw(
        "oauth_client_id",
        None,
        Support::Refused("walbridge does not do OAuth authentication"),
    ),
    kw(
        "oauth_client_secret",
        None,
        Support::Refused("walbridge does not do OAuth authentication"),
    ),
    kw(
        "oauth_scope",
        None,
        Support::Refused("walbridge does not do OAuth authentication"),
    ),
];

/// The keyword named `name`, if libpq knows it.
pub fn keyword(name: &str) -> Option<&'static Keyword> {
    KEYWORDS.iter().find(|k| k.name == name)
}

/// One parameter's value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameter {
    pub name: &'static str,
    pub value: String,
    /// The variable it came from, when the connection string did not set it.
    pub from_env: Option<&'static str>,
}

/// The parameters of one connection string, each from the string or else
/// from its `PG*` variable (the string wins, as in libpq), checked against
/// [`KEYWORDS`]; errors name the setting.
pub struct Parameters<'a> {
    setting: &'a str,
    given: BTreeMap<&'static str, String>,
    env: &'a dyn Environment,
}

impl<'a> Parameters<'a> {
    /// Parses `raw` (the value of `setting`): unknown keywords are refused
    /// as libpq refuses them, and so are keywords walbridge cannot honour,
    /// set in the string or in their variable.
    pub fn read(setting: &'a str, raw: &str, env: &'a dyn Environment) -> Result<Parameters<'a>, SettingError> {
        let pairs = parse(raw).map_err(|e| SettingError::new(setting, e.0))?;
        let mut given = BTreeMap::new();
        for (name, value) in pairs {
            let keyword = keyword(&name)
                .ok_or_else(|| SettingError::new(setting, format!("\"{name}\" is not a libpq connection parameter")))?;
            if let Support::Refused(why) = keyword.support {
                return Err(SettingError::new(setting, format!("parameter {name}: {why}")));
            }
            // An empty value is no value: the variable or default applies.
            if value.is_empty() {
                given.remove(keyword.name);
            } else {
                given.insert(keyword.name, value);
            }
        }
        for keyword in KEYWORDS {
            if let (Support::Refused(why), Some(var)) = (keyword.support, keyword.env)
                && !given.contains_key(keyword.name)
                && env.var(var).is_some_and(|v| !v.is_empty())
            {
                return Err(SettingError::new(
                    setting,
                    format!("{var} is set in the environment: {why}"),
                ));
            }
        }
        Ok(Parameters { setting, given, env })
    }

    /// The value of `name`: the string's, else its variable's.
    pub fn get(&self, name: &str) -> Option<Parameter> {
        let keyword = keyword(name).expect("a keyword from the table");
        if let Some(value) = self.given.get(keyword.name) {
            return Some(Parameter {
                name: keyword.name,
                value: value.clone(),
                from_env: None,
            });
        }
        let var = keyword.env?;
        let value = self.env.var(var).filter(|v| !v.is_empty())?;
        Some(Parameter {
            name: keyword.name,
            value,
            from_env: Some(var),
        })
    }

    /// "parameter sslmode (from PGSSLMODE): "verify_full" is not ...":
    /// never the value of a password.
    pub fn invalid(&self, parameter: &Parameter, problem: &str) -> SettingError {
        let origin = parameter
            .from_env
            .map(|var| format!(" (from {var})"))
            .unwrap_or_default();
        let value = if parameter.name == "password" {
            String::new()
        } else {
            format!("\"{}\" ", parameter.value)
        };
        SettingError::new(
            self.setting,
            format!("parameter {}{origin}: {value}{problem}", parameter.name),
        )
    }

    /// A problem of the connection string as a whole.
    pub fn problem(&self, problem: impl Into<String>) -> SettingError {
        SettingError::new(self.setting, problem)
    }
}

/// Reads a connection string in either spelling into keyword/value pairs,
/// in the order given (a later pair overrides an earlier one, as in libpq).
/// Keywords are not checked here.
pub fn parse(raw: &str) -> Result<Vec<(String, String)>, SyntaxError> {
    let trimmed = raw.trim_start();
    for prefix in ["postgresql://", "postgres://"] {
        if let Some(rest) = trimmed.strip_prefix(prefix) {
            return parse_url(rest);
        }
    }
    parse_keyword_values(raw)
}

/// `keyword = value ...`: values may be single-quoted; a backslash takes
/// the next character literally, quoted or not.
fn parse_keyword_values(raw: &str) -> Result<Vec<(String, String)>, SyntaxError> {
    let mut pairs = Vec::new();
    let mut chars = raw.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            name.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(SyntaxError(format!(
                "missing \"=\" after \"{name}\" in the connection string"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(unterminated(&name)),
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(unterminated(&name)),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((name, value));
    }
}

fn unterminated(name: &str) -> SyntaxError {
    SyntaxError(format!(
        "the quoted value of \"{name}\" is not terminated in the connection string"
    ))
}

/// `[user[:password]@][host][:port][,...][/dbname][?keyword=value&...]`,
/// every part percent-decoded, as libpq reads it.
fn parse_url(rest: &str) -> Result<Vec<(String, String)>, SyntaxError> {
    let mut pairs = Vec::new();
    // The user information ends at the last '@' before the first '/'
    // (libpq looks no further: a '/' in a password must be encoded).
    let slash = rest.find('/').unwrap_or(rest.len());
    let (userinfo, after_user) = match rest[..slash].rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let hosts_end = after_user.find(['/', '?']).unwrap_or(after_user.len());
    let (hosts, after_hosts) = after_user.split_at(hosts_end);
    let (path, query) = match after_hosts.strip_prefix('/') {
        Some(path_and_query) => match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        },
        None => ("", after_hosts.strip_prefix('?')),
    };
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        let user =
            decode(user).map_err(|_| SyntaxError("the user name in the URL is not valid percent-encoding".into()))?;
        if !user.is_empty() {
            pairs.push(("user".to_owned(), user));
        }
        if let Some(password) = password {
            // Never say what was wrong with it: it is the password.
            let password = decode(password)
                .map_err(|_| SyntaxError("the password in the URL is not valid percent-encoding".into()))?;
            if !password.is_empty() {
                pairs.push(("password".to_owned(), password));
            }
        }
    }
    let (host_list, port_list) = parse_hosts(hosts)?;
    if host_list.iter().any(|h| !h.is_empty()) {
        pairs.push(("host".to_owned(), host_list.join(",")));
    }
    if port_list.iter().any(|p| !p.is_empty()) {
        pairs.push(("port".to_owned(), port_list.join(",")));
    }
    if !path.is_empty() {
        pairs.push((
            "dbname".to_owned(),
            decode(path).map_err(|e| url_error("database name", &e))?,
        ));
    }
    if let Some(query) = query {
        for parameter in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = parameter.split_once('=').ok_or_else(|| {
                SyntaxError(format!(
                    "the URL parameter \"{}\" has no \"=\"",
                    decode(parameter).unwrap_or_default()
                ))
            })?;
            let name = decode(name).map_err(|e| url_error("parameter name", &e))?;
            if value.contains('=') {
                return Err(SyntaxError(format!(
                    "the URL parameter \"{name}\" has more than one \"=\""
                )));
            }
            let value = if name == "password" {
                decode(value)
                    .map_err(|_| SyntaxError("the password in the URL is not valid percent-encoding".into()))?
            } else {
                decode(value).map_err(|e| url_error(&format!("value of \"{name}\""), &e))?
            };
            // libpq's concession to JDBC URLs.
            if name == "ssl" && value == "true" {
                pairs.push(("sslmode".to_owned(), "require".to_owned()));
            } else {
                pairs.push((name, value));
            }
        }
    }
    Ok(pairs)
}

/// `host[:port],...`: a host may be a bracketed IPv6 address.
fn parse_hosts(hosts: &str) -> Result<(Vec<String>, Vec<String>), SyntaxError> {
    let mut names = Vec::new();
    let mut ports = Vec::new();
    if hosts.is_empty() {
        return Ok((names, ports));
    }
    for spec in hosts.split(',') {
        let (name, port) = if let Some(inner) = spec.strip_prefix('[') {
            let (address, after) = inner
                .split_once(']')
                .ok_or_else(|| SyntaxError("an IPv6 host address in the URL lacks its closing \"]\"".to_owned()))?;
            if address.is_empty() {
                return Err(SyntaxError("the URL has an empty IPv6 address in \"[]\"".to_owned()));
            }
            let port = match after {
                "" => "",
                _ => after.strip_prefix(':').ok_or_else(|| {
                    SyntaxError(format!(
                        "unexpected \"{after}\" after the IPv6 address [{address}] in the URL"
                    ))
                })?,
            };
            (address.to_owned(), port)
        } else {
            match spec.rsplit_once(':') {
                Some((name, port)) => (decode(name).map_err(|e| url_error("host", &e))?, port),
                None => (decode(spec).map_err(|e| url_error("host", &e))?, ""),
            }
        };
        names.push(name);
        ports.push(decode(port).map_err(|e| url_error("port", &e))?);
    }
    Ok((names, ports))
}

fn url_error(part: &str, problem: &str) -> SyntaxError {
    SyntaxError(format!("the {part} in the URL {problem}"))
}

/// Percent-decoding as libpq does it: `%00` and bad escapes are errors.
fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "has an invalid percent-encoded token".to_owned())?;
            if hex == 0 {
                return Err("has a forbidden %00".to_owned());
            }
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8 once decoded".to_owned())
}

/// Writes keyword/value pairs as one libpq connection string: each value
/// single-quoted, with `\` and `'` escaped by a backslash.
pub fn render<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    pairs
        .into_iter()
        .map(|(name, value)| format!("{name}={}", quote(value)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One value quoted for a libpq connection string.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(raw: &str) -> Vec<(String, String)> {
        parse(raw).unwrap_or_else(|e| panic!("{raw}: {e:?}"))
    }

    fn p(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn urls_are_percent_decoded_in_every_part() {
        assert_eq!(
            pairs("postgresql://us%40er:p%2Fw%3Ad@db.example:6432/my%20db?sslmode=verify-full&application_name=a%26b"),
            p(&[
                ("user", "us@er"),
                ("password", "p/w:d"),
                ("host", "db.example"),
                ("port", "6432"),
                ("dbname", "my db"),
                ("sslmode", "verify-full"),
                ("application_name", "a&b"),
            ])
        );
        assert_eq!(
            pairs("postgres://%2Fvar%2Frun%2Fpostgresql/app"),
            p(&[("host", "/var/run/postgresql"), ("dbname", "app")])
        );
        assert_eq!(
            pairs("postgres:///app?host=/tmp&port=5433"),
            p(&[("dbname", "app"), ("host", "/tmp"), ("port", "5433")])
        );
        assert_eq!(
            pairs("postgres://[::1]:5433/app"),
            p(&[("host", "::1"), ("port", "5433"), ("dbname", "app")])
        );
        assert_eq!(
            pairs("postgres://h/d?ssl=true"),
            p(&[("host", "h"), ("dbname", "d"), ("sslmode", "require")])
        );
        assert_eq!(pairs("postgres://"), p(&[]));
        // Several hosts come through as libpq's lists; Database refuses them.
        assert_eq!(
            pairs("postgres://a:1,b:2/d"),
            p(&[("host", "a,b"), ("port", "1,2"), ("dbname", "d")])
        );
    }

    #[test]
    fn keyword_values_take_quotes_and_backslashes() {
        assert_eq!(
            pairs(r"host=db.example  port = 5432"),
            p(&[("host", "db.example"), ("port", "5432")])
        );
        assert_eq!(
            pairs(r"password='it\'s a \\ secret' dbname = '' user=a\ b"),
            p(&[("password", r"it's a \ secret"), ("dbname", ""), ("user", "a b")])
        );
    }

    #[test]
    fn syntax_errors_never_show_the_password() {
        for raw in [
            "postgres://app:s3cr%zzet@h/d",
            "postgres://app@h/d?password=s3cr%zzet",
            "host=h password='s3cret",
        ] {
            let error = parse(raw).unwrap_err();
            assert!(!error.0.contains("s3cr"), "{raw}: {error:?}");
        }
        assert!(parse("host").unwrap_err().0.contains("missing \"=\""));
        assert!(parse("postgres://h/d?sslmode").unwrap_err().0.contains("no \"=\""));
        assert!(parse("postgres://h/d?a=b=c").unwrap_err().0.contains("more than one"));
        assert!(parse("postgres://[::1/d").unwrap_err().0.contains("closing"));
        assert!(parse("postgres://h/d%00").unwrap_err().0.contains("%00"));
    }

    #[test]
    fn rendered_strings_read_back_as_written() {
        let values = [
            ("host", "db.example"),
            ("password", r"it's a \ 'secret'"),
            ("dbname", ""),
            ("user", "a b"),
        ];
        let rendered = render(values);
        assert_eq!(
            rendered,
            r"host='db.example' password='it\'s a \\ \'secret\'' dbname='' user='a b'"
        );
        assert_eq!(pairs(&rendered), p(&values));
    }
}
