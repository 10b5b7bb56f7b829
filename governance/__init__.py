"""Tollgate's project package: settings, URLs, the Celery app, the org model and the audit trail."""
from governance.celery import app as celery_app

__all__ = ["celery_app"]
