"""A request rate limit per API key: a token bucket in Redis, shared by every API process.

Each key has a bucket of ``burst`` tokens that refills at ``rate`` tokens per second; a request
takes one, or is refused (429) with the seconds until the next one. Taking is one Lua script, so
it is atomic across API processes, and the clock is Redis's (``TIME``), not each process's. A bucket
that would be full again expires. The API calls it from its request guard, on the event loop, with
an asyncio Redis client (never a worker thread: those serve the routes).
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from workers import settings as S

log = logging.getLogger(__name__)

TAKE = """
redis.replicate_commands()  -- TIME before writes (Redis 6; always so from Redis 7)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""
"""KEYS[1]: the bucket; ARGV: rate (tokens per second), burst (bucket size). Returns the seconds
to wait as a string (0 = taken): Lua numbers come back from Redis cut to integers."""


def bucket_key(key_id: str) -> str:
    return f"{S.KEY_PREFIX}:rate:{key_id}"


class RateLimiter:
    """Token buckets on one Redis; :meth:`open` and :meth:`close` bracket the app's lifespan."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.redis: Redis | None = None

    async def open(self) -> None:
        self.redis = Redis.from_url(self.redis_url)
        self.script = self.redis.register_script(TAKE)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None

    async def take(self, key_id: str, rate: float, burst: int) -> float:
        """Take a token from ``key_id``'s bucket: 0.0, or the seconds until one is free.

        ``rate`` 0 = no limit. Raises RedisError when Redis cannot be reached.
        """
        if rate <= 0:
            return 0.0
        if self.redis is None:
            raise RuntimeError("the rate limiter is used outside the app's lifespan")
        wait = await self.script(keys=[bucket_key(key_id)], args=[rate, burst])
        return float(wait)
