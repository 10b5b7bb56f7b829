"""IT's console for keys: actions that ask why, the review queue, filters, history, and large-table paging."""
from decimal import Decimal

import pytest
from django.contrib import admin
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from governance import roles
from governance.bigtables import EstimatedCountPaginator
from governance.models import AuditEvent, Membership
from keys import services
from keys.models import AccessRequest, ProvisioningPolicy, VirtualKey
from tests.gateway.factories import ModelAliasFactory
from tests.governance.factories import MembershipFactory, PersonFactory, TeamFactory
from tests.keys.factories import VirtualKeyFactory

pytestmark = pytest.mark.django_db

KEYS = "/admin/keys/virtualkey/"
REQUESTS = "/admin/keys/accessrequest/"
DAY = timezone.timedelta(days=1)


def choose(client, action, objects, url=KEYS, **extra):
    """The changelist's POST: pick an action for the ticked rows."""
    return client.post(url, {"action": action, "_selected_action": [o.pk for o in objects], "index": 0, **extra})


def confirm(client, action, objects, reason, url=KEYS, **extra):
    """The reason page's POST back."""
    data = {"action": action, "_selected_action": [o.pk for o in objects], "select_across": "0", "apply": "yes",
            "reason": reason, **extra}
    return client.post(url, data, follow=True)


def shown_messages(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def listed(client, url=KEYS, **params) -> set[int]:
    response = client.get(url, params)
    assert response.status_code == 200
    return {obj.pk for obj in response.context["cl"].result_list}


def key_events(key) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(object_type="keys.virtualkey", object_id=str(key.pk)).order_by("id"))


# --- Key actions ----------------------------------------------------------------------------------

ACTIONS = [
    # action, status before, status after
    ("revoke", "active", "revoked"),
    ("suspend", "active", "suspended"),
    ("reactivate", "suspended", "active"),
    ("extend_30_days", "active", "active"),
]


@pytest.mark.parametrize("action, before, after", ACTIONS, ids=[a[0] for a in ACTIONS])
def test_each_key_action_asks_for_a_reason_before_changing_anything(admin_client, action, before, after):
    keys = VirtualKeyFactory.create_batch(2, status=before, expires_at=timezone.now() + 5 * DAY)

    response = choose(admin_client, action, keys)

    assert response.status_code == 200
    assert response.templates[0].name == "admin/keys/action_reason.html"
    page = response.content.decode()
    assert 'name="reason"' in page and f'name="action" value="{action}"' in page and 'name="apply"' in page
    assert all(f'name="_selected_action" value="{k.pk}"' in page and k.prefix in page for k in keys)
    assert {k.status for k in VirtualKey.objects.all()} == {before}
    assert not AuditEvent.objects.exists()


@pytest.mark.parametrize("action, before, after", ACTIONS, ids=[a[0] for a in ACTIONS])
def test_confirmed_key_action_changes_each_key_and_audits_the_reason_and_the_actor(admin_client, admin_user, action, before, after):
    expires = timezone.now() + 5 * DAY
    keys = VirtualKeyFactory.create_batch(2, status=before, expires_at=expires)

    response = confirm(admin_client, action, keys, "ticket IT-42")

    assert response.status_code == 200 and response.redirect_chain[-1][0] == KEYS
    assert any(m.startswith("2 virtual keys ") for m in shown_messages(response))
    for key in keys:
        key.refresh_from_db()
        assert key.status == after
        [event] = key_events(key)
        assert event.action == f"key.{action.split('_')[0]}"
        assert (event.actor, event.actor_label, event.after["reason"]) == (admin_user, "admin", "ticket IT-42")
    if action == "extend_30_days":
        assert all(k.expires_at == expires + 30 * DAY for k in keys)


def test_missing_reason_shows_the_page_again_with_an_error_and_changes_nothing(admin_client):
    key = VirtualKeyFactory()

    response = confirm(admin_client, "revoke", [key], "   ")

    assert response.status_code == 200 and not response.redirect_chain
    assert response.context["form"].errors == {"reason": ["This field is required."]}
    assert "This field is required." in response.content.decode()
    key.refresh_from_db()
    assert key.status == "active" and not AuditEvent.objects.exists()


