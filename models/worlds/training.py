"""Training a backbone from scratch: one AdamW + warmup-cosine loop, resumable, with a time budget.

The loop is plain (no trainer framework). It checkpoints the model, the optimiser state and the
augmentation RNG to one safetensors file (no pickle) every ``checkpoint_every`` steps and when its
wall-time budget runs out, so a run interrupted at any point resumes where it stopped and, given
the same data and config, ends with the same weights. Each epoch's order is drawn from its own
seeded generator, so a resume mid-epoch replays the same order.

The data stays where it is given (uint8 on the CPU); each batch moves to the model's ``device``
before ``prepare`` and ``augment``, whose random draws come from a CPU generator, so a GPU run
draws the same crops and flips as a CPU run (its arithmetic still differs in the last bits).
Checkpoints hold CPU tensors and resume on either device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.errors import ManifestError
from models.precision import autocast
from models.store.manifest import read_json, write_json_atomic

log = logging.getLogger(__name__)

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    seed: int = 0
    precision: str = "fp32"  # "bf16": forward and backward under bf16 autocast (weights stay fp32)
    cutmix: float = 0.0  # share of batches trained on CutMix (Yun et al. 2019), a regulariser
    mixup: float = 0.0  # share of batches trained on Mixup (Zhang et al. 2018); cutmix + mixup <= 1
    crop: str = "pad"  # the world's crop: "pad" (padded random crop) or "resized" (area and aspect)
    drop_path: float = 0.0  # stochastic depth (Huang et al. 2016): the rate of the last block


@dataclass
class TrainResult:
    finished: bool  # False: stopped by the time budget (resume to go on)
    steps: int
    seconds: float  # wall time of this and all earlier (resumed) runs
    history: list[dict[str, float]]  # per finished epoch: loss, eval accuracy, seconds


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Eval-mode logits of a float batch, in chunks."""
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def cutmix_batch(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """CutMix (Yun et al. 2019) on a batch: one box, its area a uniform share of the image, is
    pasted from the next image of the batch (``x.roll(1, 0)``) into each. Returns the mixed batch
    and the share of each image left its own (the weight of its own label)."""
    h, w = x.shape[-2:]
    lam = float(torch.rand((), generator=gen))
    cut_h, cut_w = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
    cy, cx = (int(torch.randint(0, size, (), generator=gen)) for size in (h, w))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, w)
    out = x.clone()
    out[:, :, top:bottom, left:right] = x.roll(1, 0)[:, :, top:bottom, left:right]
    return out, 1 - (bottom - top) * (right - left) / (h * w)


