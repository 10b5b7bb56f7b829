"""`Authorization: Bearer tg_api_...`: the token's person is the request's user, the token is request.auth.
An unknown, expired or revoked token, or one whose person was deactivated, is refused with 401."""
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from governance.api import tokens


class ApiTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer":
            return None  # no token: the session may authenticate
        secret = secret.strip()
        if not secret.startswith(tokens.PREFIX):
            raise exceptions.AuthenticationFailed("Use a management API token (tg_api_...); relay keys call /v1/ only.")
        token = tokens.token_by_secret(secret)
        if token is None:
            raise exceptions.AuthenticationFailed("The API token is not valid.")
        if token.revoked_at is not None:
            raise exceptions.AuthenticationFailed("The API token was revoked.")
        if token.expires_at is not None and token.expires_at <= timezone.now():
            raise exceptions.AuthenticationFailed("The API token has expired.")
        if not token.person.is_active:
            raise exceptions.AuthenticationFailed("The API token's person is no longer active.")
        tokens.api_token_touch(token)
        return token.person, token

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'  # makes DRF answer 401, not 403, to an unauthenticated call


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = ApiTokenAuthentication
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "tg_api_..."}
