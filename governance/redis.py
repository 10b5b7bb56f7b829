"""The shared Redis client (counters for rate limits and budgets), None when REDIS_URL is not set, and
`run_parts`, which runs several counter scripts in one round trip."""
from dataclasses import dataclass
from functools import lru_cache

import redis
from django.conf import settings


@lru_cache(maxsize=1)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2, health_check_interval=30)


def get_redis() -> redis.Redis | None:
    return _client(settings.REDIS_URL) if settings.REDIS_URL else None


@dataclass(frozen=True)
class ScriptPart:
    """One Lua script body with its own KEYS and ARGV, to run with others in one round trip (`run_parts`).
    `go_on_if` is a Lua condition on the part's result `r`; when it is false, the parts after it do not run."""

    source: str
    keys: list
    args: list
    go_on_if: str = "true"


_composed: dict[tuple, object] = {}


def run_parts(client: redis.Redis, parts: list[ScriptPart]) -> list:
    """Run script bodies in order in ONE script, so one round trip and all of them atomic together, as
    if they ran one after the other with nothing in between. Returns the results of the parts that ran.
    Each body keeps its own view of KEYS and ARGV, so a script written to run alone runs unchanged here."""
    shape = tuple((part.source, part.go_on_if) for part in parts)
    script = _composed.get((id(client), shape))
    if script is None:
        script = _composed[(id(client), shape)] = client.register_script(_compose(parts))
    keys, args = [], [len(parts)]
    for part in parts:
        args += [len(part.keys), len(part.args)]
    for part in parts:
        keys += part.keys
        args += part.args
    return script(keys=keys, args=args)


def _compose(parts: list[ScriptPart]) -> str:
    functions = "\n".join(f"local function part{i}(KEYS, ARGV)\n{part.source}\nend" for i, part in enumerate(parts))
    conditions = "\n".join(f"conditions[{i + 1}] = function(r) return {part.go_on_if} end" for i, part in enumerate(parts))
    calls = ", ".join(f"part{i}" for i in range(len(parts)))
    return f"""{functions}
local conditions = {{}}
{conditions}
local parts = {{{calls}}}
local n = tonumber(ARGV[1])
local key_at, arg_at = 0, 1 + 2 * n
local results = {{}}
for i = 1, n do
  local nkeys, nargs = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local k, a = {{}}, {{}}
  for j = 1, nkeys do k[j] = KEYS[key_at + j] end
  for j = 1, nargs do a[j] = ARGV[arg_at + j] end
  key_at, arg_at = key_at + nkeys, arg_at + nargs
  local r = parts[i](k, a)
  results[i] = r
  if not conditions[i](r) then break end
end
return results
"""
