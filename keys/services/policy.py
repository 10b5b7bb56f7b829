"""The acceptable-use policy: publish a version, accept it, and the gate that key issuing goes through."""
from datetime import date

from django.db import transaction
from django.urls import reverse

from governance.audit import audit_record
from governance.models import Person
from keys.models import AcceptableUsePolicy, PolicyAcceptance


class PolicyNotAccepted(Exception):
    """The person has not accepted the acceptable-use policy in force: no key may be issued to them."""

    def __init__(self, person: Person, policy: AcceptableUsePolicy):
        self.person, self.policy = person, policy
        super().__init__(
            f"{person} has not accepted the acceptable-use policy (version {policy.version}): no key can be issued "
            f"until they accept it on {reverse('keys:acceptable-use')}.")


def aup_pending_for(person: Person) -> AcceptableUsePolicy | None:
    """The policy version in force if this person has not accepted it yet; None when there is nothing to accept."""
    policy = AcceptableUsePolicy.current()
    if policy is None or policy.acceptances.filter(person=person).exists():
        return None
    return policy


def aup_require(person: Person) -> None:
    """Refuse (PolicyNotAccepted) unless the person accepted the version in force. No policy: nothing to refuse."""
    policy = aup_pending_for(person)
    if policy is not None:
        raise PolicyNotAccepted(person, policy)


@transaction.atomic
def aup_accept(*, person: Person, policy: AcceptableUsePolicy) -> PolicyAcceptance:
    """Record (once, audited) that the person accepted this version; accepting it again changes nothing."""
    acceptance, created = PolicyAcceptance.objects.get_or_create(person=person, policy=policy)
    if created:
        audit_record(actor=person, action="aup.accept", obj=acceptance,
                     after={"version": policy.version, "effective_from": policy.effective_from})
    return acceptance


@transaction.atomic
def aup_publish(*, version: str, text: str, effective_from: date, actor: Person | None,
                accepted_by: tuple[Person, ...] | list[Person] = ()) -> AcceptableUsePolicy:
    """Publish a policy version (idempotent by version: an existing one is kept as it is) and record the
    acceptances given with it, e.g. the people of the demo."""
    policy, created = AcceptableUsePolicy.objects.get_or_create(
        version=version, defaults={"text": text, "effective_from": effective_from})
    if created:
        audit_record(actor=actor, action="aup.publish", obj=policy,
                     after={"version": version, "effective_from": effective_from})
    for person in accepted_by:
        aup_accept(person=person, policy=policy)
    return policy
