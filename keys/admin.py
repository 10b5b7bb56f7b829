"""IT's console for keys: virtual keys (their state changes only through the lifecycle services, each with a
reason), the access-request review queue, the provisioning policy and the acceptable-use policy. Key hashes are never shown or loaded."""
import re
from collections.abc import Callable

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db import models
from django.db.models import OuterRef, QuerySet, Subquery, Sum
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode

from governance.admin import AuditedModelAdmin, ReadOnlyAdminMixin
from governance.bigtables import LargeTableAdminMixin
from governance.models import AuditEvent, Person, Team
from keys import keyformat
from keys.models import AcceptableUsePolicy, AccessRequest, ApiToken, PolicyAcceptance, ProvisioningPolicy, VirtualKey
from keys.services import (
    KeyStateError,
    RequestRefused,
    key_extend,
    key_reactivate,
    key_revoke,
    key_suspend,
    request_approve,
    request_deny,
)

# --- Large tables ---------------------------------------------------------------------------------


class LargeTableAdmin(LargeTableAdminMixin, admin.ModelAdmin):
    """Changelist settings for tables that grow to millions of rows (governance.bigtables), without facets
    (one COUNT per filter choice)."""

    show_facets = admin.ShowFacets.NEVER
    ordering = None  # each admin says its own order


# --- Actions that ask why -------------------------------------------------------------------------

ACTION_LIMIT = 1000  # each object is its own transaction with an audit append; more belongs in a script


class ReasonForm(forms.Form):
    reason = forms.CharField(max_length=300, widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
                             help_text="Recorded in the audit trail with your name; the holder may see it.")

    def __init__(self, *args, reason_required: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["reason"].required = reason_required


def reason_action(*, name: str, description: str, done: str, apply: Callable, refusals: tuple[type[Exception], ...],
                  reason_required: bool = True, permission: str = "change"):
    """An admin action that asks for a reason before it acts.

    The changelist's POST shows a page listing the selection with a reason form; that page posts back
    (`action`, `_selected_action`, `select_across`, `apply`) and only then `apply(obj, actor=, reason=)`
    runs once per object. The services are atomic per call, so an object a service refuses (`refusals`)
    is reported and skipped without undoing the others."""

    @admin.action(description=description, permissions=[permission])
    def action(modeladmin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet):
        opts = modeladmin.model._meta
        objects = list(queryset[: ACTION_LIMIT + 1])
        if len(objects) > ACTION_LIMIT:
            modeladmin.message_user(request, f"{description}: select at most {ACTION_LIMIT} {opts.verbose_name_plural} "
                                             "at a time (narrow the list with a filter).", messages.ERROR)
            return None
        form = ReasonForm(request.POST if "apply" in request.POST else None, reason_required=reason_required)
        if not form.is_valid():  # also the first visit: an unbound form is never valid
            request.current_app = modeladmin.admin_site.name
            return TemplateResponse(request, "admin/keys/action_reason.html", {
                **modeladmin.admin_site.each_context(request),
                "title": f"{description}: why?",
                "opts": opts,
                "objects": objects,
                "form": form,
                "action_name": name,
                "action_label": description,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
                "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
                "select_across": request.POST.get("select_across", "0"),
                "changelist_url": request.get_full_path(),
            })
        reason = form.cleaned_data["reason"]
        changed, skipped = 0, []
        for obj in objects:
            try:
                apply(obj, actor=request.user, reason=reason)
            except refusals as exc:
                skipped.append(f"{obj}: {exc}")
            else:
                changed += 1
        if changed:
            noun = opts.verbose_name if changed == 1 else opts.verbose_name_plural
            modeladmin.message_user(request, f"{changed} {noun} {done}.", messages.SUCCESS)
        if skipped:
            shown = "; ".join(skipped[:10]) + (f"; and {len(skipped) - 10} more" if len(skipped) > 10 else "")
            modeladmin.message_user(request, f"Skipped {len(skipped)}: {shown}", messages.WARNING)
        return None

    action.__name__ = name
    return action


# --- History --------------------------------------------------------------------------------------

HISTORY_ROWS = 50


def audit_history(obj) -> str:
    """The object's audit events, newest first, with the reason each change was made (escaped)."""
    if obj is None or obj.pk is None:
        return "-"
    object_type, object_id = obj._meta.label_lower, str(obj.pk)
    events = list(
        AuditEvent.objects.filter(object_type=object_type, object_id=object_id)
        .only("created_at", "actor_label", "action", "after").order_by("-id")[:HISTORY_ROWS]
    )
    if not events:
        return "No recorded changes."
    rows = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", (
        (date_format(timezone.localtime(e.created_at), "Y-m-d H:i:s"), e.actor_label, e.action,
         e.after.get("reason", "") if isinstance(e.after, dict) else "")
        for e in events
    ))
    trail = reverse("admin:governance_auditevent_changelist") + "?" + urlencode(
        {"object_type": object_type, "object_id": object_id})
    more = format_html('<p>Showing the latest {}. <a href="{}">Full trail</a></p>', HISTORY_ROWS, trail) \
        if len(events) == HISTORY_ROWS else ""
    return format_html(
        '<table class="audit-history"><thead><tr><th>Time</th><th>Actor</th><th>Action</th><th>Reason</th></tr>'
        "</thead><tbody>{}</tbody></table>{}", rows, more,
    )


