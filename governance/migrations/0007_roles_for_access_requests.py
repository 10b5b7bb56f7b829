"""Re-sync role permissions now that access requests and the provisioning policy exist."""
from django.db import migrations

from governance.roles import sync_roles


class Migration(migrations.Migration):
    dependencies = [
        ("governance", "0006_allowlist_validators"),
        ("keys", "0004_access_requests_and_lifecycle"),
    ]
    operations = [migrations.RunPython(sync_roles, migrations.RunPython.noop)]
