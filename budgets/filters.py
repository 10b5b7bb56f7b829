"""One FilterSet per model of budgets, shared by the API and the list pages."""
import django_filters

from budgets.models import Alert, Grant, IncreaseRequest


class GrantFilter(django_filters.FilterSet):
    team = django_filters.CharFilter(field_name="team__slug", help_text="Team slug.")
    owner = django_filters.CharFilter(field_name="owner__username")

    class Meta:
        model = Grant
        fields = ["scope", "status", "period", "grant_class", "team", "owner", "parent", "project"]


class IncreaseRequestFilter(django_filters.FilterSet):
    class Meta:
        model = IncreaseRequest
        fields = ["status", "grant"]


class AlertFilter(django_filters.FilterSet):
    team = django_filters.CharFilter(field_name="team__slug")

    class Meta:
        model = Alert
        fields = ["kind", "status", "team", "key"]
