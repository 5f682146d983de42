"""Tests of scripts/: each runs its script as a user would, in a subprocess from the repo root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """``python scripts/NAME.py ARGS`` from the repository root, output captured as text."""
    return subprocess.run(
        [sys.executable, f"scripts/{name}.py", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
