#!/usr/bin/env bash
# The GPU check (issue "The user's own ViT and GPU"): run on a machine with CUDA, from the repo root,
# after `make install`. Times a ViT-B/16 edit, a report's evaluation and a meta-training iteration,
# fp32 against bf16, then runs the tests marked `gpu`. Needs nothing from the network.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on the GPU machine')"
$PY scripts/gpu_check.py --repeats 3
$PY scripts/gpu_check.py --repeats 3 --tf32
$PY -m pytest -q -m gpu
