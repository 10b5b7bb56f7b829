"""Key lifecycle: issue, rotate, suspend, reactivate, extend, revoke, and the expiry sweep.
Each transition changes the key and writes its AuditEvent in one transaction."""
import secrets
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from governance import crypto, runtime
from governance.audit import audit_record, snapshot
from governance.models import Person, Team
from governance.notify import email_after_commit
from governance.webhooks import key_payload, webhook_emit
from keys import keyformat
from keys.models import ProvisioningPolicy, VirtualKey
from keys.services.links import absolute_link
from keys.services.policy import aup_require

EXPIRY_NOTICE_DAYS = (7, 1)


class KeyStateError(Exception):
    """The transition does not apply to the key in its current state."""


@dataclass(frozen=True)
class IssuedKey:
    key: VirtualKey
    secret: str  # shown once to whoever asked; never stored
    signing_secret: str = ""  # service keys: the HMAC secret for X-Tollgate-Actor, shown once too


def _locked(key: VirtualKey) -> VirtualKey:
    return VirtualKey.objects.select_for_update().get(pk=key.pk)


@transaction.atomic
def key_issue(*, name: str, team: Team, person: Person | None, actor: Person | None, actor_label: str | None = None,
              key_class: str = VirtualKey.KeyClass.EXPERIMENTATION, days: int | None = None, aliases=(),
              with_signing_secret: bool = False, **fields) -> IssuedKey:
    """Issue a key. A person's key needs their acceptance of the acceptable-use policy in force
    (PolicyNotAccepted otherwise); a team's service key does not."""
    if person is not None:
        aup_require(person)
    new = keyformat.generate(settings.TOLLGATE_KEY_ENVIRONMENT)
    signing_secret = secrets.token_urlsafe(32) if with_signing_secret else ""
    key = VirtualKey.objects.create(
        name=name, team=team, person=person, key_class=key_class, prefix=new.prefix, key_hash=new.hash,
        expires_at=timezone.now() + timezone.timedelta(days=days) if days else None, created_by=actor,
        signing_secret_encrypted=crypto.encrypt(signing_secret) if signing_secret else "", **fields,
    )
    if aliases:
        key.allowed_models.set(aliases)
    after = {**snapshot(key), "allowed_models": sorted(a.name for a in aliases), "signing_secret": bool(signing_secret)}
    audit_record(actor=actor, actor_label=actor_label, action="key.issue", obj=key, after=after)
    webhook_emit("key.issued", key_payload(key, approved_by_policy=key.approved_by_policy))
    return IssuedKey(key=key, secret=new.secret, signing_secret=signing_secret)


@transaction.atomic
def key_rotate(*, key: VirtualKey, actor: Person | None, grace_hours: int | None = None) -> IssuedKey:
    """A new secret at once; the old one keeps working for the grace period, then stops."""
    key = _locked(key)
    if key.status != VirtualKey.Status.ACTIVE:
        raise KeyStateError(f"only active keys can be rotated (this one is {key.status})")
    if grace_hours is None:
        grace_hours = ProvisioningPolicy.current().rotation_grace_hours
    before = snapshot(key)
    new = keyformat.generate(settings.TOLLGATE_KEY_ENVIRONMENT)
    key.previous_key_hash, key.previous_key_expires_at = key.key_hash, timezone.now() + timezone.timedelta(hours=grace_hours)
    key.key_hash, key.prefix = new.hash, new.prefix
    key.save(update_fields=["previous_key_hash", "previous_key_expires_at", "key_hash", "prefix"])
    audit_record(actor=actor, action="key.rotate", obj=key, before=before,
                 after={**snapshot(key), "old_secret_valid_until": key.previous_key_expires_at})
    webhook_emit("key.rotated", key_payload(key, old_secret_valid_until=key.previous_key_expires_at))
    return IssuedKey(key=key, secret=new.secret)


def _may_manage(actor: Person | None, key: VirtualKey) -> None:
    """Services re-check who acts, whatever the page or admin decided (VirtualKey.objects.manageable_by)."""
    if actor is not None and not VirtualKey.objects.manageable_by(actor).filter(pk=key.pk).exists():
        raise PermissionDenied("You cannot change this key: it is not yours, nor your team's to manage.")


_PAST = {"key.revoke": "revoked", "key.suspend": "suspended", "key.reactivate": "reactivated", "key.extend": "extended"}


def _transition(key: VirtualKey, *, actor, action: str, to_status: str, allowed_from: set[str], reason: str,
                actor_label: str | None = None, **changes) -> VirtualKey:
    key = _locked(key)
    if key.status == to_status and not changes:
        return key
    if key.status not in allowed_from:
        raise KeyStateError(f"a {key.status} key cannot be {_PAST[action]}")
    before = snapshot(key)
    key.status = to_status
    for field, value in changes.items():
        setattr(key, field, value)
    key.save(update_fields=["status", *changes])
    audit_record(actor=actor, actor_label=actor_label, action=action, obj=key, before=before,
                 after={**snapshot(key), "reason": reason})
    return key


LIVE = {VirtualKey.Status.ACTIVE, VirtualKey.Status.SUSPENDED, VirtualKey.Status.PENDING, VirtualKey.Status.EXPIRED}


