//! pg_dump's plain SQL, split into statements as they arrive, so the
//! controller (which has no psql) can run them one by one and report the
//! exact statement the target rejects.
//!
//! The lexer knows what pg_dump emits with `standard_conforming_strings`
//! on: `'...'` strings (`''` inside), `E'...'` strings (backslash escapes),
//! `"..."` identifiers, `$tag$...$tag$` bodies, `--` comments and nested
//! `/* */` comments. psql's `\restrict` / `\unrestrict` lines (pg_dump since
//! 17.6, 16.10, 15.14, 14.19, 13.22) are skipped; any other meta-command is
//! refused, since there is no psql to run it.
//!
//! Each statement carries the dump entry it belongs to, read from the
//! header comment pg_dump writes before every entry
//! (`-- Name: items; Type: TABLE; Schema: shop; Owner: -`), so that a
//! rejected statement can be named and an entry left out (`--skip`).

/// One statement, without its terminating semicolon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub text: String,
    /// The line of the script on which the statement starts (1-based).
    pub line: usize,
    /// The dump entry the statement belongs to; `None` for the session
    /// settings (`SET ...`, `set_config(...)`) pg_dump writes between
    /// entries, which belong to none.
    pub entry: Option<Entry>,
}

/// One entry of pg_dump's table of contents, as its header names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `TABLE`, `EXTENSION`, `EVENT TRIGGER`, `COMMENT`, `FK CONSTRAINT`, ...
    pub kind: String,
    /// `None` for objects outside schemas (pg_dump writes `-`).
    pub schema: Option<String>,
    /// As pg_dump writes it, unquoted: `items`, `items items_pkey` (a
    /// constraint: its table, then its name), `EXTENSION hstore` (a comment).
    pub name: String,
}

impl Entry {
    /// `TYPE SCHEMA.NAME` (or `TYPE NAME` outside schemas): how findings
    /// name the entry and how `--skip` names it back.
    pub fn label(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{} {schema}.{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }

    /// Reads a header comment's text (after `--`), if it is one.
    fn from_header(comment: &str) -> Option<Entry> {
        let rest = comment.trim_start().strip_prefix("Name: ")?;
        let (name, rest) = rest.rsplit_once("; Type: ")?;
        let (kind, rest) = rest.split_once("; Schema: ")?;
        // `Owner:` is empty with --no-owner; `Tablespace:` comes last.
        let schema = rest.split("; Owner:").next()?.split("; Tablespace:").next()?.trim_end();
        Some(Entry {
            kind: kind.to_owned(),
            schema: (schema != "-").then(|| schema.to_owned()),
            name: name.to_owned(),
        })
    }
}

/// Whether a statement only sets the session up (pg_dump writes these
/// between entries): it belongs to no entry and is never left out.
pub fn is_session_setting(text: &str) -> bool {
    let upper: String = text.chars().take(40).collect::<String>().to_ascii_uppercase();
    upper.starts_with("SET ") || upper.starts_with("SELECT PG_CATALOG.SET_CONFIG(")
}

/// The parameter a session setting sets: `transaction_timeout` for `SET
/// transaction_timeout = 0`, `search_path` for `SELECT
/// pg_catalog.set_config('search_path', '', false)`.
pub fn session_setting_name(text: &str) -> Option<String> {
    let text = text.trim_start();
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SET ") {
        text[4..]
            .trim_start()
            .split(|c: char| c == '=' || c.is_whitespace())
            .next()?
    } else if upper.starts_with("SELECT PG_CATALOG.SET_CONFIG(") {
        text["SELECT PG_CATALOG.SET_CONFIG(".len()..]
            .trim_start()
            .strip_prefix('\'')?
            .split('\'')
            .next()?
    } else {
        return None;
    };
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    #[error("line {line}: the psql meta-command {command:?} cannot be run without psql")]
    UnsupportedMetaCommand { line: usize, command: String },
    #[error("line {line}: the script holds COPY data, which a schema dump never should")]
    CopyData { line: usize },
    #[error("the script ends inside {what} opened on line {line}")]
    Unterminated { what: &'static str, line: usize },
    #[error("line {line}: the script is not valid UTF-8")]
    NotUtf8 { line: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Outside any quote or comment.
    Code,
    /// In a line comment.
    LineComment,
    /// In a block comment at this depth.
    BlockComment(usize),
    /// In a `'...'` string; `true` for `E'...'`.
    Quoted {
        escapes: bool,
    },
    Identifier,
    /// In a dollar-quoted body closed by this tag (with its `$`s).
    Dollar(String),
    /// On a psql meta-command line, collecting it.
    MetaCommand,
}

/// The incremental splitter.
#[derive(Debug)]
pub struct ScriptSplitter {
    state: State,
    /// Undecoded bytes: a UTF-8 character may be cut by a chunk boundary.
    pending: Vec<u8>,
    /// Decoded characters not yet consumed (a token may need lookahead).
    input: Vec<char>,
    /// The statement being built.
    current: String,
    /// Line of the current statement's first token (0: none yet).
    start_line: usize,
    /// Line of the next character in `input`.
    line: usize,
    /// Line on which the open quote or comment started.
    opened_on: usize,
    meta: String,
    /// A comment line between statements, collected for its header.
    comment: Option<String>,
    /// The entry whose header came last.
    entry: Option<Entry>,
    /// Whether only blanks have been seen on the current line so far
    /// outside a statement (meta-commands start lines).
    at_line_start: bool,
    ended: bool,
}

impl Default for ScriptSplitter {
    fn default() -> Self {
        ScriptSplitter::new()
    }
}

impl ScriptSplitter {
    pub fn new() -> ScriptSplitter {
        ScriptSplitter {
            state: State::Code,
            pending: Vec::new(),
            input: Vec::new(),
            current: String::new(),
            start_line: 0,
            line: 1,
            opened_on: 0,
            meta: String::new(),
            comment: None,
            entry: None,
            at_line_start: true,
            ended: false,
        }
    }

    /// Adds bytes; returns the statements they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Statement>, ScriptError> {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(text) => text.len(),
            // An incomplete character at the end waits for the next chunk.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => return Err(ScriptError::NotUtf8 { line: self.line }),
        };
        let text = std::str::from_utf8(&self.pending[..valid]).expect("checked above");
        self.input.extend(text.chars());
        self.pending.drain(..valid);
        self.run()
    }

