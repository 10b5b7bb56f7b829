"""Finance pages: chargeback for any period and grouping (CSV and XLSX downloads), provider cost imports
and monthly reconciliations."""
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from ledger import chargeback as cb
from ledger import reconciliation
from ledger.forms import ChargebackForm, CostImportForm, ReconcileForm
from ledger.models import ProviderCostImport, Reconciliation
from ledger.services import ledger_rollup

CONTENT_TYPES = {"csv": "text/csv", "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"}


@login_required
@permission_required("ledger.view_ledgerentry", raise_exception=True)
def chargeback(request):
    form = ChargebackForm(request.GET or None)
    report = None
    if form.is_valid():
        while ledger_rollup():  # reports read rollups: bring them up to the last ledger entry first
            pass
        report = cb.chargeback(start=form.cleaned_data["start"], end=form.cleaned_data["end"],
                               group_by=form.cleaned_data["group_by"])
        fmt = request.GET.get("format")
        if fmt in cb.FORMATS:
            response = HttpResponse(cb.export(report, fmt), content_type=CONTENT_TYPES[fmt])
            response["Content-Disposition"] = f'attachment; filename="chargeback-{report.start}-{report.end}.{fmt}"'
            return response
    return render(request, "ledger/chargeback.html", {"form": form, "report": report, "groups": cb.GROUPS},
                  status=400 if form.errors else 200)


@login_required
@permission_required("ledger.view_ledgerentry", raise_exception=True)
def reconciliations(request):
    """Upload provider cost files, run a reconciliation, and see past ones."""
    can_write = request.user.has_perm("ledger.add_reconciliation")
    upload = CostImportForm(request.POST or None, request.FILES or None, prefix="upload")
    run = ReconcileForm(request.POST or None, prefix="run")
    if request.method == "POST":
        if not can_write:
            raise PermissionDenied("Only finance can import costs or reconcile.")
        if "upload-provider" in request.POST and upload.is_valid():
            file = upload.cleaned_data["file"]
            try:
                record = reconciliation.cost_import(provider=upload.cleaned_data["provider"], source=upload.cleaned_data["source"],
                                                    file_name=file.name, content=file.read(), actor=request.user)
            except ValidationError as error:
                upload.add_error("file", error.message_dict.get("file", error.messages))
            else:
                messages.success(request, f"Imported {record.file_name}: {record.lines} lines.")
                return redirect("ledger:reconciliations")
        elif "run-provider" in request.POST and run.is_valid():
            while ledger_rollup():
                pass
            if request.POST.get("fetch") and run.cleaned_data["provider"].admin_key_encrypted:
                reconciliation.fetch_costs(provider=run.cleaned_data["provider"], month=run.cleaned_data["month"])
            result = reconciliation.reconcile(provider=run.cleaned_data["provider"], month=run.cleaned_data["month"], actor=request.user)
            return redirect("ledger:reconciliation", pk=result.pk)
    return render(request, "ledger/reconciliations.html", {
        "upload": upload, "run": run, "can_write": can_write,
        "results": Reconciliation.objects.select_related("provider")[:50],
        "imports": ProviderCostImport.objects.select_related("provider")[:20],
    }, status=400 if (upload.errors or run.errors) and request.method == "POST" else 200)


@login_required
@permission_required("ledger.view_ledgerentry", raise_exception=True)
def reconciliation_detail(request, pk: int):
    result = get_object_or_404(Reconciliation.objects.select_related("provider", "trued_up_by"), pk=pk)
    if request.method == "POST":
        try:
            entries = reconciliation.reconciliation_true_up(result=result, actor=request.user)
        except ValidationError as error:
            messages.error(request, "; ".join(error.messages))
        else:
            messages.success(request, f"Allocated {result.drift:.2f} to {len(entries)} teams as adjustment entries.")
        return redirect("ledger:reconciliation", pk=result.pk)
    if request.GET.get("format") == "csv":
        response = HttpResponse(reconciliation.export_csv(result), content_type="text/csv")
        response["Content-Disposition"] = f'attachment; filename="reconciliation-{result.provider.name}-{result.month:%Y-%m}.csv"'
        return response
    return render(request, "ledger/reconciliation.html", {"result": result, "lines": result.lines.all()})
