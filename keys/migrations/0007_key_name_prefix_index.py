"""Search by a key name's beginning (the keys admin) through an index on UPPER(name) with pattern ops, so
`name ILIKE 'abc%'` as Django writes it (UPPER(name::text) LIKE UPPER('abc%')) does not scan a million keys.
PostgreSQL only: SQLite has no operator classes (and no million keys)."""
from django.db import migrations

INDEX = "key_name_upper_prefix_idx"


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {INDEX} ON keys_virtualkey (UPPER(name::text) text_pattern_ops)")


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    dependencies = [("keys", "0006_acceptable_use_policy")]
    operations = [migrations.RunPython(create, drop)]