# --- Virtual keys ---------------------------------------------------------------------------------


class ExpiresWithinFilter(admin.SimpleListFilter):
    title = "expires within"
    parameter_name = "expires_within"

    def lookups(self, request, model_admin):
        return [("7", "7 days"), ("30", "30 days")]

    def queryset(self, request, queryset):
        if self.value() not in ("7", "30"):
            return queryset
        now = timezone.now()
        return queryset.filter(status=VirtualKey.Status.ACTIVE, expires_at__gt=now,
                               expires_at__lte=now + timezone.timedelta(days=int(self.value())))


class UnusedFilter(admin.SimpleListFilter):
    """The same rule as the weekly unused-key report (keys.tasks.report_unused_keys)."""

    title = "usage"
    parameter_name = "unused"

    def lookups(self, request, model_admin):
        return [("30", "Unused for 30 days")]

    def queryset(self, request, queryset):
        if self.value() != "30":
            return queryset
        cutoff = timezone.now() - timezone.timedelta(days=30)
        return queryset.filter(status=VirtualKey.Status.ACTIVE, created_at__lt=cutoff).exclude(last_used_at__gte=cutoff)


class ProvisionedByFilter(admin.SimpleListFilter):
    title = "provisioned by"
    parameter_name = "provisioned_by"

    def lookups(self, request, model_admin):
        return [("policy", "Policy"), ("approver", "An approver")]

    def queryset(self, request, queryset):
        if self.value() == "policy":
            return queryset.filter(approved_by_policy=True)
        if self.value() == "approver":
            return queryset.filter(approved_by_policy=False)
        return queryset


class HolderFilter(admin.SimpleListFilter):
    title = "holder"
    parameter_name = "holder"

    def lookups(self, request, model_admin):
        return [("person", "Person key"), ("service", "Service key")]

    def queryset(self, request, queryset):
        if self.value() in ("person", "service"):
            return queryset.filter(person__isnull=self.value() == "service")
        return queryset


KEY_PREFIX_SHAPE = re.compile(r"^tg_[lt]_[0-9A-Za-z]+$")
KEY_REFUSALS = (KeyStateError,)


