"""Who may reach what: every page, form POST and relay endpoint of the URL configuration, every admin's
changelist, add form and change page, and every admin action that changes state, for each role and for
anonymous, on objects of the person's own team and of another team. The expected outcome of each cell is in
the tables below (PAGES, ADMIN, ACTIONS); a route, admin or action without a row fails the test (add its row
when you add it). The rules themselves live in one place each: VirtualKey.objects.manageable_by,
Grant.objects.manageable_by, AccessRequest.objects.decidable_by, the role groups (governance.roles).

Outcomes: O reached (200, a redirect after acting, or 400 for a form with errors), L sent to log in,
D refused (403), H not found (404: the object is not theirs to see), K the relay's 401 (a key is needed:
a session is not a key), - no such cell.
Roles, in column order: anonymous, employee (member of team A, holds the own key and the own grant),
approver of team A, owner of team A, IT admin, finance, security auditor (the last three in no team).
"""
from decimal import Decimal

import pytest
from django.contrib import admin
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone

from budgets.models import Alert, Grant, IncreaseRequest
from gateway.models import BilledModelName
from governance import roles
from governance.api.tokens import api_token_issue
from governance.models import Membership, WebhookDelivery, WebhookEndpoint
from keys.models import AcceptableUsePolicy, AccessRequest, PolicyAcceptance
from ledger.models import Reconciliation, TrueUp
from tests.budgets.factories import GrantFactory
from tests.gateway.factories import ModelAliasFactory, ProviderFactory, ProviderModelFactory
from tests.governance.factories import MembershipFactory, PersonFactory, TeamFactory
from tests.keys.factories import VirtualKeyFactory

pytestmark = pytest.mark.django_db
ROLES = ["anon", "employee", "approver", "owner", "it", "finance", "auditor"]

# route name -> {(method, variant): outcomes by role}. variant: "own" (team A's object), "other" (team B's),
# "-" (a route without an object).
PAGES = {
    "home": {("GET", "-"): "OOOOOOO"},
    "healthz": {("GET", "-"): "OOOOOOO"},
    "readyz": {("GET", "-"): "OOOOOOO"},
    "login": {("GET", "-"): "OOOOOOO"},
    "oidc_authentication_init": {("GET", "-"): "HHHHHHH"},  # single sign-on off in this world: 404
    "oidc_authentication_callback": {("GET", "-"): "HHHHHHH"},
    "oidc_logout": {("POST", "-"): "LLLLLLL"},
    "logout": {("POST", "-"): "LLLLLLL"},  # logging out lands on the login page
    "keys:my-keys": {("GET", "-"): "LOOOOOO"},
    "keys:request": {("GET", "-"): "LOOOOOO"},
    "keys:approvals": {("GET", "-"): "LOOOOOO"},
    "keys:getting-started": {("GET", "-"): "LOOOOOO"},
    "keys:acceptable-use": {("GET", "-"): "LOOOOOO", ("POST", "-"): "LOOOOOO"},  # POST accepts the version in force
    "keys:key-detail": {("GET", "own"): "LOOOOOO", ("GET", "other"): "LHHHOOO"},
    "keys:key-rotate": {("POST", "own"): "LODDDDD", ("POST", "other"): "LHHHDDD"},
    "keys:key-revoke": {("POST", "own"): "LOOOODD", ("POST", "other"): "LHHHODD"},
    "keys:key-change": {("POST", "own"): "LODDDDD", ("POST", "other"): "LHHHDDD"},
    "keys:request-collect": {("POST", "own"): "LOHHHHH", ("POST", "other"): "LHHHHHH"},
    "keys:request-decide": {("POST", "own"): "LHOOOHH", ("POST", "other"): "LHHHOHH"},
    "budgets:my-grants": {("GET", "-"): "LOOOOOO"},
    "budgets:delegate": {("POST", "own"): "LODDODD", ("POST", "other"): "LDDDODD"},
    "budgets:increase": {("POST", "own"): "LODDDDD", ("POST", "other"): "LDDDDDD"},
    "budgets:renew": {("POST", "own"): "LODDODD", ("POST", "other"): "LDDDODD"},
    "budgets:decide-increase": {("POST", "own"): "LHHOOHH", ("POST", "other"): "LHHHOHH"},
    "ledger:chargeback": {("GET", "-"): "LDDDOOO"},
    "ledger:reconciliations": {("GET", "-"): "LDDDOOO"},
    "ledger:reconciliation": {("GET", "-"): "LDDDOOO"},
    "ledger:cost_import": {("GET", "-"): "LDDDOOO"},
    "ledger:usage": {("GET", "-"): "LOOOOOO"},  # scoped by role inside (ledger.dashboard.usage_scope)
    "ledger:true_up": {("GET", "-"): "LDDDDOD"},
    "ledger:true_up_reverse": {("POST", "-"): "LDDDDOD"},
    "relay-chat": {("POST", "-"): "KKKKKKK"},
    "relay-messages": {("POST", "-"): "KKKKKKK"},
    "relay-embeddings": {("POST", "-"): "KKKKKKK"},
    "relay-models": {("GET", "-"): "KKKKKKK"},
    "relay-key": {("GET", "-"): "KKKKKKK"},  # a Tollgate key reads its own status: not a login
    "relay-unknown": {("GET", "-"): "HHHHHHH"},  # any other /v1 path: JSON 404, ledgered
}

