"""Celery tasks shared by every app."""
from celery import shared_task
from django.core.mail import send_mail


@shared_task(autoretry_for=(OSError,), retry_backoff=30, max_retries=5)
def send_email(*, to: list[str], subject: str, body: str) -> int:
    return send_mail(subject, body, None, to)


@shared_task
def checkpoint_audit_head() -> None:
    """Daily: the newest audit event's signed head, appended outside the database (governance.audit)."""
    from governance.audit import audit_checkpoint

    audit_checkpoint()