    /// The end of the script: what remained, including a last statement
    /// without `;`.
    pub fn finish(mut self) -> Result<Vec<Statement>, ScriptError> {
        if !self.pending.is_empty() {
            return Err(ScriptError::NotUtf8 { line: self.line });
        }
        self.ended = true;
        let mut done = self.run()?;
        match &self.state {
            State::Code => {}
            State::LineComment => self.end_comment(),
            State::MetaCommand => self.end_meta_command()?,
            State::BlockComment(_) => return Err(self.unterminated("a /* comment")),
            State::Quoted { .. } => return Err(self.unterminated("a quoted string")),
            State::Identifier => return Err(self.unterminated("a quoted identifier")),
            State::Dollar(_) => return Err(self.unterminated("a dollar-quoted body")),
        }
        if let Some(last) = self.take_statement()? {
            done.push(last);
        }
        Ok(done)
    }

    fn unterminated(&self, what: &'static str) -> ScriptError {
        ScriptError::Unterminated {
            what,
            line: self.opened_on,
        }
    }

    /// Consumes `input` as far as it can be decided; keeps an undecidable
    /// tail (e.g. a lone `$` or `-`) for the next chunk.
    fn run(&mut self) -> Result<Vec<Statement>, ScriptError> {
        let mut done = Vec::new();
        let mut i = 0;
        let input = std::mem::take(&mut self.input);
        while i < input.len() {
            let c = input[i];
            let next = input.get(i + 1).copied();
            // A token that needs one more character than we have waits,
            // unless the script has ended.
            let needs_lookahead = next.is_none() && !self.ended;
            let consumed = match self.state.clone() {
                State::Code => match c {
                    '\\' if self.at_line_start && self.current.trim().is_empty() => {
                        self.state = State::MetaCommand;
                        self.meta.clear();
                        self.meta.push(c);
                        1
                    }
                    ';' => {
                        if let Some(statement) = self.take_statement()? {
                            done.push(statement);
                        }
                        1
                    }
                    '-' | '/' if needs_lookahead => break,
                    '-' if next == Some('-') => {
                        self.state = State::LineComment;
                        if self.current.trim().is_empty() {
                            self.comment = Some(String::new());
                        }
                        self.keep_if_started("--");
                        2
                    }
                    '/' if next == Some('*') => {
                        self.state = State::BlockComment(1);
                        self.opened_on = self.line;
                        self.keep_if_started("/*");
                        2
                    }
                    '\'' => {
                        let escapes = self.current.ends_with(['E', 'e'])
                            && !self
                                .current
                                .chars()
                                .rev()
                                .nth(1)
                                .is_some_and(|p| p.is_alphanumeric() || p == '_' || p == '$');
                        self.open(State::Quoted { escapes }, c);
                        1
                    }
                    '"' => {
                        self.open(State::Identifier, c);
                        1
                    }
                    '$' => match self.dollar_tag(&input[i..]) {
                        DollarTag::Tag(tag) => {
                            let len = tag.chars().count();
                            self.open(State::Dollar(tag.clone()), '$');
                            self.current.push_str(&tag[1..]);
                            len
                        }
                        DollarTag::NotATag => {
                            self.code_char(c);
                            1
                        }
                        DollarTag::NeedMore => break,
                    },
                    _ => {
                        self.code_char(c);
                        1
                    }
                },
                State::LineComment => {
                    if c == '\n' {
                        self.end_comment();
                        self.state = State::Code;
                        self.code_char(c);
                    } else {
                        if let Some(comment) = &mut self.comment {
                            comment.push(c);
                        }
                        self.keep_if_started_char(c);
                    }
                    1
                }
                State::BlockComment(depth) => {
                    if (c == '*' || c == '/') && needs_lookahead {
                        break;
                    }
                    if c == '*' && next == Some('/') {
                        self.state = if depth == 1 {
                            State::Code
                        } else {
                            State::BlockComment(depth - 1)
                        };
                        self.keep_if_started("*/");
                        2
                    } else if c == '/' && next == Some('*') {
                        self.state = State::BlockComment(depth + 1);
                        self.keep_if_started("/*");
                        2
                    } else {
                        self.keep_if_started_char(c);
                        1
                    }
                }
                State::Quoted { escapes } => {
                    if escapes && c == '\\' {
                        if needs_lookahead {
                            break;
                        }
                        self.current.push(c);
                        if let Some(n) = next {
                            self.current.push(n);
                        }
                        2
                    } else if c == '\'' {
                        if needs_lookahead {
                            break;
                        }
                        self.current.push(c);
                        if next == Some('\'') {
                            self.current.push('\'');
                            2
                        } else {
                            self.state = State::Code;
                            1
                        }
                    } else {
                        self.current.push(c);
                        1
                    }
                }
                State::Identifier => {
                    if c == '"' {
                        if needs_lookahead {
                            break;
                        }
                        self.current.push(c);
                        if next == Some('"') {
                            self.current.push('"');
                            2
                        } else {
                            self.state = State::Code;
                            1
                        }
                    } else {
                        self.current.push(c);
                        1
                    }
                }
                State::Dollar(tag) => {
                    let len = tag.chars().count();
                    if c == '$' {
                        let available = input.len() - i;
                        if available < len && !self.ended {
                            break;
                        }
                        if input[i..].iter().take(len).copied().eq(tag.chars()) {
                            self.current.push_str(&tag);
                            self.state = State::Code;
                            len
                        } else {
                            self.current.push(c);
                            1
                        }
                    } else {
                        self.current.push(c);
                        1
                    }
                }
                State::MetaCommand => {
                    if c == '\n' {
                        self.end_meta_command()?;
                        self.state = State::Code;
                        self.code_char(c);
                    } else {
                        self.meta.push(c);
                    }
                    1
                }
            };
            for &consumed_char in &input[i..i + consumed] {
                if consumed_char == '\n' {
                    self.line += 1;
                }
            }
            i += consumed;
        }
        self.input = input[i..].to_vec();
        Ok(done)
    }

