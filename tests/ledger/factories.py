import uuid
from decimal import Decimal

import factory
from django.utils import timezone
from factory.django import DjangoModelFactory

from ledger.models import LedgerEntry
from tests.keys.factories import VirtualKeyFactory


class LedgerEntryFactory(DjangoModelFactory):
    class Meta:
        model = LedgerEntry

    request_id = factory.LazyFunction(lambda: uuid.uuid4().hex)
    created_at = factory.LazyFunction(timezone.now)
    key = factory.SubFactory(VirtualKeyFactory)
    person = factory.LazyAttribute(lambda e: e.key.person)
    team = factory.LazyAttribute(lambda e: e.key.team)
    cost_center = factory.LazyAttribute(lambda e: e.key.team.cost_center)
    model_requested = "fast"
    input_tokens = 100
    output_tokens = 50
    cost = Decimal("0.00012500")
    outcome = LedgerEntry.Outcome.OK
    http_status = 200
