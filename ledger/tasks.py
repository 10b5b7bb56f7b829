"""Beat tasks of the ledger, and the tasks pages hand work to (imports, reconciliations)."""
import logging
from datetime import date, timedelta

import requests
from celery import shared_task
from django.conf import settings
from django.utils import timezone

from gateway.models import Provider
from governance import roles
from governance.audit import audit_record
from governance.notify import email_after_commit
from ledger import partitions
from ledger.imports import cost_import_run, fetch_costs
from ledger.models import ProviderCostLine
from ledger.reconciliation import reconcile
from ledger.services import call_bodies_purge, ledger_rollup

log = logging.getLogger(__name__)


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
def import_cost_file(import_id: int) -> str:
    """Read an accepted cost file (ledger.imports): the web request only stored it."""
    return cost_import_run(import_id).status


@shared_task
def reconcile_month(provider_id: int, month: str, actor_id: int | None = None) -> int:
    """Fold the ledger, then reconcile one provider's month (the reconciliation page queues this)."""
    from governance.models import Person

    rollup_ledger()
    actor = Person.objects.filter(pk=actor_id).first() if actor_id else None
    return reconcile(provider=Provider.objects.get(pk=provider_id), month=date.fromisoformat(month), actor=actor).pk


@shared_task(bind=True, autoretry_for=(requests.RequestException,), retry_backoff=600, max_retries=6)
def fetch_and_reconcile(self, provider_id: int, month: str) -> int:
    """One provider's month: fetch its costs (retried with backoff when its API fails; finance is told),
    then reconcile. Each provider is its own task: one failing never stops the others."""
    provider = Provider.objects.get(pk=provider_id)
    try:
        fetch_costs(provider=provider, month=date.fromisoformat(month))
    except requests.RequestException as error:
        _fetch_failed(provider, month, error, final=self.request.retries >= self.max_retries)
        raise
    rollup_ledger()
    return reconcile(provider=provider, month=date.fromisoformat(month)).pk


def _fetch_failed(provider: Provider, month: str, error: Exception, *, final: bool) -> None:
    what = f"{type(error).__name__}" + (f" {error.response.status_code}" if getattr(error, "response", None) is not None else "")
    log.warning("cost API of %s failed for %s: %s", provider.name, month, what)
    audit_record(actor=None, actor_label="monthly reconciliation", action="ledger.cost_fetch_failed", obj=provider,
                 after={"month": month, "error": what, "retrying": not final})
    email_after_commit(to=roles.people_with_role(roles.FINANCE), subject=f"{provider.name} {month[:7]}: cost API failed",
                       body=f"Fetching {provider.name}'s costs for {month[:7]} failed ({what}). "
                            + ("It will be retried." if not final else "No more retries: upload the cost file instead."))


@shared_task
def reconcile_last_month() -> dict:
    """First day of each month: for each provider, fetch last month's costs (with an admin key) and
    reconcile; providers without a cost API are reconciled from uploaded files. One provider's failure is
    reported and retried; the others complete."""
    rollup_ledger()
    last_month = (timezone.now().date().replace(day=1) - timedelta(days=1)).replace(day=1)
    outcome = {}
    with_api = list(Provider.objects.exclude(admin_key_encrypted="").filter(kind__in=["openai", "anthropic"]))
    for provider in with_api:
        try:
            outcome[provider.name] = fetch_and_reconcile.delay(provider.pk, last_month.isoformat()).id
        except Exception as error:  # noqa: BLE001 - eager runs raise here; the task reported and will retry
            outcome[provider.name] = f"failed: {type(error).__name__}"
    uploaded = ProviderCostLine.objects.filter(day__gte=last_month, day__lt=timezone.now().date().replace(day=1)) \
        .exclude(provider__in=with_api).values_list("provider_id", flat=True).distinct()
    for provider in Provider.objects.filter(pk__in=uploaded):
        try:
            outcome[provider.name] = reconcile(provider=provider, month=last_month).pk
        except Exception as error:  # noqa: BLE001 - one provider's data must not stop the others
            log.exception("reconciliation of %s failed", provider.name)
            outcome[provider.name] = f"failed: {type(error).__name__}"
    return outcome


@shared_task
def maintain_ledger_partitions() -> list[str]:
    """PostgreSQL: keep the next months' partitions ready before their rows arrive."""
    return partitions.ensure_partitions(start=timezone.localdate()) if partitions.is_partitioned() else []
