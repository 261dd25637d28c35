//! pg_dump's post-data statements as a scheduler sees them: which tables
//! each one needs copied first, and which others it must not run beside.
//! That lets a table's indexes be built as soon as its data is in, while
//! other tables still copy, and several builds run at once.
//!
//! Only the forms pg_dump writes are recognised; anything else is
//! [`Needs::Everything`]: it waits until every table is copied and every
//! statement before it is done, and nothing after it starts before it
//! ends — the order of the script, as before.

use std::collections::HashMap;

use crate::ident::QualifiedName;

/// What one statement needs before it may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needs {
    /// Builds an index on this table (`SHARE` lock): it may run beside
    /// other index builds on the same table.
    Index(QualifiedName),
    /// Changes these tables' definitions without changing what a write
    /// to them does (a primary key, a unique constraint, a comment): it
    /// runs alone on each of them.
    Tables(Vec<QualifiedName>),
    /// Changes what writes to these tables do (a trigger, a foreign key, a
    /// check, a rule, a policy): alone on each, and never while the copy
    /// runs — a copy begun again after a lost snapshot empties and reloads
    /// tables, which a foreign key would refuse, a trigger fire on and a
    /// `NOT VALID` check reject.
    Writes(Vec<QualifiedName>),
    /// Not understood: runs alone, after everything before it.
    Everything,
}

impl Needs {
    /// The tables it needs copied (`None`: every table).
    pub fn tables(&self) -> Option<&[QualifiedName]> {
        match self {
            Needs::Index(table) => Some(std::slice::from_ref(table)),
            Needs::Tables(tables) | Needs::Writes(tables) => Some(tables),
            Needs::Everything => None,
        }
    }

    /// Whether it may run while other tables still copy.
    pub fn during_copy(&self) -> bool {
        matches!(self, Needs::Index(_) | Needs::Tables(_))
    }

    /// Whether `self`, later in the script, must wait for `earlier`.
    pub fn waits_for(&self, earlier: &Needs) -> bool {
        match (self, earlier) {
            (Needs::Everything, _) | (_, Needs::Everything) => true,
            // Index builds share their table.
            (Needs::Index(_), Needs::Index(_)) => false,
            (later, earlier) => {
                let (a, b) = (later.tables().unwrap_or(&[]), earlier.tables().unwrap_or(&[]));
                a.iter().any(|t| b.contains(t))
            }
        }
    }
}

/// What each statement needs, in the script's order. Indexes named later
/// (`COMMENT ON INDEX`, `ALTER INDEX ... ATTACH PARTITION`) are traced to
/// their tables through the statements that created them.
pub fn needs(statements: &[String]) -> Vec<Needs> {
    let mut indexes: HashMap<QualifiedName, QualifiedName> = HashMap::new();
    statements
        .iter()
        .map(|statement| classify(&tokens(statement), &mut indexes))
        .collect()
}

/// For each statement, the earlier ones it waits for: the last change to
/// each of its tables, for a change also the index builds on them since,
/// and the last statement that needs everything (for one of those: every
/// statement since the one before). Each of those waits for its own in
/// turn, so a statement follows every earlier one [`Needs::waits_for`]
/// names, while a scheduler checks a few statements per candidate instead
/// of every one before it (a dump of thousands of statements).
pub fn prerequisites(needs: &[Needs]) -> Vec<Vec<usize>> {
    #[derive(Default)]
    struct OnTable {
        last_change: Option<usize>,
        indexes_since: Vec<usize>,
    }
    let mut tables: HashMap<&QualifiedName, OnTable> = HashMap::new();
    let mut last_everything: Option<usize> = None;
    let mut since_everything: Vec<usize> = Vec::new();
    let mut all = Vec::with_capacity(needs.len());
    for (index, need) in needs.iter().enumerate() {
        let mut before: Vec<usize> = last_everything.into_iter().collect();
        match need {
            Needs::Everything => {
                before.append(&mut since_everything);
                tables.clear();
                last_everything = Some(index);
            }
            Needs::Index(table) => {
                let on = tables.entry(table).or_default();
                before.extend(on.last_change);
                on.indexes_since.push(index);
                since_everything.push(index);
            }
            Needs::Tables(list) | Needs::Writes(list) => {
                for table in list {
                    let on = tables.entry(table).or_default();
                    before.extend(on.last_change.replace(index));
                    before.append(&mut on.indexes_since);
                }
                since_everything.push(index);
            }
        }
        before.sort_unstable();
        before.dedup();
        all.push(before);
    }
    all
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// An unquoted word, upper-cased (keywords) — with its text as written.
    Word(String, String),
    /// A `"quoted"` identifier, unquoted.
    Quoted(String),
    Dot,
    /// Anything else: punctuation, literals, numbers.
    Other,
}

