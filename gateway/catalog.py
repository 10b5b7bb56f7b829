"""Resolving what a caller asked for (an alias) into the deployments to try, with their prices.

The catalog changes rarely and is read on every call, so each process keeps it for
TOLLGATE_CATALOG_CACHE_SECONDS; admin edits show up within that time on every process.
"""
import threading
import time
from dataclasses import dataclass

from django.conf import settings

from gateway.models import ModelAlias, ModelPrice, Provider, ProviderModel


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
    global _cache, _loaded_at
    if time.monotonic() - _loaded_at > settings.TOLLGATE_CATALOG_CACHE_SECONDS:
        with _lock:
            if time.monotonic() - _loaded_at > settings.TOLLGATE_CATALOG_CACHE_SECONDS:
                _cache, _loaded_at = _load(), time.monotonic()
    return _cache.get(name)


def all_routes() -> dict[str, Route]:
    route_for("")
    return dict(_cache)


def invalidate() -> None:
    global _loaded_at
    _loaded_at = 0.0
