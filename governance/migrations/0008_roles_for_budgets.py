"""Re-sync role permissions now that grant alerts and increase requests exist."""
from django.db import migrations

from governance.roles import sync_roles


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0007_roles_for_access_requests"),
        ("budgets", "0003_grants_as_authorizations"),
        ("ledger", "0003_grant_path"),
    ]
    operations = [migrations.RunPython(sync_roles, migrations.RunPython.noop)]
