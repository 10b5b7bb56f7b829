"""The management API for grants, increase requests and anomaly alerts. Reads are scoped here (grants_visible_to);
writes go through budgets.services, which re-check who acts (Grant.objects.manageable_by, separation of duties)."""
from django.db.models import Q
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from budgets import services
from budgets.filters import AlertFilter, GrantFilter, IncreaseRequestFilter
from budgets.models import Alert, Grant, IncreaseRequest


def grants_visible_to(person):
    """IT, finance and auditors (view permission) see every grant; everyone else the grants they own, watch, or
    that were delegated under theirs, and those that cover them (their own, their teams')."""
    if person.has_perm("budgets.view_grant"):
        return Grant.objects.all()
    return Grant.objects.filter(
        Q(owner=person) | Q(parent__owner=person) | Q(watchers=person) | Q(person=person)
        | Q(team__memberships__person=person)).distinct()


class GrantOutput(serializers.ModelSerializer):
    owner = serializers.SlugRelatedField(slug_field="username", read_only=True)
    team = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)
    person = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    allowed_models = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)

    class Meta:
        model = Grant
        fields = ["id", "name", "owner", "parent", "scope", "department", "team", "person", "key", "project",
                  "environment", "grant_class", "period", "limit_amount", "limit_tokens", "allowed_models", "on_cap",
                  "alert_thresholds", "term_start", "renews_at", "status", "purpose", "created_at"]
        read_only_fields = fields


class GrantViewSet(viewsets.ReadOnlyModelViewSet):
    scope_resource = "grants"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    queryset = Grant.objects.none()  # the schema's model; requests use get_queryset
    serializer_class = GrantOutput
    filterset_class = GrantFilter

    def get_queryset(self):
        return (grants_visible_to(self.request.user).select_related("owner", "team", "person")
                .prefetch_related("allowed_models").order_by("name", "id"))


class IncreaseOutput(serializers.ModelSerializer):
    requester = serializers.SlugRelatedField(slug_field="username", read_only=True)
    approver = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    decided_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = IncreaseRequest
        fields = ["id", "grant", "requester", "new_limit", "from_limit", "reason", "status", "approver", "decided_by",
                  "decided_at", "decision_reason", "created_at"]
        read_only_fields = fields


class IncreaseInput(serializers.Serializer):
    grant = serializers.PrimaryKeyRelatedField(queryset=Grant.objects.all())
    new_limit = serializers.DecimalField(max_digits=14, decimal_places=2, min_value=0)
    reason = serializers.CharField(max_length=300)


class DecisionInput(serializers.Serializer):
    reason = serializers.CharField(max_length=300, required=False, allow_blank=True, default="")


class IncreaseViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet):
    """Requests to raise a grant's limit: one's own, those one decides, and all for IT, finance and auditors."""

    scope_resource = "increases"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    queryset = IncreaseRequest.objects.none()
    serializer_class = IncreaseOutput
    filterset_class = IncreaseRequestFilter

    def get_queryset(self):
        user = self.request.user
        increases = IncreaseRequest.objects.select_related("requester", "approver", "decided_by").order_by("-created_at", "-id")
        if user.has_perm("budgets.view_increaserequest"):
            return increases
        return increases.filter(Q(requester=user) | Q(approver=user))

    @extend_schema(request=IncreaseInput, responses={201: IncreaseOutput})
    def create(self, request):
        data = IncreaseInput(data=request.data)
        data.is_valid(raise_exception=True)
        grant = get_object_or_404(grants_visible_to(request.user), pk=data.validated_data["grant"].pk)
        increase = services.grant_increase_request(grant=grant, requester=request.user,
                                                   new_limit=data.validated_data["new_limit"],
                                                   reason=data.validated_data["reason"])
        return Response(IncreaseOutput(increase).data, status=status.HTTP_201_CREATED)

    def _decide(self, request, pk, *, approve: bool) -> Response:
        data = DecisionInput(data=request.data)
        data.is_valid(raise_exception=True)
        increase = services.increase_decide(request=self.get_object(), actor=request.user, approve=approve,
                                            reason=data.validated_data["reason"])
        return Response(IncreaseOutput(increase).data)

    @extend_schema(request=DecisionInput, responses=IncreaseOutput)
    @action(detail=True, methods=["post"])
    def approve(self, request, pk=None):
        return self._decide(request, pk, approve=True)

    @extend_schema(request=DecisionInput, responses=IncreaseOutput)
    @action(detail=True, methods=["post"])
    def deny(self, request, pk=None):
        return self._decide(request, pk, approve=False)


class AlertOutput(serializers.ModelSerializer):
    class Meta:
        model = Alert
        fields = ["id", "kind", "subject", "key", "person", "team", "status", "evidence", "window_start", "window_end",
                  "created_at", "acknowledged_at", "resolved_at", "action_taken"]
        read_only_fields = fields


class AlertViewSet(viewsets.ReadOnlyModelViewSet):
    """Anomaly alerts (read only; IT acts on them in the admin)."""

    scope_resource = "alerts"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    required_perm = "budgets.view_alert"
    serializer_class = AlertOutput
    filterset_class = AlertFilter
    queryset = Alert.objects.order_by("-created_at", "-id")
