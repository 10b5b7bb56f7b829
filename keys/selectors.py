"""Reads of virtual keys."""
import threading
import time
from collections import OrderedDict
from decimal import Decimal

from django.conf import settings
from django.db.models import DecimalField, OuterRef, Q, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from governance import stamps
from keys import keyformat
from keys.models import AccessRequest, VirtualKey


class _KeyCache:
    """Keys the relay has seen, in this process's memory, with their team, owner, cost center and model
    allowlists loaded, so an authenticated call needs no query. Entries are valid for the keys stamp they
    were loaded at (governance.stamps: every write to a key, team, person, cost center or allowlist bumps
    it after commit, so a revocation reaches every process on its next call) and for at most
    TOLLGATE_MEMORY_CACHE_SECONDS. At most TOLLGATE_KEY_CACHE_SIZE keys, least recently used out first.
    Unknown secrets are never cached."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stamp: str | None = None
        # key digest -> (loaded at, key); ("actor", team id, e-mail) -> (loaded at, person or None)
        self.entries: OrderedDict[str | tuple, tuple[float, object]] = OrderedDict()

    def get(self, digest: str | tuple, stamp: str):
        with self.lock:
            if stamp != self.stamp:
                self.entries.clear()
                self.stamp = stamp
                return None
            entry = self.entries.get(digest)
            if entry is None:
                return None
            if time.monotonic() - entry[0] >= settings.TOLLGATE_MEMORY_CACHE_SECONDS:
                del self.entries[digest]
                return None
            self.entries.move_to_end(digest)
            return entry[1]

    def put(self, digest: str | tuple, stamp: str, key) -> None:
        with self.lock:
            if stamp != self.stamp:
                return  # the stamp moved while the key was loading: what was read may be stale already
            self.entries[digest] = (time.monotonic(), key)
            while len(self.entries) > settings.TOLLGATE_KEY_CACHE_SIZE:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.stamp = None


_cache = _KeyCache()
invalidate_key_cache = _cache.clear


def _load(digest: str) -> VirtualKey | None:
    return next(iter(
        VirtualKey.objects.select_related("person", "team", "team__cost_center")
        .prefetch_related("allowed_models", "team__allowed_models")  # read by the relay's model check
        .filter(Q(key_hash=digest) | Q(previous_key_hash=digest))
        .order_by()[:1]  # at most one row matches; skip the default ORDER BY
    ), None)


def key_by_secret(secret: str) -> VirtualKey | None:
    """The key for a presented secret, or None. A malformed secret (bad shape or checksum) costs no query,
    a known one usually none either (see _KeyCache). A secret rotated out still matches during its grace
    period. The returned key is shared with other threads: read it, never change it."""
    if not keyformat.is_well_formed(secret):
        return None
    digest = keyformat.hash_key(secret)
    stamp = stamps.current(stamps.KEYS)  # read before loading, so a change during the load is not missed
    key = _cache.get(digest, stamp)
    if key is None:
        key = _load(digest)
        if key is None:
            return None
        _cache.put(digest, stamp, key)
    # The lookup is by hash already; the constant-time compare guards against any future lookup by prefix.
    if keyformat.matches(secret, key.key_hash):
        return key
    in_grace = key.previous_key_expires_at is not None and key.previous_key_expires_at > timezone.now()
    if key.previous_key_hash and in_grace and keyformat.matches(secret, key.previous_key_hash):
        return key
    return None


_NO_ONE = object()  # an actor known not to be an active member, cached too (a misconfigured app retries a lot)


def actor_member(team, email: str):
    """The active member of `team` that a service key's signed actor names, or None. Kept in memory with the
    keys (the same stamp: memberships and people bump it), so a service key's call needs no query either."""
    stamp = stamps.current(stamps.KEYS)
    entry = ("actor", team.pk, email.lower())
    person = _cache.get(entry, stamp)
    if person is None:
        from governance.models import Person

        person = Person.objects.filter(email__iexact=email, is_active=True, memberships__team=team).first() or _NO_ONE
        _cache.put(entry, stamp, person)
    return None if person is _NO_ONE else person


def keys_changed() -> None:
    """Call after any write that changes what the relay decides for a key (see _KeyCache)."""
    stamps.bump(stamps.KEYS)


def keys_for_person(person):
    """The keys a person may see, with this month's spend from the ledger."""
    from ledger.models import LedgerEntry

    month_start = timezone.localtime().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spend = (
        LedgerEntry.objects.filter(key=OuterRef("pk"), created_at__gte=month_start)
        .values("key").annotate(total=Sum("cost")).values("total")
    )
    return (
        VirtualKey.objects.visible_to(person)
        .select_related("team", "person")
        .prefetch_related("allowed_models")
        .annotate(spend_this_month=Coalesce(Subquery(spend), Value(Decimal(0)), output_field=DecimalField()))
    )


def requests_awaiting(person):
    """Pending requests this person may decide: all for IT, else those of teams they own or approve for."""
    from governance.models import Membership

    pending = AccessRequest.objects.filter(status=AccessRequest.Status.PENDING).select_related("requester", "team", "key")
    if person.has_perm("keys.change_accessrequest"):
        return pending
    teams = Membership.objects.filter(
        person=person, role__in=[Membership.Role.OWNER, Membership.Role.APPROVER]).values("team_id")
    return pending.filter(Q(team_id__in=teams) | Q(team__owner=person)).exclude(requester=person)