@admin.register(VirtualKey)
class VirtualKeyAdmin(LargeTableAdmin, AuditedModelAdmin):
    list_display = ["prefix", "name", "person", "team", "key_class", "status", "expires_at", "last_used_at", "spend"]
    list_filter = ["status", "team", "key_class", ExpiresWithinFilter, UnusedFilter, ProvisionedByFilter, HolderFilter]
    list_select_related = ["person", "team"]
    # Sorting by an unindexed column sorts the whole table: only indexed columns are offered.
    sortable_by = ["prefix", "expires_at"]
    search_fields = ["^prefix", "name", "person__email", "team__slug"]
    search_help_text = "A key prefix (tg_l_…), the beginning of a key name, a holder's email or a team slug."
    raw_id_fields = ["person", "team", "created_by"]
    # Status and expiry change only through the actions below (the lifecycle services), never by editing.
    readonly_fields = ["prefix", "status", "expires_at", "approved_by_policy", "created_at", "last_used_at",
                       "created_by", "history"]
    exclude = ["key_hash"]
    filter_horizontal = ["allowed_models"]
    fieldsets = [
        (None, {"fields": ["name", "prefix", "status", "key_class", "person", "team", "expires_at",
                           "approved_by_policy", "created_by", "created_at", "last_used_at"]}),
        ("Access", {"fields": ["allowed_models", "ip_allowlist", "body_logging", "default_tags", "monthly_budget"]}),
        ("Rate limits", {"fields": ["rpm_limit", "rpd_limit", "tpm_limit", "tpd_limit"]}),
        ("History", {"fields": ["history"]}),
    ]
    actions = [
        reason_action(name="revoke", description="Revoke selected keys", done="revoked", refusals=KEY_REFUSALS,
                      apply=lambda key, actor, reason: key_revoke(key=key, actor=actor, reason=reason)),
        reason_action(name="suspend", description="Suspend selected keys", done="suspended", refusals=KEY_REFUSALS,
                      apply=lambda key, actor, reason: key_suspend(key=key, actor=actor, reason=reason)),
        reason_action(name="reactivate", description="Reactivate selected keys", done="reactivated", refusals=KEY_REFUSALS,
                      apply=lambda key, actor, reason: key_reactivate(key=key, actor=actor, reason=reason)),
        reason_action(name="extend_30_days", description="Extend selected keys by 30 days", done="extended by 30 days",
                      refusals=KEY_REFUSALS,
                      apply=lambda key, actor, reason: key_extend(key=key, actor=actor, days=30, reason=reason)),
    ]

    def get_queryset(self, request):
        # The hashes and the encrypted signing secret never leave the database through the admin.
        from ledger.models import DailyRollup

        # This month's spend from the daily rollups, computed only for the rows of the page shown.
        spend = (DailyRollup.objects.filter(key=OuterRef("pk"), day__gte=timezone.localdate().replace(day=1))
                 .order_by().values("key").annotate(total=Sum("cost")).values("total"))
        return super().get_queryset(request).defer(*VirtualKey.AUDIT_EXCLUDE).annotate(spend_this_month=Subquery(spend))

    @admin.display(description="Spend this month")
    def spend(self, obj):
        return f"{obj.spend_this_month or 0:.2f} {settings.TOLLGATE_CURRENCY}"

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        # The admin's own search ORs four case-insensitive lookups across joins: a scan of the whole table.
        # The two terms IT types most are answered by indexes instead.
        if KEY_PREFIX_SHAPE.match(term):
            # A pasted key prefix. Base62 is case-sensitive, and a case-sensitive prefix match uses the prefix index.
            return queryset.filter(prefix__startswith=term[: keyformat.VISIBLE_PREFIX_LEN]), False
        if "@" in term and not any(c.isspace() for c in term):
            # A holder's email: match people first (a far smaller table), then their keys by the person index.
            return queryset.filter(person__in=Person.objects.filter(email__icontains=term).values("pk")), False
        if term:
            # A team's slug, else a key name's beginning (an index on UPPER(name), migration keys 0007). Not
            # both in one OR: the planner cannot estimate the OR and walks the whole table in date order.
            team = Team.objects.filter(slug=term).values_list("pk", flat=True).first()
            if team is not None:
                return queryset.filter(team_id=team), False
            return queryset.filter(name__istartswith=term), False
        return super().get_search_results(request, queryset, search_term)

    @admin.display(description="History")
    def history(self, obj):
        return audit_history(obj)

    def has_add_permission(self, request):
        # Keys are issued by the key service (request form, `manage.py issue_key`), which shows the secret once.
        return False

    def has_delete_permission(self, request, obj=None):
        # Keys are revoked, never deleted: the ledger and the audit trail refer to them.
        return False


