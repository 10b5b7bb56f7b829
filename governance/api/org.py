"""The organisation over the API, read only: departments, cost centers, teams, memberships (changed in the
admin, where each change is audited) and the audit trail (append-only, for those with view permission)."""
from django.db.models import Q
from rest_framework import serializers, viewsets

from governance.api.pagination import NewestFirstCursorPagination
from governance.filters import AuditEventFilter, CostCenterFilter, DepartmentFilter, MembershipFilter, TeamFilter
from governance.models import AuditEvent, CostCenter, Department, Membership, Team


def teams_visible_to(person):
    """IT, finance and auditors (view permission) see every team; everyone else the teams they belong to or own."""
    if person.has_perm("governance.view_team"):
        return Team.objects.all()
    return Team.objects.filter(Q(memberships__person=person) | Q(owner=person)).distinct()


class DepartmentOutput(serializers.ModelSerializer):
    class Meta:
        model = Department
        fields = ["id", "name", "slug"]
        read_only_fields = fields


class DepartmentViewSet(viewsets.ReadOnlyModelViewSet):
    scope_resource = "departments"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    serializer_class = DepartmentOutput
    filterset_class = DepartmentFilter
    queryset = Department.objects.order_by("name", "id")


class CostCenterOutput(serializers.ModelSerializer):
    class Meta:
        model = CostCenter
        fields = ["id", "code", "name", "department", "is_active"]
        read_only_fields = fields


class CostCenterViewSet(viewsets.ReadOnlyModelViewSet):
    scope_resource = "cost-centers"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    serializer_class = CostCenterOutput
    filterset_class = CostCenterFilter
    queryset = CostCenter.objects.order_by("code", "id")


class TeamOutput(serializers.ModelSerializer):
    department = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    cost_center = serializers.SlugRelatedField(slug_field="code", read_only=True)
    owner = serializers.SlugRelatedField(slug_field="username", read_only=True)
    allowed_models = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)

    class Meta:
        model = Team
        fields = ["id", "name", "slug", "department", "cost_center", "owner", "is_active", "allowed_models",
                  "body_logging", "rpm_limit", "rpd_limit", "tpm_limit", "tpd_limit"]
        read_only_fields = fields


class TeamViewSet(viewsets.ReadOnlyModelViewSet):
    scope_resource = "teams"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    queryset = Team.objects.none()  # the schema's model; requests use get_queryset
    serializer_class = TeamOutput
    filterset_class = TeamFilter

    def get_queryset(self):
        return (teams_visible_to(self.request.user).select_related("department", "cost_center", "owner")
                .prefetch_related("allowed_models").order_by("name", "id"))


class MembershipOutput(serializers.ModelSerializer):
    person = serializers.SlugRelatedField(slug_field="username", read_only=True)
    team = serializers.SlugRelatedField(slug_field="slug", read_only=True)

    class Meta:
        model = Membership
        fields = ["id", "person", "team", "role", "created_at"]
        read_only_fields = fields


class MembershipViewSet(viewsets.ReadOnlyModelViewSet):
    scope_resource = "memberships"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    queryset = Membership.objects.none()
    serializer_class = MembershipOutput
    filterset_class = MembershipFilter

    def get_queryset(self):
        return (Membership.objects.filter(team__in=teams_visible_to(self.request.user).values("pk"))
                .select_related("person", "team").order_by("team__slug", "id"))


class AuditEventOutput(serializers.ModelSerializer):
    actor = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = AuditEvent
        fields = ["id", "created_at", "actor", "actor_label", "action", "object_type", "object_id", "object_repr",
                  "before", "after", "source_ip", "request_id", "hash"]
        read_only_fields = fields


class AuditEventViewSet(viewsets.ReadOnlyModelViewSet):
    scope_resource = "audit-events"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    required_perm = "governance.view_auditevent"
    serializer_class = AuditEventOutput
    filterset_class = AuditEventFilter
    pagination_class = NewestFirstCursorPagination
    queryset = AuditEvent.objects.select_related("actor").order_by("-id")
