"""Editable sites: the FFN neurons of chosen blocks, their masks, and sparse patches over them.

A site is one timm ``Mlp`` (``fc1`` then ``fc2``). Neuron j of a site owns row j of ``fc1.weight``
and column j of ``fc2.weight``; the two are *independent* mask entries. Matrices are always in the
order (site0.fc1, site0.fc2, site1.fc1, ...), and a flat mask concatenates them in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import Mlp
from torch import nn

from models.errors import PatchError, SiteError

PATCH_FORMAT = "vitedit.patch/1"
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass(frozen=True)
class Matrix:
    """One editable matrix: a parameter name and the dimension that indexes neurons."""

    param: str  # e.g. "blocks.5.mlp.fc1.weight"
    dim: int  # 0 for fc1 (rows), 1 for fc2 (columns)
    hidden: int  # number of neurons


def find_mlps(model: nn.Module) -> dict[str, Mlp]:
    """All timm Mlp modules of a model, keyed by module name (e.g. ``blocks.5.mlp``)."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, Mlp)}


def default_blocks(n_blocks: int) -> tuple[int, ...]:
    """The three blocks ending at 75% depth (0-based): 7, 8, 9 of 12; 4, 5, 6 of 8."""
    if n_blocks <= 3:
        return tuple(range(n_blocks))
    end = int(0.75 * n_blocks)
    return (end - 2, end - 1, end)


@dataclass(frozen=True)
class Sites:
    """An ordered set of editable FFNs, named by their Mlp module paths."""

    mlps: tuple[str, ...]  # e.g. ("blocks.4.mlp", "blocks.5.mlp", "blocks.6.mlp")
    hidden: tuple[int, ...]

    @classmethod
    def for_model(cls, model: nn.Module, blocks: tuple[int, ...] | None = None) -> Sites:
        """Sites at the given block indices (default: three blocks ending at 75% depth).

        Block i is the i-th Mlp in module order, which is the block order for ViT/DeiT
        (``blocks.i.mlp``) and for Swin (``layers.s.blocks.j.mlp``, flattened).
        """
        mlps = find_mlps(model)
        if not mlps:
            raise SiteError(f"{type(model).__name__} has no timm Mlp: it has no editable FFN sites")
        names = list(mlps)
        # sorted and de-duplicated: (6, 4, 5, 5) and (4, 5, 6) name the same sites, in one order
        blocks = default_blocks(len(names)) if blocks is None else tuple(sorted(set(blocks)))
        bad = [b for b in blocks if not 0 <= b < len(names)]
        if bad or not blocks:
            raise SiteError(
                f"blocks {bad or blocks} out of range: the model has {len(names)} blocks"
            )
        chosen = tuple(names[b] for b in blocks)
        return cls(chosen, tuple(mlps[n].fc1.out_features for n in chosen))

    @classmethod
    def from_names(cls, model: nn.Module, mlps: list[str] | tuple[str, ...]) -> Sites:
        found = find_mlps(model)
        missing = [m for m in mlps if m not in found]
        if missing:
            raise SiteError(f"no timm Mlp at {missing}; available: {list(found)[:6]} ...")
        order = list(found)  # module order = block order; duplicates dropped
        chosen = tuple(sorted(set(mlps), key=order.index))
        return cls(chosen, tuple(found[m].fc1.out_features for m in chosen))

    @property
    def matrices(self) -> list[Matrix]:
        out = []
        for mlp, h in zip(self.mlps, self.hidden, strict=True):
            out += [Matrix(f"{mlp}.fc1.weight", 0, h), Matrix(f"{mlp}.fc2.weight", 1, h)]
        return out

    @property
    def n_entries(self) -> int:
        return 2 * sum(self.hidden)

    def params(self, model: nn.Module) -> list[nn.Parameter]:
        named = dict(model.named_parameters())
        return [named[m.param] for m in self.matrices]

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Flat (..., n_entries) mask -> one (..., hidden) tensor per matrix."""
        sizes = [m.hidden for m in self.matrices]
        return list(flat.split(sizes, dim=-1))

    @staticmethod
    def broadcast(entries: torch.Tensor, matrix: Matrix) -> torch.Tensor:
        """Per-neuron values (..., hidden) -> broadcastable over the weight's rows or columns."""
        return entries.unsqueeze(-1) if matrix.dim == 0 else entries.unsqueeze(-2)

    def to_json(self) -> dict:
        return {"mlps": list(self.mlps), "hidden": list(self.hidden)}

    @classmethod
    def from_json(cls, data: dict) -> Sites:
        return cls(tuple(data["mlps"]), tuple(int(h) for h in data["hidden"]))