# admin model -> (changelist, add form), by role. Non-staff people and anonymous go to the admin's login.
ADMIN = {
    "auth.group": ("LLLLDDD", "LLLLDDD"),
    "axes.accessattempt": ("LLLLODO", "LLLLDDD"),
    "axes.accessfailurelog": ("LLLLODO", "LLLLDDD"),
    "axes.accesslog": ("LLLLODO", "LLLLDDD"),
    "budgets.alert": ("LLLLOOO", "LLLLDDD"),  # anomaly alerts: IT acts on them, finance and auditors read
    "budgets.grant": ("LLLLOOO", "LLLLODD"),
    "budgets.grantalert": ("LLLLOOO", "LLLLDDD"),
    "budgets.increaserequest": ("LLLLOOO", "LLLLDDD"),
    "gateway.modelalias": ("LLLLOOO", "LLLLODD"),
    "gateway.billedmodelname": ("LLLLOOO", "LLLLODD"),
    "gateway.modelprice": ("LLLLOOO", "LLLLODD"),
    "gateway.provider": ("LLLLOOO", "LLLLODD"),  # finance reads providers (reconciliation); secrets never shown
    "gateway.providermodel": ("LLLLOOO", "LLLLODD"),
    "governance.auditevent": ("LLLLOOO", "LLLLDDD"),
    "governance.costcenter": ("LLLLOOO", "LLLLODD"),
    "governance.department": ("LLLLOOO", "LLLLODD"),
    "governance.membership": ("LLLLOOO", "LLLLODD"),
    "governance.person": ("LLLLOOO", "LLLLODD"),
    "governance.team": ("LLLLOOO", "LLLLODD"),
    "governance.webhookdelivery": ("LLLLODO", "LLLLDDD"),  # the delivery log; finance does not see receivers
    "governance.webhookendpoint": ("LLLLODO", "LLLLODD"),
    "keys.acceptableusepolicy": ("LLLLOOO", "LLLLODD"),
    "keys.apitoken": ("LLLLOOO", "LLLLODD"),
    "keys.accessrequest": ("LLLLOOO", "LLLLDDD"),
    "keys.policyacceptance": ("LLLLOOO", "LLLLDDD"),  # read-only: written by keys.services.aup_accept
    "keys.provisioningpolicy": ("LLLLOOO", "LLLLDDD"),  # one policy: it is changed, never added again
    "keys.virtualkey": ("LLLLOOO", "LLLLDDD"),
    "ledger.callbody": ("LLLLODO", "LLLLDDD"),
    "ledger.dailyrollup": ("LLLLOOO", "LLLLDDD"),
    "ledger.ledgerentry": ("LLLLOOO", "LLLLDDD"),
    "ledger.providercostimport": ("LLLLOOO", "LLLLDDD"),  # imported from the reconciliation pages, not added
    "ledger.reconciliation": ("LLLLOOO", "LLLLDDD"),
    "ledger.trueup": ("LLLLOOO", "LLLLDDD"),
}


def _routes() -> dict[str, URLPattern]:
    found = {}

    def walk(patterns, namespace=None):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                # The admin has its own table (ADMIN); the management API answers with tokens and JSON, and
                # its role-by-resource table is tests/api/test_permissions.py.
                if pattern.app_name in ("admin", "api"):
                    continue
                walk(pattern.url_patterns, pattern.namespace or namespace)
            else:
                name = pattern.name or ("relay-unknown" if "v1/" in str(pattern.pattern) else str(pattern.pattern))
                found[f"{namespace}:{name}" if namespace else name] = pattern

    walk(get_resolver().url_patterns)
    return found