impl Token {
    fn is(&self, keyword: &str) -> bool {
        matches!(self, Token::Word(upper, _) if upper == keyword)
    }

    fn ident(&self) -> Option<&str> {
        match self {
            Token::Word(_, text) => Some(text),
            Token::Quoted(text) => Some(text),
            _ => None,
        }
    }
}

/// The statement's tokens; strings, comments and dollar-quoted bodies are
/// single `Other` tokens (nothing inside them is read as a name).
fn tokens(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '\'' {
            // '' inside; E'' strings' backslashes escape a quote too.
            let escapes = i > 0 && matches!(chars[i - 1], 'E' | 'e');
            i += 1;
            while i < chars.len() {
                if (escapes && chars[i] == '\\') || (chars[i] == '\'' && chars.get(i + 1) == Some(&'\'')) {
                    i += 2;
                } else if chars[i] == '\'' {
                    i += 1;
                    break;
                } else {
                    i += 1;
                }
            }
            out.push(Token::Other);
        } else if c == '"' {
            let mut name = String::new();
            i += 1;
            while i < chars.len() {
                if chars[i] == '"' && chars.get(i + 1) == Some(&'"') {
                    name.push('"');
                    i += 2;
                } else if chars[i] == '"' {
                    i += 1;
                    break;
                } else {
                    name.push(chars[i]);
                    i += 1;
                }
            }
            out.push(Token::Quoted(name));
        } else if c == '$'
            && let Some(tag_end) = dollar_tag_end(&chars, i)
        {
            let tag: String = chars[i..=tag_end].iter().collect();
            let mut j = tag_end + 1;
            loop {
                if j >= chars.len() {
                    i = chars.len();
                    break;
                }
                if chars[j..].starts_with(&tag.chars().collect::<Vec<_>>()) {
                    i = j + tag.chars().count();
                    break;
                }
                j += 1;
            }
            out.push(Token::Other);
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            out.push(Token::Word(word.to_uppercase(), word));
        } else if c == '.' {
            out.push(Token::Dot);
            i += 1;
        } else {
            out.push(Token::Other);
            i += 1;
        }
    }
    out
}

/// The end of a `$tag$` opening at `start`, if it is one.
fn dollar_tag_end(chars: &[char], start: usize) -> Option<usize> {
    let mut j = start + 1;
    while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
        j += 1;
    }
    (chars.get(j) == Some(&'$') && !chars[start + 1..j].first().is_some_and(|c| c.is_ascii_digit())).then_some(j)
}

/// A cursor over a statement's tokens.
struct Cursor<'a> {
    tokens: &'a [Token],
    at: usize,
}

impl Cursor<'_> {
    /// Takes `keyword` if it comes next.
    fn eat(&mut self, keyword: &str) -> bool {
        let next = self.tokens.get(self.at).is_some_and(|t| t.is(keyword));
        if next {
            self.at += 1;
        }
        next
    }

    /// Takes the keywords if they all come next, in order.
    fn eat_all(&mut self, keywords: &[&str]) -> bool {
        let fits = keywords
            .iter()
            .enumerate()
            .all(|(k, keyword)| self.tokens.get(self.at + k).is_some_and(|t| t.is(keyword)));
        if fits {
            self.at += keywords.len();
        }
        fits
    }

    /// A name, qualified or not (`schema.name`, `name`): its parts.
    fn name(&mut self) -> Option<(Option<String>, String)> {
        let first = self.tokens.get(self.at)?.ident()?.to_owned();
        if self.tokens.get(self.at + 1) == Some(&Token::Dot) {
            let second = self.tokens.get(self.at + 2)?.ident()?.to_owned();
            self.at += 3;
            Some((Some(first), second))
        } else {
            self.at += 1;
            Some((None, first))
        }
    }

    /// A schema-qualified name (pg_dump qualifies every table it names).
    fn qualified(&mut self) -> Option<QualifiedName> {
        match self.name()? {
            (Some(schema), name) => Some(QualifiedName::new(schema, name)),
            (None, _) => None,
        }
    }

    /// Moves past the next unquoted `keyword`; false if there is none.
    fn skip_to(&mut self, keyword: &str) -> bool {
        while let Some(token) = self.tokens.get(self.at) {
            self.at += 1;
            if token.is(keyword) {
                return true;
            }
        }
        false
    }
}

