"""Walk the audit hash chain and report the first broken link (exit status 1 when the chain is broken)."""
from django.core.management.base import BaseCommand, CommandError

from governance.audit import audit_verify


class Command(BaseCommand):
    help = "Verify the audit trail's hash chain; report the first broken link."

    def handle(self, *args, **options):
        checked, broken = audit_verify()
        if broken:
            raise CommandError(f"audit chain broken at event #{broken.event_id}: {broken.reason} ({checked} events read)")
        self.stdout.write(self.style.SUCCESS(f"audit chain intact: {checked} events verified"))
