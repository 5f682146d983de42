"""Test helper: an S3 server on 127.0.0.1 for the S3 store's tests: moto's server mode.

moto is an S3 *emulator* (Python, in memory), not S3. It is the most real S3 server that installs
from our registries and runs here: Debian's Ceph radosgw (16.2) has no standalone database-store
mode and needs a Ceph cluster (README, "Scaling out"). It speaks the S3 REST API over real HTTP,
including conditional writes (If-Match / If-None-Match on PutObject).

moto's own command serves each request on a thread, and its conditional writes are a check then a
put: two racing writers could both pass the check. S3 decides them atomically, so the server here
handles one request at a time (a lock around moto's app; connections stay on their threads),
which makes moto's checks atomic as S3's are.

Run as ``python -m tests.s3_server PORT``; :func:`s3_server` starts it for a test session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from cli import launcher

CREDENTIALS = {  # any pair works with moto; boto3 refuses to sign without one
    "AWS_ACCESS_KEY_ID": "vitedit-test",
    "AWS_SECRET_ACCESS_KEY": "vitedit-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def s3_server() -> Iterator[str]:
    """A moto S3 server process on a free loopback port; yields its endpoint URL."""
    port = launcher.free_port()
    # its log goes to a file: a pipe nobody reads fills up, and then the server stops answering
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.s3_server", str(port)],
        env={**os.environ, **CREDENTIALS},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    err = log.read().decode(errors="replace")
                    raise RuntimeError(f"the S3 emulator did not start: {err[-2000:]}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def new_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket=name)


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def main() -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    port = int(sys.argv[1])
    os.environ.setdefault("MOTO_PORT", str(port))
    moto = DomainDispatcherApplication(create_backend_app)
    one_at_a_time = threading.Lock()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with one_at_a_time:  # the whole response is produced under the lock
            return list(moto(environ, start_response))

    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
