"""Celery tasks shared by every app."""
from celery import shared_task
from django.conf import settings
from django.core.mail import send_mail

from governance.webhooks import DeliveryRetry, delivery_attempt


@shared_task(autoretry_for=(OSError,), retry_backoff=30, max_retries=5)
def send_email(*, to: list[str], subject: str, body: str) -> int:
    return send_mail(subject, body, None, to)


@shared_task
def checkpoint_audit_head() -> None:
    """Daily: the newest audit event's signed head, appended outside the database (governance.audit)."""
    from governance.audit import audit_checkpoint

    audit_checkpoint()


@shared_task(bind=True, autoretry_for=(DeliveryRetry,), retry_backoff=30, retry_backoff_max=3600, retry_jitter=True,
             max_retries=settings.TOLLGATE_WEBHOOK_MAX_ATTEMPTS - 1)
def deliver_webhook(self, delivery_id: int) -> str:
    """POST one webhook delivery (governance.webhooks). A receiver that cannot be reached or answers 5xx or 429 is
    tried again after 30 s, 1, 2, 4 ... minutes (capped at an hour, jittered); the last attempt marks it failed."""
    return delivery_attempt(delivery_id, final=self.request.retries >= self.max_retries)
