"""The management API for the ledger: usage (ledger entries), daily rollups, chargeback (JSON, CSV or XLSX),
cost imports and reconciliations. All read only. Who sees which usage is ledger.dashboard.usage_scope, the
same decision the usage pages make; chargeback and reconciliations need ledger.view_ledgerentry."""

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import renderers, serializers, viewsets
from rest_framework.response import Response
from rest_framework.views import APIView

from governance.api.pagination import NewestFirstCursorPagination
from ledger import chargeback as cb
from ledger.dashboard import usage_scope
from ledger.filters import DailyRollupFilter, LedgerEntryFilter, ProviderCostImportFilter, ReconciliationFilter
from ledger.models import DailyRollup, LedgerEntry, ProviderCostImport, Reconciliation


class UsageOutput(serializers.ModelSerializer):
    key = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)
    key_prefix = serializers.CharField(source="key.prefix", read_only=True, allow_null=True, default=None)
    team = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)
    person = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    model = serializers.SlugRelatedField(source="alias", slug_field="name", read_only=True, allow_null=True)

    class Meta:
        model = LedgerEntry
        fields = ["id", "request_id", "created_at", "key", "key_prefix", "person", "team", "tags", "model_requested",
                  "model", "input_tokens", "output_tokens", "cached_tokens", "cost", "latency_ms", "outcome",
                  "http_status", "error_code", "detail", "streamed"]
        read_only_fields = fields


class UsageViewSet(viewsets.ReadOnlyModelViewSet):
    """Ledger entries, newest first, with a cursor (no counting of the largest table)."""

    scope_resource = "usage"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    queryset = LedgerEntry.objects.none()  # the schema's model; requests use get_queryset
    serializer_class = UsageOutput
    filterset_class = LedgerEntryFilter
    pagination_class = NewestFirstCursorPagination

    def get_queryset(self):
        return (LedgerEntry.objects.filter(usage_scope(self.request.user).ledger())
                .select_related("key", "team", "person", "alias").order_by("-id"))


class RollupOutput(serializers.ModelSerializer):
    team = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)
    person = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    model = serializers.SlugRelatedField(source="alias", slug_field="name", read_only=True, allow_null=True)

    class Meta:
        model = DailyRollup
        fields = ["id", "day", "team", "person", "key", "model", "project", "feature", "environment", "experiment",
                  "calls", "refused", "failed", "input_tokens", "output_tokens", "cached_tokens", "cost"]
        read_only_fields = fields


class RollupViewSet(viewsets.ReadOnlyModelViewSet):
    scope_resource = "rollups"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    queryset = DailyRollup.objects.none()
    serializer_class = RollupOutput
    filterset_class = DailyRollupFilter
    pagination_class = NewestFirstCursorPagination

    def get_queryset(self):
        return (DailyRollup.objects.filter(usage_scope(self.request.user).rollups())
                .select_related("team", "person", "alias").order_by("-id"))


class CostImportOutput(serializers.ModelSerializer):
    class Meta:
        model = ProviderCostImport
        fields = ["id", "provider", "source", "status", "file_name", "size", "read", "lines", "replaced", "rejected",
                  "error", "created_at", "finished_at"]
        read_only_fields = fields


class CostImportViewSet(viewsets.ReadOnlyModelViewSet):
    scope_resource = "reconciliations"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    required_perm = "ledger.view_ledgerentry"
    serializer_class = CostImportOutput
    filterset_class = ProviderCostImportFilter
    queryset = ProviderCostImport.objects.order_by("-created_at", "-id")


class ReconciliationOutput(serializers.ModelSerializer):
    class Meta:
        model = Reconciliation
        fields = ["id", "provider", "month", "billed", "ledger", "bypass", "explained", "unexplained", "status",
                  "created_at"]
        read_only_fields = fields


class ReconciliationViewSet(viewsets.ReadOnlyModelViewSet):
    scope_resource = "reconciliations"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    required_perm = "ledger.view_ledgerentry"
    serializer_class = ReconciliationOutput
    filterset_class = ReconciliationFilter
    queryset = Reconciliation.objects.order_by("-month", "-id")


