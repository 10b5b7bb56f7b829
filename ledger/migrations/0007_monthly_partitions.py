"""PostgreSQL: turn the ledger into a table partitioned by month of created_at, keeping its data, indexes,
outgoing foreign keys and the no-UPDATE trigger. Other databases are left as they are."""
from datetime import date

from django.db import migrations

TABLE = "ledger_ledgerentry"


def partition(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    from ledger.partitions import ensure_partitions

    with schema_editor.connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexname <> %s", [TABLE, f"{TABLE}_pkey"])
        indexes = [row[0] for row in cursor.fetchall()]
        cursor.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'f'", [TABLE])
        foreign_keys = cursor.fetchall()
        cursor.execute(f"SELECT min(created_at)::date FROM {TABLE}")
        oldest = cursor.fetchone()[0] or date.today()
        cursor.execute(f"ALTER TABLE {TABLE} RENAME TO {TABLE}_unpartitioned")
        cursor.execute(
            f"CREATE TABLE {TABLE} (LIKE {TABLE}_unpartitioned INCLUDING DEFAULTS INCLUDING IDENTITY) "
            "PARTITION BY RANGE (created_at)")
        cursor.execute(f"CREATE TABLE {TABLE}_default PARTITION OF {TABLE} DEFAULT")
        ensure_partitions(start=oldest, cursor=cursor)
        cursor.execute(f"INSERT INTO {TABLE} OVERRIDING SYSTEM VALUE SELECT * FROM {TABLE}_unpartitioned")
        cursor.execute(f"DROP TABLE {TABLE}_unpartitioned CASCADE")
        cursor.execute(f"SELECT setval(pg_get_serial_sequence('{TABLE}', 'id'), coalesce(max(id), 0) + 1, false) FROM {TABLE}")
        # The primary key of a partitioned table must include the partition key.
        cursor.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_pkey PRIMARY KEY (id, created_at)")
        for definition in indexes:
            cursor.execute(definition)
        for name, definition in foreign_keys:
            cursor.execute(f'ALTER TABLE {TABLE} ADD CONSTRAINT "{name}" {definition}')
        cursor.execute(f"CREATE TRIGGER ledger_entry_no_update BEFORE UPDATE ON {TABLE} "
                       "FOR EACH ROW EXECUTE FUNCTION ledger_entry_immutable()")


class Migration(migrations.Migration):
    atomic = True
    dependencies = [("ledger", "0006_no_constraints_into_the_ledger")]
    operations = [migrations.RunPython(partition, migrations.RunPython.noop)]
