//! From the source's catalog and the operator's selection to what the
//! migration copies: the tables the publication covers (top-level tables:
//! partitioned roots and ordinary tables), the leaves whose rows are
//! copied (ordinary tables and partitions), what pg_dump leaves out, and
//! the materialized views to refresh.

use std::collections::BTreeMap;

use walbridge_migration::copy::page_ranges;
use walbridge_migration::ident::QualifiedName;
use walbridge_migration::selection::{Selection, SelectionError};
use walbridge_proto::convert::name_from_wire;
use walbridge_proto::v1 as wire;

use crate::migration::{TableRecord, TableState};

/// PostgreSQL's page size, to turn a byte size into pages.
const PAGE_BYTES: u64 = 8192;

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub publication_tables: Vec<QualifiedName>,
    pub dump_exclude: Vec<QualifiedName>,
    pub materialized_views: Vec<QualifiedName>,
    pub tables: Vec<TableRecord>,
}

/// `split_bytes`: tables larger than this are copied as page ranges of about
/// this size.
pub fn plan(catalog: Vec<wire::SourceTable>, selection: &Selection, split_bytes: u64) -> Result<Plan, SelectionError> {
    let mut parents = BTreeMap::new();
    let mut relations = Vec::new();
    let mut materialized_views = Vec::new();
    for table in catalog {
        let Some(name) = table.name.clone().map(name_from_wire) else {
            continue;
        };
        if table.materialized_view {
            materialized_views.push(name);
            continue;
        }
        if let Some(parent) = table.parent.clone().map(name_from_wire) {
            parents.insert(name.clone(), parent);
        }
        relations.push((name, table));
    }
    let root_of = |name: &QualifiedName| {
        let mut root = name.clone();
        while let Some(parent) = parents.get(&root) {
            root = parent.clone();
        }
        root
    };
    let top_level: Vec<QualifiedName> = relations
        .iter()
        .filter(|(name, _)| !parents.contains_key(name))
        .map(|(name, _)| name.clone())
        .collect();
    let selected = selection.resolve(&top_level)?;
    let mut selected_sorted = selected.clone();
    selected_sorted.sort();
    let is_selected = |name: &QualifiedName| selected_sorted.binary_search(&root_of(name)).is_ok();

    let dump_exclude = relations
        .iter()
        .filter(|(name, _)| !is_selected(name))
        .map(|(name, _)| name.clone())
        .collect();
    let tables = relations
        .into_iter()
        .filter(|(name, table)| table.kind == "r" && is_selected(name))
        .map(|(name, table)| {
            // What a copy reads: the rows and the TOAST values they point
            // to. A TOAST-heavy table with few heap pages is split too,
            // its ranges of heap pages each carrying their share of it.
            let copy_bytes = table.size_bytes + table.toast_bytes;
            let ranges = if copy_bytes > split_bytes {
                // relpages is an estimate; the size is exact.
                let pages = table.pages.max(table.size_bytes / PAGE_BYTES).max(1);
                let wanted = copy_bytes.div_ceil(split_bytes.max(1));
                page_ranges(pages, pages.div_ceil(wanted).max(1))
            } else {
                Vec::new()
            };
            let root = root_of(&name);
            TableRecord {
                root: (root != name).then_some(root),
                size_bytes: copy_bytes,
                name,
                columns: table
                    .columns
                    .into_iter()
                    .filter(|c| !c.generated)
                    .map(|c| c.name)
                    .collect(),
                ranges,
                state: TableState::Pending,
                rows: 0,
                bytes: 0,
                wire_bytes: 0,
                copy_seconds: 0.0,
                copy_attempts: 0,
            }
        })
        .collect();
    Ok(Plan {
        publication_tables: selected,
        dump_exclude,
        materialized_views,
        tables,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use walbridge_proto::convert::name_to_wire;

    fn table(name: &str, size_bytes: u64, pages: u64, toast_bytes: u64) -> wire::SourceTable {
        wire::SourceTable {
            name: Some(name_to_wire(QualifiedName::new("public", name))),
            kind: "r".to_owned(),
            size_bytes,
            pages,
            toast_bytes,
            ..Default::default()
        }
    }

    #[test]
    fn a_table_is_split_by_what_its_copy_reads_toast_included() {
        const MB: u64 = 1 << 20;
        let catalog = vec![
            // 8 MB of rows pointing to 56 MB of TOAST: eight ranges of
            // its 1024 heap pages, 128 each.
            table("documents", 8 * MB, 1024, 56 * MB),
            table("small", MB, 128, 0),
        ];
        let planned = plan(catalog, &Selection::default(), 8 * MB).unwrap();
        let documents = planned.tables.iter().find(|t| t.name.name == "documents").unwrap();
        assert_eq!(documents.size_bytes, 64 * MB);
        assert_eq!(documents.ranges.len(), 8, "{:?}", documents.ranges);
        assert_eq!(documents.ranges[1].first_page, 128);
        let small = planned.tables.iter().find(|t| t.name.name == "small").unwrap();
        assert!(small.ranges.is_empty());
    }
}