def test_key_the_service_refuses_is_reported_and_skipped_while_the_others_change(admin_client):
    active, revoked = VirtualKeyFactory(), VirtualKeyFactory(status="revoked")

    response = confirm(admin_client, "suspend", [active, revoked], "incident 7")

    active.refresh_from_db(), revoked.refresh_from_db()
    assert (active.status, revoked.status) == ("suspended", "revoked")
    notes = shown_messages(response)
    assert "1 virtual key suspended." in notes
    assert any(m.startswith("Skipped 1: ") and str(revoked) in m and "revoked key cannot be" in m for m in notes)
    assert key_events(revoked) == [] and len(key_events(active)) == 1


def test_select_across_acts_on_every_key_the_filters_list(admin_client):
    active = VirtualKeyFactory.create_batch(3)
    revoked = VirtualKeyFactory(status="revoked")

    response = confirm(admin_client, "suspend", active[:1], "contractor left", url=f"{KEYS}?status=active",
                       select_across="1")

    assert "3 virtual keys suspended." in shown_messages(response)
    assert set(VirtualKey.objects.filter(status="suspended").values_list("pk", flat=True)) == {k.pk for k in active}
    revoked.refresh_from_db()
    assert revoked.status == "revoked"


def test_people_who_may_only_view_keys_get_no_actions(client):
    client.force_login(PersonFactory(roles=[roles.SECURITY_AUDITOR]))
    key = VirtualKeyFactory()

    response = client.get(KEYS)

    assert response.status_code == 200 and not response.context["action_form"]
    choose(client, "revoke", [key])
    key.refresh_from_db()
    assert key.status == "active"


# --- The review queue -----------------------------------------------------------------------------


def pending_request(**overrides) -> AccessRequest:
    """A request policy sends to an approver (production keys need one)."""
    member = MembershipFactory(role=Membership.Role.MEMBER)
    fields = dict(requester=member.person, team=member.team, aliases=[ModelAliasFactory()], use_case="ticket triage",
                  key_class="production", environment="production", project="triage", duration_days=30,
                  monthly_budget=Decimal("20"))
    submitted = services.request_submit(**{**fields, **overrides})
    assert submitted.request.status == "pending"
    return submitted.request


def test_queue_opens_on_pending_requests_with_all_available(admin_client, admin_user):
    waiting = pending_request()
    denied = pending_request()
    services.request_deny(access_request=denied, actor=admin_user, reason="no budget")

    response = admin_client.get(REQUESTS)

    assert {r.pk for r in response.context["cl"].result_list} == {waiting.pk}
    page = response.content.decode()
    assert "production keys need an approver" in page and waiting.aliases.get().name in page
    assert listed(admin_client, REQUESTS, status="all") == {waiting.pk, denied.pk}
    assert listed(admin_client, REQUESTS, status="denied") == {denied.pk}


def test_approving_from_the_queue_allows_an_empty_reason_and_is_audited(admin_client, admin_user):
    request = pending_request()

    assert choose(admin_client, "approve", [request], url=REQUESTS).status_code == 200
    assert AccessRequest.objects.get(pk=request.pk).status == "pending"
    response = confirm(admin_client, "approve", [request], "", url=REQUESTS)

    request.refresh_from_db()
    assert (request.status, request.decided_by, request.decided_by_policy) == ("approved", admin_user, False)
    assert "1 access request approved." in shown_messages(response)
    event = AuditEvent.objects.get(action="access_request.approve", object_id=str(request.pk))
    assert (event.actor, event.after["reason"]) == (admin_user, "")
    page = admin_client.get(f"{REQUESTS}{request.pk}/change/").content.decode()
    assert "access_request.approve" in page and "access_request.submit" in page


def test_approving_an_extension_extends_its_key(admin_client):
    key = VirtualKeyFactory(expires_at=timezone.now() + 2 * DAY)
    request = services.request_change(key=key, requester=key.person, kind="extension", use_case="still needed",
                                      duration_days=30)

    confirm(admin_client, "approve", [request], "fine", url=REQUESTS)

    old_expiry = key.expires_at
    key.refresh_from_db()
    assert key.expires_at == old_expiry + 30 * DAY
    assert key_events(key)[-1].after["reason"] == f"request #{request.pk}: fine"


