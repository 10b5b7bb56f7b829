"""Issue a management API token (tg_api_...) from the command line, with the same checks and audit event as the
admin. Prints only the token, once, on stdout."""
import json

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from governance.api.tokens import api_token_issue
from governance.models import Person
from keys.models import ApiToken


class Command(BaseCommand):
    help = 'Issue an API token acting as a person, e.g. --person it@example.com --scopes \'{"keys": "write"}\'.'

    def add_arguments(self, parser):
        parser.add_argument("--person", required=True, help="Email of the person (or service account) it acts as.")
        parser.add_argument("--name", required=True, help="What the token is for.")
        parser.add_argument("--scopes", required=True, help='JSON: resource -> "read" or "write"; "*" for all.')
        parser.add_argument("--days", type=int, default=90, help="Days until it expires; 0 for no expiry.")
        parser.add_argument("--service", action="store_true", help="A service token (an automation account).")

    def handle(self, *args, person, name, scopes, days, service, **options):
        try:
            scopes = json.loads(scopes)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--scopes is not JSON: {exc}") from None
        if days < 0:
            raise CommandError("--days must be 0 (no expiry) or more")
        holder = Person.objects.filter(email__iexact=person, is_active=True).first()
        if holder is None:
            raise CommandError(f"no active person with email {person!r}")
        try:
            issued = api_token_issue(person=holder, name=name, scopes=scopes, days=days or None, actor=None,
                                     actor_label="manage.py issue_api_token",
                                     kind=ApiToken.Kind.SERVICE if service else ApiToken.Kind.PERSONAL)
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(issued.secret)
