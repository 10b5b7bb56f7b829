"""Write what the ledger journals of stopped processes still hold (rows the database could not take, calls
in flight when a worker died). Web workers do this on their own at start and every few seconds; this is
for a spool directory moved from another host, or to check before a host is retired."""
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from ledger import writer


class Command(BaseCommand):
    help = "Write the ledger rows left in journals of stopped processes (idempotent), then delete those files."

    def add_arguments(self, parser):
        parser.add_argument("--dir", default=None, help="Spool directory (default: TOLLGATE_SPOOL_DIR).")

    def handle(self, *args, dir=None, **options):
        directory = Path(dir) if dir else settings.TOLLGATE_SPOOL_DIR
        recovered = writer.recover(directory)
        self.stdout.write(f"{recovered} calls written from journals in {directory} (already written ones are skipped)")
        rejected = directory / "rejected.jsonl"
        if rejected.exists():
            self.stderr.write(f"{rejected} holds rows the database rejected: fix and re-import them, or adjust the ledger")
