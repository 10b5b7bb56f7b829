"""Notifications: queued as Celery tasks once the transaction that caused them commits."""
from django.db import transaction

from governance.models import Person
from governance.tasks import send_email


def email_after_commit(*, to: list[Person] | list[str], subject: str, body: str) -> None:
    addresses = sorted({p.email if isinstance(p, Person) else p for p in to} - {""})
    if not addresses:
        return
    # robust: a broker that is down must not undo or fail the change that caused the notification.
    transaction.on_commit(lambda: send_email.delay(to=addresses, subject=f"[Tollgate] {subject}", body=body), robust=True)
