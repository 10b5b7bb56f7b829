"""After Redis lost its data: counters rebuilt from the ledger plus the amounts settled meanwhile, and every
process's open holds put back (an epoch key and a short fence, a watcher thread). See budgets.enforcement."""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING

from budgets.enforcement.meters import Meter, _ttl
from governance.redis import ScriptPart, get_redis, run_parts

if TYPE_CHECKING:
    from budgets.enforcement.holds import Reservation

log = logging.getLogger(__name__)
EPOCH_KEY, FENCE_KEY = "budget:epoch", "budget:epoch:fence"
# A process polls the epoch this often while it has holds open; the fence must outlast a poll with room
# to spare for a busy event loop, so it is three polls long. Every reserve after a data loss waits it out.
REREGISTER_EVERY_SECONDS = 0.2
EPOCH_FENCE_SECONDS = 0.6
REBUILD_LOCK_SECONDS = 10  # one process reads the ledger for a meter at a time; others wait for its counter

_BEFORE_READ = """
-- KEYS: spent, late, hold amounts. The counter if it exists now, else the late and the open holds.
if redis.call('EXISTS', KEYS[1]) == 1 then return {1, redis.call('GET', KEYS[1])} end
return {0, redis.call('HKEYS', KEYS[2]), redis.call('HKEYS', KEYS[3])}
"""

_REBUILD = """
-- KEYS: spent, late, hold amounts, holds counted
-- ARGV: ledger total, ttl_s, last attempt (1 or 0), then three lists, each its length first: the late
-- holds and the open holds seen before the ledger was read, and the holds whose rows the read had.
-- A hold that carries its call's identity (hold_id "<uuid>|<request id>|<created at>") was looked up in the
-- same read: its late amount is added unless the read had its row, and an open one the read had is marked
-- counted, so its settle does not count it again. Without the identity only order tells: a late amount
-- noted before the read, of a row committed before it settled, is in the read; one noted since may not be.
-- Whatever appeared since the lookup is unknown: unless this is the last attempt, the caller reads again
-- ({0}); on the last it is counted (too much, never too little).
if redis.call('EXISTS', KEYS[1]) == 1 then return {1, redis.call('GET', KEYS[1])} end
local lists, at = {}, 4
for l = 1, 3 do
  lists[l] = {}
  local n = tonumber(ARGV[at])
  for i = at + 1, at + n do lists[l][ARGV[i]] = true end
  at = at + n + 1
end
local late_before, open_before, found = lists[1], lists[2], lists[3]
local last = ARGV[3] == '1'
local add, counted = {}, {}
local late = redis.call('HGETALL', KEYS[2])
for j = 1, #late, 2 do
  local hold = late[j]
  local committed, amount = string.match(late[j + 1], '^(%d):(.*)$')
  if found[hold] then
    -- in the read
  elseif string.find(hold, '|', 1, true) then
    if late_before[hold] or open_before[hold] or last then add[#add + 1] = amount else return {0} end
  elseif committed == '1' and late_before[hold] then
    -- in the read: its row was committed before it settled, before the read
  elseif committed == '1' and not last then
    return {0}
  else
    add[#add + 1] = amount
  end
end
for _, hold in ipairs(redis.call('HKEYS', KEYS[3])) do
  if found[hold] then
    counted[#counted + 1] = hold
  elseif string.find(hold, '|', 1, true) and not open_before[hold] and not last then
    return {0}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
for _, amount in ipairs(add) do redis.call('INCRBY', KEYS[1], amount) end
redis.call('DEL', KEYS[2])
if #counted > 0 then
  redis.call('SADD', KEYS[4], unpack(counted))
  redis.call('EXPIRE', KEYS[4], ARGV[2])
end
return {1, redis.call('GET', KEYS[1])}
"""

_ENSURE_EPOCH = """
-- KEYS: epoch, fence; ARGV: a new epoch id, fence_ms. Returns {epoch, fence ms left}.
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then redis.call('SET', KEYS[2], '1', 'PX', ARGV[2]) end
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[2])}
"""