def mixup_batch(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Mixup (Zhang et al. 2018) on a batch: each image blended with the next one of the batch
    (``x.roll(1, 0)``), its own weight uniform in [0, 1] (Beta(1, 1), as CutMix's box area is).
    Returns the mixed batch and that weight (the weight of its own label)."""
    lam = float(torch.rand((), generator=gen))
    return lam * x + (1 - lam) * x.roll(1, 0), lam


def mix_batch(
    x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator
) -> tuple[torch.Tensor, float] | None:
    """CutMix for a ``cfg.cutmix`` share of batches, Mixup for a ``cfg.mixup`` share, else None.
    One draw picks which; a config with neither draws nothing (the stream of older recipes)."""
    if not (cfg.cutmix or cfg.mixup):
        return None
    pick = float(torch.rand((), generator=gen))
    if pick < cfg.cutmix:
        return cutmix_batch(x, gen)
    if pick < cfg.cutmix + cfg.mixup:
        return mixup_batch(x, gen)
    return None


class Trainer:
    """Trains ``model`` on (float or uint8 -> ``prepare``) tensors; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        prepare: Callable[[torch.Tensor], torch.Tensor],
        augment: Augment,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model, self.cfg, self.prepare, self.augment = (
            model.to(self.device),
            cfg,
            prepare,
            augment,
        )
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.seconds, self.history = 0, 0.0, []
        # the schedule's length by step: a resume may shorten or lengthen it (epochs only)
        self.schedule: list[dict[str, int]] = [{"from_step": 0, "epochs": cfg.epochs}]

    def lr_at(self, step: int, total: int, warmup: int) -> float:
        if step < warmup:
            return self.cfg.lr * (step + 1) / warmup
        return (
            0.5 * self.cfg.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        )

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_eval: torch.Tensor,
        y_eval: torch.Tensor,
        checkpoint: Path | None = None,
        time_budget: float | None = None,
        checkpoint_every: int = 500,
        progress: Callable[[str], None] = log.info,
        stop_at_step: int | None = None,
        fit_eval: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> TrainResult:
        """Train to the end of the schedule, or until ``time_budget`` seconds of this call, or
        until ``stop_at_step`` (a checkpoint is written at each stop). ``fit_eval``: some of the
        training images, whose top-1 (unaugmented) each epoch also records as ``train_accuracy``:
        its distance above the eval accuracy is how much the model memorises."""
        cfg = self.cfg
        per_epoch = len(x) // cfg.batch_size
        total, warmup = cfg.epochs * per_epoch, int(cfg.warmup_epochs * per_epoch)
        start, seconds0 = time.perf_counter(), self.seconds
        while self.step < total:
            epoch, i = divmod(self.step, per_epoch)
            order = torch.randperm(
                len(x), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            )
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.step, total, warmup)
            loss = self.train_step(x[idx], y[idx])
            self.step += 1
            self.seconds = seconds0 + time.perf_counter() - start
            if self.step % per_epoch == 0:
                acc = self.accuracy(x_eval, y_eval)
                record = {
                    "epoch": self.step // per_epoch,
                    "loss": round(loss.item(), 4),
                    "eval_accuracy": acc,
                    "seconds": round(self.seconds, 1),
                }
                fitted = ""
                if fit_eval is not None:
                    record["train_accuracy"] = self.accuracy(*fit_eval)
                    fitted = f", train acc {record['train_accuracy']:.4f}"
                self.history.append(record)
                progress(
                    f"epoch {self.step // per_epoch}/{cfg.epochs}: loss {loss.item():.3f}, "
                    f"eval acc {acc:.4f}{fitted}, {self.seconds:.0f} s"
                )
            out_of_time = (
                time_budget is not None and time.perf_counter() - start > time_budget
            ) or (stop_at_step is not None and self.step >= stop_at_step)
            if checkpoint is not None and (self.step % checkpoint_every == 0 or out_of_time):
                self.save(checkpoint)
            if out_of_time and self.step < total:
                progress(f"stopped at step {self.step}/{total} (budget); resume to go on")
                return TrainResult(False, self.step, self.seconds, self.history)
        if checkpoint is not None:
            self.save(checkpoint)
        return TrainResult(True, self.step, self.seconds, self.history)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a batch as stored (e.g. uint8 on the CPU): to the device,
        ``prepare``, ``augment``, CutMix or Mixup for their shares of batches, label-smoothed
        cross-entropy, backward, AdamW at the learning rate already set. Returns the loss."""
        cfg = self.cfg
        self.model.train()
        batch, targets = x.to(self.device), y.to(self.device)
        inputs = self.augment(self.prepare(batch), self.gen)
        mixed = mix_batch(inputs, cfg, self.gen)
        if mixed is not None:
            inputs = mixed[0]
        with autocast(inputs.device, cfg.precision):
            logits = self.model(inputs).float()
        loss = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
        if mixed is not None:  # the other image's share of the loss goes to its label
            lam = mixed[1]
            pasted = F.cross_entropy(
                logits, targets.roll(1, 0), label_smoothing=cfg.label_smoothing
            )
            loss = lam * loss + (1 - lam) * pasted
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def accuracy(self, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
        preds = torch.cat(
            [
                predict_logits(self.model, self.prepare(x[i : i + batch].to(self.device)))
                .argmax(1)
                .cpu()
                for i in range(0, len(x), batch)
            ]
        )
        return float((preds == y.cpu()).float().mean())

    # ----------------------------------------------------------------------- checkpoints

    def save(self, directory: Path) -> None:
        """Model, optimiser and RNG state as safetensors; step, config, history as JSON."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()
        }
        opt_state = self.opt.state_dict()
        for idx, state in opt_state["state"].items():
            tensors |= {
                f"optim.{idx}.{k}": torch.as_tensor(v).cpu().contiguous() for k, v in state.items()
            }
        tensors["rng.augment"] = self.gen.get_state()
        tmp = directory / ".train.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, directory / "train.safetensors")
        write_json_atomic(
            directory / "train.json",
            {
                "step": self.step,
                "seconds": self.seconds,
                "config": dataclasses.asdict(self.cfg),
                "param_groups": opt_state["param_groups"],
                "history": self.history,
                "schedule": self.schedule,
            },
        )

    def resume(self, directory: Path) -> bool:
        """Restore a checkpoint written by :meth:`save`; False if there is none."""
        if not (directory / "train.json").exists():
            return False
        state = read_json(directory / "train.json")
        # a field added to TrainConfig after the checkpoint was written has its default there
        defaults = dataclasses.asdict(TrainConfig())
        saved, now = {**defaults, **state["config"]}, dataclasses.asdict(self.cfg)
        if {**saved, "epochs": 0} != {**now, "epochs": 0}:
            raise ManifestError(
                f"training checkpoint {directory} was written with another config "
                f"({state['config']}); use another --work folder or the same settings "
                "(only the number of epochs may change on a resume)"
            )
        tensors = load_file(str(directory / "train.safetensors"))
        self.model.load_state_dict(
            {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        )
        optim: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                optim.setdefault(int(idx), {})[name] = value
        self.opt.load_state_dict({"state": optim, "param_groups": state["param_groups"]})
        self.gen.set_state(tensors["rng.augment"])
        self.step, self.seconds, self.history = state["step"], state["seconds"], state["history"]
        self.schedule = state.get("schedule", [{"from_step": 0, "epochs": saved["epochs"]}])
        if self.schedule[-1]["epochs"] != self.cfg.epochs:  # the schedule changes from here
            self.schedule.append({"from_step": self.step, "epochs": self.cfg.epochs})
        log.info("resumed training from %s at step %d", directory, self.step)
        return True