def test_denying_needs_a_reason(admin_client, admin_user):
    request = pending_request()

    response = confirm(admin_client, "deny", [request], "", url=REQUESTS)

    assert response.context["form"].errors == {"reason": ["This field is required."]}
    request.refresh_from_db()
    assert request.status == "pending"
    assert not AuditEvent.objects.filter(action="access_request.deny").exists()

    response = confirm(admin_client, "deny", [request], "use the shared staging key", url=REQUESTS)

    request.refresh_from_db()
    assert (request.status, request.decision_reason, request.decided_by) == ("denied", "use the shared staging key", admin_user)
    assert "1 access request denied." in shown_messages(response)


def test_deciding_an_already_decided_request_is_reported_and_skipped(admin_client, admin_user):
    waiting, denied = pending_request(), pending_request()
    services.request_deny(access_request=denied, actor=admin_user, reason="duplicate")

    response = confirm(admin_client, "approve", [waiting, denied], "ok", url=f"{REQUESTS}?status=all")

    waiting.refresh_from_db(), denied.refresh_from_db()
    assert (waiting.status, denied.status) == ("approved", "denied")
    assert any(m.startswith("Skipped 1: ") and "already denied" in m for m in shown_messages(response))


def test_requests_cannot_be_added_edited_or_deleted_in_the_form(admin_client):
    request = pending_request()

    assert admin_client.get(f"{REQUESTS}add/").status_code == 403
    admin_client.post(f"{REQUESTS}{request.pk}/change/", {"status": "approved", "decision_reason": "sneaky"})
    request.refresh_from_db()
    assert (request.status, request.decision_reason) == ("pending", "")
    assert admin_client.post(f"{REQUESTS}{request.pk}/delete/", {"post": "yes"}).status_code == 403
    assert AccessRequest.objects.filter(pk=request.pk).exists()


# --- Filters --------------------------------------------------------------------------------------


def aged(key, *, days: int):
    VirtualKey.objects.filter(pk=key.pk).update(created_at=timezone.now() - days * DAY)
    return key


def test_expires_within_lists_only_active_keys_expiring_in_the_window(admin_client):
    now = timezone.now()
    in_3 = VirtualKeyFactory(expires_at=now + 3 * DAY)
    in_20 = VirtualKeyFactory(expires_at=now + 20 * DAY)
    VirtualKeyFactory(expires_at=now + 40 * DAY)
    VirtualKeyFactory(expires_at=now + 3 * DAY, status="suspended")
    VirtualKeyFactory(expires_at=now - DAY)  # overdue, not yet swept
    VirtualKeyFactory(expires_at=None)

    assert listed(admin_client, expires_within="7") == {in_3.pk}
    assert listed(admin_client, expires_within="30") == {in_3.pk, in_20.pk}


def test_unused_lists_active_keys_older_than_30_days_not_used_in_30_days(admin_client):
    now = timezone.now()
    never_used = aged(VirtualKeyFactory(last_used_at=None), days=60)
    used_long_ago = aged(VirtualKeyFactory(last_used_at=now - 40 * DAY), days=60)
    aged(VirtualKeyFactory(last_used_at=now - DAY), days=60)
    aged(VirtualKeyFactory(last_used_at=None), days=10)
    aged(VirtualKeyFactory(last_used_at=None, status="revoked"), days=60)

    assert listed(admin_client, unused="30") == {never_used.pk, used_long_ago.pk}


def test_provisioned_by_holder_status_team_and_class_filters(admin_client):
    team = TeamFactory()
    by_policy = VirtualKeyFactory(approved_by_policy=True, team=team)
    by_approver = VirtualKeyFactory(approved_by_policy=False, key_class="production")
    service = VirtualKeyFactory(person=None, status="suspended", team=team)

    assert listed(admin_client, provisioned_by="policy") == {by_policy.pk}
    assert listed(admin_client, provisioned_by="approver") == {by_approver.pk, service.pk}
    assert listed(admin_client, holder="service") == {service.pk}
    assert listed(admin_client, holder="person") == {by_policy.pk, by_approver.pk}
    assert listed(admin_client, status="suspended") == {service.pk}
    assert listed(admin_client, team__id__exact=team.pk) == {by_policy.pk, service.pk}
    assert listed(admin_client, key_class="production") == {by_approver.pk}


