"""API clients authenticated with a management token, and the people of a small organisation."""
import pytest
from rest_framework.test import APIClient

from governance import roles
from governance.api.tokens import api_token_issue
from governance.models import Membership
from tests.governance.factories import MembershipFactory, PersonFactory, TeamFactory

ALL = {"*": "write"}


def token_client(person, scopes=None, **kwargs) -> APIClient:
    issued = api_token_issue(person=person, name="test", scopes=scopes or ALL, actor=person, **kwargs)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.secret}")
    client.token = issued
    return client


@pytest.fixture
def org(db):
    class Org:
        team_a, team_b = TeamFactory(slug="team-a"), TeamFactory(slug="team-b")
        employee = MembershipFactory(team=team_a).person
        approver = MembershipFactory(team=team_a, role=Membership.Role.APPROVER).person
        stranger = MembershipFactory(team=team_b).person
        it = PersonFactory(roles=[roles.IT_ADMIN])
        finance = PersonFactory(roles=[roles.FINANCE])
    return Org
