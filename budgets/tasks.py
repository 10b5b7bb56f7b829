"""Celery tasks for budgets."""
import requests
from celery import shared_task

from budgets import alerts, anomalies
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


@shared_task
def detect_anomalies() -> int:
    """Every 5 minutes from beat: the last window against its baseline (budgets.anomalies)."""
    return len(anomalies.anomalies_detect())


@shared_task(autoretry_for=(requests.RequestException,), retry_backoff=30, max_retries=5)
def send_anomaly_webhook(alert_id: int) -> bool:
    return anomalies.alert_webhook_send(alert_id)
