"""Re-sync role permissions for the models issue 14 added: true-ups (ledger) and billed model names
(gateway)."""
from django.db import migrations

from governance.roles import sync_roles


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0011_roles_separation_of_duties"),
        ("ledger", "0013_reconciliation_you_can_sign"),
        ("gateway", "0004_billed_model_names"),
    ]
    operations = [migrations.RunPython(sync_roles, migrations.RunPython.noop)]