def test_every_route_and_admin_has_its_row():
    assert set(_routes()) == set(PAGES), "routes without a row in PAGES (or rows without a route)"
    assert {m._meta.label_lower for m in admin.site._registry} == set(ADMIN), "admins without a row in ADMIN"


class World:
    """Team A (the employee's, with its approver and owner) and team B, with one of each object in each."""

    def __init__(self):
        self.team_a, self.team_b = TeamFactory(slug="team-a"), TeamFactory(slug="team-b")
        self.employee = MembershipFactory(team=self.team_a).person
        self.approver = MembershipFactory(team=self.team_a, role=Membership.Role.APPROVER).person
        self.owner = self.team_a.owner
        stranger = self.stranger = MembershipFactory(team=self.team_b).person
        self.people = {
            "anon": None, "employee": self.employee, "approver": self.approver, "owner": self.owner,
            "it": PersonFactory(roles=[roles.IT_ADMIN]), "finance": PersonFactory(roles=[roles.FINANCE]),
            "auditor": PersonFactory(roles=[roles.SECURITY_AUDITOR]),
        }
        alias = ModelAliasFactory(name="fast")
        self.key = {"own": VirtualKeyFactory(person=self.employee, team=self.team_a),
                    "other": VirtualKeyFactory(person=stranger, team=self.team_b)}
        team_grants = {"own": GrantFactory(name="A", owner=self.owner, team=self.team_a, limit_amount=Decimal("1000"),
                                           renews_at=timezone.localdate() + timezone.timedelta(days=30)),
                       "other": GrantFactory(name="B", owner=self.team_b.owner, team=self.team_b,
                                             limit_amount=Decimal("1000"),
                                             renews_at=timezone.localdate() + timezone.timedelta(days=30))}
        self.grant = {
            variant: GrantFactory(name=f"project {variant}", owner=holder, parent=team_grants[variant],
                                  scope=Grant.Scope.PROJECT, project=variant, team=team, limit_amount=Decimal("100"),
                                  renews_at=timezone.localdate() + timezone.timedelta(days=30))
            for variant, holder, team in (("own", self.employee, self.team_a), ("other", stranger, self.team_b))
        }
        self.increase = {
            variant: IncreaseRequest.objects.create(grant=self.grant[variant], requester=self.grant[variant].owner,
                                                    new_limit=Decimal("500"), from_limit=Decimal("100"), reason="more",
                                                    approver=team_grants[variant].owner)
            for variant in ("own", "other")
        }

        def request(requester, team, status):
            made = AccessRequest.objects.create(requester=requester, team=team, use_case="x", key_class="experimentation",
                                                environment="development", project="p", duration_days=30, status=status)
            made.aliases.set([alias])
            return made

        self.pending = {"own": request(self.employee, self.team_a, AccessRequest.Status.PENDING),
                        "other": request(stranger, self.team_b, AccessRequest.Status.PENDING)}
        self.approved = {"own": request(self.employee, self.team_a, AccessRequest.Status.APPROVED),
                         "other": request(stranger, self.team_b, AccessRequest.Status.APPROVED)}
        self._one_of_every_admin_model()
        self.reconciliation = Reconciliation.objects.create(
            provider=ProviderFactory(), month=timezone.localdate().replace(day=1), billed=1, ledger=1,
            status=Reconciliation.Status.choices[0][0])
        self.alert = Alert.objects.create(kind="rate", subject=f"key:{self.key['other'].pk}", key=self.key["other"],
                                          team=self.team_b, window_start=timezone.now(), window_end=timezone.now(),
                                          evidence={"window_calls": 60, "window_minutes": 5, "times_usual": 6,
                                                    "usual_calls_per_window": 10})
        self.api_token = api_token_issue(person=self.stranger, name="matrix", scopes={"*": "read"},
                                         actor=self.stranger).token
        self.webhook = WebhookEndpoint(url="https://hooks.example.com/tollgate", description="matrix")
        self.webhook.set_secret("whsec_matrix_secret_0000")
        self.webhook.save()
        self.delivery = WebhookDelivery.objects.create(endpoint=self.webhook, event="key.issued", payload={},
                                                       status=WebhookDelivery.Status.FAILED)
        policy = AcceptableUsePolicy.objects.create(version="1", text="Use keys for work.",
                                                    effective_from=timezone.localdate() + timezone.timedelta(days=365))
        PolicyAcceptance.objects.create(policy=policy, person=self.people["finance"])
        self.true_up = TrueUp.objects.create(provider=self.reconciliation.provider, month=self.reconciliation.month,
                                             reconciliation=self.reconciliation, amount=1, created_by=self.people["finance"])

    def _one_of_every_admin_model(self):
        """So each admin's change page has an object to open."""
        from axes.models import AccessAttempt, AccessFailureLog, AccessLog

        from budgets.models import GrantAlert
        from governance.audit import audit_record
        from keys.models import ProvisioningPolicy
        from ledger.models import CallBody, DailyRollup, ProviderCostImport
        from ledger.services import ledger_rollup
        from tests.gateway.factories import DeploymentFactory, ModelPriceFactory
        from tests.ledger.factories import LedgerEntryFactory

        audit_record(actor=None, action="matrix.world", after={"built": True})
        ProvisioningPolicy.current()
        ModelPriceFactory(provider_model=DeploymentFactory().provider_model)
        entry = LedgerEntryFactory(key=self.key["other"])
        CallBody.objects.create(entry_id=entry.pk, created_at=entry.created_at, mode="full", request="{}", response="{}")
        ledger_rollup()
        assert DailyRollup.objects.exists()
        GrantAlert.objects.create(grant=self.grant["own"], period_start=timezone.now(), kind="50", spent=1)
        self.cost_import = ProviderCostImport.objects.create(
            provider=ProviderFactory(), source=ProviderCostImport.Source.choices[0][0], file_name="costs.csv", sha256="0" * 64)
        BilledModelName.objects.create(provider_model=ProviderModelFactory(), name="billed-name")
        seen = {"user_agent": "t", "ip_address": "198.51.100.7", "username": "someone", "http_accept": "*/*",
                "path_info": "/accounts/login/", "attempt_time": timezone.now()}
        self.attempt = AccessAttempt.objects.create(**seen, get_data="", post_data="", failures_since_start=5)
        AccessLog.objects.create(**seen)
        AccessFailureLog.objects.create(**seen)

    def url(self, name: str, variant: str) -> str:
        by_object = {
            "keys:key-detail": self.key, "keys:key-rotate": self.key, "keys:key-revoke": self.key,
            "keys:key-change": self.key, "keys:request-collect": self.approved, "keys:request-decide": self.pending,
            "budgets:delegate": self.grant, "budgets:increase": self.grant, "budgets:renew": self.grant,
            "budgets:decide-increase": self.increase,
        }
        if name in by_object:
            return reverse(name, args=[by_object[name][variant].pk])
        if name in ("ledger:reconciliation", "ledger:true_up"):
            return reverse(name, args=[self.reconciliation.pk])
        if name == "ledger:cost_import":
            return reverse(name, args=[self.cost_import.pk])
        if name == "ledger:true_up_reverse":
            return reverse(name, args=[self.true_up.pk])
        if name == "relay-unknown":
            return "/v1/nothing-here"
        return reverse(name)


