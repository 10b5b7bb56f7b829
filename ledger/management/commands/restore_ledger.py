"""Restore an archived month of ledger entries."""
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from ledger.archive import ledger_restore


class Command(BaseCommand):
    help = "Restore a ledger-YYYY-MM.jsonl.gz archive."

    def add_arguments(self, parser):
        parser.add_argument("file")

    def handle(self, *args, file, **options):
        path = Path(file)
        if not path.exists():
            raise CommandError(f"no such file: {file}")
        self.stdout.write(f"restored {ledger_restore(path=path)} entries from {path}")
