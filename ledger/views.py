"""Finance pages: chargeback for any period and grouping (CSV and XLSX downloads), provider cost imports
(accepted here, read by the worker) and monthly reconciliations (run by the worker, trued up here). Reports
read the daily rollups as the beat task last folded them; no page folds the ledger itself."""
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from ledger import chargeback as cb
from ledger import imports, reconciliation
from ledger.forms import ChargebackForm, CostImportForm, ReconcileForm
from ledger.models import ProviderCostImport, Reconciliation, RollupState, TrueUp
from ledger.tasks import reconcile_month

CONTENT_TYPES = {"csv": "text/csv", "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"}


def _rolled_up_at():
    state = RollupState.objects.filter(pk=1).first()
    return state.updated_at if state else None


@login_required
@permission_required("ledger.view_ledgerentry", raise_exception=True)
def chargeback(request):
    form = ChargebackForm(request.GET or None)
    report = None
    if form.is_valid():
        report = cb.chargeback(start=form.cleaned_data["start"], end=form.cleaned_data["end"],
                               group_by=form.cleaned_data["group_by"])
        fmt = request.GET.get("format")
        if fmt in cb.FORMATS:
            response = HttpResponse(cb.export(report, fmt), content_type=CONTENT_TYPES[fmt])
            response["Content-Disposition"] = f'attachment; filename="chargeback-{report.start}-{report.end}.{fmt}"'
            return response
    return render(request, "ledger/chargeback.html", {"form": form, "report": report, "groups": cb.GROUPS,
                                                      "rolled_up_at": _rolled_up_at()},
                  status=400 if form.errors else 200)


@login_required
@permission_required("ledger.view_ledgerentry", raise_exception=True)
def reconciliations(request):
    """Upload provider cost files, queue a reconciliation, and see past ones and imports in progress."""
    can_write = request.user.has_perm("ledger.add_reconciliation")
    upload = CostImportForm(request.POST or None, request.FILES or None, prefix="upload")
    run = ReconcileForm(request.POST or None, prefix="run")
    if request.method == "POST":
        if not can_write:
            raise PermissionDenied("Only finance can import costs or reconcile.")
        if "upload-provider" in request.POST and upload.is_valid():
            file = upload.cleaned_data["file"]
            try:
                record = imports.cost_import_accept(provider=upload.cleaned_data["provider"], file=file, file_name=file.name,
                                                   source=upload.cleaned_data["source"], actor=request.user)
            except ValidationError as error:
                upload.add_error("file", error.message_dict.get("file", error.messages))
            else:
                messages.success(request, f"{record.file_name}: {record.get_status_display().lower()}.")
                return redirect("ledger:cost_import", pk=record.pk)
        elif "run-provider" in request.POST and run.is_valid():
            provider, month = run.cleaned_data["provider"], run.cleaned_data["month"].replace(day=1)
            task = reconciliation_task(provider, month, fetch=bool(request.POST.get("fetch")), actor=request.user)
            transaction.on_commit(task, robust=True)
            messages.success(request, f"Reconciliation of {provider} {month:%Y-%m} queued: it appears below when done.")
            return redirect("ledger:reconciliations")
    return render(request, "ledger/reconciliations.html", {
        "upload": upload, "run": run, "can_write": can_write,
        "results": Reconciliation.objects.select_related("provider")[:50],
        "imports": ProviderCostImport.objects.select_related("provider").defer("report")[:20],
    }, status=400 if (upload.errors or run.errors) and request.method == "POST" else 200)


def reconciliation_task(provider, month, *, fetch: bool, actor):
    from ledger.tasks import fetch_and_reconcile

    if fetch and provider.admin_key_encrypted:
        return lambda: fetch_and_reconcile.delay(provider.pk, month.isoformat())
    return lambda: reconcile_month.delay(provider.pk, month.isoformat(), actor.pk)


@login_required
@permission_required("ledger.view_ledgerentry", raise_exception=True)
def cost_import(request, pk: int):
    """One import: its progress while the worker reads it (the page refreshes itself), then its report."""
    record = get_object_or_404(ProviderCostImport.objects.select_related("provider", "uploaded_by"), pk=pk)
    return render(request, "ledger/cost_import.html", {
        "record": record, "progress": imports.progress(record),
        "running": record.status in (ProviderCostImport.Status.PENDING, ProviderCostImport.Status.RUNNING)})


@login_required
@permission_required("ledger.view_ledgerentry", raise_exception=True)
def reconciliation_detail(request, pk: int):
    result = get_object_or_404(Reconciliation.objects.select_related("provider"), pk=pk)
    if request.GET.get("format") == "csv":
        response = HttpResponse(reconciliation.export_csv(result), content_type="text/csv")
        response["Content-Disposition"] = f'attachment; filename="reconciliation-{result.provider.name}-{result.month:%Y-%m}.csv"'
        return response
    true_ups = TrueUp.objects.filter(provider=result.provider_id, month=result.month).select_related("created_by", "reversed_by")
    return render(request, "ledger/reconciliation.html", {"result": result, "lines": result.lines.all(), "true_ups": true_ups})


@login_required
@permission_required("ledger.add_ledgerentry", raise_exception=True)
def true_up(request, pk: int):
    """What a true-up will write (by team), and, on confirmation, writing it."""
    result = get_object_or_404(Reconciliation.objects.select_related("provider"), pk=pk)
    if request.method == "POST":
        try:
            done = reconciliation.reconciliation_true_up(result=result, actor=request.user)
        except ValidationError as error:
            messages.error(request, "; ".join(error.messages))
        else:
            messages.success(request, f"Allocated {done.amount:.2f} to teams as {done.entries} adjustment entries.")
        return redirect("ledger:reconciliation", pk=result.pk)
    plan = reconciliation.true_up_plan(result)
    return render(request, "ledger/true_up.html", {"result": result, "plan": reconciliation.plan_by_team(plan),
                                                   "total": sum((a.amount for a in plan), 0), "entries": len(plan)})


@login_required
@permission_required("ledger.add_ledgerentry", raise_exception=True)
def true_up_reverse(request, pk: int):
    if request.method != "POST":
        raise PermissionDenied("Reverse with the button on the reconciliation page.")
    done = get_object_or_404(TrueUp, pk=pk)
    try:
        count = reconciliation.true_up_reverse(true_up=done, actor=request.user)
    except ValidationError as error:
        messages.error(request, "; ".join(error.messages))
    else:
        messages.success(request, f"Reversed true-up #{done.pk}: {count} counter-entries.")
    return redirect("ledger:reconciliation", pk=done.reconciliation_id)
