"""Meta-training checkpoints: save and resume a :class:`~models.hypernet.metatrain.MetaTrainer`.

The hypernetwork, its optimiser state and the episode sampler's RNG state go to one safetensors
file (no pickle); the config, sites, backbone identity and history to ``state.json``. A resume
refuses a checkpoint written for another backbone, sites, hypernetwork shape or config (only the
iteration count and the schedule length may change).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from models.errors import ManifestError
from models.store.manifest import read_json, write_json_atomic

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
_RESUMABLE_CHANGES = {"iterations", "schedule_iterations"}  # config fields a resume may change


class MetaTrainer(Protocol):
    """What a checkpoint reads and restores of a :class:`models.hypernet.metatrain.MetaTrainer`
    (a protocol, so this module does not import the trainer that imports it)."""

    hypernet: torch.nn.Module
    opt: torch.optim.Optimizer
    sampler: Any  # has .generator (torch.Generator)
    backbone: Any  # has .weights_sha256 and .device
    sites: Any  # has .to_json()
    cfg: Any  # a dataclass
    impl: str
    iteration: int
    history: list[dict[str, Any]]


def save_checkpoint(trainer: MetaTrainer, directory: Path) -> None:
    """Hypernetwork, optimiser state and RNG state as safetensors; the rest as JSON. No pickle."""
    directory.mkdir(parents=True, exist_ok=True)
    opt_state = trainer.opt.state_dict()
    tensors = {
        f"hypernet.{k}": v.detach().cpu().contiguous()
        for k, v in trainer.hypernet.state_dict().items()
    }
    for idx, state in opt_state["state"].items():
        tensors.update(
            {f"optim.{idx}.{k}": torch.as_tensor(v).cpu().contiguous() for k, v in state.items()}
        )
    tensors["rng.sampler"] = trainer.sampler.generator.get_state()
    tmp = directory / ".checkpoint.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / "checkpoint.safetensors")
    write_json_atomic(
        directory / "state.json",
        {
            "iteration": trainer.iteration,
            "config": dataclasses.asdict(trainer.cfg),
            "hypernet_config": trainer.hypernet.config.to_json(),
            "sites": trainer.sites.to_json(),
            "backbone_sha256": trainer.backbone.weights_sha256,
            "impl": trainer.impl,
            "param_groups": opt_state["param_groups"],
            "history": trainer.history,
        },
    )
    log.info("checkpoint at iteration %d -> %s", trainer.iteration, directory)


def load_checkpoint(trainer: MetaTrainer, directory: Path) -> None:
    """Restore a trainer saved by :func:`save_checkpoint`; refuses a different setup."""
    state = read_json(directory / "state.json")
    # a field the checkpoint predates takes its default (e.g. the locality term: off; the
    # hypernetwork's rank_feature: linear)
    saved = {
        k: v
        for k, v in _with_defaults(trainer.cfg, state["config"]).items()
        if k not in _RESUMABLE_CHANGES
    }
    now = {k: v for k, v in dataclasses.asdict(trainer.cfg).items() if k not in _RESUMABLE_CHANGES}
    shape = trainer.hypernet.config
    same = (
        saved == now
        and state["sites"] == trainer.sites.to_json()
        and _with_defaults(shape, state["hypernet_config"]) == shape.to_json()
        and state["backbone_sha256"] == trainer.backbone.weights_sha256
    )
    if not same:
        raise ManifestError(
            f"checkpoint {directory} was written for another backbone, sites, hypernetwork shape "
            "or meta-training config; start afresh without --resume (or use another --out)"
        )
    tensors = load_file(str(directory / "checkpoint.safetensors"))
    device = trainer.backbone.device
    prefix = "hypernet."
    trainer.hypernet.load_state_dict(
        {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    )
    optim: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            optim.setdefault(int(idx), {})[name] = value if name == "step" else value.to(device)
    trainer.opt.load_state_dict({"state": optim, "param_groups": state["param_groups"]})
    trainer.sampler.generator.set_state(tensors["rng.sampler"])
    trainer.iteration, trainer.history = int(state["iteration"]), list(state["history"])
    log.info("resumed from %s at iteration %d", directory, trainer.iteration)


def _with_defaults(config: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` (a config as a checkpoint wrote it) with the fields it predates at the defaults
    of ``config``'s dataclass."""
    fields = dataclasses.fields(config)
    return {**{f.name: f.default for f in fields if f.default is not dataclasses.MISSING}, **saved}
