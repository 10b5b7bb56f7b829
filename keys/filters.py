"""One FilterSet per model of keys, shared by the API and the list pages."""
import django_filters

from governance.filters import UtcDateTimeFilter
from keys.models import AccessRequest, ApiToken, VirtualKey


class VirtualKeyFilter(django_filters.FilterSet):
    team = django_filters.CharFilter(field_name="team__slug", help_text="Team slug.")
    person = django_filters.CharFilter(field_name="person__username", help_text="Holder's username.")
    prefix = django_filters.CharFilter(field_name="prefix", lookup_expr="startswith")
    expires_before = UtcDateTimeFilter(field_name="expires_at", lookup_expr="lt")

    class Meta:
        model = VirtualKey
        fields = ["status", "key_class", "team", "person", "prefix", "expires_before"]


class AccessRequestFilter(django_filters.FilterSet):
    team = django_filters.CharFilter(field_name="team__slug", help_text="Team slug.")
    requester = django_filters.CharFilter(field_name="requester__username")

    class Meta:
        model = AccessRequest
        fields = ["status", "kind", "team", "requester", "key"]


class ApiTokenFilter(django_filters.FilterSet):
    person = django_filters.CharFilter(field_name="person__username")
    revoked = django_filters.BooleanFilter(field_name="revoked_at", lookup_expr="isnull", exclude=True)

    class Meta:
        model = ApiToken
        fields = ["kind", "person", "revoked"]
