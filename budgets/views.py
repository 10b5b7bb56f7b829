"""Grant owners' pages: usage bars, delegation, increase requests, renewals, and increases to decide."""
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from budgets import services
from budgets.forms import DelegateForm, IncreaseForm
from budgets.models import Grant
from budgets.selectors import grants_for_owner, increases_awaiting


def _field_errors(form, error: ValidationError) -> None:
    if hasattr(error, "error_dict"):
        for field, errors in error.error_dict.items():
            form.add_error(field if field in form.fields else None, errors)
    else:
        form.add_error(None, error)


@login_required
def my_grants(request):
    return render(request, "budgets/my_grants.html", {
        "grants": grants_for_owner(request.user), "increases": increases_awaiting(request.user),
    })


def _owned(request, pk: int) -> Grant:
    grant = get_object_or_404(Grant.objects.select_related("owner", "parent"), pk=pk)
    if not Grant.objects.manageable_by(request.user).filter(pk=grant.pk).exists():
        raise PermissionDenied("Only the grant's owner can do this.")
    return grant


@login_required
def delegate(request, pk: int):
    grant = _owned(request, pk)
    form = DelegateForm(request.POST or None, grant=grant)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            services.grant_delegate(parent=grant, actor=request.user, **data)
        except ValidationError as error:
            _field_errors(form, error)
        else:
            messages.success(request, f"Delegated {data['limit_amount']} to '{data['name']}'.")
            return redirect("budgets:my-grants")
    return render(request, "budgets/delegate.html", {"grant": grant, "form": form}, status=400 if form.errors else 200)


@login_required
def increase(request, pk: int):
    grant = _owned(request, pk)
    form = IncreaseForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            made = services.grant_increase_request(grant=grant, requester=request.user, **form.cleaned_data)
        except ValidationError as error:
            _field_errors(form, error)
        else:
            messages.success(request, "Increased at once." if made.status == "approved" else
                             "Your request went to the parent grant's owner.")
            return redirect("budgets:my-grants")
    return render(request, "budgets/increase.html", {"grant": grant, "form": form}, status=400 if form.errors else 200)


@login_required
@require_POST
def renew(request, pk: int):
    grant = _owned(request, pk)
    try:
        grant = services.grant_renew(grant=grant, actor=request.user)
    except ValidationError as error:
        messages.error(request, "; ".join(error.messages))
    else:
        messages.success(request, f"'{grant.name}' renewed until {grant.renews_at}.")
    return redirect("budgets:my-grants")


@login_required
@require_POST
def decide_increase(request, pk: int):
    pending = get_object_or_404(increases_awaiting(request.user), pk=pk)
    approve = request.POST.get("decision") == "approve"
    try:
        services.increase_decide(request=pending, actor=request.user, approve=approve,
                                 reason=request.POST.get("reason", "").strip())
    except ValidationError as error:
        messages.error(request, "; ".join(error.messages))
    else:
        messages.success(request, f"Approved: '{pending.grant.name}' is now {pending.new_limit} {settings.TOLLGATE_CURRENCY} "
                                  f"{pending.grant.period_phrase}; {pending.requester} is told." if approve else
                         f"Denied the increase of '{pending.grant.name}'; {pending.requester} is told.")
    return redirect("budgets:my-grants")