    /// A comment line between statements ends: a header starts an entry.
    fn end_comment(&mut self) {
        if let Some(comment) = self.comment.take()
            && let Some(entry) = Entry::from_header(&comment)
        {
            self.entry = Some(entry);
        }
    }

    fn open(&mut self, state: State, c: char) {
        self.begin_statement();
        self.opened_on = self.line;
        self.current.push(c);
        self.state = state;
        self.at_line_start = false;
    }

    fn begin_statement(&mut self) {
        if self.current.trim().is_empty() {
            self.current.clear();
            self.start_line = self.line;
        }
    }

    fn code_char(&mut self, c: char) {
        if c == '\n' {
            self.at_line_start = true;
        } else if !c.is_whitespace() {
            self.at_line_start = false;
        }
        if c.is_whitespace() && self.current.trim().is_empty() {
            // Blanks between statements are dropped.
            self.current.clear();
            return;
        }
        self.begin_statement();
        self.current.push(c);
    }

    /// Comments inside a statement stay; comments between statements go.
    fn keep_if_started(&mut self, text: &str) {
        if !self.current.trim().is_empty() {
            self.current.push_str(text);
        }
    }

    fn keep_if_started_char(&mut self, c: char) {
        if !self.current.trim().is_empty() {
            self.current.push(c);
        }
    }

