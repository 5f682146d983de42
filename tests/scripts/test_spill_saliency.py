"""scripts/spill_saliency.py benches ``saliency-spill`` beside the registered methods, and
refuses what it cannot use in one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.scripts import run_script


def spill_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return run_script("spill_saliency", *args)


def test_the_script_benches_saliency_spill_beside_saliency_on_the_demo_world(
    tmp_path: Path,
) -> None:
    run = spill_bench(
        "--anchors", "4", "bench", "--world", "demo", "--methods", "saliency-spill,saliency",
        "--quick", "--out", str(tmp_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"saliency-spill", "saliency"}
    points = results["methods"]["saliency-spill"]["points"]
    assert len(points) == 2 and all(0 <= p["sr"] <= 1 and p["groups"] for p in points)
    assert {p["config"]["rho"] for p in points} == {
        p["config"]["rho"] for p in results["methods"]["saliency"]["points"]
    }


def test_where2edit_spill_at_mix_0_is_saliency_spills_mask(tmp_path: Path) -> None:
    run = spill_bench(
        "--anchors", "4", "bench", "--world", "demo", "--methods", "where2edit-spill,saliency-spill",
        "--set", "where2edit-spill.mix=0", "--quick", "--out", str(tmp_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    methods = json.loads((tmp_path / "results.json").read_text())["methods"]
    for a, b in zip(
        methods["where2edit-spill"]["points"], methods["saliency-spill"]["points"], strict=True
    ):
        assert (a["sr"], a["gr"], a["lr"]) == (b["sr"], b["gr"], b["lr"])
        assert a["config"]["mix"] == 0


def test_anchor_counts_out_of_range_and_a_missing_world_are_refused_in_one_line() -> None:
    for args in (["--anchors", "0"], ["--anchors", "100000"]):
        run = spill_bench(*args, "bench", "--world", "demo")
        assert run.returncode != 0 and "--anchors" in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
    run = spill_bench("bench")
    assert run.returncode != 0 and "--world" in run.stderr
