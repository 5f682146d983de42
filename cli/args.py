"""Comma-separated option values ("0.1,0.05"), shared by the CLI and the scripts.

:func:`numbers` makes an argparse ``type``: argparse turns its ValueError into a usage error
that names the option and the kind, e.g. ``argument --rhos: invalid rhos value: ' , '``.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def parse_numbers(text: str) -> list[float]:
    """At least one finite number, comma-separated; blanks between commas are skipped."""
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(text)
    return values


def numbers(kind: str) -> Callable[[str], list[float]]:
    """An argparse type for a comma-separated list of ``kind`` (its name in usage errors)."""

    def parse(text: str) -> list[float]:
        return parse_numbers(text)

    parse.__name__ = kind
    return parse
