"""Login throttling: repeated failures lock a username, and an address, out; the right password does not get
through a lockout; lockouts and unlocks are audited; IT lifts a lockout in the admin."""
import pytest
from axes.models import AccessAttempt

from governance import roles
from governance.models import AuditEvent
from tests.governance.factories import PersonFactory

pytestmark = pytest.mark.django_db
PASSWORD = "correct horse battery staple"


@pytest.mark.parametrize("page", ["/accounts/login/", "/admin/login/"])
def test_thirty_wrong_passwords_then_the_right_one_is_refused(client, page, settings):
    person = PersonFactory(is_staff=True)
    statuses = [client.post(page, {"username": person.username, "password": "wrong"}).status_code
                for _ in range(settings.AXES_FAILURE_LIMIT)]
    assert statuses == [200] * (settings.AXES_FAILURE_LIMIT - 1) + [429]  # the form again, then locked out
    locked = client.post(page, {"username": person.username, "password": PASSWORD})
    assert locked.status_code == 429
    assert "_auth_user_id" not in client.session
    assert AuditEvent.objects.filter(action="login.lockout", after__username=person.username).exists()


def test_one_address_guessing_many_usernames_is_locked_out(client, settings):
    people = [PersonFactory() for _ in range(settings.AXES_FAILURE_LIMIT + 1)]
    for person in people[:-1]:
        client.post("/accounts/login/", {"username": person.username, "password": "wrong"})
    assert client.post("/accounts/login/", {"username": people[-1].username, "password": PASSWORD}).status_code == 429


def test_it_unlocks_a_locked_out_person_and_it_is_audited(client, settings):
    person = PersonFactory()
    for _ in range(settings.AXES_FAILURE_LIMIT):
        client.post("/accounts/login/", {"username": person.username, "password": "wrong"})
    it = PersonFactory(roles=[roles.IT_ADMIN])
    admin = client.__class__()
    admin.force_login(it)
    attempts = AccessAttempt.objects.filter(username=person.username)
    response = admin.post("/admin/axes/accessattempt/", {"action": "unlock", "_selected_action": [a.pk for a in attempts]})
    assert response.status_code == 302 and not AccessAttempt.objects.filter(username=person.username).exists()
    assert AuditEvent.objects.filter(action="login.unlock", after__username=person.username, actor=it).exists()
    assert client.post("/accounts/login/", {"username": person.username, "password": PASSWORD}).status_code == 302
