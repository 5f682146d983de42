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


def edit(payload: dict[str, Any]) -> dict[str, Any]:
    rt = runtime.current()
    return metrics.run_job(
        "edit",
        rt.redis,
        lambda: tasks.edit(rt, EditPayload.model_validate(payload), get_current_job()),
    )


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    rt = runtime.current()
    return metrics.run_job(
        "predict",
        rt.redis,
        lambda: tasks.predict(rt, PredictPayload.model_validate(payload), get_current_job()),
    )


def materialise(payload: dict[str, Any]) -> dict[str, Any]:
    rt = runtime.current()
    return metrics.run_job(
        "materialise",
        rt.redis,
        lambda: tasks.materialise(
            rt, MaterialisePayload.model_validate(payload), get_current_job()
        ),
    )


def register(payload: dict[str, Any]) -> dict[str, Any]:
    rt = runtime.current()
    return metrics.run_job(
        "register",
        rt.redis,
        lambda: tasks.register(rt, RegisterPayload.model_validate(payload), get_current_job()),
    )
