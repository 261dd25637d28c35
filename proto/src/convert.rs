//! Conversions between wire types and the migration's domain types, in
//! one place for both ends of every call.

use walbridge_migration::finding::{Finding, NamedRole, Severity, Side, SourceSchema};
use walbridge_migration::ident::QualifiedName;

use crate::v1 as wire;

pub fn name_from_wire(name: wire::TableName) -> QualifiedName {
    QualifiedName::new(name.schema, name.name)
}

pub fn name_to_wire(name: QualifiedName) -> wire::TableName {
    wire::TableName {
        schema: name.schema,
        name: name.name,
    }
}

impl From<Finding> for wire::Finding {
    fn from(finding: Finding) -> Self {
        wire::Finding {
            severity: match finding.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            }
            .to_owned(),
            side: match finding.side {
                Side::Source => "source",
                Side::Target => "target",
            }
            .to_owned(),
            check: finding.check,
            object: finding.object,
            message: finding.message,
            fix: finding.fix,
        }
    }
}

impl From<wire::Finding> for Finding {
    fn from(finding: wire::Finding) -> Self {
        Finding {
            severity: if finding.severity == "warning" {
                Severity::Warning
            } else {
                Severity::Error
            },
            side: if finding.side == "target" {
                Side::Target
            } else {
                Side::Source
            },
            check: finding.check,
            object: finding.object,
            message: finding.message,
            fix: finding.fix,
        }
    }
}

impl From<SourceSchema> for wire::SourceSchema {
    fn from(schema: SourceSchema) -> Self {
        wire::SourceSchema {
            name: schema.name,
            created_by_dump: schema.created_by_dump,
            has_objects: schema.has_objects,
        }
    }
}

impl From<wire::SourceSchema> for SourceSchema {
    fn from(schema: wire::SourceSchema) -> Self {
        SourceSchema {
            name: schema.name,
            created_by_dump: schema.created_by_dump,
            has_objects: schema.has_objects,
        }
    }
}

impl From<NamedRole> for wire::NamedRole {
    fn from(role: NamedRole) -> Self {
        wire::NamedRole {
            name: role.name,
            login: role.login,
            inherit: role.inherit,
            create_db: role.create_db,
            create_role: role.create_role,
            connection_limit: role.connection_limit,
            member_of: role.member_of,
        }
    }
}

impl From<wire::NamedRole> for NamedRole {
    fn from(role: wire::NamedRole) -> Self {
        NamedRole {
            name: role.name,
            login: role.login,
            inherit: role.inherit,
            create_db: role.create_db,
            create_role: role.create_role,
            connection_limit: role.connection_limit,
            member_of: role.member_of,
        }
    }
}
