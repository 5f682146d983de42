"""Bounds of the editors' numeric options: one spec per method, read by the worker and the API.

An editor's frozen config dataclass (``models/editing/``) is the source: each numeric field names
its :class:`Bound` in its metadata (``field(default=..., metadata=bound(...))``). The config checks
itself with them (in the worker), and registration writes them, as JSON, into the model's registry
entry, where the torch-free API reads them (``service/validation.py``). Both sides run the same
:meth:`Bound.check`, so the API refuses (422) exactly what the worker would refuse. Torch-free.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from models.errors import EditConfigError, quoted

SEED_MAX = 2**63 - 1  # a seed is a signed 64-bit integer everywhere we hand it on


def shown(value: Any, limit: int = 60) -> str:
    """``value`` as a message quotes it: its repr, cut to ``limit`` characters and its length (an
    option's name or value is the client's text; a 100 kB one would be echoed whole)."""
    if isinstance(value, str):
        return quoted(value, limit)
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than repr() writes
        return "an integer of thousands of digits"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Bound:
    """A finite number of one kind in ``[low, high]`` (an open end excludes its value)."""

    kind: Literal["int", "float"]
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        if self.kind == "int":
            return f"an integer in {left}{int(self.low)}, {int(self.high)}{right}"
        return f"a number in {left}{self.low:g}, {self.high:g}{right}"

    def check(self, name: str, value: Any) -> int | float:
        """``value`` as this kind, or :class:`EditConfigError` naming the option and its range."""
        number = self._coerce(value)
        inside = (
            number is not None
            and (number > self.low if self.low_open else number >= self.low)
            and (number < self.high if self.high_open else number <= self.high)
        )
        if not inside:
            raise EditConfigError(f"option {name}={shown(value)} must be {self.describe()}")
        return number  # type: ignore[return-value]

    def _coerce(self, value: Any) -> int | float | None:
        """The number ``value`` stands for (None if it is not one, or not finite: an integer past
        a float's range, such as 1 followed by 400 zeros in a JSON body, is not a float)."""
        if isinstance(value, bool):
            return None
        if isinstance(value, str):
            text = value.strip()
            if not text.isascii():  # int() and float() read other scripts' digits too ("\u0667")
                return None
            try:
                value = (
                    int(text)
                    if self.kind == "int" and re.fullmatch(r"[+-]?[0-9]+", text)
                    else float(text)
                )
            except ValueError:  # not a number, or more digits than int() takes
                return None
        if not isinstance(value, int | float):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if self.kind == "float":
            try:
                return float(value)
            except OverflowError:  # an int of more than ~1e308
                return None
        if isinstance(value, float) and value != int(value):
            return None
        return int(value)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Bound:
        return cls(**data)


def bound(
    kind: Literal["int", "float"],
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> dict[str, Bound]:
    """Field metadata: ``lr: float = field(default=2e-5, metadata=bound("float", 0, 1, low_open=True))``."""
    return {"bound": Bound(kind, low, high, low_open, high_open)}


def bounds_of(fields: Any) -> dict[str, Bound]:
    """The bounds declared on dataclass fields (``dataclasses.fields(config_cls)``)."""
    return {f.name: f.metadata["bound"] for f in fields if "bound" in f.metadata}


def check_options(options: dict[str, Any], bounds: dict[str, Bound]) -> dict[str, Any]:
    """Every bounded option checked and coerced; others pass unchanged."""
    return {k: bounds[k].check(k, v) if k in bounds else v for k, v in options.items()}
