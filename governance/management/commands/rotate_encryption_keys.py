"""Re-encrypt every stored secret with the first key of TOLLGATE_ENCRYPTION_KEYS."""
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from gateway.models import Provider
from governance import crypto, runtime
from governance.audit import audit_record
from governance.models import WebhookEndpoint
from keys.models import VirtualKey

# Every encrypted column in Tollgate: a new one must be listed here.
ENCRYPTED_FIELDS = [
    (Provider, "api_key_encrypted"),
    (Provider, "admin_key_encrypted"),
    (VirtualKey, "signing_secret_encrypted"),
    (WebhookEndpoint, "secret_encrypted"),
]


class Command(BaseCommand):
    help = (
        "Re-encrypt stored secrets under the primary (first) TOLLGATE_ENCRYPTION_KEYS key. "
        "Put the new key first, run this, then remove the old key."
    )

    def handle(self, *args, **options):
        counts = {}
        with transaction.atomic():
            for model, field in ENCRYPTED_FIELDS:
                label = f"{model._meta.label_lower}.{field}"
                counts[label] = 0
                for obj in model.objects.select_for_update().exclude(**{field: ""}).only("pk", field):
                    try:
                        setattr(obj, field, crypto.rotate(getattr(obj, field)))
                    except crypto.DecryptionError as exc:
                        raise CommandError(f"{label} of #{obj.pk}: {exc}; nothing was changed") from exc
                    model.objects.filter(pk=obj.pk).update(**{field: getattr(obj, field)})
                    counts[label] += 1
            audit_record(actor=None, actor_label="manage.py rotate_encryption_keys", action="encryption_keys.rotate",
                         after=counts)
            runtime.changed(runtime.CATALOG, runtime.KEYS)  # .update() sends no signal
        total = sum(counts.values())
        self.stdout.write(self.style.SUCCESS(f"re-encrypted {total} secret(s) under the primary key: {counts}"))
