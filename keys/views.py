"""Self-service pages: request access, see a new key once, my keys, key history, the approvals queue."""
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from governance.models import AuditEvent
from keys import services
from keys.forms import AccessRequestForm, ChangeRequestForm, ReasonForm
from keys.models import AccessRequest, VirtualKey
from keys.selectors import keys_for_person, requests_awaiting


def _show_once(request, issued: services.IssuedKey, *, heading: str):
    """The only page that ever shows a secret. Never cached, never stored."""
    response = render(request, "keys/key_created.html", {
        "heading": heading, "key": issued.key, "secret": issued.secret, "signing_secret": issued.signing_secret,
        "base_url": request.build_absolute_uri("/v1"),
        "model": next(iter(issued.key.allowed_models.values_list("name", flat=True)), "fast"),
    })
    response["Cache-Control"] = "no-store"
    return response


@login_required
def request_access(request):
    form = AccessRequestForm(request.POST or None, person=request.user)
    if request.method == "POST" and form.is_valid():
        try:
            submitted = services.request_submit(requester=request.user, **form.cleaned_data)
        except services.RequestRefused as refusal:
            form.add_error(refusal.field if refusal.field in form.fields else None, refusal.message)
        else:
            if submitted.issued:
                return _show_once(request, submitted.issued, heading="Your key is ready")
            messages.info(request, "Your request needs an approver: " + "; ".join(submitted.request.review_reasons)
                          + ". You will get an email when it is decided.")
            return redirect("keys:my-keys")
    return render(request, "keys/request_form.html", {"form": form}, status=400 if form.errors else 200)


@login_required
def my_keys(request):
    keys = keys_for_person(request.user).order_by("-created_at")
    own_requests = AccessRequest.objects.filter(requester=request.user).select_related("team", "key")[:20]
    return render(request, "keys/my_keys.html", {
        "keys": keys, "requests": own_requests, "reason_form": ReasonForm(), "change_form": ChangeRequestForm(),
    })


def _visible_key(request, pk: int) -> VirtualKey:
    return get_object_or_404(VirtualKey.objects.visible_to(request.user).select_related("team", "person"), pk=pk)


@login_required
def key_detail(request, pk: int):
    key = _visible_key(request, pk)
    history = AuditEvent.objects.filter(object_type="keys.virtualkey", object_id=str(key.pk)).order_by("-id")[:50]
    return render(request, "keys/key_detail.html", {
        "key": key, "history": history, "reason_form": ReasonForm(), "change_form": ChangeRequestForm(),
    })


@login_required
@require_POST
def key_rotate(request, pk: int):
    key = _visible_key(request, pk)
    if key.person_id != request.user.pk:
        raise PermissionDenied("Only the key's holder can rotate it.")
    try:
        issued = services.key_rotate(key=key, actor=request.user)
    except services.KeyStateError as exc:
        messages.error(request, str(exc))
        return redirect("keys:key-detail", pk=key.pk)
    return _show_once(request, issued, heading="Your key was rotated")


@login_required
@require_POST
def key_revoke(request, pk: int):
    key = _visible_key(request, pk)  # 404 for keys one cannot see; 403 (from the service) for seen, not managed
    form = ReasonForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Give a reason to revoke the key.")
        return redirect("keys:key-detail", pk=key.pk)
    services.key_revoke(key=key, actor=request.user, reason=form.cleaned_data["reason"])
    messages.success(request, f"Key {key.prefix}… is revoked.")
    return redirect("keys:my-keys")


@login_required
@require_POST
def key_change_request(request, pk: int):
    key = _visible_key(request, pk)
    form = ChangeRequestForm(request.POST)
    if form.is_valid():
        try:
            services.request_change(key=key, requester=request.user, kind=form.cleaned_data["kind"],
                                    use_case=form.cleaned_data["use_case"], duration_days=form.cleaned_data["duration_days"] or 30,
                                    monthly_budget=form.cleaned_data["monthly_budget"])
        except services.RequestRefused as refusal:
            messages.error(request, refusal.message)
        else:
            messages.success(request, "Your request was sent to the team's approvers.")
    else:
        messages.error(request, "The change request is incomplete.")
    return redirect("keys:key-detail", pk=key.pk)


@login_required
@require_POST
def request_collect(request, pk: int):
    access_request = get_object_or_404(AccessRequest, pk=pk, requester=request.user)
    try:
        issued = services.request_collect(access_request=access_request, requester=request.user)
    except services.RequestRefused as refusal:
        messages.error(request, refusal.message)
        return redirect("keys:my-keys")
    return _show_once(request, issued, heading="Your approved key")


@login_required
def approvals(request):
    return render(request, "keys/approvals.html", {"pending": requests_awaiting(request.user), "reason_form": ReasonForm()})


@login_required
@require_POST
def request_decide(request, pk: int):
    access_request = get_object_or_404(requests_awaiting(request.user), pk=pk)
    reason = request.POST.get("reason", "").strip()
    try:
        if request.POST.get("decision") == "approve":
            services.request_approve(access_request=access_request, actor=request.user, reason=reason)
            messages.success(request, f"Approved the request from {access_request.requester}.")
        else:
            services.request_deny(access_request=access_request, actor=request.user, reason=reason)
            messages.success(request, f"Denied the request from {access_request.requester}.")
    except services.RequestRefused as refusal:
        messages.error(request, refusal.message)
    return redirect("keys:approvals")
