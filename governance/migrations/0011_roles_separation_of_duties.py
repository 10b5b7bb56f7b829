"""Re-sync role permissions: finance reads grants and no longer changes them; IT sees and lifts login
lockouts, auditors see them (issue 13)."""
from django.db import migrations

from governance.roles import sync_roles


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0010_roles_for_reconciliation"),
        ("budgets", "0005_increase_from_limit"),
        ("axes", "0010_accessattemptexpiration"),
    ]
    operations = [migrations.RunPython(sync_roles, migrations.RunPython.noop)]
