"""/api/: the management API (v1), its OpenAPI schema and the docs page."""
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from budgets.api import AlertViewSet, GrantViewSet, IncreaseViewSet
from gateway.catalog_api import ModelViewSet, ProviderViewSet
from governance.api.org import (
    AuditEventViewSet,
    CostCenterViewSet,
    DepartmentViewSet,
    MembershipViewSet,
    TeamViewSet,
)
from keys.api import AccessRequestViewSet, ApiTokenViewSet, KeyViewSet
from ledger.api import ChargebackView, CostImportViewSet, ReconciliationViewSet, RollupViewSet, UsageViewSet

app_name = "api"

router = DefaultRouter(trailing_slash=True)
router.include_format_suffixes = False  # ?format= chooses the chargeback export; no .json/.csv suffix routes
router.register("departments", DepartmentViewSet, basename="department")
router.register("cost-centers", CostCenterViewSet, basename="cost-center")
router.register("teams", TeamViewSet, basename="team")
router.register("memberships", MembershipViewSet, basename="membership")
router.register("providers", ProviderViewSet, basename="provider")
router.register("models", ModelViewSet, basename="model")
router.register("grants", GrantViewSet, basename="grant")
router.register("increases", IncreaseViewSet, basename="increase")
router.register("keys", KeyViewSet, basename="key")
router.register("access-requests", AccessRequestViewSet, basename="access-request")
router.register("tokens", ApiTokenViewSet, basename="token")
router.register("usage", UsageViewSet, basename="usage")
router.register("rollups", RollupViewSet, basename="rollup")
router.register("cost-imports", CostImportViewSet, basename="cost-import")
router.register("reconciliations", ReconciliationViewSet, basename="reconciliation")
router.register("alerts", AlertViewSet, basename="alert")
router.register("audit-events", AuditEventViewSet, basename="audit-event")

urlpatterns = [
    path("v1/chargeback/", ChargebackView.as_view(), name="chargeback"),
    path("v1/", include(router.urls)),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
]
