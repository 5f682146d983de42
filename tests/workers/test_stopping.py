"""workers/main.py: a stopping worker does not wait on RQ's pubsub clean-up for long. A call that
hangs is given up after its bound (the thread is left to die with the process), and the real
subscribe / unsubscribe of a worker on a real Redis finishes within it."""

from __future__ import annotations

import threading
import time

import pytest
from redis import Redis

from tests.redis_server import db_url
from workers.main import PUBSUB_POLL_S, UNSUBSCRIBE_WAIT_S, rq_worker, within

pytestmark = pytest.mark.redis


def test_a_call_that_hangs_is_given_up_after_its_bound_and_one_that_ends_is_waited_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    start = time.monotonic()
    assert not within(0.3, lambda: release.wait(60), "a stuck clean-up")
    assert 0.3 <= time.monotonic() - start < 5
    assert "a stuck clean-up did not finish within 0 s" in caplog.text
    release.set()
    done = []
    assert within(5, lambda: done.append(1), "a quick clean-up") and done == [1]


def test_a_worker_unsubscribes_from_its_channel_within_the_bound(redis_url: str) -> None:
    redis = Redis.from_url(db_url(redis_url, 15))
    worker = rq_worker(redis, "vitedit-test-stopping")
    worker.subscribe()
    channel = worker.pubsub_channel_name
    assert redis.pubsub_numsub(channel)[0][1] == 1
    start = time.monotonic()
    worker.unsubscribe()
    assert time.monotonic() - start < UNSUBSCRIBE_WAIT_S
    assert redis.pubsub_numsub(channel)[0][1] == 0


def test_unsubscribing_after_the_listener_has_read_the_reply_does_not_wait_on_a_long_read(
    redis_url: str,
) -> None:
    # The race behind a stop that hung in CI: RQ unsubscribes, then stops its listener thread. If
    # the listener reads the unsubscribe reply before the stop, it goes back to a blocking read
    # (60 s in RQ), and redis-py's stop() waits for it. Here the listener is given that reply
    # first on purpose; the worker's own listener wakes every PUBSUB_POLL_S, so the stop is quick.
    redis = Redis.from_url(db_url(redis_url, 15))
    worker = rq_worker(redis, "vitedit-test-stopping-race")
    worker.subscribe()
    channel = worker.pubsub_channel_name
    worker.pubsub.unsubscribe()
    deadline = time.monotonic() + 5
    while redis.pubsub_numsub(channel)[0][1] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the listener has read the reply and is back in its read
    start = time.monotonic()
    worker.unsubscribe()
    assert time.monotonic() - start < PUBSUB_POLL_S + 1.0
    assert not worker.pubsub_thread.is_alive()
