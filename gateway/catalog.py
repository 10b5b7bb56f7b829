"""Resolving what a caller asked for (an alias) into the deployments to try, with their prices.

The catalog changes rarely and is read on every call, so each process keeps it in memory: the CATALOG part
of what the relay holds (governance.runtime), read again on its next call after any write to providers,
models, prices, aliases or deployments. Prices switch at
their effective time regardless: a route carries its future prices too.
"""
import threading
import time
from dataclasses import dataclass

from django.conf import settings

from gateway.models import ModelAlias, ModelPrice, Provider, ProviderModel
from governance import runtime, stamps


@dataclass(frozen=True)
class Target:
    provider: Provider
    provider_model: ProviderModel
    prices: tuple[ModelPrice, ...]  # newest first, including future ones

    def price_at(self, when) -> ModelPrice | None:
        """The price in force at `when`: a price scheduled for later takes effect on time, cache or not."""
        return next((p for p in self.prices if p.effective_from <= when), None)


@dataclass(frozen=True)
class Route:
    alias: ModelAlias
    targets: tuple[Target, ...]

    @property
    def max_output_tokens(self) -> int:
        """The smallest limit among the deployments, so any fallback can serve the request."""
        return min(t.provider_model.max_output_tokens for t in self.targets)


_lock = threading.Lock()
_cache: dict[str, Route] = {}
_stamp = ""  # the catalog stamp _cache was loaded at
_loaded_at = 0.0


def _load() -> dict[str, Route]:
    prices: dict[int, list[ModelPrice]] = {}
    for price in ModelPrice.objects.order_by("provider_model_id", "-effective_from"):
        prices.setdefault(price.provider_model_id, []).append(price)
    routes = {}
    aliases = ModelAlias.objects.filter(is_active=True).prefetch_related("deployments__provider_model__provider")
    for alias in aliases:
        targets = tuple(
            Target(d.provider_model.provider, d.provider_model, tuple(prices.get(d.provider_model_id, ())))
            for d in sorted(alias.deployments.all(), key=lambda d: d.priority)
            if d.provider_model.provider.is_active
        )
        if targets:
            routes[alias.name] = Route(alias, targets)
    return routes


def route_for(name: str) -> Route | None:
    global _cache, _stamp, _loaded_at
    stamp = stamps.current(stamps.CATALOG)  # read before loading, so a change during the load is not missed
    if not _fresh(stamp):
        with _lock:
            if not _fresh(stamp):
                _cache, _stamp, _loaded_at = _load(), stamp, time.monotonic()
    return _cache.get(name)


def _fresh(stamp: str) -> bool:
    return stamp == _stamp and time.monotonic() - _loaded_at < settings.TOLLGATE_MEMORY_CACHE_SECONDS


def all_routes() -> dict[str, Route]:
    route_for("")
    return dict(_cache)


def _forget() -> None:
    global _loaded_at
    _loaded_at = 0.0


runtime.keeps(runtime.CATALOG, _forget)


def billed_model_matcher(provider: Provider):
    """A function from a billed model name to the catalog model it is, or None. Only a catalog model's own
    name (exactly) and the billed names table (gateway.BilledModelName: a name and its dated snapshots)
    match; never a prefix: gpt-4o-realtime-preview-2024-12-17 is not gpt-4o, claude-sonnet-4-5-20250929 is
    not claude-sonnet-4."""
    from gateway.models import BilledModelName

    exact = {m.name.lower(): m.name for m in ProviderModel.objects.filter(provider=provider)}
    names = list(BilledModelName.objects.filter(provider_model__provider=provider).select_related("provider_model"))

    def match(billed: str) -> str | None:
        billed = billed.strip().lower()
        found = {n.provider_model.name for n in names if n.matches(billed)}
        if billed in exact:
            found.add(exact[billed])
        return found.pop() if len(found) == 1 else None  # two catalog models claiming a name: neither

    return match
