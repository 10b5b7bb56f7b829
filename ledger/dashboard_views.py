"""The usage dashboard: one page for everyone, its content scoped by role (ledger.dashboard.usage_scope), each
table also as CSV (?table=<section>&format=csv, with the page's period and granularity)."""
import csv
import io
from urllib.parse import urlencode

from django import forms
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import render

from ledger import dashboard


class UsageForm(forms.Form):
    period = forms.ChoiceField(choices=list(dashboard.PERIODS.items()), required=False)
    granularity = forms.ChoiceField(choices=list(dashboard.GRANULARITIES.items()), required=False)


@login_required
def usage(request):
    form = UsageForm(request.GET or None)
    valid = form.is_valid() if form.is_bound else False
    period = (form.cleaned_data.get("period") if valid else None) or "month"
    granularity = (form.cleaned_data.get("granularity") if valid else None) or "day"
    report = dashboard.Usage(scope=dashboard.usage_scope(request.user), period=period, granularity=granularity)
    if request.GET.get("format") == "csv":
        try:
            table = report.section(request.GET.get("table", ""))
        except KeyError:
            raise Http404("No such table.") from None
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(table.columns)
        writer.writerows(table.rows)
        response = HttpResponse(out.getvalue(), content_type="text/csv")
        response["Content-Disposition"] = (f'attachment; filename="usage-{table.name}-{report.start}-{report.end}.csv"')
        return response
    return render(request, "ledger/usage.html", {
        "form": form, "report": report, "sections": report.sections(), "currency": settings.TOLLGATE_CURRENCY,
        "query": urlencode({"period": period, "granularity": granularity}), "periods": dashboard.PERIODS, "granularities": dashboard.GRANULARITIES,
    }, status=400 if form.errors else 200)
