"""scripts/rule_criteria.py on a committed tuning run: it gives the criterion recorded for attempt 12
(docs/bench/tiny-imagenet/attempts/natural-locality-100/commands.txt: +0.12 = (+0.26 - 0.02) / 2)
and refuses, in one line, a file that is not a results.json and a method or rho it does not hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TUNING = "docs/bench/tiny-imagenet/attempts/natural-locality-100/tuning-results.json"


def criteria(*args: str, results: str = TUNING) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/rule_criteria.py", results, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_the_middle_criterion_is_the_one_attempt_12_recorded() -> None:
    run = criteria("--middle", "0.1,0.05", "--end", "0.1")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "LR difference +0.26 [" in lines[0] and "LR difference -0.02 [" in lines[1]
    assert "M (rho 0.1,0.05): +0.12" in run.stdout
    assert "E (rho 0.1): +0.26" in run.stdout


def test_it_refuses_what_the_file_does_not_hold() -> None:
    run = criteria("--b", "lora")
    assert run.returncode != 0 and "has no 'lora'" in run.stderr
    run = criteria("--end", "0.01")
    assert run.returncode != 0 and "rho 0.01 is not among both methods' points" in run.stderr
    run = criteria("--middle", " , ")
    assert run.returncode == 2 and "invalid rhos value" in run.stderr


def test_it_refuses_a_file_that_is_not_a_results_json_in_one_line() -> None:
    run = criteria(results="models/assets/demo/world.json")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().endswith(
        "has no 'methods': pass a results.json written by vitedit bench"
    )
