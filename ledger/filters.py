"""One FilterSet per ledger model, shared by the API and the list pages."""
import django_filters

from governance.filters import UtcDateTimeFilter
from ledger.models import DailyRollup, LedgerEntry, ProviderCostImport, Reconciliation


class LedgerEntryFilter(django_filters.FilterSet):
    """Usage: a period (created_at range) and who, which key, which model, which project tag, which outcome."""

    start = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte", help_text="From (inclusive).")
    end = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt", help_text="Until (exclusive).")
    team = django_filters.CharFilter(field_name="team__slug", help_text="Team slug.")
    person = django_filters.CharFilter(field_name="person__username", help_text="Username.")
    key = django_filters.NumberFilter(field_name="key_id", help_text="Key id.")
    model = django_filters.CharFilter(field_name="model_requested", help_text="The model as requested.")
    tag = django_filters.CharFilter(field_name="tags__project", help_text="The project tag.")
    outcome = django_filters.ChoiceFilter(choices=LedgerEntry.Outcome.choices)

    class Meta:
        model = LedgerEntry
        fields = ["start", "end", "team", "person", "key", "model", "tag", "outcome"]


class DailyRollupFilter(django_filters.FilterSet):
    start = django_filters.DateFilter(field_name="day", lookup_expr="gte")
    end = django_filters.DateFilter(field_name="day", lookup_expr="lte")
    team = django_filters.CharFilter(field_name="team__slug")
    person = django_filters.CharFilter(field_name="person__username")
    model = django_filters.CharFilter(field_name="alias__name")

    class Meta:
        model = DailyRollup
        fields = ["start", "end", "team", "person", "key", "model", "project", "environment"]


class ProviderCostImportFilter(django_filters.FilterSet):
    class Meta:
        model = ProviderCostImport
        fields = ["provider", "status", "source"]


class ReconciliationFilter(django_filters.FilterSet):
    class Meta:
        model = Reconciliation
        fields = ["provider", "month", "status"]
