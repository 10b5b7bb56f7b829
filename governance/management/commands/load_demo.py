"""Load (or refresh) the demo organisation; safe to run twice."""
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import URLValidator

from governance.demo import DEMO_PASSWORD, load_demo


class Command(BaseCommand):
    help = "Load the demo organisation, people, provider and priced model catalog (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--provider-url",
            help="Point the demo provider at this OpenAI-compatible base URL instead of the built-in mock.",
        )

    def handle(self, *args, provider_url=None, **options):
        if provider_url:
            try:
                URLValidator(schemes=["http", "https"])(provider_url)
            except ValidationError as exc:
                raise CommandError(f"--provider-url: {provider_url!r} is not an http(s) URL") from exc
        demo = load_demo(provider_url=provider_url)
        self.stdout.write(self.style.SUCCESS("Demo organisation loaded."))
        self.stdout.write(f"Demo logins (password for all: {DEMO_PASSWORD}):")
        for login in demo.logins:
            self.stdout.write(f"  {login.username:<8} {login.role}")
        self.stdout.write(f"Demo relay key for bob (shown once, valid 30 days): {demo.key_secret}")
