"""What the login page needs to know about single sign-on."""
from django import template
from django.conf import settings

register = template.Library()


@register.simple_tag
def sso_login() -> dict:
    """{"enabled": SSO is on, "superusers_only": the password form is for break-glass superusers only}."""
    enabled = bool(settings.OIDC_RP_CLIENT_ID)
    return {"enabled": enabled, "superusers_only": enabled and settings.TOLLGATE_OIDC_LOCAL_LOGIN == "superusers"}
