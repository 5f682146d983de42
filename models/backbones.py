"""Backbones: a timm classifier name + constructor overrides + weights, described by a manifest.

A backbone's identity is the sha256 of its weights file. Weights come from a local safetensors
file (timm key layout, optionally with a ``module.``/``model.`` prefix) or, when the user asks
for ``pretrained`` and has network, from the Hugging Face hub through timm itself. We never
unpickle anything.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config
from torch import nn

import models.architectures  # noqa: F401  (registers this project's timm models)
from models.errors import UnknownBackboneError, WeightsMismatchError
from models.images import MAX_SIDE
from models.store.manifest import BackboneManifest, sha256_file

log = logging.getLogger(__name__)

_STRIP_PREFIXES = ("module.", "model.")


@dataclass
class Backbone:
    """A frozen, eval-mode classifier with everything needed to feed it images."""

    model: nn.Module
    manifest: BackboneManifest
    weights_sha256: str  # identity of the weights actually loaded ("" for random init)
    data_config: dict[str, Any]
    device: torch.device

    @property
    def class_names(self) -> list[str]:
        names = self.manifest.class_names
        return list(names) if names else [str(i) for i in range(self.num_classes)]

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def in_chans(self) -> int:
        return int(self.data_config["input_size"][0])

    def transform(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalised (C, H, W) tensor with the backbone's eval transform."""
        mode = "L" if self.in_chans == 1 else "RGB"
        return _eval_transform(self.data_config)(image.convert(mode))

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """A list of PIL images -> a (N, C, H, W) batch on the backbone's device."""
        return torch.stack([self.transform(im) for im in images]).to(self.device)


def _eval_transform(data_config: dict[str, Any]) -> Any:
    return create_transform(**data_config, is_training=False)


def check_data_config(data_config: dict[str, Any]) -> None:
    """UnknownBackboneError unless the eval transform is one a worker can run: an input size of
    1 or 3 channels and sides of at most ``MAX_SIDE`` px, also before the center crop
    (side / crop_pct), and a finite mean and positive std per channel. A manifest's data-config
    overlay sets these, and a side of 60,000 px would make every image a 43 GB tensor."""

    def bad(why: str) -> UnknownBackboneError:
        return UnknownBackboneError(
            f"the backbone's data config {why}; fix pretrained_cfg_overlay in its manifest"
        )

    size = data_config.get("input_size")
    if not (
        isinstance(size, list | tuple)
        and len(size) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    ):
        raise bad(f"has input_size {size!r}: give [channels, height, width]")
    channels, height, width = size
    if channels not in (1, 3):
        raise bad(f"has {channels} input channels: images are grey (1) or RGB (3)")
    crop = data_config.get("crop_pct", 1.0)
    if not isinstance(crop, int | float) or not 0 < crop <= 10:
        raise bad(f"has crop_pct {crop!r}: give a share, e.g. 0.875 or 1.0")
    if max(height, width) / crop > MAX_SIDE:
        raise bad(
            f"resizes images to {max(height, width) / crop:.0f} px (input {height}x{width}, "
            f"crop_pct {crop}): at most {MAX_SIDE}"
        )
    for what in ("mean", "std"):
        values = data_config.get(what)
        if not (
            isinstance(values, list | tuple)
            and len(values) == channels
            and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
            and (what == "mean" or all(v > 0 for v in values))
        ):
            raise bad(
                f"has {what} {values!r}: give one finite number per channel ({channels})"
                + (", each above 0" if what == "std" else "")
            )


