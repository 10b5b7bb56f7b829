"""A person's first steps: the request form (no team, the acceptable-use policy), snippets that work against the
relay, the getting-started page, My requests and the approvals queue, the emails, and issue_key all or nothing."""
import html
import json
import re
from io import StringIO

import pytest
import requests
from django.contrib.auth.models import Group
from django.core import mail
from django.core.management import CommandError, call_command
from django.utils import timezone

from gateway.errors import REFUSALS
from gateway.models import ModelAlias, Provider
from governance import roles
from governance.models import AuditEvent, Membership
from keys import services
from keys.models import AcceptableUsePolicy, AccessRequest, PolicyAcceptance, VirtualKey
from keys.selectors import key_by_secret
from tests.gateway.factories import DeploymentFactory, ModelAliasFactory, ModelPriceFactory, ProviderFactory
from tests.governance.factories import MembershipFactory, PersonFactory, TeamFactory
from tests.keys.factories import VirtualKeyFactory

pytestmark = pytest.mark.django_db


def priced(name: str, kind=ModelAlias.Kind.CHAT, tier=ModelAlias.Tier.STANDARD, provider=None, provider_model=None):
    alias = ModelAliasFactory(name=name, kind=kind, tier=tier)
    deployment = DeploymentFactory(alias=alias, **({"provider_model__provider": provider} if provider else {}),
                                   **({"provider_model__name": provider_model} if provider_model else {}))
    ModelPriceFactory(provider_model=deployment.provider_model)
    return alias


def form_data(team, *aliases, **overrides):
    data = {"team": team.pk, "aliases": [a.pk for a in aliases], "use_case": "summaries", "key_class": "experimentation",
            "environment": "development", "project": "notes", "duration_days": "30", "monthly_budget": ""}
    data.update(overrides)
    return data


@pytest.fixture
def member(client):
    membership = MembershipFactory()
    client.force_login(membership.person)
    return membership


def _snippet(body: str, element_id: str) -> str:
    return html.unescape(re.search(rf'<pre id="{element_id}">(.*?)</pre>', body, re.S).group(1))


# --- Snippets that work ---------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_show_once_snippets_use_a_chat_model_for_chat_and_both_calls_succeed_on_the_relay(relay, client):
    """Reproduction: the snippets named the alphabetically first model (`embed`) on chat/completions: 400."""
    mock = ProviderFactory(name="Mock", kind=Provider.Kind.MOCK, base_url="", api_key="")
    embed = priced("embed", ModelAlias.Kind.EMBEDDING, provider=mock, provider_model="mock-embed")
    fast = priced("fast", provider=mock, provider_model="mock-fast")
    membership = MembershipFactory()
    client.force_login(membership.person)
    page = client.post("/keys/request/", form_data(membership.team, embed, fast))
    assert page.status_code == 200
    body = page.content.decode()
    curl = _snippet(body, "curl-snippet")
    assert '"model": "fast"' in curl and "/chat/completions" in curl
    assert 'model="fast"' in _snippet(body, "sdk-snippet") and 'model: "fast"' in _snippet(body, "node-snippet")
    embeddings = _snippet(body, "curl-embeddings-snippet")
    assert '"model": "embed"' in embeddings and "/embeddings" in embeddings

    for snippet in (curl, embeddings):  # run each curl command as written, against the live relay
        url = re.search(r"curl (\S+)", snippet).group(1).replace("http://testserver", relay.url)
        auth = re.search(r'-H "Authorization: ([^"]+)"', snippet).group(1)
        payload = json.loads(re.search(r"-d '(.*)'", snippet).group(1))
        response = requests.post(url, json=payload, headers={"Authorization": auth}, timeout=10)
        assert response.status_code == 200, response.text


def test_a_key_for_embeddings_only_gets_no_chat_snippet(client, member):
    embed = priced("embed", ModelAlias.Kind.EMBEDDING)
    page = client.post("/keys/request/", form_data(member.team, embed)).content.decode()
    assert 'id="curl-snippet"' not in page and '"model": "embed"' in _snippet(page, "curl-embeddings-snippet")


# --- Getting started ------------------------------------------------------------------------------


def test_getting_started_shows_my_prefixes_models_prices_tool_variables_and_every_error_code(client, member):
    fast = priced("fast")
    embed = priced("embed", ModelAlias.Kind.EMBEDDING)
    key = VirtualKeyFactory(person=member.person, team=member.team)
    key.allowed_models.set([fast, embed])
    someone_elses = VirtualKeyFactory(team=member.team)
    response = client.get("/keys/getting-started/")
    assert response.status_code == 200
    body = response.content.decode()
    assert key.prefix in body and key.secret not in body and someone_elses.prefix not in body
    assert "fast" in body and "$1" in body and "$2" in body  # the price per million tokens, in and out
    assert "OPENAI_BASE_URL=http://testserver/v1" in body and "OPENAI_API_KEY" in body
    assert "ANTHROPIC_BASE_URL=http://testserver" in body  # the relay serves /v1/messages
    assert '"model": "fast"' in _snippet(body, "curl-snippet") and '"model": "embed"' in _snippet(body, "curl-embeddings-snippet")
    assert 'os.environ["OPENAI_API_KEY"]' in _snippet(body, "sdk-snippet")
    for code in REFUSALS:
        assert f'id="error-{code}"' in body
    assert "Retry-After" in body  # what to do on rate_limit_exceeded


