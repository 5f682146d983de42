"""Every numeric option of every editor is bounded, and one spec (the config's field bounds) is what
both the worker's configs and the API's checks read; an edit that turns non-finite stops there."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
import torch

from models.bounds import SEED_MAX, Bound
from models.editing import EDITORS, EditConfig, EditTask, make_config, run_edit
from models.editing.finetune import FTConfig, FTL1Config
from models.editing.lora import LoRAConfig
from models.errors import EditConfigError, EditDiverged
from models.sites import Sites
from tests.conftest import tiny_vit

REFUSED: list[tuple[str, str, Any]] = [
    ("ft", "lr", 1e30),
    ("ft", "lr", 0.0),
    ("ft", "lr", math.nan),
    ("ft", "lr", "inf"),
    ("ft", "lr", True),
    ("ft", "lr", 10**400),  # an int past a float's range (JSON's 1 and 400 zeros): OverflowError
    ("ft", "lr", "1" + "0" * 5000),
    ("ft", "max_steps", 10**400),
    ("ft", "max_steps", "1" * 5000),  # more digits than int() takes
    ("ft", "max_steps", "٧"),  # an Arabic-Indic 7: int() takes it, as a number it is not ours
    ("ft", "max_steps", 0),
    ("ft", "max_steps", 10_001),
    ("ft", "max_steps", 2.5),
    ("ft", "stop_loss", -0.1),
    ("ft", "stop_loss", math.inf),
    ("ft", "seed", -1),
    ("ft", "seed", 2**63),
    ("ft", "seed", 2**64),
    ("ft-l1", "c", 1e300),
    ("ft-l2", "c", -1e-9),
    ("lora", "rank", 0),
    ("lora", "rank", 1025),
    ("random", "rho", 0.0),
    ("where2edit", "rho", 1.5),
    ("where2edit-sal", "mix", 1.5),
    ("where2edit-sal", "mix", -0.1),
]
ACCEPTED: list[tuple[str, str, Any]] = [
    ("ft", "lr", 1.0),
    ("ft", "seed", SEED_MAX),
    ("ft", "max_steps", "7"),
    ("ft-l1", "c", 0.0),
    ("ft-l2", "c", 10.0),
    ("lora", "rank", 1024),
    ("saliency", "rho", 1.0),
]


@pytest.mark.parametrize(("method", "key", "value"), REFUSED)
def test_configs_refuse_values_outside_their_bounds(method: str, key: str, value: Any) -> None:
    with pytest.raises(EditConfigError, match=f"option {key}=.* must be"):
        make_config(method, **{key: value})


@pytest.mark.parametrize(("method", "key", "value"), ACCEPTED)
def test_configs_accept_the_edges_of_their_bounds(method: str, key: str, value: Any) -> None:
    config = make_config(method, **{key: value})
    assert getattr(config, key) == type(getattr(config, key))(value)


@pytest.mark.parametrize("value", [10**400, -(10**400), "7" * 100_000, [0.5] * 10_000])
def test_a_refused_value_is_quoted_short_with_the_range(value: Any) -> None:
    with pytest.raises(EditConfigError) as refused:
        Bound("float", 0, 1, low_open=True).check("lr", value)
    message = str(refused.value)
    assert message.startswith("option lr=") and message.endswith("must be a number in (0, 1]")
    assert len(message) < 200 and "characters)" in message, message


def test_every_numeric_option_of_every_editor_is_bounded() -> None:
    for name, editor in EDITORS.items():
        numeric = {
            f.name
            for f in dataclasses.fields(editor.config_cls)
            if isinstance(f.default, int | float) and not isinstance(f.default, bool)
        }
        assert numeric == set(editor.config_cls.bounds()), name


def test_a_config_built_directly_is_checked_too() -> None:
    with pytest.raises(EditConfigError, match="rank"):
        LoRAConfig(rank=5000).validate()


def test_bounds_survive_a_json_round_trip() -> None:
    for editor in EDITORS.values():
        for key, b in editor.config_cls.bounds().items():
            again = Bound.from_json(json.loads(json.dumps(b.to_json())))
            assert again == b, key


# --------------------------------------------------------------------------- non-finite edits


def _task() -> EditTask:
    model = tiny_vit()
    images = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        targets = (model(images).argmax(1) + 3) % 10
    return EditTask.build(model, Sites.for_model(model), images, targets)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("ft", FTConfig(lr=1e30, max_steps=3)),  # built directly: no bounds checked
        ("ft-l1", FTL1Config(lr=1e-3, max_steps=3, c=1e300)),
        ("lora", LoRAConfig(lr=1e30, max_steps=3)),
    ],
)
def test_a_diverging_edit_stops_with_a_reason_and_leaves_the_model(
    name: str, config: EditConfig
) -> None:
    task = _task()
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    steps: list[int] = []
    with pytest.raises(EditDiverged, match=r"non-finite .* at step [0-3] of 3.*Lower lr"):
        run_edit(name, task, config, on_step=lambda step, _n, _loss: steps.append(step))
    assert len(steps) <= 1  # it stops at the step that diverged, not after max_steps
    assert all(torch.equal(before[k], v) for k, v in task.model.state_dict().items())
