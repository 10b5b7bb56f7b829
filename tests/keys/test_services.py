"""Access requests and the key lifecycle, as the services see them."""
from decimal import Decimal

import pytest
from django.core import mail
from django.core.exceptions import PermissionDenied
from django.utils import timezone

from gateway.models import ModelAlias
from governance.models import AuditEvent, Membership
from keys import services
from keys.models import ProvisioningPolicy, VirtualKey
from keys.selectors import key_by_secret
from tests.gateway.factories import ModelAliasFactory
from tests.governance.factories import MembershipFactory, TeamFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def member():
    return MembershipFactory(role=Membership.Role.MEMBER)


@pytest.fixture
def approver(member):
    return MembershipFactory(team=member.team, role=Membership.Role.APPROVER).person


def submit(member, *, aliases=None, **overrides):
    fields = dict(requester=member.person, team=member.team, aliases=aliases or [ModelAliasFactory(name="fast")],
                  use_case="summarise support tickets", key_class="experimentation", environment="development",
                  project="tickets", duration_days=30, monthly_budget=Decimal("20"))
    fields.update(overrides)
    return services.request_submit(**fields)


def test_standard_request_is_provisioned_at_once_with_expiry_and_audit(member, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        submitted = submit(member)
    key = submitted.issued.key
    assert key_by_secret(submitted.issued.secret) == key
    assert (key.status, key.person, key.team, key.approved_by_policy) == ("active", member.person, member.team, True)
    assert 29 <= (key.expires_at - timezone.now()).days <= 30
    assert key.default_tags == {"environment": "development", "project": "tickets"}
    assert list(key.allowed_models.values_list("name", flat=True)) == ["fast"]
    assert submitted.request.status == "approved" and submitted.request.decided_by_policy
    assert {"access_request.submit", "key.issue", "access_request.approve"} <= set(AuditEvent.objects.values_list("action", flat=True))
    assert mail.outbox[-1].to == [member.person.email] and "approved" in mail.outbox[-1].subject


@pytest.mark.parametrize("overrides, reason", [
    ({"aliases": "premium"}, "premium models"),
    ({"duration_days": 120}, "duration 120 days"),
    ({"monthly_budget": Decimal("500")}, "monthly budget 500"),
    ({"key_class": "production"}, "production keys"),
])
def test_policy_routes_requests_to_an_approver(member, approver, overrides, reason, django_capture_on_commit_callbacks):
    if overrides.get("aliases") == "premium":
        overrides["aliases"] = [ModelAliasFactory(name="smart", tier=ModelAlias.Tier.PREMIUM)]
    with django_capture_on_commit_callbacks(execute=True):
        submitted = submit(member, **overrides)
    assert submitted.issued is None and VirtualKey.objects.count() == 0
    assert submitted.request.status == "pending" and any(reason in r for r in submitted.request.review_reasons)
    assert [member.person.email] in [m.to for m in mail.outbox]
    assert any(approver.email in m.to and member.team.owner.email in m.to for m in mail.outbox)


def test_policy_thresholds_are_editable(member):
    policy = ProvisioningPolicy.current()
    policy.auto_approve_max_budget = Decimal("1000")
    policy.save()
    assert submit(member, monthly_budget=Decimal("500")).issued is not None


def test_only_members_can_request_for_a_team(member):
    with pytest.raises(services.RequestRefused) as excinfo:
        submit(member, team=TeamFactory())
    assert excinfo.value.field == "team"


def test_second_key_for_same_person_team_and_project_is_refused_naming_the_first(member):
    first = submit(member).issued.key
    with pytest.raises(services.RequestRefused, match=first.prefix) as excinfo:
        submit(member)
    assert excinfo.value.field == "project" and VirtualKey.objects.count() == 1
    assert submit(member, project="other-project").issued is not None


def test_active_key_limit_per_person(member):
    policy = ProvisioningPolicy.current()
    policy.max_active_keys_per_person = 2
    policy.save()
    submit(member, project="a")
    submit(member, project="b")
    with pytest.raises(services.RequestRefused, match="most policy allows"):
        submit(member, project="c")


def test_approved_request_is_collected_once_by_the_requester(member, approver):
    request = submit(member, duration_days=120).request
    services.request_approve(access_request=request, actor=approver, reason="fine")
    assert VirtualKey.objects.count() == 0  # the approver never sees the secret
    with pytest.raises(PermissionDenied):
        services.request_collect(access_request=request, requester=approver)
    issued = services.request_collect(access_request=request, requester=member.person)
    assert key_by_secret(issued.secret) == issued.key and not issued.key.approved_by_policy
    with pytest.raises(services.RequestRefused):
        services.request_collect(access_request=request, requester=member.person)


def test_denied_request_creates_no_key_and_needs_a_reason(member, approver):
    request = submit(member, duration_days=120).request
    with pytest.raises(services.RequestRefused):
        services.request_deny(access_request=request, actor=approver, reason=" ")
    services.request_deny(access_request=request, actor=approver, reason="use the shared key")
    request.refresh_from_db()
    assert (request.status, request.decision_reason, request.decided_by) == ("denied", "use the shared key", approver)
    assert VirtualKey.objects.count() == 0
    with pytest.raises(services.RequestRefused):
        services.request_collect(access_request=request, requester=member.person)


def test_members_cannot_approve_and_nobody_approves_their_own(member, approver):
    request = submit(member, duration_days=120).request
    bystander = MembershipFactory(team=member.team, role=Membership.Role.MEMBER).person
    with pytest.raises(PermissionDenied):
        services.request_approve(access_request=request, actor=bystander)
    approver_membership = Membership.objects.get(person=approver, team=member.team)
    own = submit(approver_membership, project="x", duration_days=120).request
    with pytest.raises(PermissionDenied):
        services.request_approve(access_request=own, actor=approver)


def test_extension_and_budget_requests_apply_on_approval(member, approver):
    key = submit(member).issued.key
    old_expiry = key.expires_at
    extension = services.request_change(key=key, requester=member.person, kind="extension", use_case="more time", duration_days=60)
    budget = services.request_change(key=key, requester=member.person, kind="budget", use_case="launch", monthly_budget=Decimal("80"))
    services.request_approve(access_request=extension, actor=approver)
    services.request_approve(access_request=budget, actor=approver)
    key.refresh_from_db()
    assert (key.expires_at - old_expiry).days == 60 and key.monthly_budget == Decimal("80")


def test_rotation_keeps_the_old_secret_for_the_grace_period_only(member):
    import time_machine

    issued = submit(member).issued
    rotated = services.key_rotate(key=issued.key, actor=member.person, grace_hours=24)
    assert key_by_secret(rotated.secret) == issued.key and key_by_secret(issued.secret) == issued.key
    with time_machine.travel(timezone.now() + timezone.timedelta(hours=25)):
        assert key_by_secret(issued.secret) is None
        assert key_by_secret(rotated.secret) == issued.key
    assert AuditEvent.objects.filter(action="key.rotate").count() == 1


def test_revocation_also_ends_a_rotation_grace(member):
    issued = submit(member).issued
    services.key_rotate(key=issued.key, actor=member.person)
    services.key_revoke(key=issued.key, actor=member.person, reason="leaked")
    key = key_by_secret(issued.secret)
    assert key is None or key.status == "revoked"


def test_suspend_reactivate_and_illegal_transitions(member):
    key = submit(member).issued.key
    services.key_suspend(key=key, actor=None, reason="investigating")
    with pytest.raises(services.KeyStateError):
        services.key_rotate(key=key, actor=None)
    services.key_reactivate(key=key, actor=None, reason="cleared")
    services.key_revoke(key=key, actor=None, reason="done")
    with pytest.raises(services.KeyStateError):
        services.key_reactivate(key=key, actor=None, reason="undo")
    actions = list(AuditEvent.objects.filter(object_type="keys.virtualkey").order_by("id").values_list("action", flat=True))
    assert actions == ["key.issue", "key.suspend", "key.reactivate", "key.revoke"]


def test_expiry_sweep_expires_keys_and_warns_once_ahead(member, django_capture_on_commit_callbacks):
    soon = submit(member, project="soon").issued.key
    due = submit(member, project="due").issued.key
    VirtualKey.objects.filter(pk=soon.pk).update(expires_at=timezone.now() + timezone.timedelta(days=5))
    VirtualKey.objects.filter(pk=due.pk).update(expires_at=timezone.now() - timezone.timedelta(minutes=1))
    with django_capture_on_commit_callbacks(execute=True):
        first = services.keys_expire_sweep()
        second = services.keys_expire_sweep()
    assert (first.expired, first.notices) == (1, 1) and (second.expired, second.notices) == (0, 0)
    due.refresh_from_db()
    assert due.status == "expired"
    subjects = [m.subject for m in mail.outbox]
    assert sum("expires in 7 day" in s for s in subjects) == 1 and sum("has expired" in s for s in subjects) == 1
    with django_capture_on_commit_callbacks(execute=True):
        assert services.keys_expire_sweep(now=timezone.now() + timezone.timedelta(days=4, hours=12)).notices == 1
    assert sum("expires in 1 day" in m.subject for m in mail.outbox) == 1
