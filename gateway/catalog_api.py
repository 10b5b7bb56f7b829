"""The catalog over the management API, read only: providers (their secrets are never returned, only whether
one is set) and models with their deployments and the prices in force. Changed in the admin."""
from rest_framework import serializers, viewsets

from gateway.models import ModelAlias, Provider
from keys.selectors import models_with_prices


class ProviderOutput(serializers.ModelSerializer):
    has_api_key = serializers.BooleanField(read_only=True)

    class Meta:
        model = Provider
        fields = ["id", "name", "kind", "base_url", "api_version", "has_api_key", "connect_timeout", "read_timeout",
                  "is_active", "created_at"]
        read_only_fields = fields


class ProviderViewSet(viewsets.ReadOnlyModelViewSet):
    scope_resource = "providers"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    required_perm = "gateway.view_provider"
    serializer_class = ProviderOutput
    queryset = Provider.objects.order_by("name", "id")


class DeploymentOutput(serializers.Serializer):
    provider = serializers.CharField(source="provider_model.provider.name")
    provider_model = serializers.CharField(source="provider_model.name")
    priority = serializers.IntegerField()


class ModelOutput(serializers.ModelSerializer):
    deployments = DeploymentOutput(many=True, read_only=True)
    price = serializers.SerializerMethodField()

    class Meta:
        model = ModelAlias
        fields = ["id", "name", "kind", "tier", "description", "is_active", "deployments", "price"]
        read_only_fields = fields

    def get_price(self, alias) -> dict | None:
        """Per million tokens, of the deployment tried first, in force now (None: not priced yet)."""
        price = models_with_prices([alias])[0].price
        if price is None:
            return None
        return {"input_per_mtok": str(price.input_per_mtok), "output_per_mtok": str(price.output_per_mtok),
                "cached_input_per_mtok": str(price.cached_input_per_mtok), "effective_from": price.effective_from}


class ModelViewSet(viewsets.ReadOnlyModelViewSet):
    scope_resource = "models"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    serializer_class = ModelOutput
    filterset_fields = ["kind", "tier", "is_active"]
    queryset = ModelAlias.objects.prefetch_related("deployments__provider_model__provider").order_by("name", "id")