def resolve_device(name: str) -> torch.device:
    """A torch device by name: ``auto`` (cuda when there is one, else cpu), ``cpu``, ``cuda`` or
    ``cuda:N``. ValueError, saying what to give, for a name torch does not know, another kind of
    device, or cuda on a machine where torch sees none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: torch sees no CUDA device on this machine")
    return device


def create_model(manifest: BackboneManifest) -> nn.Module:
    """Build the timm model a manifest describes, with random weights."""
    if manifest.timm_name not in timm.list_models():
        close = timm.list_models(f"*{manifest.timm_name.split('_')[0]}*")[:5]
        raise UnknownBackboneError(
            f"timm has no model named {manifest.timm_name!r}; close names: {close or 'none'}. "
            "Use a name from timm.list_models()."
        )
    kwargs: dict[str, Any] = dict(manifest.overrides)
    if manifest.pretrained_cfg_overlay:
        kwargs["pretrained_cfg_overlay"] = dict(manifest.pretrained_cfg_overlay)
    try:
        return timm.create_model(manifest.timm_name, pretrained=manifest.pretrained, **kwargs)
    except TypeError as exc:
        raise UnknownBackboneError(
            f"timm model {manifest.timm_name!r} rejects the overrides {manifest.overrides}: {exc}"
        ) from exc


def _check_weights_file(path: Path) -> None:
    if path.suffix != ".safetensors":
        raise WeightsMismatchError(
            f"{path.name}: only .safetensors weights are accepted (pickled checkpoints can run "
            "code when loaded); convert it with safetensors.torch.save_file(model.state_dict(), ...)"
        )
    if not path.is_file():
        raise WeightsMismatchError(f"weights file {path} does not exist")


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in _STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors state dict, dropping a ``module.``/``model.`` wrapper prefix."""
    _check_weights_file(path)
    return _strip_prefix(load_file(str(path)))


