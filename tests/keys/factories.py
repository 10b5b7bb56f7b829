import factory
from factory.django import DjangoModelFactory

from keys import keyformat
from keys.models import VirtualKey
from tests.governance.factories import PersonFactory, TeamFactory


class VirtualKeyFactory(DjangoModelFactory):
    """Creates a real key; its clear secret is on `instance.secret` (never stored)."""

    class Meta:
        model = VirtualKey

    name = factory.Sequence(lambda n: f"key {n}")
    person = factory.SubFactory(PersonFactory)
    team = factory.SubFactory(TeamFactory)

    @classmethod
    def _create(cls, model_class, *args, **kwargs):
        new = keyformat.generate()
        instance = super()._create(model_class, *args, prefix=new.prefix, key_hash=new.hash, **kwargs)
        instance.secret = new.secret
        return instance
