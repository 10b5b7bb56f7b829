"""The ledger in admin: read-only rows (corrections are adjustment entries, never edits), an export of
selected rows (django-import-export), an adjust action for finance, and the daily rollups."""
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.template.response import TemplateResponse
from import_export import fields, resources
from import_export.admin import ExportActionMixin

from governance.admin import ReadOnlyAdminMixin
from governance.bigtables import LargeTableAdminMixin, recent_values_filter
from governance.spreadsheets import safe_cell
from ledger.forms import AdjustmentForm
from ledger.models import CallBody, DailyRollup, LedgerEntry, ProviderCostImport, Reconciliation, TrueUp
from ledger.services import ledger_adjust


class LedgerEntryResource(resources.ModelResource):
    """What an export of ledger rows carries: attribution and money, never a secret (the key's prefix only)."""

    key = fields.Field(attribute="key__prefix", column_name="key")
    person = fields.Field(attribute="person__username", column_name="person")
    team = fields.Field(attribute="team__slug", column_name="team")
    cost_center = fields.Field(attribute="cost_center__code", column_name="cost_center")
    model = fields.Field(attribute="provider_model__name", column_name="model")

    def export_field(self, field, instance, **kwargs):
        return safe_cell(super().export_field(field, instance, **kwargs))  # model names and details are callers' text

    class Meta:
        model = LedgerEntry
        fields = ["request_id", "created_at", "outcome", "error_code", "key", "person", "team", "cost_center", "tags",
                  "model_requested", "model", "input_tokens", "output_tokens", "cached_tokens", "cost", "detail"]
        export_order = fields


@admin.register(LedgerEntry)
class LedgerEntryAdmin(LargeTableAdminMixin, ReadOnlyAdminMixin, ExportActionMixin, admin.ModelAdmin):
    resource_classes = [LedgerEntryResource]
    list_display = [
        "created_at", "request_id", "outcome", "http_status", "error_code", "key", "person", "team",
        "model_requested", "input_tokens", "output_tokens", "cost", "latency_ms",
    ]
    # error_code's choices come from recent rows: a SELECT DISTINCT would read every partition on each load.
    # No date hierarchy either (its year list is a DISTINCT over every partition).
    list_filter = ["outcome", recent_values_filter("error_code"), "streamed", ("created_at", admin.DateFieldListFilter)]
    list_select_related = ["key", "person", "team"]
    search_fields = ["=request_id", "key__prefix", "person__username", "model_requested"]
    changelist_defer = ("tags", "detail", "grant_path")
    actions = ["adjust"]

    @admin.action(description="Adjust the selected entry (finance)", permissions=["add_adjustment"])
    def adjust(self, request, queryset):
        entries = list(queryset[:2])
        if len(entries) != 1:
            self.message_user(request, "Select exactly one entry to adjust.", messages.WARNING)
            return None
        entry = entries[0]
        form = AdjustmentForm(request.POST if "apply" in request.POST else None)
        if form.is_valid():
            try:
                adjustment = ledger_adjust(entry=entry, actor=request.user, **form.cleaned_data)
            except (ValidationError, PermissionDenied) as error:
                form.add_error(None, error)
            else:
                self.message_user(request, f"Recorded adjustment {adjustment.request_id} of {adjustment.cost}.")
                return None
        context = {**self.admin_site.each_context(request), "title": "Adjust a ledger entry", "entry": entry, "form": form,
                   "opts": self.model._meta, "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME}
        return TemplateResponse(request, "admin/ledger/adjust.html", context)

    def has_add_adjustment_permission(self, request):
        return request.user.has_perm("ledger.add_ledgerentry")


@admin.register(DailyRollup)
class DailyRollupAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["day", "team", "person", "key", "provider_model", "cost_center", "project", "calls", "refused", "cost"]
    list_filter = [("day", admin.DateFieldListFilter), "team"]
    list_select_related = ["team", "person", "key", "provider_model", "cost_center"]
    search_fields = ["project", "feature", "team__slug", "person__username"]
    date_hierarchy = "day"
    show_full_result_count = False


@admin.register(CallBody)
class CallBodyAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Stored prompts and responses (only under a body-logging policy); not visible to the Finance role."""

    list_display = ["entry", "created_at", "mode"]
    list_filter = ["mode"]
    list_select_related = ["entry"]
    show_full_result_count = False


@admin.register(ProviderCostImport)
class ProviderCostImportAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["created_at", "provider", "source", "file_name", "status", "read", "lines", "replaced", "rejected",
                    "uploaded_by"]
    list_filter = ["provider", "source", "status"]
    list_select_related = ["provider", "uploaded_by"]
    search_fields = ["file_name"]


@admin.register(TrueUp)
class TrueUpAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["month", "provider", "amount", "entries", "created_by", "created_at", "reversed_at"]
    list_filter = ["provider"]
    list_select_related = ["provider", "created_by"]


@admin.register(Reconciliation)
class ReconciliationAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["month", "provider", "billed", "ledger", "bypass", "unexplained", "status", "created_at"]
    list_filter = ["provider", "status"]
    list_select_related = ["provider"]
    date_hierarchy = "month"