def test_search_by_prefix_name_email_and_team(admin_client):
    key = VirtualKeyFactory(name="billing-bot")
    other = VirtualKeyFactory()

    assert listed(admin_client, q=key.prefix) == {key.pk}
    assert listed(admin_client, q=key.prefix[:9]) >= {key.pk}
    assert listed(admin_client, q="billing") == {key.pk}
    assert listed(admin_client, q=key.person.email) == {key.pk}
    assert listed(admin_client, q=key.person.email.split("@")[0] + "@") == {key.pk}
    assert listed(admin_client, q=other.team.slug) == {other.pk}


# --- Change page ----------------------------------------------------------------------------------


def test_change_page_shows_the_keys_history_newest_first_escaped(admin_client, admin_user):
    key = VirtualKeyFactory()
    services.key_suspend(key=key, actor=admin_user, reason="<script>alert(1)</script> looked odd")
    services.key_reactivate(key=key, actor=admin_user, reason="false alarm")

    page = admin_client.get(f"{KEYS}{key.pk}/change/").content.decode()

    assert page.index("key.reactivate") < page.index("key.suspend")
    assert "false alarm" in page and "&lt;script&gt;alert(1)&lt;/script&gt; looked odd" in page
    assert "<script>alert(1)" not in page


def test_long_history_links_to_the_keys_full_audit_trail(admin_client, admin_user, monkeypatch):
    monkeypatch.setattr("keys.admin.HISTORY_ROWS", 1)
    key, other = VirtualKeyFactory(), VirtualKeyFactory()
    services.key_suspend(key=key, actor=admin_user, reason="reason one")
    services.key_reactivate(key=key, actor=admin_user, reason="reason two")
    services.key_suspend(key=other, actor=admin_user, reason="other key")

    page = admin_client.get(f"{KEYS}{key.pk}/change/").content.decode()

    assert "reason two" in page and "reason one" not in page
    trail = admin_client.get("/admin/governance/auditevent/", {"object_type": "keys.virtualkey", "object_id": key.pk})
    assert f"/admin/governance/auditevent/?object_type=keys.virtualkey&amp;object_id={key.pk}" in page
    assert {e.object_id for e in trail.context["cl"].result_list} == {str(key.pk)} and trail.context["cl"].result_count == 2


def test_status_and_expiry_cannot_be_edited_on_the_form(admin_client):
    key = VirtualKeyFactory()
    form = admin_client.get(f"{KEYS}{key.pk}/change/").context["adminform"].form
    assert "status" not in form.fields and "expires_at" not in form.fields and "name" in form.fields


def test_no_page_shows_a_hash_or_a_secret(admin_client, admin_user):
    team = TeamFactory()
    issued = services.key_issue(name="svc", team=team, person=None, actor=admin_user, with_signing_secret=True)
    rotated = services.key_rotate(key=issued.key, actor=admin_user, grace_hours=1)
    key = VirtualKey.objects.get(pk=issued.key.pk)
    secrets = [issued.secret, rotated.secret, issued.signing_secret, key.key_hash, key.previous_key_hash,
               key.signing_secret_encrypted]

    pages = [
        admin_client.get(KEYS).content.decode(),
        admin_client.get(KEYS, {"q": key.prefix}).content.decode(),
        admin_client.get(f"{KEYS}{key.pk}/change/").content.decode(),
        choose(admin_client, "revoke", [key]).content.decode(),
    ]

    assert all(key.prefix in page for page in pages)
    assert not [s for s in secrets for page in pages if s in page]


# --- Large tables ---------------------------------------------------------------------------------


def _full_table_counts(queries, table: str) -> list[str]:
    return [q["sql"] for q in queries
            if "COUNT(" in q["sql"].upper() and f'"{table}"' in q["sql"] and "WHERE" not in q["sql"].upper()
            and "LIMIT" not in q["sql"].upper()]


