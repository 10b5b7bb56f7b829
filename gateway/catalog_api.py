"""The catalog over the management API: providers (IT adds and changes them; their keys are write-only, never
returned, only whether one is set) and models with their deployments and the prices in force (read only;
changed in the admin)."""
from rest_framework import serializers, viewsets

from gateway.models import ModelAlias, Provider
from governance.api.writes import AuditedWrites
from governance.audit import audit_record, audited_save
from keys.selectors import models_with_prices


class ProviderOutput(serializers.ModelSerializer):
    has_api_key = serializers.BooleanField(read_only=True)

    class Meta:
        model = Provider
        fields = ["id", "name", "kind", "base_url", "api_version", "has_api_key", "connect_timeout", "read_timeout",
                  "is_active", "created_at"]
        read_only_fields = fields


class ProviderInput(serializers.ModelSerializer):
    api_key = serializers.CharField(write_only=True, required=False, allow_blank=True, max_length=500,
                                    help_text="The provider's API key: stored encrypted, never returned.")
    admin_key = serializers.CharField(write_only=True, required=False, allow_blank=True, max_length=500,
                                      help_text="Its admin key for the cost API (reconciliation): write-only too.")
    has_api_key = serializers.BooleanField(read_only=True)

    class Meta:
        model = Provider
        fields = ["id", "name", "kind", "base_url", "api_version", "connect_timeout", "read_timeout", "is_active",
                  "api_key", "admin_key", "has_api_key", "created_at"]
        read_only_fields = ["id", "has_api_key", "created_at"]

    def persist(self, provider: Provider, *, actor) -> Provider:
        data = dict(self.validated_data)
        secrets = {name: data.pop(name) for name in ("api_key", "admin_key") if name in data}
        for field, value in data.items():
            setattr(provider, field, value)
        if "api_key" in secrets:
            provider.set_api_key(secrets["api_key"])
        if "admin_key" in secrets:
            provider.set_admin_key(secrets["admin_key"])
        provider = audited_save(provider, actor=actor)
        for name in secrets:  # that a key was set, never the key (Provider.AUDIT_EXCLUDE keeps it out of snapshots)
            audit_record(actor=actor, action=f"provider.{name}_set", obj=provider)
        return provider

    def to_representation(self, provider):
        return ProviderOutput(provider, context=self.context).data


class ProviderViewSet(AuditedWrites, viewsets.ReadOnlyModelViewSet):
    scope_resource = "providers"
    lookup_value_regex = r"[0-9]+"  # a malformed id is a 404 from the router, never a query
    required_perm = "gateway.view_provider"
    queryset = Provider.objects.order_by("name", "id")

    def get_serializer_class(self):
        return ProviderOutput if self.request is not None and self.request.method in ("GET", "HEAD", "OPTIONS") \
            else ProviderInput


class BilledNameOutput(serializers.Serializer):
    name = serializers.CharField()
    snapshot_suffix = serializers.CharField(help_text="The regular expression of its dated snapshots; empty: exact.")


class DeploymentOutput(serializers.Serializer):
    provider = serializers.CharField(source="provider_model.provider.name")
    provider_model = serializers.CharField(source="provider_model.name")
    priority = serializers.IntegerField()
    billed_names = BilledNameOutput(source="provider_model.billed_names", many=True, read_only=True,
                                    help_text="How the provider's bills name it (reconciliation matches through these).")


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
    queryset = ModelAlias.objects.prefetch_related("deployments__provider_model__provider",
                                                   "deployments__provider_model__billed_names").order_by("name", "id")
