"""Append the newest audit event's signed head to TOLLGATE_AUDIT_CHECKPOINT_FILE (beat does it daily)."""
from django.core.management.base import BaseCommand

from governance.audit import audit_checkpoint


class Command(BaseCommand):
    help = "Record the audit trail's head (newest event number and hash, signed) outside the database."

    def handle(self, *args, **options):
        head = audit_checkpoint()
        self.stdout.write(f"audit head: event #{head['id']}" if head else "no audit events yet")