def test_changelist_never_counts_the_whole_table(admin_client):
    VirtualKeyFactory.create_batch(3)

    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(KEYS)

    assert response.status_code == 200 and len(response.context["cl"].result_list) == 3
    assert _full_table_counts(queries.captured_queries, "keys_virtualkey") == []
    with CaptureQueriesContext(connection) as queries:
        admin_client.get(REQUESTS, {"status": "all"})
    assert _full_table_counts(queries.captured_queries, "keys_accessrequest") == []


def test_past_the_exact_limit_the_count_is_an_estimate_and_pages_still_work(admin_client, monkeypatch):
    monkeypatch.setattr(EstimatedCountPaginator, "exact_up_to", 3)
    monkeypatch.setattr(admin.site._registry[VirtualKey], "list_per_page", 2)
    keys = VirtualKeyFactory.create_batch(6)

    with CaptureQueriesContext(connection) as queries:
        first = admin_client.get(KEYS)

    cl = first.context["cl"]
    assert cl.paginator.estimated and cl.result_count >= 4
    assert "about " in first.content.decode()
    assert _full_table_counts(queries.captured_queries, "keys_virtualkey") == []
    second = admin_client.get(KEYS, {"p": 2})
    assert second.status_code == 200
    assert [k.pk for k in second.context["cl"].result_list] == [k.pk for k in sorted(keys, key=lambda k: (k.created_at, k.pk), reverse=True)][2:4]


# --- Provisioning policy --------------------------------------------------------------------------


def test_policy_is_a_single_audited_row_that_cannot_be_deleted(admin_client):
    assert admin_client.get("/admin/keys/provisioningpolicy/add/").status_code == 200
    policy = ProvisioningPolicy.current()
    assert admin_client.get("/admin/keys/provisioningpolicy/add/").status_code == 403
    assert admin_client.post(f"/admin/keys/provisioningpolicy/{policy.pk}/delete/", {"post": "yes"}).status_code == 403

    data = {"auto_approve_max_days": 60, "auto_approve_max_budget": "50", "max_active_keys_per_person": 3,
            "rotation_grace_hours": 12}
    response = admin_client.post(f"/admin/keys/provisioningpolicy/{policy.pk}/change/", data)

    assert response.status_code == 302
    assert ProvisioningPolicy.current().auto_approve_max_days == 60 and ProvisioningPolicy.objects.count() == 1
    event = AuditEvent.objects.get(action="provisioningpolicy.update")
    assert (event.before["auto_approve_max_days"], event.after["auto_approve_max_days"]) == (90, 60)


def test_policy_added_in_admin_is_the_one_the_services_read(admin_client):
    data = {"auto_approve_max_days": 30, "auto_approve_max_budget": "10", "max_active_keys_per_person": 2,
            "rotation_grace_hours": 6}
    assert admin_client.post("/admin/keys/provisioningpolicy/add/", data).status_code == 302
    assert ProvisioningPolicy.current().auto_approve_max_days == 30 and ProvisioningPolicy.objects.count() == 1


def test_the_keys_list_shows_this_months_spend_from_the_rollups(admin_client):
    """Reproduction (issue 15): the keys list had no spend column."""
    from decimal import Decimal

    from ledger.services import ledger_rollup
    from tests.ledger.factories import LedgerEntryFactory

    key = VirtualKeyFactory(name="checkout bot")
    LedgerEntryFactory(key=key, cost=Decimal("2.5"))
    LedgerEntryFactory(key=key, cost=Decimal("1.25"))
    ledger_rollup()
    page = admin_client.get(KEYS).content.decode()
    assert "Spend this month" in page and "3.75 USD" in page


def test_a_key_name_is_found_by_its_beginning(admin_client):
    key = VirtualKeyFactory(name="Checkout bot")
    VirtualKeyFactory(name="other")
    found = admin_client.get(KEYS, {"q": "checkout"}).context["cl"].result_list
    assert [k.pk for k in found] == [key.pk]
    found = admin_client.get(KEYS, {"q": key.team.slug}).context["cl"].result_list
    assert key.pk in [k.pk for k in found]
