"""The database itself refuses UPDATE and DELETE on audit events (PostgreSQL and SQLite triggers).

TRUNCATE is left to privileges: in production the application's role should not own the table (the
test suite's teardown truncates it)."""
from django.db import migrations

PG_FORWARD = """
CREATE OR REPLACE FUNCTION governance_auditevent_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER governance_auditevent_no_update_delete
    BEFORE UPDATE OR DELETE ON governance_auditevent
    FOR EACH ROW EXECUTE FUNCTION governance_auditevent_append_only();
"""
PG_REVERSE = """
DROP TRIGGER IF EXISTS governance_auditevent_no_update_delete ON governance_auditevent;
DROP FUNCTION IF EXISTS governance_auditevent_append_only();
"""
SQLITE_FORWARD = [
    """CREATE TRIGGER IF NOT EXISTS governance_auditevent_no_update BEFORE UPDATE ON governance_auditevent
       BEGIN SELECT RAISE(ABORT, 'audit events are append-only (UPDATE refused)'); END;""",
    """CREATE TRIGGER IF NOT EXISTS governance_auditevent_no_delete BEFORE DELETE ON governance_auditevent
       BEGIN SELECT RAISE(ABORT, 'audit events are append-only (DELETE refused)'); END;""",
]
SQLITE_REVERSE = [
    "DROP TRIGGER IF EXISTS governance_auditevent_no_update;",
    "DROP TRIGGER IF EXISTS governance_auditevent_no_delete;",
]


def forwards(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_FORWARD, params=None)
    elif vendor == "sqlite":
        for statement in SQLITE_FORWARD:
            schema_editor.execute(statement, params=None)
    else:
        raise RuntimeError(f"no append-only guard for {vendor}: add one before running Tollgate on it")


def backwards(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    statements = [PG_REVERSE] if vendor == "postgresql" else SQLITE_REVERSE
    for statement in statements:
        schema_editor.execute(statement, params=None)


class Migration(migrations.Migration):
    dependencies = [("governance", "0001_initial")]
    operations = [migrations.RunPython(forwards, backwards)]
