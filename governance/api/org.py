"""The organisation over the API: departments, cost centers, teams and memberships (IT adds and changes them, as
in the admin, each change validated and audited by governance.audit.audited_save) and the audit trail
(append-only, for those with view permission)."""
from django.db.models import Q
from rest_framework import serializers, viewsets

from governance.api.pagination import NewestFirstCursorPagination
from governance.api.writes import AuditedInput, AuditedWrites, ReadOrWrite
from governance.filters import AuditEventFilter, CostCenterFilter, DepartmentFilter, MembershipFilter, TeamFilter
from governance.models import AuditEvent, CostCenter, Department, Membership, Person, Team


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


class DepartmentInput(AuditedInput):
    output = DepartmentOutput

    class Meta:
        model = Department
        fields = ["id", "name", "slug"]
        read_only_fields = ["id"]


class DepartmentViewSet(ReadOrWrite, AuditedWrites, viewsets.ReadOnlyModelViewSet):
    input_class = DepartmentInput
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


class CostCenterInput(AuditedInput):
    output = CostCenterOutput

    class Meta:
        model = CostCenter
        fields = ["id", "code", "name", "department", "is_active"]
        read_only_fields = ["id"]


class CostCenterViewSet(ReadOrWrite, AuditedWrites, viewsets.ReadOnlyModelViewSet):
    input_class = CostCenterInput
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


class TeamInput(AuditedInput):
    output = TeamOutput
    department = serializers.SlugRelatedField(slug_field="slug", queryset=Department.objects.all())
    cost_center = serializers.SlugRelatedField(slug_field="code", queryset=CostCenter.objects.all())
    owner = serializers.SlugRelatedField(slug_field="username", queryset=Person.objects.filter(is_active=True))

    class Meta:
        model = Team
        fields = ["id", "name", "slug", "department", "cost_center", "owner", "is_active", "body_logging",
                  "rpm_limit", "rpd_limit", "tpm_limit", "tpd_limit"]
        read_only_fields = ["id"]


class TeamViewSet(ReadOrWrite, AuditedWrites, viewsets.ReadOnlyModelViewSet):
    input_class = TeamInput
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


class MembershipInput(AuditedInput):
    output = MembershipOutput
    person = serializers.SlugRelatedField(slug_field="username", queryset=Person.objects.filter(is_active=True))
    team = serializers.SlugRelatedField(slug_field="slug", queryset=Team.objects.all())

    class Meta:
        model = Membership
        fields = ["id", "person", "team", "role", "created_at"]
        read_only_fields = ["id", "created_at"]


class MembershipViewSet(ReadOrWrite, AuditedWrites, viewsets.ReadOnlyModelViewSet):
    input_class = MembershipInput
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
