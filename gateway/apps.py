from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class GatewayConfig(AppConfig):
    name = "gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from gateway.catalog import catalog_changed
        from gateway.models import Deployment, ModelAlias, ModelPrice, Provider, ProviderModel

        # Cache invalidation only (no business rule): the relay keeps the catalog in memory
        # (gateway.catalog); any write to it must reach every process. Bulk .update() calls on these models
        # bypass signals and call catalog_changed() themselves.
        def changed(**kwargs):
            catalog_changed()

        for model in (Provider, ProviderModel, ModelPrice, ModelAlias, Deployment):
            post_save.connect(changed, sender=model, weak=False, dispatch_uid=f"catalog-save-{model.__name__}")
            post_delete.connect(changed, sender=model, weak=False, dispatch_uid=f"catalog-delete-{model.__name__}")
