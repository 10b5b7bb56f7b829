import pytest
from django.contrib import admin
from django.contrib.auth.models import Group

from governance import roles
from tests.budgets.factories import GrantFactory
from tests.gateway.factories import DeploymentFactory, ModelPriceFactory
from tests.governance.factories import MembershipFactory, PersonFactory
from tests.keys.factories import VirtualKeyFactory
from tests.ledger.factories import LedgerEntryFactory

pytestmark = pytest.mark.django_db


def _perms(role: str) -> set[str]:
    group = Group.objects.get(name=role)
    return {f"{p.content_type.app_label}.{p.codename}" for p in group.permissions.select_related("content_type")}


def test_migration_creates_the_three_roles():
    assert set(Group.objects.values_list("name", flat=True)) >= {roles.IT_ADMIN, roles.FINANCE, roles.SECURITY_AUDITOR}


def test_it_admin_manages_keys_and_providers_but_only_reads_the_ledger():
    perms = _perms(roles.IT_ADMIN)
    assert {"keys.change_virtualkey", "gateway.change_provider", "budgets.add_grant", "governance.view_auditevent"} <= perms
    assert "ledger.change_ledgerentry" not in perms and "ledger.delete_ledgerentry" not in perms


def test_finance_reads_spend_and_grants_but_changes_neither_grants_nor_providers():
    perms = _perms(roles.FINANCE)
    assert {"ledger.view_ledgerentry", "budgets.view_grant", "governance.view_costcenter"} <= perms
    assert not {"gateway.change_provider", "keys.change_virtualkey", "budgets.change_grant"} & perms


def test_security_auditor_only_reads():
    perms = _perms(roles.SECURITY_AUDITOR)
    assert "governance.view_auditevent" in perms and "keys.view_virtualkey" in perms
    assert all(p.split(".")[1].startswith("view_") for p in perms)


def test_nobody_may_edit_the_audit_trail():
    for role in roles.ROLE_PERMISSIONS:
        assert not {"governance.change_auditevent", "governance.delete_auditevent"} & _perms(role)


def test_auditor_sees_the_audit_trail_and_cannot_change_a_provider(client):
    auditor = PersonFactory(roles=[roles.SECURITY_AUDITOR])
    provider = DeploymentFactory().provider_model.provider
    client.force_login(auditor)
    assert client.get("/admin/governance/auditevent/").status_code == 200
    response = client.post(f"/admin/gateway/provider/{provider.pk}/change/", {"name": "hijacked"})
    assert response.status_code == 403
    provider.refresh_from_db()
    assert provider.name != "hijacked"


def test_finance_cannot_open_provider_admin(client):
    client.force_login(PersonFactory(roles=[roles.FINANCE]))
    assert client.get("/admin/gateway/provider/add/").status_code == 403
    assert client.get("/admin/ledger/ledgerentry/").status_code == 200


@pytest.fixture
def one_of_everything():
    MembershipFactory()
    ModelPriceFactory()
    DeploymentFactory()
    GrantFactory()
    LedgerEntryFactory(key=VirtualKeyFactory())


@pytest.mark.parametrize("model", list(admin.site._registry), ids=lambda m: m._meta.label_lower)
def test_every_admin_lists_searches_and_opens_its_forms(admin_client, one_of_everything, model):
    model_admin = admin.site._registry[model]
    base = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
    assert admin_client.get(base).status_code == 200
    if model_admin.search_fields:
        assert admin_client.get(base, {"q": "x"}).status_code == 200
    obj = model.objects.first()
    if obj is not None:
        assert admin_client.get(f"{base}{obj.pk}/change/").status_code == 200
    expected_add = 200 if model_admin.has_add_permission(_superuser_request()) else 403
    assert admin_client.get(f"{base}add/").status_code == expected_add


def _superuser_request():
    from django.test import RequestFactory

    request = RequestFactory().get("/")
    request.user = PersonFactory(is_superuser=True, is_staff=True)
    return request


def test_admin_edit_is_audited_with_before_and_after(admin_client):
    from governance.models import AuditEvent, Team
    from tests.governance.factories import TeamFactory

    team = TeamFactory(name="Old name")
    data = {
        "name": "New name", "slug": team.slug, "department": team.department_id, "cost_center": team.cost_center_id,
        "owner": team.owner_id, "is_active": "on", "ip_allowlist": "[]", "body_logging": "off", "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0",
    }
    response = admin_client.post(f"/admin/governance/team/{team.pk}/change/", data, REMOTE_ADDR="10.9.8.7")
    assert response.status_code == 302
    assert Team.objects.get(pk=team.pk).name == "New name"
    event = AuditEvent.objects.get(action="team.update")
    assert (event.before["name"], event.after["name"], event.source_ip) == ("Old name", "New name", "10.9.8.7")
    assert len(event.request_id) >= 8


def test_virtual_key_admin_never_shows_the_hash(admin_client):
    key = VirtualKeyFactory()
    page = admin_client.get(f"/admin/keys/virtualkey/{key.pk}/change/").content.decode()
    assert key.key_hash not in page and key.secret not in page
    assert key.prefix in page


def test_bad_cidr_in_an_allowlist_is_a_field_error(admin_client):
    from tests.governance.factories import TeamFactory

    team = TeamFactory()
    data = {
        "name": team.name, "slug": team.slug, "department": team.department_id, "cost_center": team.cost_center_id,
        "owner": team.owner_id, "is_active": "on", "ip_allowlist": '["10.0.0.0/8", "not-a-network"]', "body_logging": "off",
        "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0",
    }
    response = admin_client.post(f"/admin/governance/team/{team.pk}/change/", data)
    assert response.status_code == 200 and "is not an IP network" in response.content.decode()
    team.refresh_from_db()
    assert team.ip_allowlist == []