@transaction.atomic
def key_revoke(*, key: VirtualKey, actor: Person | None, reason: str, actor_label: str | None = None) -> VirtualKey:
    """Final: the relay refuses the key (and any secret still in its rotation grace) on the next call.
    `actor` None is the system (sweeps, commands run by an operator on the host)."""
    _may_manage(actor, key)
    key = _transition(key, actor=actor, actor_label=actor_label, action="key.revoke", to_status=VirtualKey.Status.REVOKED,
                      allowed_from=LIVE, reason=reason, previous_key_expires_at=None)
    webhook_emit("key.revoked", key_payload(key, reason=reason))
    if key.person and key.person != actor:
        email_after_commit(to=[key.person], subject=f"Your key {key.prefix}… was revoked",
                           body=f"Your Tollgate key '{key.name}' ({key.prefix}…) was revoked. Reason: {reason}\n\n"
                                f"The key: {absolute_link('keys:key-detail', key.pk)}")
    return key


@transaction.atomic
def key_suspend(*, key: VirtualKey, actor: Person | None, reason: str) -> VirtualKey:
    _may_manage(actor, key)
    return _transition(key, actor=actor, action="key.suspend", to_status=VirtualKey.Status.SUSPENDED,
                       allowed_from={VirtualKey.Status.ACTIVE}, reason=reason)


@transaction.atomic
def key_reactivate(*, key: VirtualKey, actor: Person | None, reason: str) -> VirtualKey:
    if actor is not None and not actor.has_perm("keys.change_virtualkey"):  # undoing a suspension is IT's call
        raise PermissionDenied("Only IT can reactivate a suspended key.")
    return _transition(key, actor=actor, action="key.reactivate", to_status=VirtualKey.Status.ACTIVE,
                       allowed_from={VirtualKey.Status.SUSPENDED}, reason=reason)


@transaction.atomic
def key_extend(*, key: VirtualKey, actor: Person | None, days: int, reason: str) -> VirtualKey:
    """Push the expiry out by `days` from the later of now and the current expiry; revives an expired key."""
    _may_manage(actor, key)
    key = _locked(key)
    base = max(key.expires_at or timezone.now(), timezone.now())
    return _transition(key, actor=actor, action="key.extend", to_status=(
        VirtualKey.Status.ACTIVE if key.status == VirtualKey.Status.EXPIRED else key.status),
        allowed_from={VirtualKey.Status.ACTIVE, VirtualKey.Status.SUSPENDED, VirtualKey.Status.EXPIRED}, reason=reason,
        expires_at=base + timezone.timedelta(days=days), expiry_notice_days=None)


@dataclass(frozen=True)
class SweepResult:
    expired: int
    notices: int


def keys_expire_sweep(*, now=None) -> SweepResult:
    """Mark keys past their expiry as expired and warn owners 7 and 1 days ahead. Safe to run twice at once:
    each key is claimed with a conditional UPDATE before anything is sent or audited."""
    now = now or timezone.now()
    expired = 0
    for key in VirtualKey.objects.filter(status=VirtualKey.Status.ACTIVE, expires_at__lte=now).select_related("person"):
        with transaction.atomic():
            if VirtualKey.objects.filter(pk=key.pk, status=VirtualKey.Status.ACTIVE).update(status=VirtualKey.Status.EXPIRED) != 1:
                continue  # another sweep got there first
            runtime.changed(runtime.KEYS)  # a bulk UPDATE sends no post_save
            audit_record(actor=None, actor_label="expiry sweep", action="key.expire", obj=key,
                         before={"status": "active"}, after={"status": "expired", "expires_at": key.expires_at})
            if key.person:
                email_after_commit(to=[key.person], subject=f"Your key {key.prefix}… has expired",
                                   body=f"Your Tollgate key '{key.name}' expired on {key.expires_at:%Y-%m-%d}. "
                                        "Request an extension from the key's page: "
                                        + absolute_link("keys:key-detail", key.pk))
            expired += 1
    notices = 0
    # The nearest notice first: a key with under a day left gets the 1-day notice only (its claim of 1 also
    # covers the 7-day one), never both in one run.
    for days in sorted(EXPIRY_NOTICE_DAYS):
        due = VirtualKey.objects.filter(
            status=VirtualKey.Status.ACTIVE, expires_at__gt=now, expires_at__lte=now + timezone.timedelta(days=days),
        ).exclude(expiry_notice_days__lte=days).select_related("person", "team__owner")
        for key in due:
            with transaction.atomic():
                claimed = VirtualKey.objects.filter(pk=key.pk).exclude(expiry_notice_days__lte=days).update(expiry_notice_days=days)
                if claimed != 1:
                    continue
                webhook_emit("key.expiring", key_payload(key, days_left=days))
                recipients = [key.person] if key.person else [key.team.owner]
                email_after_commit(to=recipients, subject=f"Your key {key.prefix}… expires in {days} day(s)",
                                   body=f"Your Tollgate key '{key.name}' expires on {key.expires_at:%Y-%m-%d %H:%M} UTC. "
                                        "Request an extension from the key's page if you still need it: "
                                        + absolute_link("keys:key-detail", key.pk))
                notices += 1
    return SweepResult(expired=expired, notices=notices)
