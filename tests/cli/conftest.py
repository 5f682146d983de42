"""The CLI's tests run against the API fixtures of tests/service (a real redis-server and worker)."""

from tests.redis_server import redis_url  # noqa: F401  (fixture)
from tests.service.conftest import served  # noqa: F401  (fixture)
