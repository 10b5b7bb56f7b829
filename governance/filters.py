"""One FilterSet per organisation model, shared by the API and the list pages."""
from datetime import UTC

import django_filters

from governance.models import AuditEvent, CostCenter, Department, Membership, Team


class UtcDateTimeFilter(django_filters.IsoDateTimeFilter):
    """An ISO 8601 instant, compared in UTC: Python accepts offsets up to ±23:59, PostgreSQL only to ±15:59, so
    an offset is applied here rather than sent along. An instant outside the representable years matches nothing."""

    def filter(self, qs, value):
        if value:
            try:
                value = value.astimezone(UTC)
            except OverflowError:
                return qs.none()
        return super().filter(qs, value)


class DepartmentFilter(django_filters.FilterSet):
    class Meta:
        model = Department
        fields = ["slug"]


class CostCenterFilter(django_filters.FilterSet):
    class Meta:
        model = CostCenter
        fields = ["code", "department", "is_active"]


class TeamFilter(django_filters.FilterSet):
    department = django_filters.CharFilter(field_name="department__slug")
    cost_center = django_filters.CharFilter(field_name="cost_center__code")

    class Meta:
        model = Team
        fields = ["slug", "department", "cost_center", "is_active"]


class MembershipFilter(django_filters.FilterSet):
    team = django_filters.CharFilter(field_name="team__slug")
    person = django_filters.CharFilter(field_name="person__username")

    class Meta:
        model = Membership
        fields = ["team", "person", "role"]


class AuditEventFilter(django_filters.FilterSet):
    start = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")
    end = UtcDateTimeFilter(field_name="created_at", lookup_expr="lt")
    actor = django_filters.CharFilter(field_name="actor__username")

    class Meta:
        model = AuditEvent
        fields = ["start", "end", "action", "object_type", "object_id", "actor"]
