"""Self-service pages: request access, see a new key once, my keys, a key's page, the approvals queue,
getting started and the acceptable-use policy."""
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from gateway.errors import REFUSALS
from governance import roles
from governance.charts import line_chart
from keys import services
from keys.filters import VirtualKeyFilter
from keys.forms import AccessRequestForm, ChangeRequestForm, ReasonForm
from keys.models import AcceptableUsePolicy, AccessRequest, VirtualKey
from keys.selectors import (
    aliases_for_person,
    key_aliases,
    key_approval,
    key_budget_lines,
    key_history,
    key_recent_calls,
    key_usage_by_day,
    keys_for_person,
    keys_held_by,
    models_with_prices,
    requests_awaiting,
    snippet_models,
)

# What a caller should do about each refusal the relay gives (gateway.errors.REFUSALS has the codes).
ERROR_ADVICE = {
    "missing_api_key": "Send your key: Authorization: Bearer <key> (or x-api-key for /v1/messages).",
    "invalid_api_key": "The key is wrong or was rotated out after its grace period: use the current secret.",
    "key_inactive": "The key is not active yet or any more: see its status under My keys.",
    "key_suspended": "The key is suspended (often by an alert): ask IT to look at it and reactivate it.",
    "key_expired": "The key expired: ask for an extension from the key's page.",
    "key_revoked": "The key was revoked: request a new one.",
    "invalid_actor": "A service key's X-Tollgate-Actor header is unsigned, badly signed or stale: sign it again.",
    "unknown_actor": "The person named in X-Tollgate-Actor is not an active member of the key's team.",
    "ip_not_allowed": "Your address is not in the key's IP allowlist: call from an allowed network or ask IT.",
    "model_not_allowed": "The key may not use that model: call one of the models listed here, or request access.",
    "grant_expired": "A budget grant covering you has lapsed: ask its owner to renew it.",
    "grant_suspended": "A budget grant covering you is suspended: ask its owner.",
    "model_not_found": "No model has that name: use one of the names listed here.",
    "not_found": "No such endpoint: use /v1/chat/completions, /v1/embeddings, /v1/messages or /v1/models.",
    "method_not_allowed": "Use POST (GET for /v1/models).",
    "invalid_json": "The body is not valid JSON.",
    "invalid_request": "The request is malformed (e.g. a chat model on /v1/embeddings): read the message.",
    "max_tokens_too_large": "Ask for fewer output tokens (max_tokens) than the model allows.",
    "unsupported_parameter": "Drop the parameter the message names.",
    "request_too_large": "The body is too large: send less.",
    "request_timeout": "The body took too long to arrive: retry.",
    "rate_limit_exceeded": "Too many requests or tokens per minute or day: wait the Retry-After seconds, then retry.",
    "budget_exceeded": "A budget is spent (or held by calls in flight): wait for the reset date or ask for more budget.",
    "overloaded": "Tollgate is busy: retry after a short pause.",
    "service_unavailable": "Tollgate cannot serve the call just now: retry after a short pause.",
    "limits_unavailable": "Limits cannot be checked just now: retry after a short pause.",
    "budget_unverifiable": "Budgets cannot be checked just now and your key fails closed: retry shortly.",
    "upstream_rejected": "The provider refused the request as sent: read the message and fix the request.",
    "upstream_error": "The provider failed: retry; Tollgate already tried the model's other deployments.",
    "upstream_timeout": "The provider took too long: retry, or ask for fewer tokens.",
    "internal_error": "Tollgate failed: retry, and tell IT the request id if it goes on.",
}


def _snippets_context(request, aliases) -> dict:
    chat_model, embedding_model = snippet_models(aliases)
    return {"base_url": request.build_absolute_uri("/v1"), "relay_url": request.build_absolute_uri("/").rstrip("/"),
            "chat_model": chat_model, "embedding_model": embedding_model}


