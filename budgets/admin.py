"""Grants in admin: the hierarchy as a tree, usage against limit, and the filters finance and IT need; anomaly alerts."""
import json

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.html import format_html

from budgets.anomalies import AlertStateError, alert_acknowledge, alert_resolve, alert_summary
from budgets.enforcement import spent_now
from budgets.models import Alert, Grant, GrantAlert, IncreaseRequest
from governance.admin import AuditedModelAdmin, ReadOnlyAdminMixin
from keys.admin import reason_action
from keys.services import KeyStateError


class ExpiringFilter(admin.SimpleListFilter):
    title = "renewal"
    parameter_name = "renewal"

    def lookups(self, request, model_admin):
        return [("14", "due within 14 days"), ("expired", "expired")]

    def queryset(self, request, queryset):
        if self.value() == "14":
            return queryset.filter(status=Grant.Status.ACTIVE, renews_at__lte=timezone.localdate() + timezone.timedelta(days=14))
        if self.value() == "expired":
            return queryset.filter(Q(status=Grant.Status.EXPIRED) | Q(renews_at__lt=timezone.localdate()))
        return queryset


class UsageFilter(admin.SimpleListFilter):
    title = "usage this period"
    parameter_name = "usage"

    def lookups(self, request, model_admin):
        return [("80", "over 80%"), ("100", "at or over the limit")]

    def queryset(self, request, queryset):
        if not self.value():
            return queryset
        # Usage lives in the counters, not in a column: read them for the active grants (a few thousand at most).
        floor = int(self.value())
        hot = [g.pk for g in queryset.filter(status=Grant.Status.ACTIVE)
               if g.limit_amount and spent_now(g) * 100 >= g.limit_amount * floor]
        return queryset.filter(pk__in=hot)


@admin.register(Grant)
class GrantAdmin(AuditedModelAdmin):
    list_display = ["name", "scope", "grant_class", "period", "usage", "owner", "parent", "renews_at", "status"]
    list_filter = ["status", "grant_class", "scope", "period", ExpiringFilter, UsageFilter, ("owner", admin.RelatedOnlyFieldListFilter)]
    list_select_related = ["owner", "parent"]
    search_fields = ["name", "owner__username", "owner__email", "project", "purpose"]
    raw_id_fields = ["owner", "parent", "team", "person", "key", "department", "downgrade_to"]
    filter_horizontal = ["watchers", "allowed_models"]
    readonly_fields = ["created_at"]
    change_list_template = "admin/budgets/grant/change_list.html"

    @admin.display(description="usage this period")
    def usage(self, grant: Grant):
        spent = spent_now(grant)
        percent = int(spent / grant.limit_amount * 100) if grant.limit_amount else 0
        colour = "#b00020" if percent >= 80 else "#2f7d4f"
        return format_html('<span style="color:{}">{} of {} ({}%)</span>', colour, f"{spent:.2f}", grant.limit_amount, percent)

    def get_urls(self):
        return [path("tree/", self.admin_site.admin_view(self.tree_view), name="budgets_grant_tree"), *super().get_urls()]

    def tree_view(self, request):
        """The hierarchy, org down to keys, each grant with its usage against its limit."""
        grants = list(Grant.objects.select_related("owner").order_by("name"))
        children: dict[int | None, list[Grant]] = {}
        for grant in grants:
            grant.spent = spent_now(grant)
            grant.percent = int(grant.spent / grant.limit_amount * 100) if grant.limit_amount else 0
            children.setdefault(grant.parent_id, []).append(grant)
        rows = []

        def walk(parent_id, depth):
            for grant in children.get(parent_id, []):
                rows.append((grant, depth))
                walk(grant.pk, depth + 1)

        walk(None, 0)
        context = {**self.admin_site.each_context(request), "title": "Grant hierarchy", "rows": rows, "opts": self.model._meta}
        return TemplateResponse(request, "admin/budgets/grant/tree.html", context)


@admin.register(IncreaseRequest)
class IncreaseRequestAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "grant", "requester", "new_limit", "status", "approver", "decided_by"]
    list_filter = ["status"]
    list_select_related = ["grant", "requester", "approver", "decided_by"]
    search_fields = ["grant__name", "requester__username", "reason"]


@admin.register(GrantAlert)
class GrantAlertAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["sent_at", "grant", "kind", "spent", "period_start"]
    list_filter = ["kind"]
    list_select_related = ["grant"]
    search_fields = ["grant__name"]


ALERT_REFUSALS = (AlertStateError, KeyStateError, PermissionDenied)


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    """Anomaly alerts: raised by detection only, changed only through budgets.anomalies (each change audited)."""

    list_display = ["created_at", "kind", "subject_shown", "summary", "status", "action_taken", "acknowledged_by", "resolved_by"]
    list_filter = ["status", "kind"]
    list_select_related = ["key", "person", "team", "acknowledged_by", "resolved_by"]
    search_fields = ["subject", "key__prefix", "person__username", "team__slug"]
    fields = ["kind", "subject_shown", "status", "summary", "evidence_shown", "window_start", "window_end", "created_at",
              "action_taken", "acknowledged_by", "acknowledged_at", "resolved_by", "resolved_at"]
    readonly_fields = fields
    actions = [
        reason_action(name="acknowledge", description="Acknowledge selected alerts", done="acknowledged",
                      refusals=ALERT_REFUSALS, reason_required=False,
                      apply=lambda alert, actor, reason: alert_acknowledge(alert=alert, actor=actor, note=reason)),
        reason_action(name="resolve", description="Resolve selected alerts", done="resolved",
                      refusals=ALERT_REFUSALS, reason_required=False,
                      apply=lambda alert, actor, reason: alert_resolve(alert=alert, actor=actor, note=reason)),
        reason_action(name="resolve_and_reinstate", description="Resolve and reinstate the key",
                      done="resolved, their keys reinstated", refusals=ALERT_REFUSALS, reason_required=False,
                      apply=lambda alert, actor, reason: alert_resolve(alert=alert, actor=actor, note=reason,
                                                                        reinstate_key=True)),
    ]

    def has_add_permission(self, request):
        return False  # alerts are raised by detection

    def has_delete_permission(self, request, obj=None):
        return False  # they are the record of what was seen and done

    def change_view(self, request, object_id, form_url="", extra_context=None):
        # Every field is read-only: the state changes through the actions, never through a form save.
        extra_context = {**(extra_context or {}), "show_save": False, "show_save_and_continue": False,
                         "show_save_and_add_another": False}
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.display(description="subject", ordering="subject")
    def subject_shown(self, alert: Alert) -> str:
        return alert.subject_label

    @admin.display(description="what was seen")
    def summary(self, alert: Alert) -> str:
        return alert_summary(alert)

    @admin.display(description="evidence")
    def evidence_shown(self, alert: Alert):
        return format_html("<pre>{}</pre>", json.dumps(alert.evidence, indent=2, sort_keys=True))
