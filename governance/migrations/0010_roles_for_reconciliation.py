"""Re-sync role permissions now that provider cost imports and reconciliations exist."""
from django.db import migrations

from governance.roles import sync_roles


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0009_roles_for_ledger_reports"),
        ("ledger", "0005_provider_costs_and_reconciliation"),
    ]
    operations = [migrations.RunPython(sync_roles, migrations.RunPython.noop)]
