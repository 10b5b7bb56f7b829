"""Receivers for other libraries' signals that must leave an audit event (login lockouts, django-axes)."""
from axes.signals import user_locked_out
from django.dispatch import receiver

from governance.audit import audit_record


@receiver(user_locked_out, dispatch_uid="audit-login-lockout")
def audit_lockout(sender, request, username, ip_address, **kwargs):
    audit_record(actor=None, actor_label="login throttling", action="login.lockout",
                 after={"username": username, "ip_address": ip_address})
