"""Grant writes: validation of the hierarchy, delegation, increases, renewals, the sweep."""
from decimal import Decimal

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from budgets import services
from budgets.models import Grant, IncreaseRequest
from governance.models import AuditEvent
from tests.budgets.factories import GrantFactory
from tests.governance.factories import PersonFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def parent():
    return GrantFactory(name="Team", limit_amount=Decimal("100"))


def test_children_may_not_promise_more_than_the_parent(parent):
    GrantFactory(parent=parent, limit_amount=Decimal("60"), scope=Grant.Scope.PROJECT, project="a").full_clean()
    child = Grant(name="b", owner=parent.owner, parent=parent, scope=Grant.Scope.PROJECT, project="b", team=parent.team,
                  limit_amount=Decimal("50"))
    with pytest.raises(ValidationError, match="would promise 110"):
        child.full_clean()
    parent.allow_oversubscription = True
    parent.save()
    child.full_clean()


def test_scope_needs_its_target_and_cycles_are_refused(parent):
    with pytest.raises(ValidationError, match="needs a project"):
        Grant(name="x", owner=parent.owner, scope=Grant.Scope.PROJECT, limit_amount=1).full_clean()
    child = GrantFactory(parent=parent, limit_amount=Decimal("1"))
    parent.parent = child
    with pytest.raises(ValidationError, match="descendants"):
        parent.full_clean()


def test_owner_delegates_within_the_parent_and_it_is_audited(parent):
    child = services.grant_delegate(parent=parent, actor=parent.owner, name="Search feature", scope=Grant.Scope.PROJECT,
                                    project="search", limit_amount=Decimal("40"))
    assert (child.parent, child.team, child.grant_class, child.owner) == (parent, parent.team, parent.grant_class, parent.owner)
    assert AuditEvent.objects.filter(action="grant.delegate", object_id=str(child.pk)).exists()
    with pytest.raises(ValidationError):
        services.grant_delegate(parent=parent, actor=parent.owner, name="Too much", scope=Grant.Scope.PROJECT,
                                project="x", limit_amount=Decimal("61"))
    with pytest.raises(PermissionDenied):
        services.grant_delegate(parent=parent, actor=PersonFactory(), name="Not mine", scope=Grant.Scope.PROJECT,
                                project="y", limit_amount=Decimal("1"))


def test_small_increase_is_approved_at_once_and_a_large_one_goes_to_the_parent_owner(parent, settings):
    settings.TOLLGATE_GRANT_AUTO_INCREASE = Decimal("10")
    child = services.grant_delegate(parent=parent, actor=parent.owner, name="c", scope=Grant.Scope.PROJECT,
                                    project="c", limit_amount=Decimal("20"), owner=PersonFactory())
    small = services.grant_increase_request(grant=child, requester=child.owner, new_limit=Decimal("25"), reason="launch")
    child.refresh_from_db()
    assert small.status == "approved" and child.limit_amount == Decimal("25")
    large = services.grant_increase_request(grant=child, requester=child.owner, new_limit=Decimal("90"), reason="growth")
    assert large.status == "pending" and large.approver == parent.owner
    with pytest.raises(PermissionDenied):
        services.increase_decide(request=large, actor=child.owner, approve=True)
    with pytest.raises(ValidationError, match="reason"):
        services.increase_decide(request=large, actor=parent.owner, approve=False, reason="")
    services.increase_decide(request=large, actor=parent.owner, approve=True)
    child.refresh_from_db()
    assert child.limit_amount == Decimal("90")
    assert set(IncreaseRequest.objects.values_list("status", flat=True)) == {"approved"}


def test_renewal_starts_the_next_term_and_the_sweep_expires_the_unrenewed():
    today = timezone.localdate()
    renewed = GrantFactory(term_start=today - timezone.timedelta(days=80), renews_at=today + timezone.timedelta(days=10))
    lapsed = GrantFactory(renews_at=today - timezone.timedelta(days=1))
    services.grant_renew(grant=renewed, actor=renewed.owner)
    renewed.refresh_from_db()
    assert renewed.term_start == today + timezone.timedelta(days=11) and renewed.renews_at == today + timezone.timedelta(days=101)
    assert services.grants_expire_sweep() == 1 and services.grants_expire_sweep() == 0
    lapsed.refresh_from_db()
    assert lapsed.status == "expired"