fn classify(tokens: &[Token], indexes: &mut HashMap<QualifiedName, QualifiedName>) -> Needs {
    recognise(tokens, indexes).unwrap_or(Needs::Everything)
}

fn recognise(tokens: &[Token], indexes: &mut HashMap<QualifiedName, QualifiedName>) -> Option<Needs> {
    let mut c = Cursor { tokens, at: 0 };
    if c.eat("CREATE") {
        c.eat_all(&["OR", "REPLACE"]);
        let unique = c.eat("UNIQUE");
        if c.eat("INDEX") {
            c.eat("CONCURRENTLY");
            c.eat_all(&["IF", "NOT", "EXISTS"]);
            let index = if c.tokens.get(c.at).is_some_and(|t| t.is("ON")) {
                None
            } else {
                Some(c.name()?.1)
            };
            if !c.eat("ON") {
                return None;
            }
            c.eat("ONLY");
            let table = c.qualified()?;
            if let Some(index) = index {
                indexes.insert(QualifiedName::new(table.schema.clone(), index), table.clone());
            }
            return Some(Needs::Index(table));
        }
        if unique {
            return None;
        }
        if c.eat("CONSTRAINT") || c.tokens.get(c.at).is_some_and(|t| t.is("TRIGGER")) {
            if !c.eat("TRIGGER") {
                return None;
            }
            c.name()?;
            if !c.skip_to("ON") {
                return None;
            }
            let table = c.qualified()?;
            let mut tables = vec![table];
            if c.skip_to("FROM") {
                tables.push(c.qualified()?);
            }
            return Some(Needs::Writes(tables));
        }
        if c.eat("POLICY") {
            c.name()?;
            return c
                .eat("ON")
                .then(|| c.qualified())
                .flatten()
                .map(|t| Needs::Writes(vec![t]));
        }
        if c.eat("RULE") {
            c.name()?;
            if !c.eat_all(&["AS", "ON"]) || !c.skip_to("TO") {
                return None;
            }
            return c.qualified().map(|t| Needs::Writes(vec![t]));
        }
        if c.eat("STATISTICS") {
            return c
                .skip_to("FROM")
                .then(|| c.qualified())
                .flatten()
                .map(|t| Needs::Tables(vec![t]));
        }
        return None;
    }
    if c.eat_all(&["ALTER", "TABLE"]) {
        c.eat_all(&["IF", "EXISTS"]);
        c.eat("ONLY");
        let table = c.qualified()?;
        if c.eat_all(&["ADD", "CONSTRAINT"]) {
            let constraint = c.name()?.1;
            if c.eat_all(&["PRIMARY", "KEY"]) || c.eat("UNIQUE") || c.eat("EXCLUDE") {
                // Its index has the constraint's name; the source's rows
                // already satisfy it.
                indexes.insert(QualifiedName::new(table.schema.clone(), constraint), table.clone());
                return Some(Needs::Tables(vec![table]));
            }
            if c.eat_all(&["FOREIGN", "KEY"]) {
                if !c.skip_to("REFERENCES") {
                    return None;
                }
                let referenced = c.qualified()?;
                return Some(Needs::Writes(vec![table, referenced]));
            }
            return Some(Needs::Writes(vec![table]));
        }
        if c.tokens[c.at..].iter().any(|t| t.is("REFERENCES")) {
            return None;
        }
        let definition_only = c.eat_all(&["CLUSTER", "ON"]) || c.eat_all(&["REPLICA", "IDENTITY"]);
        return Some(if definition_only {
            Needs::Tables(vec![table])
        } else {
            Needs::Writes(vec![table])
        });
    }
    if c.eat_all(&["ALTER", "INDEX"]) {
        let parent = indexes.get(&c.qualified()?)?.clone();
        if !c.eat_all(&["ATTACH", "PARTITION"]) {
            return None;
        }
        let child = indexes.get(&c.qualified()?)?.clone();
        return Some(Needs::Tables(vec![parent, child]));
    }
    if c.eat_all(&["COMMENT", "ON"]) {
        if c.eat("INDEX") {
            return indexes.get(&c.qualified()?).map(|t| Needs::Tables(vec![t.clone()]));
        }
        if c.eat("CONSTRAINT") || c.eat("TRIGGER") || c.eat("POLICY") || c.eat("RULE") {
            c.name()?;
            return c
                .eat("ON")
                .then(|| c.qualified())
                .flatten()
                .map(|t| Needs::Tables(vec![t]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(schema: &str, name: &str) -> QualifiedName {
        QualifiedName::new(schema, name)
    }

    fn one(statement: &str) -> Needs {
        needs(&[statement.to_owned()]).remove(0)
    }

    #[test]
    fn pg_dumps_post_data_forms_name_their_tables() {
        assert_eq!(
            one("CREATE INDEX orders_by_customer ON public.orders USING btree (customer_id)"),
            Needs::Index(t("public", "orders"))
        );
        assert_eq!(
            one("CREATE UNIQUE INDEX \"Big Idx\" ON ONLY \"Sales\".\"Order Lines\" USING btree (id)"),
            Needs::Index(t("Sales", "Order Lines"))
        );
        assert_eq!(
            one("ALTER TABLE ONLY public.orders\n    ADD CONSTRAINT orders_pkey PRIMARY KEY (id)"),
            Needs::Tables(vec![t("public", "orders")])
        );
        assert_eq!(
            one("ALTER TABLE ONLY public.t\n    ADD CONSTRAINT t_code_key UNIQUE (code)"),
            Needs::Tables(vec![t("public", "t")])
        );
        assert_eq!(
            one("ALTER TABLE public.t CLUSTER ON t_code_key"),
            Needs::Tables(vec![t("public", "t")])
        );
        assert_eq!(
            one(
                "ALTER TABLE ONLY public.orders\n    ADD CONSTRAINT orders_customer_fkey FOREIGN KEY (customer_id) \
                 REFERENCES public.customers(id) ON DELETE CASCADE"
            ),
            Needs::Writes(vec![t("public", "orders"), t("public", "customers")])
        );
        assert_eq!(
            one("ALTER TABLE public.orders\n    ADD CONSTRAINT positive CHECK ((amount > 0)) NOT VALID"),
            Needs::Writes(vec![t("public", "orders")])
        );
        assert_eq!(
            one("ALTER TABLE public.orders ENABLE ALWAYS TRIGGER audit"),
            Needs::Writes(vec![t("public", "orders")])
        );
        assert_eq!(
            one(
                "CREATE TRIGGER audit AFTER INSERT OR UPDATE OF amount ON public.orders FOR EACH ROW EXECUTE \
                 FUNCTION public.audit()"
            ),
            Needs::Writes(vec![t("public", "orders")])
        );
        assert_eq!(
            one(
                "CREATE CONSTRAINT TRIGGER c AFTER INSERT ON public.a FROM public.b DEFERRABLE FOR EACH ROW \
                 EXECUTE FUNCTION public.f()"
            ),
            Needs::Writes(vec![t("public", "a"), t("public", "b")])
        );
        assert_eq!(
            one("CREATE POLICY mine ON public.docs USING ((owner = CURRENT_USER))"),
            Needs::Writes(vec![t("public", "docs")])
        );
        assert_eq!(
            one("CREATE RULE r AS\n    ON INSERT TO public.log DO INSTEAD NOTHING"),
            Needs::Writes(vec![t("public", "log")])
        );
        assert_eq!(
            one("CREATE STATISTICS public.s (ndistinct) ON a, b FROM public.t"),
            Needs::Tables(vec![t("public", "t")])
        );
        assert_eq!(
            one("COMMENT ON CONSTRAINT orders_pkey ON public.orders IS 'the key; ON public.other'"),
            Needs::Tables(vec![t("public", "orders")])
        );
    }

    #[test]
    fn indexes_named_later_are_traced_to_their_tables() {
        let statements: Vec<String> = [
            "CREATE INDEX events_at ON ONLY public.events USING btree (at)",
            "ALTER TABLE ONLY public.events_2024 ADD CONSTRAINT events_2024_pkey PRIMARY KEY (id)",
            "CREATE INDEX events_2024_at_idx ON public.events_2024 USING btree (at)",
            "ALTER INDEX public.events_at ATTACH PARTITION public.events_2024_at_idx",
            "COMMENT ON INDEX public.events_2024_pkey IS 'key'",
            "ALTER INDEX public.unknown ATTACH PARTITION public.events_2024_at_idx",
        ]
        .map(str::to_owned)
        .to_vec();
        let needs = needs(&statements);
        assert_eq!(
            needs[3],
            Needs::Tables(vec![t("public", "events"), t("public", "events_2024")])
        );
        assert_eq!(needs[4], Needs::Tables(vec![t("public", "events_2024")]));
        assert_eq!(needs[5], Needs::Everything);
    }

    #[test]
    fn anything_else_waits_for_everything() {
        for statement in [
            "CREATE EVENT TRIGGER e ON ddl_command_end EXECUTE FUNCTION public.f()",
            "GRANT SELECT ON TABLE public.t TO reader",
            "CREATE INDEX i ON t USING btree (a)",
            "COMMENT ON INDEX public.never_created IS 'x'",
            "REFRESH MATERIALIZED VIEW public.m",
        ] {
            assert_eq!(one(statement), Needs::Everything, "{statement}");
        }
    }

    #[test]
    fn only_indexes_and_definitions_run_while_tables_still_copy() {
        assert!(Needs::Index(t("public", "a")).during_copy());
        assert!(Needs::Tables(vec![t("public", "a")]).during_copy());
        assert!(!Needs::Writes(vec![t("public", "a")]).during_copy());
        assert!(!Needs::Everything.during_copy());
    }

    #[test]
    fn prerequisites_order_statements_as_waits_for_does() {
        let (a, b, c) = (t("s", "a"), t("s", "b"), t("s", "c"));
        let needs = vec![
            Needs::Tables(vec![a.clone()]),
            Needs::Index(a.clone()),
            Needs::Index(a.clone()),
            Needs::Index(b.clone()),
            Needs::Writes(vec![a.clone(), b.clone()]),
            Needs::Index(c.clone()),
            Needs::Everything,
            Needs::Index(a.clone()),
            Needs::Tables(vec![c.clone()]),
            Needs::Writes(vec![a.clone()]),
            Needs::Everything,
            Needs::Index(b),
        ];
        let prerequisites = prerequisites(&needs);
        for (index, need) in needs.iter().enumerate() {
            // Every prerequisite is one it waits for...
            assert!(
                prerequisites[index]
                    .iter()
                    .all(|p| *p < index && need.waits_for(&needs[*p]))
            );
            // ...and every statement it waits for is a prerequisite or
            // comes before one (a chain of them).
            let mut reached = std::collections::BTreeSet::new();
            let mut frontier = prerequisites[index].clone();
            while let Some(p) = frontier.pop() {
                if reached.insert(p) {
                    frontier.extend(&prerequisites[p]);
                }
            }
            for earlier in (0..index).filter(|e| need.waits_for(&needs[*e])) {
                assert!(
                    reached.contains(&earlier),
                    "{index} does not follow {earlier}: {prerequisites:?}"
                );
            }
        }
        // Builds on one table do not wait for one another.
        assert_eq!(prerequisites[2], [0]);
        assert_eq!(prerequisites[4], [0, 1, 2, 3]);
        assert_eq!(prerequisites[6], [0, 1, 2, 3, 4, 5]);
        assert_eq!(prerequisites[7], [6]);
    }

    #[test]
    fn builds_share_a_table_changes_do_not() {
        let (orders, customers) = (t("public", "orders"), t("public", "customers"));
        let index = Needs::Index(orders.clone());
        let key = Needs::Tables(vec![orders.clone()]);
        let foreign = Needs::Writes(vec![t("public", "lines"), customers.clone()]);
        assert!(!index.waits_for(&Needs::Index(orders.clone())));
        assert!(!index.waits_for(&Needs::Index(customers.clone())));
        assert!(index.waits_for(&key) && key.waits_for(&index));
        assert!(!foreign.waits_for(&key));
        assert!(foreign.waits_for(&Needs::Index(customers)));
        assert!(index.waits_for(&Needs::Everything) && Needs::Everything.waits_for(&index));
    }
}
