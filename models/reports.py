"""The report stored with every version: what the edit fixed, what it broke, and what it cost.

The metrics are those of :mod:`models.evaluation` (docs/method.md section 6) applied to one
edit: the evaluation sets are prepared once as prefix tokens (:class:`ReportSets`), predicted
under the parent version and under the new one (:func:`predict_sets`), and compared
(:func:`build_report`). Retention checks the edit images of every earlier version of the lineage.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from models.evaluation import METRIC_DEFINITIONS, predictions
from models.forward import SplitForward

REPORT_SCHEMA = 1

DEFINITIONS = {
    "SR": "reliability: share of this request's edit images the new version predicts as their "
    "target label (docs/method.md section 6)",
    "GR": "generalization: accuracy of the new version on held-out failures of the same group: "
    "the request's 'holdout' images, else the registered benchmark groups of the target "
    "label(s); the edit images themselves are never counted",
    "LR_vs_root": "locality: share of the model's registered sensitive locality images whose top-1 "
    "prediction equals the base backbone's",
    "LR_vs_parent": "locality: the same share, against the parent version the edit started from",
    "retention": "share of the edit images of each earlier version of this lineage that the new "
    "version still predicts as their targets",
    "mask_entries": "entries (neuron rows/columns) the method was allowed to change, of n_entries",
    "edit_neurons": "rows/columns this edit changed; patch_neurons: rows/columns the whole "
    "lineage changed (the stored patch is cumulative over the base)",
    "reference": METRIC_DEFINITIONS,
}


@dataclass
class TokenSet:
    """Prefix tokens of some images and (optionally) their target labels."""

    tokens: torch.Tensor  # (N, T, D)
    targets: torch.Tensor | None = None  # (N,) long
    images: list[Image.Image] | None = None  # thumbnails for the review figures (models.review)


@dataclass
class ReportSets:
    """Everything a report evaluates, as prefix tokens computed once per edit."""

    edit: TokenSet
    holdout: TokenSet | None = None
    holdout_source: str | None = None  # "request" | "benchmark"
    locality: TokenSet | None = None
    locality_root_preds: torch.Tensor | None = None  # (L,) base-backbone predictions
    retention: dict[str, TokenSet] = field(default_factory=dict)  # earlier version -> its edits


def predict_sets(split: SplitForward, sets: ReportSets) -> dict[str, torch.Tensor]:
    """Top-1 predictions of the model as it is now on every set: {"edit", "holdout", ...}."""
    out = {"edit": predictions(split, sets.edit.tokens).cpu()}
    if sets.holdout is not None:
        out["holdout"] = predictions(split, sets.holdout.tokens).cpu()
    if sets.locality is not None:
        out["locality"] = predictions(split, sets.locality.tokens).cpu()
    for version, ts in sets.retention.items():
        out[f"retention:{version}"] = predictions(split, ts.tokens).cpu()
    return out


def _share(a: torch.Tensor, b: torch.Tensor) -> float | None:
    return round(float((a.cpu() == b.cpu()).float().mean()), 6) if len(a) else None


def _metrics(preds: dict[str, torch.Tensor], sets: ReportSets) -> dict[str, Any]:
    out: dict[str, Any] = {"SR": _share(preds["edit"], sets.edit.targets)}
    if sets.holdout is not None:
        out["GR"] = _share(preds["holdout"], sets.holdout.targets)
    if sets.locality is not None and sets.locality_root_preds is not None:
        out["LR_vs_root"] = _share(preds["locality"], sets.locality_root_preds)
    return out


def build_report(
    sets: ReportSets,
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
    edit: dict[str, Any],
    seconds: dict[str, float],
    memory: dict[str, float],
) -> dict[str, Any]:
    """The JSON report: metrics before and after the edit, retention, edit facts and costs."""
    metrics = _metrics(after, sets)
    if sets.locality is not None:
        metrics["LR_vs_parent"] = _share(after["locality"], before["locality"])
    retention = {v: _share(after[f"retention:{v}"], ts.targets) for v, ts in sets.retention.items()}
    sizes = {
        "edit": len(sets.edit.tokens),
        "holdout": len(sets.holdout.tokens) if sets.holdout is not None else 0,
        "locality": len(sets.locality.tokens) if sets.locality is not None else 0,
    }
    return {
        "schema": REPORT_SCHEMA,
        "metrics": metrics,
        "before": _metrics(before, sets),
        "retention": {"per_version": retention, "min": min(retention.values(), default=None)},
        "edit_predictions": {
            "before": before["edit"].tolist(),
            "after": after["edit"].tolist(),
            "targets": sets.edit.targets.tolist(),
        },
        "holdout_source": sets.holdout_source,
        "set_sizes": sizes,
        "edit": edit,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "peak_memory_mib": memory,
        "definitions": DEFINITIONS,
    }


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and the CUDA allocator's peak since the last reset)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"process_rss": round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)}
    if device.type == "cuda":
        out["cuda_allocated"] = round(torch.cuda.max_memory_allocated(device) / (1 << 20), 1)
    return out
