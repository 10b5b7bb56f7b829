"""Beat tasks of the ledger."""
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from gateway.models import Provider
from ledger import partitions
from ledger.models import ProviderCostLine
from ledger.reconciliation import fetch_costs, reconcile
from ledger.services import call_bodies_purge, ledger_rollup


@shared_task
def purge_call_bodies() -> int:
    return call_bodies_purge(older_than_days=settings.TOLLGATE_BODY_RETENTION_DAYS)


@shared_task
def rollup_ledger() -> int:
    """Fold new ledger entries into the daily rollups until caught up."""
    total = 0
    while folded := ledger_rollup():
        total += folded
    return total


@shared_task
def reconcile_last_month() -> list[int]:
    """First day of each month: reconcile the month before for every provider with imported costs."""
    while ledger_rollup():
        pass
    last_month = (timezone.localdate().replace(day=1) - timedelta(days=1)).replace(day=1)
    for provider in Provider.objects.exclude(admin_key_encrypted=""):
        fetch_costs(provider=provider, month=last_month)
    provider_ids = ProviderCostLine.objects.filter(day__gte=last_month, day__lt=timezone.localdate().replace(day=1)) \
        .values_list("provider_id", flat=True).distinct()
    return [reconcile(provider=p, month=last_month).pk for p in Provider.objects.filter(pk__in=provider_ids)]


@shared_task
def maintain_ledger_partitions() -> list[str]:
    """PostgreSQL: keep the next months' partitions ready before their rows arrive."""
    return partitions.ensure_partitions(start=timezone.localdate()) if partitions.is_partitioned() else []
