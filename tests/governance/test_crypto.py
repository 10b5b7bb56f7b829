from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.core.management import CommandError, call_command

from gateway.models import Provider
from governance import crypto
from governance.models import AuditEvent
from tests.gateway.factories import ProviderFactory

pytestmark = pytest.mark.django_db
OLD, NEW = Fernet.generate_key().decode(), Fernet.generate_key().decode()


def test_provider_key_round_trips_and_is_not_stored_in_clear(settings):
    settings.TOLLGATE_ENCRYPTION_KEYS = [OLD]
    provider = ProviderFactory(api_key="sk-live-very-secret-123456")
    stored = Provider.objects.values_list("api_key_encrypted", flat=True).get(pk=provider.pk)
    assert "sk-live" not in stored
    assert Provider.objects.get(pk=provider.pk).api_key == "sk-live-very-secret-123456"


def test_rotation_reencrypts_under_the_new_key_so_the_old_one_can_go(settings):
    settings.TOLLGATE_ENCRYPTION_KEYS = [OLD]
    provider = ProviderFactory(api_key="sk-rotate-me-000000")
    settings.TOLLGATE_ENCRYPTION_KEYS = [NEW, OLD]
    out = StringIO()
    call_command("rotate_encryption_keys", stdout=out)
    assert "re-encrypted 1 secret" in out.getvalue()
    settings.TOLLGATE_ENCRYPTION_KEYS = [NEW]  # the old key is retired
    assert Provider.objects.get(pk=provider.pk).api_key == "sk-rotate-me-000000"
    assert AuditEvent.objects.filter(action="encryption_keys.rotate").count() == 1


def test_without_rotation_a_retired_key_makes_secrets_unreadable(settings):
    settings.TOLLGATE_ENCRYPTION_KEYS = [OLD]
    provider = ProviderFactory(api_key="sk-lost-000000")
    settings.TOLLGATE_ENCRYPTION_KEYS = [NEW]
    with pytest.raises(crypto.DecryptionError) as excinfo:
        Provider.objects.get(pk=provider.pk).api_key
    assert "sk-lost" not in str(excinfo.value)


def test_rotation_with_a_missing_key_changes_nothing(settings):
    settings.TOLLGATE_ENCRYPTION_KEYS = [OLD]
    provider = ProviderFactory(api_key="sk-keep-000000")
    before = Provider.objects.get(pk=provider.pk).api_key_encrypted
    settings.TOLLGATE_ENCRYPTION_KEYS = [NEW]
    with pytest.raises(CommandError, match="nothing was changed"):
        call_command("rotate_encryption_keys")
    assert Provider.objects.get(pk=provider.pk).api_key_encrypted == before


def test_provider_admin_never_shows_the_key(admin_client, settings):
    settings.TOLLGATE_ENCRYPTION_KEYS = [OLD]
    provider = ProviderFactory(api_key="sk-admin-visible-000000")
    ciphertext = Provider.objects.get(pk=provider.pk).api_key_encrypted
    for url in [f"/admin/gateway/provider/{provider.pk}/change/", "/admin/gateway/provider/"]:
        page = admin_client.get(url).content.decode()
        assert "sk-admin-visible" not in page and ciphertext not in page


def test_setting_the_key_in_admin_encrypts_it_and_audits_without_the_secret(admin_client, settings):
    settings.TOLLGATE_ENCRYPTION_KEYS = [OLD]
    response = admin_client.post(
        "/admin/gateway/provider/add/",
        {"name": "OpenAI", "kind": "openai", "base_url": "https://api.openai.com/v1", "api_version": "",
         "connect_timeout": "5", "read_timeout": "60", "is_active": "on", "new_api_key": "sk-from-admin-0000000",
         "models-TOTAL_FORMS": "0", "models-INITIAL_FORMS": "0"},
    )
    assert response.status_code == 302, response.content
    assert Provider.objects.get(name="OpenAI").api_key == "sk-from-admin-0000000"
    events = AuditEvent.objects.filter(object_type="gateway.provider")
    assert {e.action for e in events} == {"provider.create", "provider.api_key_set"}
    assert all("sk-from-admin" not in str(e.after) and "api_key_encrypted" not in str(e.after) for e in events)


def test_rotation_covers_service_key_signing_secrets(settings):
    from keys.services import key_issue
    from tests.governance.factories import TeamFactory

    settings.TOLLGATE_ENCRYPTION_KEYS = [OLD]
    issued = key_issue(name="bot", team=TeamFactory(), person=None, actor=None, with_signing_secret=True)
    settings.TOLLGATE_ENCRYPTION_KEYS = [NEW, OLD]
    call_command("rotate_encryption_keys", stdout=StringIO())
    settings.TOLLGATE_ENCRYPTION_KEYS = [NEW]
    issued.key.refresh_from_db()
    assert issued.key.signing_secret == issued.signing_secret
