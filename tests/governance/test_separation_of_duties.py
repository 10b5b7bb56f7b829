"""Who may act, as the issue's reproductions found it: seeing is never enough to act, nobody decides their
own request, privileged fields are for superusers, and increases cannot be split to dodge an approver."""
import pytest

from governance import roles
from keys.models import VirtualKey
from tests.governance.factories import MembershipFactory, PersonFactory
from tests.keys.factories import VirtualKeyFactory

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("role", [roles.SECURITY_AUDITOR, roles.FINANCE])
def test_roles_that_see_every_key_cannot_revoke_one(client, role):
    key = VirtualKeyFactory()
    client.force_login(PersonFactory(roles=[role]))
    assert client.get(f"/keys/{key.pk}/").status_code == 200  # they may see it
    response = client.post(f"/keys/{key.pk}/revoke/", {"reason": "curious"})
    assert response.status_code == 403
    assert VirtualKey.objects.get(pk=key.pk).status == VirtualKey.Status.ACTIVE


def test_the_holder_the_team_owner_and_it_may_revoke(client):
    for who in ("holder", "owner", "it"):
        key = VirtualKeyFactory()
        actor = {"holder": key.person, "owner": key.team.owner, "it": PersonFactory(roles=[roles.IT_ADMIN])}[who]
        client.force_login(actor)
        response = client.post(f"/keys/{key.pk}/revoke/", {"reason": "no longer needed"})
        assert response.status_code == 302, who
        assert VirtualKey.objects.get(pk=key.pk).status == VirtualKey.Status.REVOKED, who


def test_a_team_member_who_is_not_an_approver_cannot_revoke_a_colleagues_key(client):
    key = VirtualKeyFactory()
    colleague = MembershipFactory(team=key.team).person
    client.force_login(colleague)
    assert client.post(f"/keys/{key.pk}/revoke/", {"reason": "x"}).status_code == 404  # not even visible
    assert VirtualKey.objects.get(pk=key.pk).status == VirtualKey.Status.ACTIVE


def test_it_cannot_approve_its_own_access_request(client):
    from django.core.exceptions import PermissionDenied

    from keys import services
    from keys.models import AccessRequest
    from tests.gateway.factories import ModelAliasFactory

    it = PersonFactory(roles=[roles.IT_ADMIN])
    team = MembershipFactory(person=it).team
    premium = ModelAliasFactory(name="smart", tier="premium")
    submitted = services.request_submit(requester=it, team=team, aliases=[premium], use_case="agents",
                                        key_class="production", environment="production", project="", duration_days=90,
                                        monthly_budget=5000)
    request = submitted.request
    assert request.status == AccessRequest.Status.PENDING
    with pytest.raises(PermissionDenied):
        services.request_approve(access_request=request, actor=it)
    client.force_login(it)
    assert request not in client.get("/keys/approvals/").context["pending"]
    assert client.post(f"/keys/approvals/{request.pk}/", {"decision": "approve"}).status_code == 404
    assert AccessRequest.objects.get(pk=request.pk).status == AccessRequest.Status.PENDING
    other_it = PersonFactory(roles=[roles.IT_ADMIN])  # a second IT admin may
    services.request_approve(access_request=request, actor=other_it)
    assert AccessRequest.objects.get(pk=request.pk).status == AccessRequest.Status.APPROVED


def test_it_cannot_grant_itself_superuser_or_roles_in_the_admin(client):
    from governance.models import Person

    it = PersonFactory(roles=[roles.IT_ADMIN])
    client.force_login(it)
    page = client.get(f"/admin/governance/person/{it.pk}/change/")
    assert page.status_code == 200
    form = page.context["adminform"].form
    assert not {"is_superuser", "groups", "user_permissions"} & set(form.fields)  # shown read-only
    data = {"username": it.username, "email": it.email, "first_name": "x", "last_name": "y", "is_active": "on",
            "is_staff": "on", "is_superuser": "on", "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00",
            "department": "", "cost_center": ""}
    client.post(f"/admin/governance/person/{it.pk}/change/", data)
    assert not Person.objects.get(pk=it.pk).is_superuser


def test_it_cannot_change_a_superusers_password_or_details(client):
    root = PersonFactory(is_superuser=True, is_staff=True)
    client.force_login(PersonFactory(roles=[roles.IT_ADMIN]))
    assert client.get(f"/admin/governance/person/{root.pk}/password/").status_code == 403
    assert client.post(f"/admin/governance/person/{root.pk}/password/",
                       {"password1": "pwned-Password-123", "password2": "pwned-Password-123"}).status_code == 403
    root.refresh_from_db()
    assert root.check_password("correct horse battery staple")


def test_small_increases_cannot_add_up_past_the_threshold_without_a_decision(settings):
    from decimal import Decimal

    from budgets import services
    from budgets.models import Grant
    from tests.budgets.factories import GrantFactory

    settings.TOLLGATE_GRANT_AUTO_INCREASE = Decimal("100")
    parent = GrantFactory(name="Team", limit_amount=Decimal("100000"))
    child = services.grant_delegate(parent=parent, actor=parent.owner, name="c", scope=Grant.Scope.PROJECT,
                                    project="c", limit_amount=Decimal("1000"), owner=PersonFactory())
    statuses = []
    for step in range(1, 11):
        request = services.grant_increase_request(grant=child, requester=child.owner,
                                                  new_limit=Grant.objects.get(pk=child.pk).limit_amount + 100, reason=f"+{step}")
        statuses.append(request.status)
    assert statuses[0] == "approved" and set(statuses[1:]) == {"pending"}
    assert Grant.objects.get(pk=child.pk).limit_amount == Decimal("1100")


def test_nobody_decides_their_own_increase_even_owning_the_parent(settings):
    from decimal import Decimal

    from django.core.exceptions import PermissionDenied

    from budgets import services
    from budgets.models import Grant
    from tests.budgets.factories import GrantFactory

    settings.TOLLGATE_GRANT_AUTO_INCREASE = Decimal("0")
    parent = GrantFactory(name="Team", limit_amount=Decimal("1000"))
    child = services.grant_delegate(parent=parent, actor=parent.owner, name="mine", scope=Grant.Scope.PROJECT,
                                    project="m", limit_amount=Decimal("10"))  # owned by the parent's owner
    request = services.grant_increase_request(grant=child, requester=parent.owner, new_limit=Decimal("500"), reason="more")
    assert request.status == "pending" and request.approver is None  # IT decides
    with pytest.raises(PermissionDenied):
        services.increase_decide(request=request, actor=parent.owner, approve=True)


def test_finance_sees_grants_but_cannot_delegate_raise_or_renew_them(client):
    from decimal import Decimal

    from budgets.models import Grant
    from tests.budgets.factories import GrantFactory

    grant = GrantFactory(name="Team", limit_amount=Decimal("100"), renews_at="2030-01-01")
    client.force_login(PersonFactory(roles=[roles.FINANCE]))
    assert client.get("/admin/budgets/grant/").status_code == 200
    client.post(f"/budgets/{grant.pk}/delegate/", {"name": "x", "scope": "project", "project": "x", "limit_amount": "5"})
    client.post(f"/budgets/{grant.pk}/renew/")
    client.post(f"/admin/budgets/grant/{grant.pk}/change/", {"name": "hacked", "limit_amount": "999999"})
    grant.refresh_from_db()
    assert (grant.name, grant.limit_amount, grant.children.count()) == ("Team", Decimal("100"), 0)
    assert str(grant.renews_at) == "2030-01-01"
    assert not Grant.objects.filter(name="x").exists()
