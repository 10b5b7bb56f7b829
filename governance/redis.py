"""The shared Redis client (counters for rate limits and budgets). None when REDIS_URL is not set."""
from functools import lru_cache

import redis
from django.conf import settings


@lru_cache(maxsize=1)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2, health_check_interval=30)


def get_redis() -> redis.Redis | None:
    return _client(settings.REDIS_URL) if settings.REDIS_URL else None