    fn take_statement(&mut self) -> Result<Option<Statement>, ScriptError> {
        let text = std::mem::take(&mut self.current);
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let upper = text.to_ascii_uppercase();
        if upper.starts_with("COPY ") && upper.ends_with("FROM STDIN") {
            return Err(ScriptError::CopyData { line: self.start_line });
        }
        Ok(Some(Statement {
            entry: if is_session_setting(text) {
                None
            } else {
                self.entry.clone()
            },
            text: text.to_owned(),
            line: self.start_line,
        }))
    }

    fn end_meta_command(&mut self) -> Result<(), ScriptError> {
        let command = self.meta.trim().to_owned();
        let name = command.split_whitespace().next().unwrap_or_default();
        if name == "\\restrict" || name == "\\unrestrict" {
            return Ok(());
        }
        Err(ScriptError::UnsupportedMetaCommand {
            line: self.line,
            command: name.to_owned(),
        })
    }

    /// Whether `input` (starting at a `$`) opens a dollar quote.
    fn dollar_tag(&self, input: &[char]) -> DollarTag {
        // `a$b` and `$1` are not quotes.
        if self
            .current
            .chars()
            .last()
            .is_some_and(|p| p.is_alphanumeric() || p == '_' || p == '$')
        {
            return DollarTag::NotATag;
        }
        let mut tag = String::from("$");
        for (n, &c) in input.iter().enumerate().skip(1) {
            if c == '$' {
                tag.push('$');
                return DollarTag::Tag(tag);
            }
            let allowed = c.is_alphabetic() || c == '_' || (n > 1 && c.is_ascii_digit());
            if !allowed {
                return DollarTag::NotATag;
            }
            tag.push(c);
        }
        if self.ended {
            DollarTag::NotATag
        } else {
            DollarTag::NeedMore
        }
    }
}

enum DollarTag {
    Tag(String),
    NotATag,
    NeedMore,
}

