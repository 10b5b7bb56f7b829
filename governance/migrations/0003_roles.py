"""Creates the IT admin, Finance and Security auditor groups with their permissions."""
from django.db import migrations

from governance.roles import sync_roles


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0002_audit_append_only"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("gateway", "0001_initial"),
        ("keys", "0001_initial"),
        ("budgets", "0002_initial"),
        ("ledger", "0001_initial"),
    ]
    operations = [migrations.RunPython(sync_roles, migrations.RunPython.noop)]
