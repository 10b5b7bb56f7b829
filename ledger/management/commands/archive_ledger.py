"""Archive whole months of raw ledger entries before a date to gzip'd JSON lines, then remove them."""
from datetime import date
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from ledger.archive import ledger_archive


class Command(BaseCommand):
    help = "Archive (and remove) raw ledger entries of every whole month before --before; rollups stay."

    def add_arguments(self, parser):
        parser.add_argument("--before", required=True, help="YYYY-MM-DD: months before this date's month are archived.")
        parser.add_argument("--dir", required=True, help="Folder for the ledger-YYYY-MM.jsonl.gz files.")

    def handle(self, *args, before, dir, **options):
        try:
            cutoff = date.fromisoformat(before)
        except ValueError:
            raise CommandError(f"--before: {before!r} is not YYYY-MM-DD") from None
        for archived in ledger_archive(before=cutoff, directory=Path(dir)):
            self.stdout.write(f"{archived.month:%Y-%m}: {archived.entries} entries -> {archived.path}")
