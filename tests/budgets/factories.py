from decimal import Decimal

import factory
from factory.django import DjangoModelFactory

from budgets.models import Grant
from tests.governance.factories import PersonFactory, TeamFactory


class GrantFactory(DjangoModelFactory):
    class Meta:
        model = Grant
        skip_postgeneration_save = True

    name = factory.Sequence(lambda n: f"Grant {n}")
    owner = factory.SubFactory(PersonFactory)
    scope = Grant.Scope.TEAM
    team = factory.SubFactory(TeamFactory)
    limit_amount = Decimal("100.00")

    @factory.post_generation
    def clean(self, create, extracted, **kwargs):
        """Factories build valid grants: the same validation the admin and the services run."""
        if create:
            self.full_clean()
