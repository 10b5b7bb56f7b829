"""The demo organisation that `make run` loads: departments, cost centers, teams, people with roles, a
provider (the built-in mock, or any OpenAI-compatible URL) and a priced model catalog. Safe to load twice."""
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

from django.apps import apps as django_apps
from django.contrib.auth.models import Group
from django.db import transaction

from budgets.models import Grant
from gateway.models import BilledModelName, Deployment, ModelAlias, ModelPrice, Provider, ProviderModel
from governance import roles
from governance.audit import audit_record
from governance.models import CostCenter, Department, Membership, Person, Team
from keys.models import VirtualKey
from keys.services import aup_publish, key_issue, key_revoke

DEMO_PASSWORD = "tollgate-demo"
DEMO_KEY_NAME = "Demo key (load_demo)"
PRICES_FROM = datetime(2026, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class DemoLogin:
    username: str
    role: str


LOGINS = [
    DemoLogin("admin", "superuser"),
    DemoLogin("it", roles.IT_ADMIN),
    DemoLogin("finance", roles.FINANCE),
    DemoLogin("auditor", roles.SECURITY_AUDITOR),
    DemoLogin("alice", "owner of team platform"),
    DemoLogin("bob", "member of team platform"),
    DemoLogin("carol", "owner of data-science, approver for platform"),
    DemoLogin("dave", "member of team data-science"),
]

# alias, kind, tier, provider model, max output tokens, input / output / cached price per million tokens
CATALOG = [
    ("fast", "chat", "standard", "mock-fast", 4096, "0.15", "0.60", "0.075"),
    ("smart", "chat", "premium", "mock-smart", 8192, "3.00", "15.00", "0.30"),
    ("embed", "embedding", "standard", "mock-embed", 0, "0.02", "0", "0"),
]


def _person(username: str, **fields) -> Person:
    person, _ = Person.objects.update_or_create(
        username=username, defaults={"email": f"{username}@demo.tollgate.local", **fields}
    )
    person.set_password(DEMO_PASSWORD)
    person.save(update_fields=["password"])
    return person


@dataclass(frozen=True)
class Demo:
    logins: list[DemoLogin]
    key_secret: str  # a fresh key for bob on team platform; the previous demo key is revoked


@transaction.atomic
def load_demo(*, provider_url: str | None = None) -> Demo:
    engineering, _ = Department.objects.update_or_create(slug="engineering", defaults={"name": "Engineering"})
    research, _ = Department.objects.update_or_create(slug="research", defaults={"name": "Research"})
    finance_dept, _ = Department.objects.update_or_create(slug="finance", defaults={"name": "Finance"})
    cc_platform, _ = CostCenter.objects.update_or_create(code="CC-1100", defaults={"name": "Platform", "department": engineering})
    cc_ds, _ = CostCenter.objects.update_or_create(code="CC-1200", defaults={"name": "Data science", "department": research})
    CostCenter.objects.update_or_create(code="CC-9000", defaults={"name": "Finance operations", "department": finance_dept})

    roles.sync_roles(django_apps)  # the role groups, even if someone deleted one
    staff = {"is_staff": True, "is_active": True}
    admin = _person("admin", first_name="Ada", last_name="Admin", is_superuser=True, **staff)
    it = _person("it", first_name="Ivan", last_name="IT", department=engineering, **staff)
    finance = _person("finance", first_name="Fiona", last_name="Finance", department=finance_dept, **staff)
    auditor = _person("auditor", first_name="Aude", last_name="Auditor", **staff)
    alice = _person("alice", first_name="Alice", last_name="Owner", department=engineering, cost_center=cc_platform)
    bob = _person("bob", first_name="Bob", last_name="Builder", department=engineering, cost_center=cc_platform)
    carol = _person("carol", first_name="Carol", last_name="Approver", department=research, cost_center=cc_ds)
    dave = _person("dave", first_name="Dave", last_name="Data", department=research, cost_center=cc_ds)
    for person, role in [(it, roles.IT_ADMIN), (finance, roles.FINANCE), (auditor, roles.SECURITY_AUDITOR)]:
        person.groups.add(Group.objects.get(name=role))

    platform, _ = Team.objects.update_or_create(
        slug="platform", defaults={"name": "Platform", "department": engineering, "cost_center": cc_platform, "owner": alice}
    )
    data_science, _ = Team.objects.update_or_create(
        slug="data-science", defaults={"name": "Data science", "department": research, "cost_center": cc_ds, "owner": carol}
    )
    for person, team, role in [
        (alice, platform, Membership.Role.OWNER),
        (bob, platform, Membership.Role.MEMBER),
        (carol, platform, Membership.Role.APPROVER),
        (carol, data_science, Membership.Role.OWNER),
        (dave, data_science, Membership.Role.MEMBER),
    ]:
        Membership.objects.update_or_create(person=person, team=team, defaults={"role": role})

    kind, base_url = (Provider.Kind.OPENAI, provider_url) if provider_url else (Provider.Kind.MOCK, "")
    provider, _ = Provider.objects.update_or_create(name="Demo provider", defaults={"kind": kind, "base_url": base_url})
    if provider_url and not provider.has_api_key:
        provider.set_api_key("demo-provider-key")
        provider.save(update_fields=["api_key_encrypted"])
    for alias_name, kind_, tier, model_name, max_out, price_in, price_out, price_cached in CATALOG:
        model, _ = ProviderModel.objects.update_or_create(
            provider=provider, name=model_name, defaults={"max_output_tokens": max_out or 1}
        )
        ModelPrice.objects.update_or_create(
            provider_model=model, effective_from=PRICES_FROM,
            defaults={"input_per_mtok": Decimal(price_in), "output_per_mtok": Decimal(price_out),
                      "cached_input_per_mtok": Decimal(price_cached)},
        )
        BilledModelName.objects.update_or_create(  # how its bills name it: reconciliation matches through this
            provider_model=model, name=model_name,
            defaults={"snapshot_suffix": BilledModelName.OPENAI_SNAPSHOT if provider_url else ""})
        alias, _ = ModelAlias.objects.update_or_create(name=alias_name, defaults={"kind": kind_, "tier": tier})
        Deployment.objects.update_or_create(alias=alias, provider_model=model, defaults={"priority": 0})

    today = date.today()
    org_grant, _ = Grant.objects.update_or_create(
        name="Demo org", scope=Grant.Scope.ORG,
        defaults={"owner": finance, "limit_amount": Decimal("5000"), "grant_class": Grant.GrantClass.PRODUCTION,
                  "term_start": today - timedelta(days=80), "renews_at": today + timedelta(days=285)},
    )
    # Terms like real ones: the platform grant is due for renewal (the renewal queue is not empty in the demo).
    for team, owner, limit, left in [(platform, alice, "1000", 10), (data_science, carol, "500", 60)]:
        Grant.objects.update_or_create(
            name=f"{team.name} monthly", scope=Grant.Scope.TEAM, team=team,
            defaults={"owner": owner, "parent": org_grant, "limit_amount": Decimal(limit),
                      "term_start": today - timedelta(days=90 - left), "renews_at": today + timedelta(days=left)},
        )

    aup_publish(version="1", effective_from=PRICES_FROM.date(), actor=admin,
                accepted_by=[admin, it, finance, auditor, alice, bob, carol, dave],
                text="Use Tollgate keys for company work only. Do not send customer personal data, secrets or "
                     "credentials in prompts. Keep your key to yourself; rotate it if it leaks.")
    # Secrets are shown once, so each load issues a fresh demo key and retires the last one.
    for old in VirtualKey.objects.filter(name=DEMO_KEY_NAME).exclude(status=VirtualKey.Status.REVOKED):
        key_revoke(key=old, actor=admin, reason="replaced by a new demo key")
    issued = key_issue(name=DEMO_KEY_NAME, team=platform, person=bob, actor=admin, days=30,
                       default_tags={"project": "demo", "environment": "dev"})
    _demo_traffic(issued.key, provider, today)
    audit_record(actor=admin, action="demo.load", after={"provider": provider.kind, "provider_url": base_url})
    return Demo(logins=LOGINS, key_secret=issued.secret)


def _demo_traffic(key, provider, today) -> None:
    """A month of made-up calls (request ids "demo-...") on the demo keys, so the usage pages and chargeback
    have something to show. Written once: a second load adds nothing."""
    import random

    from ledger.models import LedgerEntry
    from ledger.services import ledger_rollup

    if LedgerEntry.objects.filter(request_id__startswith="demo-", created_at__gte=datetime.now(timezone.utc) - timedelta(days=40)).exists():
        return
    from ledger import partitions

    if partitions.is_partitioned():
        partitions.ensure_partitions(start=today - timedelta(days=31))
    rng = random.Random(15)
    models = {m.name: m for m in ProviderModel.objects.filter(provider=provider)}
    aliases = {a.name: a for a in ModelAlias.objects.all()}
    dave = Person.objects.get(username="dave")
    data_science = Team.objects.get(slug="data-science")
    holders = [(key, key.person, key.team, "demo"), (None, dave, data_science, "forecasting")]
    rows = []
    for back in range(30, -1, -1):
        day = datetime.combine(today - timedelta(days=back), datetime.min.time(), tzinfo=timezone.utc)
        for holder_key, person, team, project in holders:
            for n in range(rng.randint(8, 30)):
                alias = rng.choice(["fast", "fast", "fast", "smart"])
                tokens_in, tokens_out = rng.randint(200, 4000), rng.randint(50, 800)
                price_in, price_out = (Decimal("0.15"), Decimal("0.60")) if alias == "fast" else (Decimal("3"), Decimal("15"))
                refused = rng.random() < 0.04
                rows.append(LedgerEntry(
                    request_id=f"demo-{back}-{project}-{n}", created_at=day + timedelta(minutes=rng.randint(480, 1140)),
                    key=holder_key, person=person, team=team, cost_center=team.cost_center, tags={"project": project},
                    model_requested=alias, alias=aliases.get(alias), provider_model=models.get(f"mock-{alias}"),
                    input_tokens=0 if refused else tokens_in, output_tokens=0 if refused else tokens_out,
                    cost=Decimal(0) if refused else (tokens_in * price_in + tokens_out * price_out) / 1_000_000,
                    outcome="refused" if refused else "ok", http_status=429 if refused else 200,
                    error_code="rate_limited" if refused else "", latency_ms=rng.randint(200, 2500),
                    detail="demo traffic"))
    LedgerEntry.objects.bulk_create(rows, batch_size=1000)
    while ledger_rollup():
        pass
