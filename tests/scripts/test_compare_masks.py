"""scripts/compare_masks.py --front with --other: one hypernetwork's front against another's, at
matched LR, on committed test-half runs (attempts 23 and 14 made the same edits)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from models.worlds.bench import read_results
from models.worlds.headline import front_comparison

ROOT = Path(__file__).resolve().parents[2]
ATTEMPTS = ROOT / "docs/bench/tiny-imagenet/attempts"
A23, A14 = ATTEMPTS / "spill-input/results.json", ATTEMPTS / "rmsprop-inner/results.json"


def fronts(results: Path, other: Path) -> list[str]:
    args = ["--other", str(other), "--a", "where2edit", "--b", "where2edit", "--front"]
    run = subprocess.run(
        [sys.executable, "scripts/compare_masks.py", str(results), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    return [line for line in run.stdout.splitlines() if line.startswith("| ")]


def test_a_front_against_itself_differs_by_nothing() -> None:
    header, *rows = fronts(A23, A23)
    assert "where2edit (other): best GR" in header
    assert rows and all(row.endswith("| +0.0 [+0.0, +0.0] |") for row in rows)


def test_another_files_front_is_compared_as_one_file_would_be() -> None:
    rows = fronts(A23, A14)[1:]
    mine, theirs = read_results(A23), read_results(A14)
    both = {**mine, "methods": {"where2edit": mine["methods"]["where2edit"]}}
    both["methods"]["other"] = theirs["methods"]["where2edit"]
    expected = front_comparison(both, rival="other")
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        assert row.startswith(f"| {100 * want['min_lr']:.1f} |")
        if "gr_difference" in want:
            assert f"{100 * want['gr_difference']:+.1f} [" in row