_REREGISTER = """
-- KEYS: 4 per meter of each hold, hold after hold
-- ARGV: now_ms, then per hold: hold_id, expiry_ms, ttl_s, its meter count, then that many amounts.
-- A hold already there is left alone (HSETNX), so running this twice, or for a hold Redis kept, is harmless.
local now = tonumber(ARGV[1])
local a, k, added = 2, 0, 0
while a <= #ARGV do
  local hold, expiry, ttl, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3])
  for i = 0, n - 1 do
    local amount, at = ARGV[a + 4 + i], k + i * 4
    if tonumber(expiry) > now and redis.call('HSETNX', KEYS[at + 4], hold, amount) == 1 then
      redis.call('INCRBY', KEYS[at + 2], amount)
      redis.call('ZADD', KEYS[at + 3], expiry, hold)
      for j = 2, 4 do redis.call('EXPIRE', KEYS[at + j], ttl) end
      added = added + 1
    end
  end
  a, k = a + 4 + n, k + n * 4
end
return added
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def rebuild(client, meter: Meter, *, wait: bool) -> int | None:
    """Create a missing counter from the ledger plus the amounts settled while it was missing; returns the
    counter (None when another process is rebuilding it and `wait` is false, or it took too long).

    The ledger read may or may not have the rows of calls that settled meanwhile, or that are committed and
    about to settle. Holds carrying their call's identity (`reserve_plan`) are looked up in the same read,
    so each is counted exactly once: by the read, or by its own amount. For the others the order of events
    in Redis decides, and what it cannot decide is counted (too much, repaired by the drift check, rather
    than too little); anything that appeared during the read is read again first, up to three times. Only
    one process reads the ledger for a meter at a time (a short Redis lock); the others wait for its counter."""
    spent_key, lock_key = meter.redis_keys()[0], f"{meter.base}:rebuild"
    keys = [spent_key, meter.late_key, meter.redis_keys()[3], meter.counted_key]
    token = uuid.uuid4().hex
    deadline = time.monotonic() + REBUILD_LOCK_SECONDS
    while not client.set(lock_key, token, nx=True, ex=REBUILD_LOCK_SECONDS):
        value = client.get(spent_key)
        if value is not None:
            return int(value)
        if not wait or time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    try:
        for attempt in range(3):
            seen = run_parts(client, [ScriptPart(_BEFORE_READ, keys[:3], [])])[0]
            if seen[0]:
                return int(seen[1])
            late, open_ = [h.decode() for h in seen[1]], [h.decode() for h in seen[2]]
            total, found = meter.ledger_read(late + open_)
            args = [total, _ttl(meter), int(attempt == 2)]
            for holds in (late, open_, found):
                args += [len(holds), *holds]
            done, *value = run_parts(client, [ScriptPart(_REBUILD, keys, args)])[0]
            if done:
                return int(value[0])
        raise AssertionError("the last rebuild attempt always sets the counter")
    finally:
        run_parts(client, [ScriptPart(_UNLOCK, [lock_key], [token])])


# --- This process's open holds, put back after Redis lost its data ---------------------------------------
# Only the process that made a hold knows it once Redis forgot it. The registry is small (the calls in
# flight here) and guarded by one lock, which re-registration holds while its script runs: a settle removes
# its hold from the registry (under the lock) before its own script runs, so a hold is never put back after
# it was settled.

_open: dict[str, Reservation] = {}
_open_lock = threading.Lock()
_holds_open = threading.Event()  # set while _open is not empty: the watcher sleeps otherwise
_epoch_seen: bytes | None = None
_watcher_pid: int | None = None


def _hold_opened(reservation: Reservation) -> None:
    with _open_lock:
        _open[reservation.hold_id] = reservation
        if not _holds_open.is_set():
            _holds_open.set()
    if _watcher_pid != os.getpid():
        _start_watcher()


def _hold_closed(reservation: Reservation) -> None:
    with _open_lock:
        _open.pop(reservation.hold_id, None)


def open_reservations() -> list[Reservation]:
    """This process's holds not yet settled or released (and not yet lapsed)."""
    with _open_lock:
        return list(_open.values())


def recover_holds(client, *, force: bool = False) -> tuple[bytes, int]:
    """Make sure the epoch exists (a new one starts a fence) and, when it is not the one this process last
    saw (or `force`), put this process's open holds back. Returns the epoch and the fence's ms left."""
    global _epoch_seen
    epoch, fence_ms = run_parts(client, [ScriptPart(_ENSURE_EPOCH, [EPOCH_KEY, FENCE_KEY],
                                                    [uuid.uuid4().hex, int(EPOCH_FENCE_SECONDS * 1000)])])[0]
    if force or epoch != _epoch_seen:
        put_back = _reregister(client)
        if put_back:
            log.warning("budget holds were lost by Redis: %d put back from this process", put_back)
        _epoch_seen = epoch
    return epoch, int(fence_ms)


def _forget_lapsed(now_ms: int) -> None:
    """Holds past their expiry (a call that never settled): Redis reclaims them anyway. Under _open_lock."""
    for hold_id in [h for h, r in _open.items() if r.expires_ms <= now_ms]:
        del _open[hold_id]


def _reregister(client) -> int:
    now_ms = int(time.time() * 1000)
    with _open_lock:
        _forget_lapsed(now_ms)
        if not _open:
            return 0
        keys, args = [], [now_ms]
        for reservation in _open.values():
            keys += [k for m in reservation.meters for k in m.redis_keys()]
            args += [reservation.hold_id, reservation.expires_ms, max(_ttl(m) for m in reservation.meters),
                     len(reservation.meters), *reservation.amounts]
        return run_parts(client, [ScriptPart(_REREGISTER, keys, args)])[0]


def _start_watcher() -> None:
    global _watcher_pid
    with _open_lock:
        if _watcher_pid == os.getpid():
            return
        _watcher_pid = os.getpid()  # after a fork, the child starts its own
    threading.Thread(target=_watch_epoch, name="budget-holds", daemon=True).start()


def _watch_epoch() -> None:
    """A process whose calls are streaming sends Redis nothing until they end; this thread notices a data
    loss meanwhile (one GET per poll, only while the process has holds open) and puts the holds back within
    the epoch's fence, so no other process admits calls against counters that do not count them."""
    failing = False
    while True:
        _holds_open.wait()
        time.sleep(REREGISTER_EVERY_SECONDS)
        with _open_lock:
            _forget_lapsed(int(time.time() * 1000))
            if not _open:
                _holds_open.clear()
                continue
        try:
            client = get_redis()
            if client is not None and client.get(EPOCH_KEY) != _epoch_seen:
                recover_holds(client)
            failing = False
        except Exception as exc:  # Redis down: try again next poll, say so once
            if not failing:
                log.warning("budget holds watcher cannot reach Redis (%s)", type(exc).__name__)
            failing = True
