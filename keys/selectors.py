"""Reads of virtual keys."""
import threading
import time
from collections import OrderedDict
from decimal import Decimal

from django.conf import settings
from django.db.models import DecimalField, OuterRef, Q, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from governance import runtime, stamps
from keys import keyformat
from keys.models import AccessRequest, VirtualKey


class _KeyCache:
    """Keys the relay has seen, in this process's memory, with their team, owner, cost center and model
    allowlists loaded, so an authenticated call needs no query. Entries are valid for the keys stamp they
    were loaded at (governance.stamps: every write to a key, team, person, cost center, membership or
    allowlist bumps it after commit, so a revocation reaches every process on its next call). In case a bump
    could not be published, every key held is read again each TOLLGATE_MEMORY_CACHE_SECONDS, all in one
    query: the cost of that safety net does not grow with the number of keys in use. At most
    TOLLGATE_KEY_CACHE_SIZE keys, least recently used out first. Unknown secrets are never cached."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stamp: str | None = None
        self.refreshed_at = time.monotonic()
        # key digest -> key; ("actor", team id, e-mail) -> the person, or _NO_ONE
        self.entries: OrderedDict[str | tuple, object] = OrderedDict()

    def get(self, entry: str | tuple, stamp: str):
        with self.lock:
            if stamp != self.stamp:
                self._reset(stamp)
                return None
            value = self.entries.get(entry)
            if value is not None:
                self.entries.move_to_end(entry)
            return value

    def put(self, entry: str | tuple, stamp: str, value) -> None:
        with self.lock:
            if stamp != self.stamp:
                return  # the stamp moved while the key was loading: what was read may be stale already
            self.entries[entry] = value
            while len(self.entries) > settings.TOLLGATE_KEY_CACHE_SIZE:
                self.entries.popitem(last=False)

    def refresh_if_due(self, stamp: str) -> None:
        """Read every key held again (one query), once per TOLLGATE_MEMORY_CACHE_SECONDS."""
        with self.lock:
            if time.monotonic() - self.refreshed_at < settings.TOLLGATE_MEMORY_CACHE_SECONDS:
                return
            self.refreshed_at = time.monotonic()  # one call refreshes; the others go on meanwhile
            if stamp != self.stamp:
                self._reset(stamp)
                return
            digests = [entry for entry in self.entries if isinstance(entry, str)]
        loaded = _load_many(digests)
        with self.lock:
            if stamp != self.stamp:
                return
            self.entries = OrderedDict((digest, loaded[digest]) for digest in self.entries if digest in loaded)

    def _reset(self, stamp: str | None) -> None:
        self.entries.clear()
        self.stamp = stamp
        self.refreshed_at = time.monotonic()

    def clear(self) -> None:
        with self.lock:
            self._reset(None)


_cache = _KeyCache()
runtime.keeps(runtime.KEYS, _cache.clear)


def _keys():
    return (VirtualKey.objects.select_related("person", "team", "team__cost_center")
            .prefetch_related("allowed_models", "team__allowed_models")  # read by the relay's model check
            .order_by())  # skip the default ORDER BY


def _load(digest: str) -> VirtualKey | None:
    return next(iter(_keys().filter(Q(key_hash=digest) | Q(previous_key_hash=digest))[:1]), None)  # one at most


def _load_many(digests: list[str]) -> dict[str, VirtualKey]:
    found = {}
    for start in range(0, len(digests), 2000):  # under SQLite's limit on query parameters
        chunk = digests[start:start + 2000]
        for key in _keys().filter(Q(key_hash__in=chunk) | Q(previous_key_hash__in=chunk)):
            found[key.key_hash] = key
            if key.previous_key_hash:
                found[key.previous_key_hash] = key
    return found


def key_by_secret(secret: str) -> VirtualKey | None:
    """The key for a presented secret, or None. A malformed secret (bad shape or checksum) costs no query,
    a known one usually none either (see _KeyCache). A secret rotated out still matches during its grace
    period. The returned key is shared with other threads: read it, never change it."""
    if not keyformat.is_well_formed(secret):
        return None
    digest = keyformat.hash_key(secret)
    stamp = stamps.current(stamps.KEYS)  # read before loading, so a change during the load is not missed
    _cache.refresh_if_due(stamp)
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
    keys (the same stamp: memberships and people bump it; dropped at each refresh), so a service key's call
    needs no query either."""
    stamp = stamps.current(stamps.KEYS)
    entry = ("actor", team.pk, email.lower())
    person = _cache.get(entry, stamp)
    if person is None:
        from governance.models import Person

        person = Person.objects.filter(email__iexact=email, is_active=True, memberships__team=team).first() or _NO_ONE
        _cache.put(entry, stamp, person)
    return None if person is _NO_ONE else person


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
    """Pending requests this person may decide (AccessRequest.objects.decidable_by)."""
    return (AccessRequest.objects.decidable_by(person).filter(status=AccessRequest.Status.PENDING)
            .select_related("requester", "team", "key"))
