"""Rate limits per key, person and team: requests and tokens per minute and per day, in Redis.

Fixed windows keyed by the window number, so counters expire on their own. Admission is one Lua call:
every request counter is checked and only then incremented, all or nothing, so concurrent callers on any
number of processes can never pass a limit. Token counters are checked at admission (a window already at
its limit refuses) and charged with the actual usage after the call.
"""
import logging
import math
import time
from dataclasses import dataclass, field

from governance.redis import ScriptPart, get_redis, run_parts

log = logging.getLogger(__name__)

WINDOWS = {"minute": 60, "day": 86400}

_ADMIT = """
-- KEYS[i]: counter; ARGV: per counter (limit, increment, ttl). Returns {0, used} or {i} for the first full one.
local n = #KEYS
for i = 1, n do
  local limit = tonumber(ARGV[(i - 1) * 3 + 1])
  local incr = tonumber(ARGV[(i - 1) * 3 + 2])
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if current + math.max(incr, 1) > limit then
    return {i}
  end
end
local used = {}
for i = 1, n do
  local incr = tonumber(ARGV[(i - 1) * 3 + 2])
  local value
  if incr > 0 then
    value = redis.call('INCRBY', KEYS[i], incr)
    if value == incr then redis.call('EXPIRE', KEYS[i], tonumber(ARGV[(i - 1) * 3 + 3])) end
  else
    value = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
  used[i] = value
end
return {0, used}
"""

_CHARGE = """
-- KEYS[i]: token counter; ARGV: tokens, then per counter its ttl. Returns 1.
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[1])
  redis.call('EXPIRE', KEYS[i], ARGV[i + 1])
end
return 1
"""


@dataclass(frozen=True)
class Limit:
    scope: str  # "key", "person", "team"
    scope_id: int
    unit: str  # "requests" or "tokens"
    window: str  # "minute" or "day"
    limit: int

    def redis_key(self, now: float) -> str:
        seconds = WINDOWS[self.window]
        return f"rl:{self.scope}:{self.scope_id}:{self.unit}:{self.window}:{int(now // seconds)}"

    def describe(self) -> str:
        return f"{self.scope} limit of {self.limit} {self.unit} per {self.window}"


@dataclass
class Admission:
    limits: list[Limit] = field(default_factory=list)
    used: list[int] = field(default_factory=list)
    now: float = 0.0

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, for the tightest request and token limits."""
        out = {}
        for unit in ("requests", "tokens"):
            pairs = [(lim, used) for lim, used in zip(self.limits, self.used) if lim.unit == unit]
            if not pairs:
                continue
            lim, used = min(pairs, key=lambda p: p[0].limit - p[1])
            reset = WINDOWS[lim.window] - (self.now % WINDOWS[lim.window])
            out[f"x-ratelimit-limit-{unit}"] = str(lim.limit)
            out[f"x-ratelimit-remaining-{unit}"] = str(max(lim.limit - used, 0))
            out[f"x-ratelimit-reset-{unit}"] = f"{reset:.0f}s"
        return out


class LimitExceeded(Exception):
    def __init__(self, limit: Limit, retry_after: int):
        super().__init__(limit.describe())
        self.limit, self.retry_after = limit, retry_after


class LimitsUnavailable(Exception):
    """Limits are configured but Redis cannot be reached: refusing is the only safe answer."""


def limits_for(*, key, person, team) -> list[Limit]:
    limits = []
    for scope, holder in (("key", key), ("person", person), ("team", team)):
        if holder is None:
            continue
        for unit, window, value in (
            ("requests", "minute", holder.rpm_limit),
            ("requests", "day", holder.rpd_limit),
            ("tokens", "minute", holder.tpm_limit),
            ("tokens", "day", holder.tpd_limit),
        ):
            if value is not None:
                limits.append(Limit(scope, holder.pk, unit, window, value))
    return limits


def admit(limits: list[Limit]) -> Admission:
    """Count one request against every request limit, or raise LimitExceeded naming the first full one."""
    if not limits:
        return Admission()
    client = get_redis()
    if client is None:
        raise LimitsUnavailable("rate limits are configured but REDIS_URL is not set")
    part, now = admit_part(limits)
    try:
        result = run_parts(client, [part])[0]
    except Exception as exc:  # redis.RedisError and connection errors alike
        raise LimitsUnavailable(f"rate-limit store unreachable ({type(exc).__name__})") from exc
    return admission_from(limits, result, now)


def admit_part(limits: list[Limit]) -> tuple[ScriptPart, float]:
    """The admission script for these limits, to run alone (`admit`) or with others in one round trip.
    The parts after it run only if it admitted the call."""
    now = time.time()
    args = []
    for lim in limits:
        args += [lim.limit, 1 if lim.unit == "requests" else 0, WINDOWS[lim.window] + 5]
    return ScriptPart(_ADMIT, [lim.redis_key(now) for lim in limits], args, go_on_if="r[1] == 0"), now


def admission_from(limits: list[Limit], result: list, now: float) -> Admission:
    """The admission script's answer: the counters' values, or LimitExceeded for the first full limit."""
    if result[0] != 0:
        full = limits[result[0] - 1]
        seconds = WINDOWS[full.window]
        raise LimitExceeded(full, retry_after=max(1, math.ceil(seconds - now % seconds)))
    return Admission(limits=limits, used=[int(v) for v in result[1]], now=now)


def charge_part(admission: Admission, tokens: int) -> ScriptPart | None:
    """The script adding the call's tokens to its token counters, to run alone or with others in one round
    trip; None when no token limit applies."""
    token_limits = [lim for lim in admission.limits if lim.unit == "tokens"]
    if not token_limits or tokens <= 0:
        return None
    return ScriptPart(_CHARGE, [lim.redis_key(admission.now) for lim in token_limits],
                      [tokens, *(WINDOWS[lim.window] + 5 for lim in token_limits)])
