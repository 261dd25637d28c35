//! The SQL of the copy and of its verification, written once for both
//! sides: the agent reads the source with it, the controller writes and
//! checks the target with it, so both sides compute the same thing.

use crate::ident::{QualifiedName, quote_ident};

/// Session settings under which both sides render rows as text: COPY's
/// text format and the checksum's row text must not depend on either
/// server's defaults.
pub const SESSION_SETTINGS: &str = "SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; \
     SET extra_float_digits = 3; SET bytea_output = 'hex'; SET TimeZone = 'UTC'; \
     SET client_encoding = 'UTF8'; SET standard_conforming_strings = on";

/// Whether both sides compute a checksum with floats rounded to 15
/// significant digits (`extra_float_digits = 0`). Servers
/// before 12 print a float under `extra_float_digits = 3` (the copy's
/// setting, which loses nothing) with 17 significant digits, 12 and later
/// print the shortest text that reads back exactly: `0.1` is
/// `0.10000000000000001` on one side and `0.1` on the other. At 0 both
/// print 15 significant digits (`%.15g`, the same on every version), so a
/// pair that straddles 12 compares floats, and every type rendered with
/// them (arrays, composites, geometric types), to 15 digits instead of
/// never matching. A source whose version is not known (0) is treated as
/// straddling: a looser comparison is better than a false mismatch.
pub fn checksum_rounds_floats(source_version_num: u32, target_version_num: u32) -> bool {
    const SHORTEST_EXACT_FLOATS: u32 = 120000;
    (source_version_num >= SHORTEST_EXACT_FLOATS) != (target_version_num >= SHORTEST_EXACT_FLOATS)
}

/// The statement that sets a checksum session's float rendering (the
/// session starts with [`SESSION_SETTINGS`]).
pub fn checksum_setup(round_floats: bool) -> &'static str {
    if round_floats {
        "SET extra_float_digits = 0"
    } else {
        "SET extra_float_digits = 3"
    }
}

/// A ctid range of a table: pages `[first_page, end_page)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PageRange {
    pub first_page: u64,
    pub end_page: u64,
}

fn column_list(columns: &[String]) -> String {
    columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
}

/// `COPY ... TO STDOUT` for the source: the table's own rows (a partition's
/// or an inheritance parent's, never its children's), the given columns.
pub fn copy_out(table: &QualifiedName, columns: &[String], range: Option<PageRange>) -> String {
    match range {
        None => format!("COPY {} ({}) TO STDOUT", table.quoted(), column_list(columns)),
        Some(range) => format!(
            "COPY (SELECT {} FROM ONLY {} WHERE ctid >= '({},0)'::tid AND ctid < '({},0)'::tid) TO STDOUT",
            column_list(columns),
            table.quoted(),
            range.first_page,
            range.end_page
        ),
    }
}

/// `COPY ... FROM STDIN` for the target. `freeze` when the table was
/// emptied (or created) in the same transaction: the rows are written
/// frozen and all-visible, so the target's first reads and vacuums do not
/// rewrite every page to set hint bits and freeze them.
pub fn copy_in(table: &QualifiedName, columns: &[String], freeze: bool) -> String {
    let options = if freeze { " WITH (FREEZE)" } else { "" };
    format!("COPY {} ({}) FROM STDIN{options}", table.quoted(), column_list(columns))
}

/// Row count and an order-independent content checksum: the sum of a
/// 64-bit hash of each row's text. Returns `(rows bigint, checksum text)`.
pub fn checksum(table: &QualifiedName, columns: &[String]) -> String {
    let row = if columns.is_empty() {
        "''".to_owned()
    } else {
        format!("ROW({})::text", column_list(columns))
    };
    format!(
        "SELECT count(*)::int8, coalesce(sum(('x' || substr(md5({row}), 1, 16))::bit(64)::int8::numeric), 0)::text \
         FROM ONLY {}",
        table.quoted()
    )
}

/// Every large object's oid, size and md5, as both sides compute it (the
/// agent in the copy's snapshot, the controller on the target).
pub const LARGE_OBJECT_DIGESTS: &str = "SELECT m.oid::int8, length(d)::int8, md5(d) \
     FROM pg_largeobject_metadata m, LATERAL lo_get(m.oid) AS d ORDER BY m.oid";

/// Splits a table of `pages` pages into ranges of at most `pages_per_range`
/// (the last range is open-ended, so rows on pages added since the plan
/// are not missed).
pub fn page_ranges(pages: u64, pages_per_range: u64) -> Vec<PageRange> {
    if pages_per_range == 0 || pages <= pages_per_range {
        return vec![PageRange {
            first_page: 0,
            end_page: u64::from(u32::MAX),
        }];
    }
    let mut ranges = Vec::new();
    let mut first = 0;
    while first < pages {
        let end = first + pages_per_range;
        ranges.push(PageRange {
            first_page: first,
            end_page: if end >= pages { u64::from(u32::MAX) } else { end },
        });
        first = end;
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_compared_at_15_digits_only_across_12() {
        assert!(checksum_rounds_floats(110022, 180001));
        assert!(checksum_rounds_floats(100023, 150018));
        assert!(checksum_rounds_floats(0, 170000));
        assert!(!checksum_rounds_floats(120022, 180001));
        assert!(!checksum_rounds_floats(150018, 150018));
    }

    #[test]
    fn sql_quotes_every_name() {
        let t = QualifiedName::new("Sales", "order");
        let cols = vec!["id".to_owned(), "Total Amount".to_owned()];
        assert_eq!(
            copy_out(&t, &cols, None),
            "COPY \"Sales\".\"order\" (id, \"Total Amount\") TO STDOUT"
        );
        assert_eq!(
            copy_in(&t, &cols, false),
            "COPY \"Sales\".\"order\" (id, \"Total Amount\") FROM STDIN"
        );
        assert_eq!(
            copy_in(&t, &cols, true),
            "COPY \"Sales\".\"order\" (id, \"Total Amount\") FROM STDIN WITH (FREEZE)"
        );
        assert!(checksum(&t, &cols).contains("ROW(id, \"Total Amount\")::text"));
        assert!(checksum(&t, &cols).ends_with("FROM ONLY \"Sales\".\"order\""));
    }

    #[test]
    fn ranges_cover_every_page_and_leave_the_end_open() {
        assert_eq!(page_ranges(10, 100).len(), 1);
        let ranges = page_ranges(250, 100);
        assert_eq!(ranges.len(), 3);
        assert_eq!(
            ranges[0],
            PageRange {
                first_page: 0,
                end_page: 100
            }
        );
        assert_eq!(
            ranges[1],
            PageRange {
                first_page: 100,
                end_page: 200
            }
        );
        assert_eq!(ranges[2].first_page, 200);
        assert_eq!(ranges[2].end_page, u64::from(u32::MAX));
    }
}