FORMS = {  # a valid body for each form POST, so "O" means the action was taken
    "keys:key-revoke": {"reason": "matrix"},
    "keys:key-change": {"kind": "extension", "use_case": "more time", "duration_days": "30"},
    "keys:request-decide": {"decision": "approve", "reason": "matrix"},
    "budgets:delegate": {"name": "child", "scope": "project", "project": "child", "limit_amount": "1"},
    "budgets:increase": {"new_limit": "150", "reason": "matrix"},
    "budgets:decide-increase": {"decision": "approve", "reason": "matrix"},
}


def outcome(response) -> str:
    status = response.status_code
    if status in (301, 302) and "login" in response.get("Location", ""):
        return "L"
    if status == 401:
        return "K"
    return {403: "D", 404: "H"}.get(status, "O" if status in (200, 302, 400) else f"?{status}")


CELLS = [(name, method, variant, role) for name, cells in PAGES.items() for (method, variant) in cells for role in ROLES]


@pytest.mark.parametrize("name, method, variant, role", CELLS, ids=[f"{n}-{m}-{v}-{r}" for n, m, v, r in CELLS])
def test_page(client, name, method, variant, role, settings):
    settings.AXES_ENABLED = False  # the matrix logs in many times from one address
    world = World()
    person = world.people[role]
    if person is not None:
        client.force_login(person)
    url = world.url(name, variant)
    response = client.post(url, FORMS.get(name, {})) if method == "POST" else client.get(url)
    expected = PAGES[name][(method, variant)][ROLES.index(role)]
    assert outcome(response) == expected, f"{method} {url} as {role}: {response.status_code}"