# --- Access requests: the review queue ------------------------------------------------------------


class RequestStatusFilter(admin.SimpleListFilter):
    """Opens on the pending queue; "All" shows every request."""

    title = "status"
    parameter_name = "status"
    default = AccessRequest.Status.PENDING

    def lookups(self, request, model_admin):
        return [*AccessRequest.Status.choices, ("all", "All")]

    def value(self):
        return super().value() or self.default

    def choices(self, changelist):
        # No "All" entry of the base class: its link (no parameter) would land on the default again.
        for lookup, title in self.lookup_choices:
            yield {
                "selected": self.value() == lookup,
                "query_string": changelist.get_query_string({self.parameter_name: lookup}),
                "display": title,
            }

    def queryset(self, request, queryset):
        if self.value() == "all":
            return queryset
        return queryset.filter(status=self.value())


@admin.register(AccessRequest)
class AccessRequestAdmin(ReadOnlyAdminMixin, LargeTableAdmin):
    """Requests are decided with the approve and deny actions (the request services), never edited."""

    list_display = ["created_at", "requester", "team", "kind", "model_names", "key_class", "duration_days",
                    "monthly_budget", "status", "reasons_for_review"]
    list_filter = [RequestStatusFilter, "kind", "team", "decided_by_policy"]
    list_select_related = ["requester", "team"]
    search_fields = ["requester__username", "requester__email", "team__slug", "project"]
    actions = [
        reason_action(name="approve", description="Approve selected requests", done="approved",
                      refusals=(RequestRefused, PermissionDenied), reason_required=False, permission="decide",
                      apply=lambda req, actor, reason: request_approve(access_request=req, actor=actor, reason=reason)),
        reason_action(name="deny", description="Deny selected requests", done="denied",
                      refusals=(RequestRefused, PermissionDenied), permission="decide",
                      apply=lambda req, actor, reason: request_deny(access_request=req, actor=actor, reason=reason)),
    ]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("aliases")

    @admin.display(description="models")
    def model_names(self, obj):
        return ", ".join(a.name for a in obj.aliases.all())

    @admin.display(description="review reasons")
    def reasons_for_review(self, obj):
        return "; ".join(obj.review_reasons or [])

    @admin.display(description="History")
    def history(self, obj):
        return audit_history(obj)

    def get_readonly_fields(self, request, obj=None):
        return [*super().get_readonly_fields(request, obj), "history"]

    def has_decide_permission(self, request):
        # The form is read-only for everyone (ReadOnlyAdminMixin); deciding needs the change permission.
        return request.user.has_perm("keys.change_accessrequest")


# --- Provisioning policy --------------------------------------------------------------------------


@admin.register(ProvisioningPolicy)
class ProvisioningPolicyAdmin(AuditedModelAdmin):
    """One row, edited in place; every save is audited."""

    list_display = ["__str__", "auto_approve_max_days", "auto_approve_max_budget", "auto_approve_premium_models",
                    "auto_approve_production", "max_active_keys_per_person", "rotation_grace_hours"]

    def has_add_permission(self, request):
        return super().has_add_permission(request) and not ProvisioningPolicy.objects.exists()

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        if not change:
            obj.pk = 1  # the row ProvisioningPolicy.current() reads
        super().save_model(request, obj, form, change)


