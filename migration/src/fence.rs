//! The durable part of the write fence on the source, as the agent seals
//! it and as anyone removes it: the schema that holds it, the trigger's
//! name, and the one script that lifts it (the agent runs it for
//! `release-source`; `abort --force` prints it for an operator whose agent
//! is gone).

/// The schema that holds the fence: its trigger function and what the
/// seal changed beyond the triggers (so that lifting it puts it back).
pub const SCHEMA: &str = "walbridge_fence";
/// The name of the fence's trigger on each table.
pub const TRIGGER: &str = "walbridge_fence";
/// The sequences the seal moved to their last value, with the state to
/// restore (`setval(name, value, is_called)`).
pub const SEQUENCES_TABLE: &str = "walbridge_fence.sequences";
/// The roles the hard fence made `NOLOGIN` (only those that could log in).
pub const ROLES_TABLE: &str = "walbridge_fence.roles";

/// Lifts the fence and puts back what the seal changed: sequences, then
/// roles, then the triggers (with the function) and the schema. Safe to
/// run again, and where no fence exists.
pub const RELEASE_SQL: &str = "\
DO $release$ DECLARE r record; BEGIN \
  IF to_regclass('walbridge_fence.sequences') IS NOT NULL THEN \
    FOR r IN SELECT name, value, is_called FROM walbridge_fence.sequences LOOP \
      IF to_regclass(r.name) IS NOT NULL THEN PERFORM setval(r.name::regclass, r.value, r.is_called); END IF; \
    END LOOP; \
  END IF; \
  IF to_regclass('walbridge_fence.roles') IS NOT NULL THEN \
    FOR r IN SELECT name FROM walbridge_fence.roles LOOP \
      IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.name) THEN \
        EXECUTE format('ALTER ROLE %I LOGIN', r.name); \
      END IF; \
    END LOOP; \
  END IF; \
END $release$; \
DROP SCHEMA IF EXISTS walbridge_fence CASCADE;";
