"""Revoke a key by its visible prefix."""
from django.core.management.base import BaseCommand, CommandError

from governance import stamps
from keys import services
from keys.models import VirtualKey


class Command(BaseCommand):
    help = "Revoke the key whose visible prefix is PREFIX (e.g. tg_l_AbC1234)."

    def add_arguments(self, parser):
        parser.add_argument("prefix")
        parser.add_argument("--reason", required=True)

    def handle(self, *args, prefix, reason, **options):
        matches = list(VirtualKey.objects.filter(prefix=prefix.rstrip("…."))[:2])
        if not matches:
            raise CommandError(f"no key with prefix {prefix!r}")
        if len(matches) > 1:
            raise CommandError(f"prefix {prefix!r} matches more than one key; revoke it in the admin")
        try:
            with stamps.published_or_raise():
                key = services.key_revoke(key=matches[0], actor=None, actor_label="manage.py revoke_key", reason=reason)
        except stamps.NotPublished as exc:
            raise CommandError(f"{matches[0].prefix}… is revoked in the database, but {exc}; check REDIS_URL "
                               "(under `make run`, run this from the repository while it is up)") from None
        self.stdout.write(f"revoked {key.prefix}… ({key.name})")
