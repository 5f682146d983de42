"""scripts/search_anatomy.py: its overlap and rank measures on known inputs, and one batch on the
demo world (real backbone, real mask search) whose table holds every measure in range."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import torch

from models.hypernet.failures import FailureSet
from models.worlds.catalog import get_world
from scripts.search_anatomy import iou_rows, spearman
from tests.scripts import run_script


def test_overlaps_and_rank_correlations_of_known_rows() -> None:
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert iou_rows(a, b) == 0.75  # rows: 1/2 and 2/2
    x = torch.tensor([[0.1, 0.5, 0.9, 2.0]])
    assert abs(spearman(x, 3 * x + 1) - 1.0) < 1e-6  # any increasing map keeps the order
    assert abs(spearman(x, -x) + 1.0) < 1e-6


def anatomy(*args: str) -> subprocess.CompletedProcess[str]:
    return run_script("search_anatomy", "--world", "demo", *args)


def test_one_batch_on_the_demo_world_measures_every_row(tmp_path: Path) -> None:
    pool = get_world("demo").load_world().pool[:16]
    labels = np.arange(16, dtype=np.int64) % 10
    path = tmp_path / "failures.npz"
    FailureSet(pool, labels, (labels + 1) % 10, np.arange(16, dtype=np.int64)).save(path)
    run = anatomy(
        "--failures", str(path), "--batches", "1", "--inner-lr", "1e-3", "--inner-steps", "3"
    )
    assert run.returncode == 0, run.stderr
    setting = json.loads(run.stdout.splitlines()[0])
    assert setting["inner_steps"] == 3 and setting["inner_lr"] == 1e-3
    rows = [line.split("|") for line in run.stdout.splitlines() if line.startswith("| ")][1:]
    values = {name.strip(): float(value) for _, name, value, _ in rows}
    assert len(values) == 20
    spread = values.pop("99th percentile of abs(s - s0)")
    assert spread > 0  # the search moved its logits
    assert all(-1.0 <= v <= 1.0 for v in values.values())
    assert 0.0 < values["density (s > 0)"] < 1.0


def test_zero_batches_are_refused_in_one_line(tmp_path: Path) -> None:
    run = anatomy("--failures", str(tmp_path / "none.npz"), "--batches", "0")
    assert run.returncode != 0
    assert run.stderr.strip() == "error: --batches must be at least 1, got 0"


def test_a_setting_meta_training_refuses_is_refused_in_one_line_before_any_work(
    tmp_path: Path,
) -> None:
    run = anatomy("--failures", str(tmp_path / "none.npz"), "--sparsity", "nan")
    assert run.returncode != 0
    assert run.stderr.strip() == (
        "error: invalid meta-training config: sparsity must be 0 or more and finite "
        "(got sparsity=nan)"
    )
