"""Changes to a person that reach beyond their own row: deactivating someone suspends their keys."""
from django.db import transaction

from governance.audit import audit_record
from governance.models import Person
from keys.models import VirtualKey
from keys.services import key_suspend


@transaction.atomic
def person_deactivate(*, person: Person, actor: Person | None, reason: str,
                      actor_label: str | None = None) -> list[VirtualKey]:
    """The person can no longer sign in, and every active key they hold is suspended in the same transaction,
    each with its own `key.suspend` event, so the relay refuses those keys on their next call. Their teams'
    service keys are the teams' and stay. Undoing it is IT's: reactivate the person, then the keys wanted back.
    `actor` None is the system (single sign-on). Returns the keys it suspended."""
    # The row lock orders this against a single sign-on login of the same person that is syncing them now.
    locked = Person.objects.select_for_update().get(pk=person.pk)
    if locked.is_active:
        locked.is_active = False
        locked.save(update_fields=["is_active"])
        audit_record(actor=actor, actor_label=actor_label, action="person.deactivate", obj=locked,
                     before={"is_active": True}, after={"is_active": False, "reason": reason})
    person.is_active = False
    return [key_suspend(key=key, actor=actor, reason=reason)
            for key in VirtualKey.objects.filter(person=locked, status=VirtualKey.Status.ACTIVE).order_by("pk")]
