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
            let ranges = if table.size_bytes > split_bytes {
                // relpages is an estimate; the size is exact.
                let pages = table.pages.max(table.size_bytes / PAGE_BYTES);
                page_ranges(pages, (split_bytes / PAGE_BYTES).max(1))
            } else {
                Vec::new()
            };
            let root = root_of(&name);
            TableRecord {
                root: (root != name).then_some(root),
                size_bytes: table.size_bytes,
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