def test_getting_started_without_a_key_lists_the_teams_models_and_asks_for_the_policy(client, member):
    priced("fast")
    AcceptableUsePolicy.objects.create(version="3", text="Be nice.", effective_from=timezone.localdate())
    body = client.get("/keys/getting-started/").content.decode()
    assert "You have no key yet" in body and "fast" in body and "acceptable-use policy (version 3)" in body


def test_getting_started_needs_a_login(client):
    response = client.get("/keys/getting-started/")
    assert response.status_code == 302 and "/login/" in response["Location"]


# --- My requests, the approvals queue, the emails --------------------------------------------------


@pytest.fixture
def owner_request(client, django_capture_on_commit_callbacks):
    """A team owner asks for a premium model on their own team: it waits for the team's approver."""
    smart = priced("smart", tier=ModelAlias.Tier.PREMIUM)
    team = TeamFactory()
    membership = MembershipFactory(team=team, person=team.owner, role=Membership.Role.OWNER)
    approver = MembershipFactory(team=membership.team, role=Membership.Role.APPROVER).person
    client.force_login(membership.person)
    with django_capture_on_commit_callbacks(execute=True):
        client.post("/keys/request/", form_data(membership.team, smart, environment="staging", project="launch-bot"))
    return AccessRequest.objects.get(), approver


def test_waits_for_you_email_goes_to_the_approvers_not_the_requester_and_links_to_the_queue(owner_request, settings):
    request, approver = owner_request
    waits = [m for m in mail.outbox if "waits for you" in m.subject]
    assert len(waits) == 1 and waits[0].to == [approver.email]  # the requester is an owner, yet not told to decide
    assert "http://localhost:8000/keys/approvals/" in waits[0].body and "staging" in waits[0].body
    mine = [m for m in mail.outbox if m.to == [request.requester.email]]
    assert len(mine) == 1 and "http://localhost:8000/keys/" in mine[0].body and str(approver) in mine[0].body


def test_decision_email_links_to_my_keys_at_the_configured_address(owner_request, client, settings,
                                                                   django_capture_on_commit_callbacks):
    settings.TOLLGATE_BASE_URL = "https://tollgate.example.com"
    request, approver = owner_request
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        services.request_approve(access_request=request, actor=approver, reason="for the launch")
    assert mail.outbox[0].to == [request.requester.email]
    assert "https://tollgate.example.com/keys/" in mail.outbox[0].body


def test_my_requests_shows_models_project_and_who_will_decide(owner_request, client):
    request, approver = owner_request
    client.force_login(request.requester)
    row = re.search(rf'<tr id="request-{request.pk}">(.*?)</tr>', client.get("/keys/").content.decode(), re.S).group(1)
    assert "smart" in row and "launch-bot" in row and str(approver) in row
    assert str(request.requester) not in row  # one never decides one's own request


def test_approvals_queue_shows_environment_and_project(owner_request, client):
    request, approver = owner_request
    client.force_login(approver)
    row = re.search(rf'<tr id="request-{request.pk}">(.*?)</tr>', client.get("/keys/approvals/").content.decode(), re.S).group(1)
    assert "Staging" in row and "launch-bot" in row


# --- People in no team -------------------------------------------------------------------------------


def test_a_person_in_no_team_is_told_so_and_whom_to_ask(client):
    priced("fast")
    it = PersonFactory(first_name="Ivan", last_name="Admin")
    it.groups.add(Group.objects.get_or_create(name=roles.IT_ADMIN)[0])
    finance = PersonFactory()
    client.force_login(finance)
    page = client.get("/keys/request/").content.decode()
    assert "You are in no team" in page and it.email in page
    response = client.post("/keys/request/", form_data(MembershipFactory().team, ModelAlias.objects.get()))
    body = response.content.decode()
    assert response.status_code == 400 and "You are in no team" in body and "This field is required." not in body
    assert not AccessRequest.objects.exists()


# --- issue_key: all or nothing -----------------------------------------------------------------------


