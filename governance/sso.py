"""Single sign-on with OpenID Connect (mozilla-django-oidc): people are matched by email, the identity
provider's groups give their Tollgate roles and team memberships, a person the provider reports inactive (or
no longer in TOLLGATE_OIDC_ALLOWED_GROUPS) is deactivated with their keys suspended, and the password form
stays for break-glass superusers. README: Single sign-on."""
import logging
import time

import requests
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import Group
from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation
from django.db import transaction
from django.http import Http404, HttpResponseRedirect
from mozilla_django_oidc.auth import OIDCAuthenticationBackend
from mozilla_django_oidc.middleware import SessionRefresh
from mozilla_django_oidc.views import OIDCAuthenticationCallbackView, OIDCAuthenticationRequestView

from governance.audit import audit_record, snapshot
from governance.models import Membership, Person, Team
from governance.people import person_deactivate

log = logging.getLogger(__name__)

ACTOR_LABEL = "single sign-on"
DISCOVERY_FIELDS = {
    "OIDC_OP_AUTHORIZATION_ENDPOINT": "authorization_endpoint",
    "OIDC_OP_TOKEN_ENDPOINT": "token_endpoint",
    "OIDC_OP_USER_ENDPOINT": "userinfo_endpoint",
    "OIDC_OP_JWKS_ENDPOINT": "jwks_uri",
}
CLOCK_SKEW_SECONDS = 120
_discovered: dict[str, dict] = {}  # issuer -> its discovery document, for the life of the process


class ProviderUnavailable(Exception):
    """The identity provider did not answer, or answered something that is not OpenID Connect."""


def enabled() -> bool:
    return bool(settings.OIDC_RP_CLIENT_ID)


def endpoint(name: str) -> str:
    """An OIDC_OP_* endpoint: as set, or from TOLLGATE_OIDC_ISSUER's discovery document (fetched once)."""
    if explicit := getattr(settings, name, ""):
        return explicit
    issuer = settings.TOLLGATE_OIDC_ISSUER
    if not issuer:
        raise ImproperlyConfigured(f"{name}: must be set when TOLLGATE_OIDC_ISSUER is not")
    if issuer not in _discovered:
        try:
            response = requests.get(f"{issuer}/.well-known/openid-configuration", timeout=settings.OIDC_TIMEOUT)
            response.raise_for_status()
            document = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise ProviderUnavailable(f"{issuer}: no discovery document ({exc})") from exc
        if document.get("issuer", "").rstrip("/") != issuer:
            raise ProviderUnavailable(f"{issuer}: the discovery document names issuer {document.get('issuer')!r}")
        _discovered[issuer] = document
    try:
        return _discovered[issuer][DISCOVERY_FIELDS[name]]
    except KeyError as exc:
        raise ProviderUnavailable(f"{issuer}: the discovery document has no {DISCOVERY_FIELDS[name]}") from exc


class _Endpoint:
    """An endpoint read when the flow uses it, never when the library's __init__ runs (it runs for every session
    request): an unreachable provider must not break pages for people who are already signed in."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else endpoint(self.name)

    def __set__(self, obj, value):
        pass  # the library's __init__ assigns it; the descriptor answers instead


def groups_of(claims: dict) -> set[str]:
    value = claims.get(settings.TOLLGATE_OIDC_GROUPS_CLAIM) or []
    return {value} if isinstance(value, str) else {str(group) for group in value}


def refusal(claims: dict) -> str:
    """Why the provider's claims no longer let this person use Tollgate ("" when they do)."""
    if claims.get(settings.TOLLGATE_OIDC_ACTIVE_CLAIM) is False:
        return f"the identity provider reports the account inactive ({settings.TOLLGATE_OIDC_ACTIVE_CLAIM}: false)"
    allowed = set(settings.TOLLGATE_OIDC_ALLOWED_GROUPS)
    if allowed and not allowed & groups_of(claims):
        return "no longer in a group allowed to use Tollgate (TOLLGATE_OIDC_ALLOWED_GROUPS)"
    return ""


def sso_managed(person: Person) -> bool:
    """Whose roles and memberships the provider's groups decide, removals included: everyone without a usable
    password. People created by single sign-on have none; others lose theirs at their first SSO login unless
    they are superusers (break-glass) or TOLLGATE_OIDC_LOCAL_LOGIN=all keeps passwords in use."""
    return not person.has_usable_password()


class BreakGlassModelBackend(ModelBackend):
    """With single sign-on on, the password form (Tollgate's and the admin's) signs in superusers only: the
    break-glass way in when the identity provider is down or misconfigured."""

    def user_can_authenticate(self, user) -> bool:
        return super().user_can_authenticate(user) and user.is_superuser