def non_finite(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of ``state`` whose tensor holds NaN or inf (integer tensors are always finite):
    weights like these are refused wherever they are loaded or saved."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]


def read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensor shapes and dtypes (safetensors' names: F32, BF16, I64, BOOL, ...) a safetensors
    file holds, from its header only, keyed as :func:`read_state_dict` keys them."""
    _check_weights_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118
            shapes = {k: tuple(v.get_shape()) for k, v in slices.items()}
            dtypes = {k: str(v.get_dtype()) for k, v in slices.items()}
    except SafetensorError as exc:
        raise WeightsMismatchError(
            f"{path.name} is not a readable safetensors file: {exc}"
        ) from exc
    return _strip_prefix(shapes), _strip_prefix(dtypes)


BACKBONE_HINT = (
    "Check the timm name and the overrides (img_size, patch_size, depth, num_classes, ...) in the "
    "backbone manifest."
)


def check_fit(
    own: dict[str, tuple[int, ...]],
    given: dict[str, tuple[int, ...]],
    path: Path,
    hint: str = BACKBONE_HINT,
) -> None:
    """Every key and shape of the model (``own``) must be in the weights (``given``), and no more;
    else a WeightsMismatchError that names them and ends with ``hint`` (what to check)."""
    missing = sorted(set(own) - set(given))
    extra = sorted(set(given) - set(own))
    shapes = [k for k in own.keys() & given.keys() if tuple(own[k]) != tuple(given[k])]
    if missing or extra or shapes:
        detail = "; ".join(
            f"{label}: {keys[:4]}{' ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing", missing), ("unexpected", extra), ("shape", shapes))
            if keys
        )
        raise WeightsMismatchError(f"{path.name} does not fit this model ({detail}). {hint}")


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors file into ``model``; every key and shape must match."""
    state = read_state_dict(path)
    check_fit(_shapes(model), {k: tuple(v.shape) for k, v in state.items()}, path)
    model.load_state_dict(state)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in model.state_dict().items()}


BUILD_SLACK = 64
"""Tensors a model may register while it is built beyond twice those of its state dict: a
constructor may make a head it then replaces, or buffers that are not saved."""


class _TooManyTensors(Exception):
    """Raised from inside a constructor that registers more tensors than its weights could fit."""


@contextlib.contextmanager
def _at_most_tensors(limit: int) -> Iterator[None]:
    """Count the parameters and buffers every module registers in this thread until the block
    ends; :class:`_TooManyTensors` from inside the constructor at the ``limit + 1``-th.

    A model's build time is proportional to the tensors (and modules) it makes, even on the meta
    device: a manifest's ``depth: 12000`` took a worker 54 s and 1.6 GB to build before its
    shapes could be compared with a file of 56 tensors. A model that fits a file has as many
    state-dict tensors as the file, so one that has registered far more can never fit it:
    building stops there, whatever the constructor's argument that asked for it is called."""
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_parameter_registration_hook,
    )

    thread, count = threading.get_ident(), 0

    def counted(*_: Any) -> None:
        nonlocal count
        if threading.get_ident() == thread:  # another thread's model is not this one's
            count += 1
            if count > limit:
                raise _TooManyTensors

    handles = [
        register_module_parameter_registration_hook(counted),
        register_module_buffer_registration_hook(counted),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_unbuilt(
    build: Callable[[], nn.Module],
    path: Path,
    hint: str = BACKBONE_HINT,
    what: str = "model",
) -> None:
    """Refuse, before the module ``build()`` makes is built for real, weights at ``path`` that
    cannot be loaded into it: built on the meta device (no memory for its tensors), and only
    until it has registered more tensors than the file could fit (:func:`_at_most_tensors`);
    then its keys and shapes are compared (:func:`check_fit`), and a floating-point tensor of
    the module given as integers or booleans (a cast would load a useless model) is refused."""
    given, given_dtypes = read_header(path)
    limit = 2 * len(given) + BUILD_SLACK
    try:
        with torch.device("meta"), _at_most_tensors(limit):
            module = build()
    except _TooManyTensors:
        raise WeightsMismatchError(
            f"{path.name} does not fit this {what}: building it made more than {limit} tensors "
            f"and stopped, the file holds {len(given)}. {hint}"
        ) from None
    check_fit(_shapes(module), given, path, hint)
    ints = [
        k
        for k, dtype in _dtypes(module).items()
        if dtype.is_floating_point and not given_dtypes[k].startswith(("F", "BF"))
    ]
    if ints:
        raise WeightsMismatchError(
            f"{path.name} holds {ints[0]!r} as {given_dtypes[ints[0]]}"
            + (f" (and {len(ints) - 1} more tensors not floating-point)" if len(ints) > 1 else "")
            + f": this {what}'s weights are floating-point (F32, F16 or BF16); send the weights "
            "it was trained with, saved without converting them to integers"
        )


def load_backbone(manifest: BackboneManifest, device: torch.device | str = "cpu") -> Backbone:
    """Create a frozen eval-mode backbone from its manifest (local weights, hub, or random)."""
    device = torch.device(device)
    if manifest.weights_path is not None:
        # before the model is built for real: overrides that ask for a model far larger than
        # its weights file (or for more blocks than it holds) are refused here, not by running
        # the host out of memory or time
        check_unbuilt(lambda: create_model(manifest), manifest.weights_path)
    model = create_model(manifest)
    sha = ""
    if manifest.weights_path is not None:
        sha = sha256_file(manifest.weights_path)
        manifest.check_weights_sha256(sha)
        load_weights(model, manifest.weights_path)
    elif manifest.pretrained:
        sha = _state_dict_sha256(model)
    model.eval().requires_grad_(False).to(device)
    data_config = resolve_data_config({}, model=model)
    check_data_config(data_config)
    log.info("loaded backbone %s (%s) sha256=%s", manifest.name, manifest.timm_name, sha[:12])
    return Backbone(model, manifest, sha, data_config, device)


def _state_dict_sha256(model: nn.Module) -> str:
    """Identity of hub weights: sha256 of the tensors in key order (no file to hash)."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def backbone_from_name(
    timm_name: str,
    *,
    weights: Path | None = None,
    pretrained: bool = False,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> Backbone:
    """Convenience: a backbone straight from a timm name (weights from a file or the hub)."""
    manifest = BackboneManifest(
        name=timm_name,
        timm_name=timm_name,
        overrides=overrides,
        weights=str(weights) if weights else None,
        pretrained=pretrained,
    )
    return load_backbone(manifest, device)
