"""The workers' tests share the session's real redis-server (tests/redis_server.py)."""

from tests.redis_server import redis_url  # noqa: F401  (fixture)