class TollgateOIDCBackend(OIDCAuthenticationBackend):
    OIDC_OP_TOKEN_ENDPOINT = _Endpoint("OIDC_OP_TOKEN_ENDPOINT")
    OIDC_OP_USER_ENDPOINT = _Endpoint("OIDC_OP_USER_ENDPOINT")
    OIDC_OP_JWKS_ENDPOINT = _Endpoint("OIDC_OP_JWKS_ENDPOINT")

    def __init__(self, *args, **kwargs):
        # The library's __init__ reads every endpoint; ours are read when a login uses them (_Endpoint), and
        # the settings module has already checked that the configuration is complete.
        self.OIDC_RP_CLIENT_ID = settings.OIDC_RP_CLIENT_ID
        self.OIDC_RP_CLIENT_SECRET = settings.OIDC_RP_CLIENT_SECRET
        self.OIDC_RP_SIGN_ALGO = settings.OIDC_RP_SIGN_ALGO
        self.OIDC_RP_IDP_SIGN_KEY = None
        self.UserModel = get_user_model()

    def get_user(self, user_id):
        """A deactivated person's session ends on their next request (the library's get_user keeps it)."""
        user = super().get_user(user_id)
        return user if user is not None and self.user_can_authenticate(user) else None

    def verify_token(self, token, **kwargs) -> dict:
        """The library checks the signature and the nonce; the audience, expiry and issuer are checked here."""
        payload = super().verify_token(token, **kwargs)
        audience = payload.get("aud")
        if self.OIDC_RP_CLIENT_ID not in (audience if isinstance(audience, list) else [audience]):
            raise SuspiciousOperation("the id_token was issued to another client")
        if not isinstance(payload.get("exp"), int | float) or payload["exp"] < time.time() - CLOCK_SKEW_SECONDS:
            raise SuspiciousOperation("the id_token has expired")
        issuer = settings.TOLLGATE_OIDC_ISSUER
        if issuer and str(payload.get("iss", "")).rstrip("/") != issuer:
            raise SuspiciousOperation("the id_token is from another issuer")
        return payload

    def get_userinfo(self, access_token, id_token, payload) -> dict:
        """The id_token's claims with the userinfo endpoint's over them: providers put groups in either."""
        return {**payload, **super().get_userinfo(access_token, id_token, payload)}

    def verify_claims(self, claims) -> bool:
        return bool(claims.get("email") and claims.get("sub"))

    @transaction.atomic
    def create_user(self, claims) -> Person:
        if why := refusal(claims):
            raise SuspiciousOperation(f"{claims.get('email')}: {why}")  # the library logs it and refuses the login
        username = claims.get("preferred_username") or claims["email"]
        if self.UserModel.objects.filter(username__iexact=username).exists():
            username = claims["email"]
        person = self.UserModel.objects.create_user(
            username[:150], email=claims["email"], first_name=claims.get("given_name", "")[:150],
            last_name=claims.get("family_name", "")[:150],
        )  # no password: an SSO-managed person (sso_managed)
        audit_record(actor=None, actor_label=ACTOR_LABEL, action="person.create", obj=person,
                     after={k: v for k, v in snapshot(person).items() if k != "password"})
        _sync(person, claims)
        return person

    @transaction.atomic
    def update_user(self, person: Person, claims) -> Person:
        """Runs at every SSO login and silent renewal (OIDC_RENEW_ID_TOKEN_EXPIRY_SECONDS). A deactivated person
        stays deactivated whatever the provider says: reactivating is IT's, in the admin."""
        if why := refusal(claims):
            person_deactivate(person=person, actor=None, actor_label=ACTOR_LABEL, reason=f"{ACTOR_LABEL}: {why}")
            return person  # inactive: the callback refuses the login
        if not person.is_active:
            return person
        # Two logins of one person at once (two tabs) would both add the same membership: one waits here.
        person = Person.objects.select_for_update().get(pk=person.pk)
        if (person.has_usable_password() and not person.is_superuser
                and settings.TOLLGATE_OIDC_LOCAL_LOGIN == "superusers"):
            # The password form refuses them anyway; from now on the provider's groups decide (sso_managed).
            person.set_unusable_password()
            person.save(update_fields=["password"])
            audit_record(actor=None, actor_label=ACTOR_LABEL, action="person.sso_link", obj=person,
                         after={"email": person.email, "subject": claims["sub"]})
        _sync(person, claims)
        return person


def _sync(person: Person, claims: dict) -> None:
    groups = groups_of(claims)
    managed = sso_managed(person)
    _sync_roles(person, groups, managed=managed)
    _sync_teams(person, groups, managed=managed)