/// Splits a whole script.
pub fn split(script: &str) -> Result<Vec<Statement>, ScriptError> {
    let mut splitter = ScriptSplitter::new();
    let mut statements = splitter.push(script.as_bytes())?;
    statements.extend(splitter.finish()?);
    Ok(statements)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_settings_name_their_parameter() {
        assert_eq!(
            session_setting_name("SET transaction_timeout = 0").as_deref(),
            Some("transaction_timeout")
        );
        assert_eq!(
            session_setting_name("SET default_tablespace = ''").as_deref(),
            Some("default_tablespace")
        );
        assert_eq!(
            session_setting_name("SELECT pg_catalog.set_config('search_path', '', false)").as_deref(),
            Some("search_path")
        );
        assert_eq!(
            session_setting_name("SET xmloption TO content").as_deref(),
            Some("xmloption")
        );
        assert_eq!(session_setting_name("CREATE TABLE t (id int)"), None);
    }

    fn texts(script: &str) -> Vec<String> {
        split(script).unwrap().into_iter().map(|s| s.text).collect()
    }

    #[test]
    fn semicolons_inside_quotes_comments_and_bodies_do_not_split() {
        assert_eq!(texts("SELECT 'a;b'; SELECT 2"), ["SELECT 'a;b'", "SELECT 2"]);
        assert_eq!(texts("SELECT 'it''s; ok';"), ["SELECT 'it''s; ok'"]);
        assert_eq!(texts(r"SELECT E'\'; still';"), [r"SELECT E'\'; still'"]);
        assert_eq!(texts(r"SELECT e'a\\';SELECT 1;"), [r"SELECT e'a\\'", "SELECT 1"]);
        // Not an E string: the backslash is plain.
        assert_eq!(texts(r"SELECT 'a\'; SELECT 1;"), [r"SELECT 'a\'", "SELECT 1"]);
        assert_eq!(
            texts(r#"CREATE TABLE "a;""b" (x int);"#),
            [r#"CREATE TABLE "a;""b" (x int)"#]
        );
        assert_eq!(
            texts("CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql;"),
            ["CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql"]
        );
        assert_eq!(
            texts("DO $fn$ BEGIN RAISE NOTICE '$$;'; PERFORM $x$;$x$; END $fn$; SELECT 1;"),
            [
                "DO $fn$ BEGIN RAISE NOTICE '$$;'; PERFORM $x$;$x$; END $fn$",
                "SELECT 1"
            ]
        );
        assert_eq!(
            texts("PREPARE p AS SELECT $1; SELECT a$b FROM t;"),
            ["PREPARE p AS SELECT $1", "SELECT a$b FROM t"]
        );
        assert_eq!(
            texts("SELECT 1 /* a /* nested; */ still; */ + 1;"),
            ["SELECT 1 /* a /* nested; */ still; */ + 1"]
        );
        assert_eq!(texts("SELECT 1 -- it's; fine\n+ 1;"), ["SELECT 1 -- it's; fine\n+ 1"]);
    }

    #[test]
    fn headers_between_statements_are_dropped_and_lines_counted() {
        let script = "--\n-- Name: t; Type: TABLE\n--\n\nCREATE TABLE t (x int);\n\n/* c */\nSELECT 1;\n";
        let statements = split(script).unwrap();
        assert_eq!(statements.len(), 2);
        assert_eq!(statements[0].text, "CREATE TABLE t (x int)");
        assert_eq!(statements[0].line, 5);
        assert_eq!(statements[1].text, "SELECT 1");
        assert_eq!(statements[1].line, 8);
    }

    #[test]
    fn restrict_lines_are_skipped_other_meta_commands_refused() {
        let script = "\\restrict AbC123\nSET x = 1;\n\\unrestrict AbC123\n";
        assert_eq!(texts(script), ["SET x = 1"]);
        assert_eq!(
            split("SET x = 1;\n\\connect other\n"),
            Err(ScriptError::UnsupportedMetaCommand {
                line: 2,
                command: "\\connect".into()
            })
        );
        // A backslash inside a statement is text.
        assert_eq!(texts("SELECT\n\\x;"), ["SELECT\n\\x"]);
    }

    #[test]
    fn unterminated_input_and_copy_data_are_errors() {
        assert!(matches!(split("SELECT 'open"), Err(ScriptError::Unterminated { .. })));
        assert!(matches!(split("SELECT $$ open"), Err(ScriptError::Unterminated { .. })));
        assert!(matches!(split("/* open"), Err(ScriptError::Unterminated { .. })));
        assert!(matches!(
            split("COPY t (a) FROM stdin;\n1\n\\.\n"),
            Err(ScriptError::CopyData { .. })
        ));
        assert_eq!(texts("SELECT 1"), ["SELECT 1"]);
        assert_eq!(texts("  -- only a comment\n"), Vec::<String>::new());
    }

    const DUMP: &str = r#"\restrict k3y
--
-- PostgreSQL database dump
--

SET statement_timeout = 0;
SET client_encoding = 'UTF8';
SELECT pg_catalog.set_config('search_path', '', false);

CREATE SCHEMA "Sales";
CREATE TYPE public.mood AS ENUM (
    'happy',
    'it''s; complicated'
);
CREATE DOMAIN public.email AS text
	CONSTRAINT email_check CHECK ((VALUE ~~ '%@%'::text));
CREATE FUNCTION public.audit() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO public.audit (note) VALUES ('created; by trigger');
    RETURN NEW;
END;
$$;
CREATE TABLE "größe"."Tabelle" (
    "Schlüssel" integer NOT NULL, -- the key; "quoted"
    "Wert" text
);
ALTER TABLE public.t ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.t_id_seq
    START WITH 1
    CACHE 1
);
COMMENT ON TABLE public.t IS 'it''s; fine';
CREATE VIEW public.v AS
 SELECT 'a;b'::text AS x, E'\n;'::text AS y;
\unrestrict k3y
"#;

    #[test]
    fn a_realistic_dump_splits_into_its_statements() {
        let statements = split(DUMP).unwrap();
        assert_eq!(statements.len(), 11);
        assert_eq!(statements[0].text, "SET statement_timeout = 0");
        assert_eq!(statements[0].line, 6);
        assert_eq!(
            statements[4].text,
            "CREATE TYPE public.mood AS ENUM (\n    'happy',\n    'it''s; complicated'\n)"
        );
        assert!(statements[6].text.ends_with("END;\n$$"), "{}", statements[6].text);
        assert!(statements[7].text.contains("-- the key; \"quoted\""));
        assert_eq!(statements[9].text, "COMMENT ON TABLE public.t IS 'it''s; fine'");
        assert_eq!(
            statements[10].text,
            "CREATE VIEW public.v AS\n SELECT 'a;b'::text AS x, E'\\n;'::text AS y"
        );
    }

    #[test]
    fn any_chunking_gives_the_same_statements() {
        let whole = split(DUMP).unwrap();
        let bytes = DUMP.as_bytes();
        for size in 1..=64 {
            let mut splitter = ScriptSplitter::new();
            let mut got = Vec::new();
            for chunk in bytes.chunks(size) {
                got.extend(splitter.push(chunk).unwrap());
            }
            got.extend(splitter.finish().unwrap());
            assert_eq!(got, whole, "chunks of {size} bytes");
        }
        for cut in 0..=bytes.len() {
            let mut splitter = ScriptSplitter::new();
            let mut got = splitter.push(&bytes[..cut]).unwrap();
            got.extend(splitter.push(&bytes[cut..]).unwrap());
            got.extend(splitter.finish().unwrap());
            assert_eq!(got, whole, "cut at byte {cut}");
        }
    }

    #[test]
    fn each_statement_carries_its_entry_from_the_header() {
        let script = "SET statement_timeout = 0;\n\
                      SELECT pg_catalog.set_config('search_path', '', false);\n\n\
                      --\n-- Name: shop; Type: SCHEMA; Schema: -; Owner: -\n--\n\n\
                      CREATE SCHEMA shop;\n\
                      SET default_tablespace = '';\n\n\
                      --\n-- Name: items items_pkey; Type: CONSTRAINT; Schema: shop; Owner: -\n--\n\n\
                      ALTER TABLE ONLY shop.items\n    ADD CONSTRAINT items_pkey PRIMARY KEY (id);\n\
                      --\n-- Name: EXTENSION hstore; Type: COMMENT; Schema: -; Owner: \n--\n\
                      COMMENT ON EXTENSION hstore IS 'x -- not a header';\n\
                      --\n-- Name: big; Type: TABLE; Schema: public; Owner: -; Tablespace: fast\n--\n\
                      CREATE TABLE public.big (\n-- Name: fake; Type: TABLE; Schema: public; Owner: -\nid int);\n\
                      ALTER TABLE public.big SET (fillfactor = 50);\n";
        let statements = split(script).unwrap();
        let labels: Vec<Option<String>> = statements.iter().map(|s| s.entry.as_ref().map(Entry::label)).collect();
        assert_eq!(
            labels,
            [
                None,
                None,
                Some("SCHEMA shop".to_owned()),
                None,
                Some("CONSTRAINT shop.items items_pkey".to_owned()),
                Some("COMMENT EXTENSION hstore".to_owned()),
                Some("TABLE public.big".to_owned()),
                // A header inside a statement is text, not a new entry.
                Some("TABLE public.big".to_owned()),
            ]
        );
        let comment = statements[5].entry.clone().unwrap();
        assert_eq!((comment.kind.as_str(), comment.schema), ("COMMENT", None));
        // Headers are found whatever the chunking.
        let bytes = script.as_bytes();
        for size in [1, 2, 3, 7] {
            let mut splitter = ScriptSplitter::new();
            let mut got = Vec::new();
            for chunk in bytes.chunks(size) {
                got.extend(splitter.push(chunk).unwrap());
            }
            got.extend(splitter.finish().unwrap());
            assert_eq!(got, statements, "chunks of {size} bytes");
        }
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let mut splitter = ScriptSplitter::new();
        assert!(matches!(
            splitter.push(b"SELECT '\xff';"),
            Err(ScriptError::NotUtf8 { .. })
        ));
    }
}
