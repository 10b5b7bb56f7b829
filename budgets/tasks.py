"""Celery tasks for budgets."""
from celery import shared_task

from budgets import alerts
from budgets.services import grant_counters_verify


@shared_task(autoretry_for=(OSError,), retry_backoff=30, max_retries=5)
def send_grant_alert(grant_id: int, since_iso: str, kind: str, spent: str) -> bool:
    return alerts.send(grant_id, since_iso, kind, spent)


@shared_task
def deliver_pending_grant_alerts() -> int:
    """Alerts kept in the database while they could not be queued (budgets.alerts); every minute from beat."""
    return alerts.deliver_pending()


@shared_task
def forecast_grant_spend() -> int:
    return alerts.forecast_alerts()


@shared_task
def verify_grant_counters() -> dict:
    report = grant_counters_verify()
    return {"checked": report.checked, "drifted": len(report.drift)}