@admin.register(AcceptableUsePolicy)
class AcceptableUsePolicyAdmin(AuditedModelAdmin):
    """Publish a version by adding it; the latest whose effective date has come is the one people accept.
    A version someone accepted is what they agreed to: its text and date can no longer change."""

    list_display = ["version", "effective_from", "acceptances_count", "created_at"]
    search_fields = ["version"]
    ordering = ["-effective_from", "-id"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(acceptance_total=models.Count("acceptances"))

    @admin.display(description="accepted by", ordering="acceptance_total")
    def acceptances_count(self, obj) -> str:
        url = reverse("admin:keys_policyacceptance_changelist") + "?" + urlencode({"policy__id__exact": obj.pk})
        return format_html('<a href="{}">{} people</a>', url, obj.acceptance_total)

    def get_readonly_fields(self, request, obj=None):
        if obj is not None and obj.acceptances.exists():
            return ["version", "text", "effective_from"]
        return []

    def has_delete_permission(self, request, obj=None):
        return super().has_delete_permission(request, obj) and (obj is None or not obj.acceptances.exists())


@admin.register(PolicyAcceptance)
class PolicyAcceptanceAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Who accepted which version, when (written by keys.services.aup_accept, audited there)."""

    list_display = ["person", "policy", "accepted_at"]
    list_filter = ["policy"]
    list_select_related = ["person", "policy"]
    search_fields = ["person__username", "person__email"]
    raw_id_fields = ["person"]
    show_full_result_count = False


# --- Management API tokens -------------------------------------------------------------------------


class ApiTokenAddForm(forms.ModelForm):
    days = forms.IntegerField(min_value=1, max_value=3650, required=False, initial=90,
                              help_text="Days until it expires; empty: no expiry (service tokens an operator rotates).")

    class Meta:
        model = ApiToken
        fields = ["name", "kind", "person", "scopes"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens for /api/v1/. Issued here (the secret is shown once, in a message) or with `issue_api_token`;
    revoked with the action. Never edited: a token with other scopes is a new token."""

    list_display = ["prefix", "name", "kind", "person", "scope_list", "expires_at", "last_used_at", "revoked_at"]
    list_filter = ["kind", ("revoked_at", admin.EmptyFieldListFilter)]
    list_select_related = ["person"]
    search_fields = ["^prefix", "name", "person__email"]
    raw_id_fields = ["person"]
    exclude = ["token_hash"]
    readonly_fields = ["name", "kind", "person", "prefix", "scopes", "expires_at", "last_used_at", "revoked_at",
                       "created_at", "created_by"]

    @admin.display(description="Scopes")
    def scope_list(self, token) -> str:
        return ", ".join(f"{name}:{level}" for name, level in sorted((token.scopes or {}).items()))

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = ApiTokenAddForm
        return super().get_form(request, obj, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj is not None else []

    def get_fields(self, request, obj=None):
        return ["name", "kind", "person", "scopes", "days"] if obj is None else self.readonly_fields

    def save_model(self, request, obj, form, change):
        from django.core.exceptions import ValidationError

        from governance.api.tokens import api_token_issue

        if change:
            return
        try:
            issued = api_token_issue(person=form.cleaned_data["person"], name=form.cleaned_data["name"],
                                     scopes=form.cleaned_data["scopes"], days=form.cleaned_data.get("days"),
                                     kind=form.cleaned_data["kind"], actor=request.user)
        except ValidationError as exc:
            raise PermissionDenied("; ".join(exc.messages)) from None
        obj.pk = issued.token.pk
        self.message_user(request, f"API token {issued.token.prefix}… issued. Copy it now, it is not shown again: "
                                   f"{issued.secret}", messages.WARNING)

    def log_addition(self, request, obj, message):  # the audit event is written by api_token_issue
        return None

    def has_delete_permission(self, request, obj=None):
        return False

    actions = [
        reason_action(name="revoke", description="Revoke selected API tokens", done="revoked", refusals=(),
                      reason_required=False,
                      apply=lambda token, actor, reason: _api_token_revoke(token=token, actor=actor, reason=reason)),
    ]


def _api_token_revoke(**kwargs):
    from governance.api.tokens import api_token_revoke

    return api_token_revoke(**kwargs)
