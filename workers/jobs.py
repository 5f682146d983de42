"""RQ entry points: one thin function per job kind, referenced by dotted path from the API.

Each takes the JSON payload, validates it and hands it to :mod:`workers.tasks` with the worker's
warm :class:`~workers.runtime.Runtime`, counting its final status and seconds
(:func:`workers.metrics.run_job`). The return value is JSON (RQ's JSONSerializer).
"""

from __future__ import annotations

from typing import Any

from rq import get_current_job

from workers import metrics, runtime, tasks
from workers.payloads import EditPayload, MaterialisePayload, PredictPayload, RegisterPayload


def _run(kind: str, payload_type: Any, task: Any, payload: dict[str, Any]) -> dict[str, Any]:
    rt = runtime.current()
    job = get_current_job()
    return metrics.run_job(
        kind, rt.redis, lambda: task(rt, payload_type.model_validate(payload), job)
    )


def edit(payload: dict[str, Any]) -> dict[str, Any]:
    return _run("edit", EditPayload, tasks.edit, payload)


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    return _run("predict", PredictPayload, tasks.predict, payload)


def materialise(payload: dict[str, Any]) -> dict[str, Any]:
    return _run("materialise", MaterialisePayload, tasks.materialise, payload)


def register(payload: dict[str, Any]) -> dict[str, Any]:
    return _run("register", RegisterPayload, tasks.register, payload)
