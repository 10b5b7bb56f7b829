"""Version stamps: how a process's in-memory copy of rarely-changing rows learns that they changed anywhere.

The relay keeps keys (with their team, owner and allowlists) and grants in each process's memory, so a
call needs no query for them. Each such copy is tagged with the stamp it was built at; every write that
could change what the relay decides bumps the stamp in the shared cache after its transaction commits,
and the next call on every process sees a different stamp and reloads. Revocation therefore reaches all
processes on their next call, not after a TTL.

The relay reads all stamps in one round trip per call (`pinned`); code outside a pinned block reads the
one it asks for. Stamps live in Redis when REDIS_URL is set (a plain MGET: the Django cache's pickling
and key versioning would double the cost of the call's cheapest round trip), else in the shared cache.
If they cannot be read, every read returns a fresh value, so copies are rebuilt from the database on
every call: slower, never stale.
"""
import contextlib
import contextvars
import logging
import uuid

from django.core.cache import cache
from django.db import transaction

from governance.redis import get_redis

log = logging.getLogger(__name__)

KEYS = "stamp:keys"  # virtual keys, their teams, owners, cost centers and model allowlists
GRANTS = "stamp:grants"  # grants and their model allowlists
ALL = (KEYS, GRANTS)
MISSING = "initial"  # a stamp never bumped since the cache was emptied

_pinned: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pinned_stamps", default=None)


def _read(names) -> dict[str, str]:
    client = get_redis()
    try:
        if client is not None:
            return {name: value.decode() if value else MISSING for name, value in zip(names, client.mget(names))}
        found = cache.get_many(names)
    except Exception:  # the store is down: nothing in memory can be trusted, so nothing matches
        return {name: uuid.uuid4().hex for name in names}
    return {name: found.get(name, MISSING) for name in names}


def current(name: str) -> str:
    pinned = _pinned.get()
    if pinned is not None:
        return pinned[name]
    return _read([name])[name]


@contextlib.contextmanager
def pinned():
    """Read every stamp once and answer `current` from that read until the block ends."""
    token = _pinned.set(_read(ALL))
    try:
        yield
    finally:
        _pinned.reset(token)


def bump(name: str) -> None:
    """After the current transaction commits (at once outside one), give `name` a new stamp."""
    def publish():
        client = get_redis()
        try:
            if client is not None:
                client.set(name, uuid.uuid4().hex)
            else:
                cache.set(name, uuid.uuid4().hex, timeout=None)
        except Exception:  # in-memory copies then live until their maximum age (see each cache)
            log.warning("could not publish a change of %s to the cache", name)

    transaction.on_commit(publish)