def _sync_roles(person: Person, groups: set[str], *, managed: bool) -> None:
    """Roles named in TOLLGATE_OIDC_ROLE_GROUPS follow the groups (added for anyone, removed only from
    SSO-managed people); roles the mapping does not name are left as set in Tollgate."""
    mapping = settings.TOLLGATE_OIDC_ROLE_GROUPS
    if not mapping:
        return
    current = set(person.groups.filter(name__in=set(mapping.values())).values_list("name", flat=True))
    wanted = {role for group, role in mapping.items() if group in groups}
    added, removed = wanted - current, (current - wanted if managed else set())
    if not added and not removed:
        return
    before = {"roles": sorted(current), "is_staff": person.is_staff}
    person.groups.add(*Group.objects.filter(name__in=added))
    person.groups.remove(*Group.objects.filter(name__in=removed))
    # The roles are admin roles: staff while holding one; an SSO-managed person without any is not staff.
    is_staff = (person.is_superuser or person.groups.exists()) if managed else (person.is_staff or bool(added))
    if is_staff != person.is_staff:
        person.is_staff = is_staff
        person.save(update_fields=["is_staff"])
    audit_record(actor=None, actor_label=ACTOR_LABEL, action="person.roles", obj=person, before=before,
                 after={"roles": sorted((current | added) - removed), "is_staff": person.is_staff,
                        "groups": sorted(groups & set(mapping))})


def _sync_teams(person: Person, groups: set[str], *, managed: bool) -> None:
    """Group "<prefix><slug>" is membership of the team with that slug; unknown or inactive teams are ignored.
    An SSO-managed person loses plain memberships whose group is gone; owners and approvers keep theirs (those
    roles are given in Tollgate, not by the provider)."""
    prefix = settings.TOLLGATE_OIDC_TEAM_GROUP_PREFIX
    if not prefix:
        return
    slugs = {group[len(prefix):] for group in groups if group.startswith(prefix) and len(group) > len(prefix)}
    existing = {m.team.slug: m for m in person.memberships.select_related("team")}
    for team in Team.objects.filter(slug__in=slugs - set(existing), is_active=True).order_by("slug"):
        membership = Membership.objects.create(person=person, team=team, role=Membership.Role.MEMBER)
        audit_record(actor=None, actor_label=ACTOR_LABEL, action="membership.create", obj=membership,
                     after={**snapshot(membership), "group": prefix + team.slug})
    if not managed:
        return
    for slug, membership in sorted(existing.items()):
        if slug not in slugs and membership.role == Membership.Role.MEMBER:
            before, pk = snapshot(membership), membership.pk
            membership.delete()
            membership.pk = pk
            audit_record(actor=None, actor_label=ACTOR_LABEL, action="membership.delete", obj=membership,
                         before=before, after={"group": prefix + slug, "reason": "not in the group any more"})


class _OnlyWhenEnabled:
    """With single sign-on off the /oidc/ routes do not exist (404), rather than fail on missing settings."""

    def dispatch(self, request, *args, **kwargs):
        if not enabled():
            raise Http404("single sign-on is off")
        return super().dispatch(request, *args, **kwargs)


class TollgateAuthenticationRequestView(_OnlyWhenEnabled, OIDCAuthenticationRequestView):
    OIDC_OP_AUTH_ENDPOINT = _Endpoint("OIDC_OP_AUTHORIZATION_ENDPOINT")

    def get(self, request):
        try:
            return super().get(request)
        except ProviderUnavailable as exc:
            log.warning("single sign-on: %s", exc)
            return HttpResponseRedirect(settings.LOGIN_REDIRECT_URL_FAILURE)


class TollgateAuthenticationCallbackView(_OnlyWhenEnabled, OIDCAuthenticationCallbackView):
    def get(self, request):
        """A provider that is down or answers a forged or stale token sends the person back to the login page
        with a message, not to an error page."""
        try:
            return super().get(request)
        except (ProviderUnavailable, requests.RequestException, SuspiciousOperation) as exc:
            log.warning("single sign-on login refused: %s", exc)
            return self.login_failure()


class TollgateSessionRefresh(SessionRefresh):
    """The library's silent renewal, with the authorization endpoint read when needed: while the provider is
    unreachable, signed-in people carry on and the next request tries again."""

    OIDC_OP_AUTHORIZATION_ENDPOINT = _Endpoint("OIDC_OP_AUTHORIZATION_ENDPOINT")

    def process_request(self, request):
        try:
            return super().process_request(request)
        except ProviderUnavailable as exc:
            log.warning("single sign-on renewal skipped: %s", exc)
            return None
