"""Re-sync role permissions now that rollups exist."""
from django.db import migrations

from governance.roles import sync_roles


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0008_roles_for_budgets"),
        ("ledger", "0004_adjustments_and_rollups"),
    ]
    operations = [migrations.RunPython(sync_roles, migrations.RunPython.noop)]
