from decimal import Decimal

import factory
from django.utils import timezone
from factory.django import DjangoModelFactory

from gateway.models import Deployment, ModelAlias, ModelPrice, Provider, ProviderModel


class ProviderFactory(DjangoModelFactory):
    class Meta:
        model = Provider
        skip_postgeneration_save = True

    name = factory.Sequence(lambda n: f"Provider {n}")
    kind = Provider.Kind.OPENAI
    base_url = "http://127.0.0.1:9/v1"

    @factory.post_generation
    def api_key(self, create, extracted, **kwargs):
        self.set_api_key(extracted or "sk-test-provider-secret-0000")
        if create:
            self.save(update_fields=["api_key_encrypted"])


class ProviderModelFactory(DjangoModelFactory):
    class Meta:
        model = ProviderModel

    provider = factory.SubFactory(ProviderFactory)
    name = factory.Sequence(lambda n: f"model-{n}")
    max_output_tokens = 4096


class ModelPriceFactory(DjangoModelFactory):
    class Meta:
        model = ModelPrice

    provider_model = factory.SubFactory(ProviderModelFactory)
    effective_from = factory.LazyFunction(lambda: timezone.now() - timezone.timedelta(days=30))
    input_per_mtok = Decimal("1.00")
    output_per_mtok = Decimal("2.00")
    cached_input_per_mtok = Decimal("0.50")


class ModelAliasFactory(DjangoModelFactory):
    class Meta:
        model = ModelAlias
        django_get_or_create = ["name"]

    name = factory.Sequence(lambda n: f"alias-{n}")


class DeploymentFactory(DjangoModelFactory):
    class Meta:
        model = Deployment

    alias = factory.SubFactory(ModelAliasFactory)
    provider_model = factory.SubFactory(ProviderModelFactory)
    priority = 0
