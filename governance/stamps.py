"""Version stamps: how a process's in-memory copy of rarely-changing rows learns that they changed anywhere.

The relay keeps keys (with their team, owner and allowlists), grants and the model catalog in each
process's memory, so a call needs no query for them. Each such copy is tagged with the stamp it was built at; every write that
could change what the relay decides bumps the stamp in the shared cache after its transaction commits,
and the next call on every process sees a different stamp and reloads. Revocation therefore reaches all
processes on their next call, not after a TTL.

The relay does not even spend a round trip of its own on them: a call assumes the newest stamps its
process has seen, and the script that counts its rate limits and holds its budget first checks them,
atomically, and counts nothing if they moved; the call then starts again with the current ones. A call
that is refused, or that counts nothing, checks them (one MGET) before it is answered. Code outside a
pinned block reads the stamp it asks for.

Stamps live in Redis when REDIS_URL is set (plain commands: the Django cache's pickling and key
versioning would double the cost of a read), else in the shared cache. If they cannot be read, every
read returns a fresh value, so copies are rebuilt from the database on every call: slower, never stale.
"""
import contextlib
import contextvars
import logging
import uuid

from django.core.cache import cache
from django.db import transaction

from governance.redis import ScriptPart, get_redis

log = logging.getLogger(__name__)

KEYS = "stamp:keys"  # virtual keys, their teams, owners, cost centers and model allowlists
GRANTS = "stamp:grants"  # grants and their model allowlists
CATALOG = "stamp:catalog"  # providers, their models and prices, aliases and deployments
ALL = (KEYS, GRANTS, CATALOG)
MISSING = "initial"  # a stamp never bumped since the cache was emptied

_pinned: contextvars.ContextVar["Pin | None"] = contextvars.ContextVar("pinned_stamps", default=None)
_last_read: dict[str, str] = {}  # this process's newest stamps from the store (any thread)


class Stale(Exception):
    """The stamps a call assumed are not the current ones: what it read from memory may be out of date."""


class Pin:
    """The stamps a call works with. Read from the store (verified), or assumed: the newest this process
    has seen, to be confirmed by the same script that counts the call (`verification_part`) or by
    `verify` before the call is answered from what they vouch for."""

    def __init__(self, values: dict[str, str], verified: bool):
        self.values, self.verified = values, verified


def _read(names) -> dict[str, str]:
    client = get_redis()
    try:
        if client is not None:
            found = {name: value.decode() if value else MISSING for name, value in zip(names, client.mget(names))}
            _last_read.update(found)
            return found
        found = cache.get_many(names)
    except Exception:  # the store is down: nothing in memory can be trusted, so nothing matches
        return {name: uuid.uuid4().hex for name in names}
    return {name: found.get(name, MISSING) for name in names}


def current(name: str) -> str:
    pin = _pinned.get()
    if pin is not None:
        return pin.values[name]
    return _read([name])[name]


@contextlib.contextmanager
def pinned(*, assume_last: bool = False):
    """Answer `current` from one set of stamps until the block ends: read now, or with `assume_last` the
    newest this process has seen (no round trip), which the call must then confirm before it is answered."""
    assumed = dict(_last_read) if assume_last and get_redis() is not None else {}
    pin = Pin(assumed, verified=False) if len(assumed) == len(ALL) else Pin(_read(ALL), verified=True)
    token = _pinned.set(pin)
    try:
        yield pin
    finally:
        _pinned.reset(token)


def verify() -> None:
    """Raise Stale if the pinned stamps were assumed and are no longer the current ones."""
    pin = _pinned.get()
    if pin is None or pin.verified:
        return
    if _read(ALL) != pin.values:
        raise Stale()
    pin.verified = True


_CHECK = """
-- KEYS: stamps; ARGV: the values assumed. {0} when they are current, else {1, current values...}
local current, stale = {}, false
for i = 1, #KEYS do
  current[i] = redis.call('GET', KEYS[i]) or ARGV[#KEYS + 1]
  if current[i] ~= ARGV[i] then stale = true end
end
if stale then return {1, unpack(current)} end
return {0}
"""


def verification_part() -> ScriptPart | None:
    """A script part that confirms the assumed stamps in the same round trip as what it precedes (nothing
    after it runs when they moved), or None when the pin needs no confirmation."""
    pin = _pinned.get()
    if pin is None or pin.verified:
        return None
    return ScriptPart(_CHECK, list(ALL), [pin.values[name] for name in ALL] + [MISSING], go_on_if="r[1] == 0")


def confirm(result: list) -> None:
    """Take the answer of `verification_part`: the pin is verified, or Stale is raised (with this process's
    newest stamps updated, so the retry assumes the right ones)."""
    pin = _pinned.get()
    if result[0] == 0:
        pin.verified = True
        return
    _last_read.update({name: value.decode() for name, value in zip(ALL, result[1:])})
    raise Stale()


class NotPublished(Exception):
    """A change was committed but the running processes could not be told (their copies live until their
    maximum age, TOLLGATE_MEMORY_CACHE_SECONDS)."""


_strict: contextvars.ContextVar[bool] = contextvars.ContextVar("stamps_strict", default=False)


@contextlib.contextmanager
def published_or_raise():
    """Inside this block a stamp that cannot be published raises NotPublished (after the change committed)
    instead of only logging: for commands, which must fail loudly rather than say "done"."""
    token = _strict.set(True)
    try:
        yield
    finally:
        _strict.reset(token)


def bump(name: str) -> None:
    """After the current transaction commits (at once outside one), give `name` a new stamp."""
    strict = _strict.get()

    def publish():
        client = get_redis()
        try:
            if client is not None:
                client.set(name, uuid.uuid4().hex)
            else:
                cache.set(name, uuid.uuid4().hex, timeout=None)
        except Exception as exc:  # in-memory copies then live until their maximum age (see each cache)
            log.warning("could not publish a change of %s to the cache", name)
            if strict:
                raise NotPublished(f"running processes could not be told ({type(exc).__name__}): they may keep what "
                                   f"they hold in memory for up to TOLLGATE_MEMORY_CACHE_SECONDS") from exc

    transaction.on_commit(publish)