def _show_once(request, issued: services.IssuedKey, *, heading: str):
    """The only page that ever shows a secret. Never cached, never stored."""
    key = issued.key
    grace_until = key.previous_key_expires_at if key.previous_key_expires_at and key.previous_key_expires_at > timezone.now() else None
    response = render(request, "keys/key_created.html", {
        "heading": heading, "key": key, "secret": issued.secret, "signing_secret": issued.signing_secret,
        "grace_until": grace_until, **_snippets_context(request, key_aliases(key)),
    })
    response["Cache-Control"] = "no-store"
    return response


def _whom_to_ask() -> list:
    """Who adds people to teams: IT admins (team owners too, for their own teams)."""
    return roles.people_with_role(roles.IT_ADMIN)


@login_required
def request_access(request):
    policy = services.aup_pending_for(request.user)
    form = AccessRequestForm(request.POST or None, person=request.user, policy=policy)
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
    return render(request, "keys/request_form.html", {
        "form": form, "policy": policy, "whom_to_ask": _whom_to_ask() if form.in_no_team else [],
    }, status=400 if form.errors else 200)


@login_required
def my_keys(request):
    # The same FilterSet as the API's /api/v1/keys/ (keys.filters): ?status=active&team=platform works on both.
    filters = VirtualKeyFilter(request.GET or None, queryset=keys_for_person(request.user).order_by("-created_at"))
    keys = filters.qs if filters.is_bound else filters.queryset
    own_requests = list(AccessRequest.objects.filter(requester=request.user)
                        .select_related("team", "key", "decided_by").prefetch_related("aliases")[:20])
    for own in own_requests:
        if own.status == AccessRequest.Status.PENDING:
            own.deciders = services.approvers_of(own.team, besides=request.user)
    return render(request, "keys/my_keys.html", {
        "keys": keys, "requests": own_requests, "reason_form": ReasonForm(), "change_form": ChangeRequestForm(),
        "filters": filters,
    })


def _visible_key(request, pk: int) -> VirtualKey:
    return get_object_or_404(VirtualKey.objects.visible_to(request.user).select_related("team", "person"), pk=pk)


@login_required
def key_detail(request, pk: int):
    key = _visible_key(request, pk)
    now = timezone.now()
    usage = key_usage_by_day(key)
    return render(request, "keys/key_detail.html", {
        "key": key, "models": models_with_prices(key_aliases(key)), "budgets": key_budget_lines(key),
        "calls": key_recent_calls(key), "usage": usage,
        "chart": line_chart(chart_id="key-usage", title=f"Spend per day of {key.name}, last {len(usage)} days",
                            points=[(f"{day.day:%m-%d}", day.cost) for day in usage]),
        "approval": key_approval(key), "history": key_history(key),
        "grace_until": key.previous_key_expires_at if key.previous_key_expires_at and key.previous_key_expires_at > now else None,
        "reason_form": ReasonForm(), "change_form": ChangeRequestForm(),
    })


@login_required
def getting_started(request):
    """How to call models through Tollgate with one's keys: prefixes (never secrets), models and prices,
    snippets, environment variables for tools, and what each refusal means."""
    keys = keys_held_by(request.user)
    aliases = aliases_for_person(request.user, keys)
    return render(request, "keys/getting_started.html", {
        "keys": keys, "models": models_with_prices(aliases), "policy": services.aup_pending_for(request.user),
        "errors": [(code, refusal.status, ERROR_ADVICE.get(code, "")) for code, refusal in REFUSALS.items()],
        **_snippets_context(request, aliases),
    })


@login_required
def acceptable_use(request):
    """The acceptable-use policy in force; POST accepts it (audited)."""
    policy = AcceptableUsePolicy.current()
    accepted = policy is not None and policy.acceptances.filter(person=request.user).first()
    if request.method == "POST":
        if policy is None:
            return redirect("keys:getting-started")
        services.aup_accept(person=request.user, policy=policy)
        messages.success(request, f"You accepted the acceptable-use policy (version {policy.version}).")
        return redirect("keys:request" if request.POST.get("next") == "request" else "keys:getting-started")
    return render(request, "keys/acceptable_use.html", {"policy": policy, "accepted": accepted})


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
