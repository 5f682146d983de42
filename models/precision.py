"""Numeric precision of the forward passes: fp32 (default) or bf16 autocast, and TF32 matmuls.

``bf16`` runs the backbone's matmuls and attention in bfloat16 under :func:`torch.autocast` (the
weights, their updates and the edit's patch stay fp32): on a GPU with bf16 tensor cores (A100,
H100) it is the usual way to halve activation memory and speed up large ViTs. ``tf32`` lets fp32
matmuls on Ampere+ GPUs use TF32 tensor cores. Both change results slightly; the README
("Precision") gives the measured effect on the benchmark. On a CPU without bf16 instructions
``bf16`` is slower than fp32 and only useful to test.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """The context that runs forward passes at ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def use_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 tensor cores for fp32 matmuls and convolutions (CUDA only)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
