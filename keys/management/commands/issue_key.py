"""Issue a key from the command line, through the same policy checks and audit as the web form.
Prints only the key on stdout (and the signing secret on a second line for --service keys). All or nothing:
a command that fails leaves no request, key or audit event behind."""
from decimal import Decimal, InvalidOperation

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from gateway.models import ModelAlias
from governance.models import Person, Team, UsageClass
from keys import services
from keys.services.links import absolute_link


class Command(BaseCommand):
    help = "Issue a Tollgate key for a person (or a service key for a team); prints the key once."

    def add_arguments(self, parser):
        parser.add_argument("--person", help="Email of the key's holder (omit with --service).")
        parser.add_argument("--team", required=True, help="Team slug.")
        parser.add_argument("--models", required=True, help="Comma-separated model aliases.")
        parser.add_argument("--budget", help="Monthly budget, e.g. 50.00.")
        parser.add_argument("--class", dest="key_class", default=UsageClass.EXPERIMENTATION, choices=UsageClass.values)
        parser.add_argument("--days", type=int, default=30, help="Days until the key expires.")
        parser.add_argument("--project", default="", help="Project tag.")
        parser.add_argument("--service", action="store_true", help="A service key owned by the team, with a signing secret.")

    def handle(self, *args, person=None, team, models, budget, key_class, days, project, service, **options):
        try:
            monthly_budget = Decimal(budget) if budget else None
        except InvalidOperation:
            raise CommandError(f"--budget: {budget!r} is not an amount") from None
        if days < 1:
            raise CommandError("--days must be at least 1")
        try:
            team_obj = Team.objects.get(slug=team)
        except Team.DoesNotExist:
            raise CommandError(f"no team with slug {team!r}") from None
        names = [name.strip() for name in models.split(",") if name.strip()]
        aliases = list(ModelAlias.objects.filter(name__in=names, is_active=True))
        missing = sorted(set(names) - {a.name for a in aliases})
        if missing or not names:
            raise CommandError(f"unknown model alias(es): {', '.join(missing) or '(none given)'}")
        if service:
            issued = services.key_issue(
                name=f"{team_obj.slug} service key{' ' + project if project else ''}", team=team_obj, person=None,
                actor=None, actor_label="manage.py issue_key", key_class=key_class, days=days, aliases=aliases,
                monthly_budget=monthly_budget, with_signing_secret=True,
                default_tags={"project": project} if project else {},
            )
            self.stdout.write(issued.secret)
            self.stdout.write(issued.signing_secret)
            return
        if not person:
            raise CommandError("--person is required unless --service is given")
        try:
            holder = Person.objects.get(email__iexact=person, is_active=True)
        except Person.DoesNotExist:
            raise CommandError(f"no active person with email {person!r}") from None
        try:
            # The request is written before policy decides; a refusal must take it (and its audit event and
            # queued emails) back, so the command is one transaction.
            with transaction.atomic():
                submitted = services.request_submit(
                    requester=holder, team=team_obj, aliases=aliases, use_case="issued by IT with manage.py issue_key",
                    key_class=key_class, environment="production" if key_class == UsageClass.PRODUCTION else "development",
                    project=project, duration_days=days, monthly_budget=monthly_budget,
                )
                if submitted.issued is None:
                    raise CommandError(
                        "policy sends this request to an approver: " + "; ".join(submitted.request.review_reasons)
                        + ". Nothing was created: ask the person to request it on the Request access page, "
                        "or issue it within the provisioning policy.")
        except services.RequestRefused as refusal:
            if refusal.field == "accept_policy":
                raise CommandError(f"{holder.email} has not accepted the acceptable-use policy in force; they accept it "
                                   f"at {absolute_link('keys:acceptable-use')} before a key can be issued") from None
            raise CommandError(refusal.message) from None
        self.stdout.write(submitted.issued.secret)