# --- Chargeback -----------------------------------------------------------------------------------------


class CSVRenderer(renderers.BaseRenderer):
    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return data if isinstance(data, str | bytes) else "\n".join(str(v) for v in (data or {}).values())


class XLSXRenderer(renderers.BaseRenderer):
    media_type = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    format = "xlsx"
    charset = None
    render_style = "binary"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return data if isinstance(data, bytes) else b""


class ChargebackQuery(serializers.Serializer):
    start = serializers.DateField()
    end = serializers.DateField()
    group_by = serializers.CharField(default="cost_center,team",
                                     help_text=f"Comma-separated, of: {', '.join(cb.GROUPS)}.")

    def validate_group_by(self, value: str) -> list[str]:
        groups = [g.strip() for g in value.split(",") if g.strip()]
        unknown = [g for g in groups if g not in cb.GROUPS]
        if not groups or unknown:
            raise serializers.ValidationError(f"Group by one or more of {', '.join(cb.GROUPS)}.")
        return groups

    def validate(self, data):
        if data["start"] > data["end"]:
            raise serializers.ValidationError({"end": "The end is before the start."})
        return data


class ChargebackLine(serializers.Serializer):
    groups = serializers.DictField(child=serializers.CharField())
    calls = serializers.IntegerField()
    refused = serializers.IntegerField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    amount = serializers.DecimalField(max_digits=18, decimal_places=2)
    exact = serializers.DecimalField(max_digits=18, decimal_places=8)


class ChargebackOutput(serializers.Serializer):
    start = serializers.DateField()
    end = serializers.DateField()
    group_by = serializers.ListField(child=serializers.CharField())
    currency = serializers.CharField()
    total = serializers.DecimalField(max_digits=18, decimal_places=2)
    exact_total = serializers.DecimalField(max_digits=18, decimal_places=8)
    refused_left_out = serializers.IntegerField()
    generated_at = serializers.DateTimeField()
    lines = ChargebackLine(many=True)


class ChargebackView(APIView):
    """Spend for a period (local days, both included) grouped as asked, from the daily rollups: the lines add
    up to the total to the cent. `format=csv` or `format=xlsx` gives finance's export (ledger.chargeback.export)."""

    scope_resource = "chargeback"
    required_perm = "ledger.view_ledgerentry"
    renderer_classes = [renderers.JSONRenderer, CSVRenderer, XLSXRenderer]

    @extend_schema(
        parameters=[ChargebackQuery, OpenApiParameter("format", OpenApiTypes.STR, enum=["json", "csv", "xlsx"])],
        responses={(200, "application/json"): ChargebackOutput, (200, "text/csv"): OpenApiTypes.STR,
                   (200, XLSXRenderer.media_type): OpenApiTypes.BINARY},
    )
    def get(self, request):
        query = ChargebackQuery(data=request.query_params)
        if not query.is_valid():
            request.accepted_renderer, request.accepted_media_type = renderers.JSONRenderer(), "application/json"
            return Response(query.errors, status=400)
        report = cb.chargeback(**query.validated_data)
        fmt = request.accepted_renderer.format
        if fmt in cb.FORMATS:
            response = Response(cb.export(report, fmt), content_type=request.accepted_renderer.media_type)
            response["Content-Disposition"] = f'attachment; filename="chargeback-{report.start}-{report.end}.{fmt}"'
            return response
        return Response(ChargebackOutput(_as_json(report)).data)


def _as_json(report: cb.Chargeback) -> dict:
    return {
        "start": report.start, "end": report.end, "group_by": list(report.group_by), "currency": settings.TOLLGATE_CURRENCY,
        "total": report.total, "exact_total": report.exact_total, "refused_left_out": report.refused_left_out,
        "generated_at": report.generated_at,
        "lines": [{"groups": dict(zip(report.group_by, line.groups)), "calls": line.calls, "refused": line.refused,
                   "input_tokens": line.input_tokens, "output_tokens": line.output_tokens, "amount": line.amount,
                   "exact": line.exact} for line in report.lines],
    }