def top_rho_mask(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Binary mask keeping the top ``rho`` fraction of all entries (one global ranking)."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    k = max(1, round(rho * scores.numel()))
    idx = torch.topk(scores.flatten(), k).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[idx] = True
    return mask.view_as(scores)


@dataclass
class Patch:
    """New values for some neurons of some matrices: ``{param: (indices, values)}``.

    fc1 values are rows, shape (k, in); fc2 values are columns, shape (out, k).
    Values are absolute (not deltas), so applying a patch is exact and order-independent
    within one patch; a lineage applies its patches parent first.
    """

    sites: Sites
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def n_neurons(self) -> int:
        return sum(int(idx.numel()) for idx, _ in self.entries.values())

    def _matrix(self, param: str) -> Matrix:
        for m in self.sites.matrices:
            if m.param == param:
                return m
        raise PatchError(f"patch key {param!r} is not one of the sites {list(self.sites.mlps)}")

    @classmethod
    def from_diff(
        cls, sites: Sites, before: list[torch.Tensor], after: list[torch.Tensor]
    ) -> Patch:
        """The neurons whose row/column changed between two lists of site weights."""
        entries = {}
        for m, w0, w1 in zip(sites.matrices, before, after, strict=True):
            other = 1 - m.dim
            changed = (w0 != w1).any(dim=other).nonzero().flatten()
            if changed.numel():
                entries[m.param] = (
                    changed.cpu(),
                    w1.detach().index_select(m.dim, changed).cpu().clone(),
                )
        return cls(sites, entries)

    def apply(
        self, model: nn.Module, backup: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Write the patch into ``model`` in place; returns the old values, for :meth:`revert`.

        Every entry is checked before any is written, so a patch that does not fit leaves the
        model untouched. ``backup`` (the caller's dict) receives each old value *before* its
        write: a caller that reverts it in ``finally`` restores the model even when apply is cut
        off midway (a job timeout arrives as an exception at any line).
        """
        named = dict(model.named_parameters())
        writes = [
            self._checked(param, idx, values, named)
            for param, (idx, values) in self.entries.items()
        ]
        backup = {} if backup is None else backup
        with torch.no_grad():
            for param, w, dim, idx, values in writes:
                backup[param] = w.index_select(dim, idx).clone()
                w.index_copy_(dim, idx, values)
        return backup

    def _checked(
        self,
        param: str,
        idx: torch.Tensor,
        values: torch.Tensor,
        named: dict[str, nn.Parameter],
    ) -> tuple[str, nn.Parameter, int, torch.Tensor, torch.Tensor]:
        """(param, weight, dim, indices, values) ready to write, or PatchError saying why not."""
        m = self._matrix(param)
        if param not in named:
            raise PatchError(f"model has no parameter {param!r}")
        w = named[param]
        expect = list(w.shape)
        expect[m.dim] = idx.numel()
        fits = (
            idx.dim() == 1
            and idx.dtype in _INDEX_DTYPES
            and values.is_floating_point()
            and list(values.shape) == expect
            and (idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < m.hidden))
            and idx.unique().numel() == idx.numel()
        )
        if not fits:
            raise PatchError(
                f"patch for {param} has indices {tuple(idx.shape)} {idx.dtype} and values "
                f"{tuple(values.shape)} {values.dtype}; expected distinct integer indices in "
                f"[0, {m.hidden}) and float values of shape {tuple(expect)}: it was made for "
                "another model or is damaged"
            )
        return param, w, m.dim, idx.to(w.device, torch.int64), values.to(w.device, w.dtype)

    def revert(self, model: nn.Module, backup: dict[str, torch.Tensor]) -> None:
        """Undo :meth:`apply` with the values it returned."""
        Patch(self.sites, {p: (self.entries[p][0], v) for p, v in backup.items()}).apply(model)

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        """Write as safetensors: ``{param}.indices`` and ``{param}.values``; provenance in header."""
        tensors = {}
        for param, (idx, values) in self.entries.items():
            tensors[f"{param}.indices"] = idx.to(torch.int64).contiguous()
            tensors[f"{param}.values"] = values.contiguous()
        meta = {
            "format": PATCH_FORMAT,
            "sites": ",".join(self.sites.mlps),
            "hidden": ",".join(map(str, self.sites.hidden)),
            **(metadata or {}),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> tuple[Patch, dict[str, str]]:
        """Read a patch file written by :meth:`save`; returns the patch and its header metadata."""
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise PatchError(f"{path}: not a readable safetensors patch ({exc})") from exc
        if meta.get("format") != PATCH_FORMAT:
            raise PatchError(f"{path}: not a vitedit patch (format {meta.get('format')!r})")
        sites = Sites(
            tuple(meta["sites"].split(",")), tuple(int(h) for h in meta["hidden"].split(","))
        )
        params = {k.rsplit(".", 1)[0] for k in tensors}
        entries = {p: (tensors[f"{p}.indices"], tensors[f"{p}.values"]) for p in sorted(params)}
        return cls(sites, entries), meta
