"""RQ entry points: one thin function per job kind, referenced by dotted path from the API.

Each takes the JSON payload, validates it and hands it to :mod:`workers.tasks` with the worker's
warm :class:`~workers.runtime.Runtime`. The return value is JSON (RQ's JSONSerializer).
"""

from __future__ import annotations

from typing import Any

from rq import get_current_job

from workers import runtime, tasks
from workers.payloads import EditPayload, MaterialisePayload, PredictPayload


def edit(payload: dict[str, Any]) -> dict[str, Any]:
    return tasks.edit(runtime.current(), EditPayload.model_validate(payload), get_current_job())


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    return tasks.predict(
        runtime.current(), PredictPayload.model_validate(payload), get_current_job()
    )


def materialise(payload: dict[str, Any]) -> dict[str, Any]:
    return tasks.materialise(
        runtime.current(), MaterialisePayload.model_validate(payload), get_current_job()
    )