ADMIN_CELLS = [(model, page, role) for model in ADMIN for page in ("changelist", "add", "change") for role in ROLES]


@pytest.mark.parametrize("model, page, role", ADMIN_CELLS, ids=[f"{m}-{p}-{r}" for m, p, r in ADMIN_CELLS])
def test_admin(client, model, page, role):
    world = World()
    person = world.people[role]
    if person is not None:
        client.force_login(person)
    app_label, model_name = model.split(".")
    if page == "change":  # whoever may list a model may open its objects (read-only without change rights)
        from django.apps import apps

        obj = apps.get_model(model).objects.first()
        assert obj is not None, f"the world has no {model}"
        response = client.get(reverse(f"admin:{app_label}_{model_name}_change", args=[obj.pk]))
    else:
        response = client.get(reverse(f"admin:{app_label}_{model_name}_{page}"))
    expected = ADMIN[model][1 if page == "add" else 0][ROLES.index(role)]
    assert outcome(response) == expected, f"admin {model} {page} as {role}: {response.status_code}"


# admin actions that change state -> by role: O the action took effect, - it did not (the object unchanged),
# L sent to log in. On the other team's objects (IT acts on any; the rest are not staff or may only read).
ACTIONS = {
    ("keys.virtualkey", "revoke"): "LLLLO--",
    ("keys.virtualkey", "suspend"): "LLLLO--",
    ("keys.virtualkey", "reactivate"): "LLLLO--",  # on a suspended key
    ("keys.virtualkey", "extend_30_days"): "LLLLO--",
    ("keys.accessrequest", "approve"): "LLLLO--",
    ("keys.accessrequest", "deny"): "LLLLO--",
    ("axes.accessattempt", "unlock"): "LLLLO--",
    ("governance.webhookendpoint", "rotate_secret"): "LLLLO--",
    ("governance.person", "deactivate_and_suspend_keys"): "LLLLO--",
    ("keys.apitoken", "revoke"): "LLLLO--",
    ("governance.webhookdelivery", "replay"): "LLLLO--",
    ("budgets.alert", "acknowledge"): "LLLLO--",
    ("budgets.alert", "resolve"): "LLLLO--",
    ("budgets.alert", "resolve_and_reinstate"): "LLLLO--",
}


def _target(world, model, action):
    if action == "reactivate":
        type(world.key["other"]).objects.filter(pk=world.key["other"].pk).update(status="suspended")
    return {"keys.virtualkey": world.key["other"], "keys.accessrequest": world.pending["other"],
            "axes.accessattempt": world.attempt, "budgets.alert": world.alert,
            "governance.webhookendpoint": world.webhook, "governance.webhookdelivery": world.delivery,
            "governance.person": world.stranger, "keys.apitoken": world.api_token}[model]


def _state(obj):
    fresh = type(obj).objects.filter(pk=obj.pk).first()
    return None if fresh is None else (getattr(fresh, "status", "present"), getattr(fresh, "expires_at", None),
                                       getattr(fresh, "secret_encrypted", None), getattr(fresh, "attempts", None),
                                       getattr(fresh, "is_active", None), getattr(fresh, "revoked_at", None))


def test_every_admin_action_has_its_row():
    found = set()
    for model, model_admin in admin.site._registry.items():
        for action in model_admin.actions or ():
            name = action if isinstance(action, str) else getattr(action, "__name__", "")
            if name != "delete_selected":
                found.add((model._meta.label_lower, name))
    documented = set(ACTIONS) | {("ledger.ledgerentry", "adjust")}  # finance's adjustment: tests/ledger (a form, not a reason)
    assert found == documented, (found - documented, documented - found)


ACTION_CELLS = [(model, action, role) for (model, action) in ACTIONS for role in ROLES]


@pytest.mark.parametrize("model, action, role", ACTION_CELLS, ids=[f"{m}-{a}-{r}" for m, a, r in ACTION_CELLS])
def test_admin_action(client, model, action, role):
    world = World()
    person = world.people[role]
    if person is not None:
        client.force_login(person)
    target = _target(world, model, action)
    before = _state(target)
    app_label, model_name = model.split(".")
    response = client.post(reverse(f"admin:{app_label}_{model_name}_changelist"), {
        "action": action, "_selected_action": [target.pk], "apply": "1", "reason": "matrix", "select_across": "0"})
    result = "L" if outcome(response) == "L" else ("O" if _state(target) != before else "-")
    assert result == ACTIONS[(model, action)][ROLES.index(role)], f"{action} on {model} as {role}"