def test_issue_key_that_is_sent_to_an_approver_leaves_no_request_behind():
    """Reproduction: the command refused but left a pending request (and its audit event) behind."""
    ModelAliasFactory(name="smart", tier=ModelAlias.Tier.PREMIUM)
    member = MembershipFactory()
    with pytest.raises(CommandError, match="approver"):
        call_command("issue_key", "--person", member.person.email, "--team", member.team.slug, "--models", "smart",
                     stdout=StringIO())
    assert not AccessRequest.objects.exists() and not VirtualKey.objects.exists()
    assert not AuditEvent.objects.filter(action="access_request.submit").exists()


# --- The acceptable-use policy -----------------------------------------------------------------------


@pytest.fixture
def policy():
    return AcceptableUsePolicy.objects.create(version="1", text="Company work only.", effective_from=timezone.localdate())


def test_request_form_asks_for_the_policy_and_refuses_it_unticked(client, member, policy):
    fast = priced("fast")
    page = client.get("/keys/request/").content.decode()
    assert 'name="accept_policy"' in page and "version 1" in page
    response = client.post("/keys/request/", form_data(member.team, fast))
    assert response.status_code == 400
    assert "Accept the acceptable-use policy (version 1) to request a key." in response.content.decode()
    assert not AccessRequest.objects.exists() and not VirtualKey.objects.exists() and not PolicyAcceptance.objects.exists()


def test_ticking_the_policy_records_the_acceptance_audited_and_issues_the_key(client, member, policy):
    fast = priced("fast")
    response = client.post("/keys/request/", form_data(member.team, fast, accept_policy="on"))
    assert response.status_code == 200 and key_by_secret(response.context["secret"]).person == member.person
    acceptance = PolicyAcceptance.objects.get()
    assert (acceptance.person, acceptance.policy) == (member.person, policy)
    assert AuditEvent.objects.filter(action="aup.accept", actor=member.person).count() == 1
    assert 'name="accept_policy"' not in client.get("/keys/request/").content.decode()  # asked once per version


def test_no_key_is_issued_to_a_person_who_has_not_accepted_the_version_in_force(member, policy):
    services.aup_accept(person=member.person, policy=policy)
    newer = AcceptableUsePolicy.objects.create(version="2", text="Also no secrets.", effective_from=timezone.localdate())
    with pytest.raises(services.PolicyNotAccepted, match="version 2"):
        services.key_issue(name="k", team=member.team, person=member.person, actor=None)
    service_key = services.key_issue(name="bot", team=member.team, person=None, actor=None)  # a team's: no person
    assert list(VirtualKey.objects.all()) == [service_key.key]
    services.aup_accept(person=member.person, policy=newer)
    assert services.key_issue(name="k", team=member.team, person=member.person, actor=None).key.person == member.person


def test_a_version_not_yet_in_force_asks_nothing(member):
    AcceptableUsePolicy.objects.create(version="9", text="Later.", effective_from=timezone.localdate() + timezone.timedelta(days=3))
    assert services.key_issue(name="k", team=member.team, person=member.person, actor=None).key


def test_issue_key_for_a_person_without_acceptance_says_where_to_accept(policy):
    ModelAliasFactory(name="fast")
    member = MembershipFactory()
    with pytest.raises(CommandError, match="acceptable-use policy"):
        call_command("issue_key", "--person", member.person.email, "--team", member.team.slug, "--models", "fast",
                     stdout=StringIO())
    assert not AccessRequest.objects.exists() and not VirtualKey.objects.exists()


def test_policy_page_shows_the_text_and_accepts_it(client, member, policy):
    page = client.get("/keys/acceptable-use/").content.decode()
    assert "Company work only." in page and 'id="accept-policy"' in page
    response = client.post("/keys/acceptable-use/", {"next": "request"})
    assert response.status_code == 302 and response["Location"] == "/keys/request/"
    assert PolicyAcceptance.objects.get().person == member.person
    assert "You accepted this version" in client.get("/keys/acceptable-use/").content.decode()


def test_policy_admin_lists_adds_and_freezes_an_accepted_version(admin_client, policy, member):
    assert admin_client.get("/admin/keys/acceptableusepolicy/").status_code == 200
    assert admin_client.get("/admin/keys/acceptableusepolicy/add/").status_code == 200
    response = admin_client.post("/admin/keys/acceptableusepolicy/add/",
                                 {"version": "2", "text": "New rules.", "effective_from": "2030-01-01"})
    assert response.status_code == 302
    assert AuditEvent.objects.filter(action="acceptableusepolicy.create").exists()
    services.aup_accept(person=member.person, policy=policy)
    change = admin_client.get(f"/admin/keys/acceptableusepolicy/{policy.pk}/change/").content.decode()
    assert 'name="text"' not in change  # what people agreed to stays as it was
    assert admin_client.get("/admin/keys/policyacceptance/").status_code == 200
    assert admin_client.get("/admin/keys/policyacceptance/?q=" + member.person.username).status_code == 200
