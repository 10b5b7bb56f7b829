"""Re-sync role permissions now that ledger.CallBody exists."""
from django.db import migrations

from governance.roles import sync_roles


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0004_rate_limits_and_relay_policy"),
        ("ledger", "0002_callbody_ledgerentry_detail"),
    ]
    operations = [migrations.RunPython(sync_roles, migrations.RunPython.noop)]
