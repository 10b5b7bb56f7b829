"""Each call once: a unique (request_id, created_at) on the ledger, which the relay's inserts rely on.

Ledgers written before this may hold a call twice (a ledger write that timed out was written again with
the refusal). Those second rows are kept, as everything in the ledger is, under a marked request id
("<id>~dup<row id>") so the constraint can hold; `manage.py ledger_duplicates` style reports find them by
that mark, and finance corrects them with adjustments."""
from django.db import migrations, models

TABLE = "ledger_ledgerentry"


def mark_duplicates(apps, schema_editor):
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY request_id, created_at ORDER BY id) AS n "
            f"FROM {TABLE}) AS numbered WHERE n > 1")
        duplicates = [row[0] for row in cursor.fetchall()]
        if not duplicates:
            return
        postgres = connection.vendor == "postgresql"
        if postgres:
            cursor.execute(f"ALTER TABLE {TABLE} DISABLE TRIGGER ledger_entry_no_update")
        for entry_id in duplicates:
            cursor.execute(
                f"UPDATE {TABLE} SET request_id = SUBSTR(request_id, 1, 40) || '~dup' || CAST(id AS VARCHAR(20)) WHERE id = %s",
                [entry_id])
        if postgres:
            cursor.execute(f"ALTER TABLE {TABLE} ENABLE TRIGGER ledger_entry_no_update")


class Migration(migrations.Migration):
    dependencies = [("ledger", "0011_ledger_references_unconstrained")]

    operations = [
        migrations.RunPython(mark_duplicates, migrations.RunPython.noop),
        migrations.RemoveIndex(model_name="ledgerentry", name="ledger_request_idx"),
        migrations.AddConstraint(
            model_name="ledgerentry",
            constraint=models.UniqueConstraint(fields=("request_id", "created_at"), name="ledger_call_once"),
        ),
    ]
