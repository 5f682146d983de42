"""The hypernetwork: a failure image's CLS feature -> a score per editable mask entry.

docs/method.md section 2. The sequence is one zero-initialised learnable query token per editable
matrix, followed by the (projected) CLS feature; no position embeddings. A small pre-LN
transformer trunk mixes them, then each query token has its own head Linear(width -> H_i), and
the scores are ``clamp(sigmoid(score_scale * z), clamp, 1 - clamp)``. Optional inputs (not in the
paper): the edit target's classifier row as one more token (``target_token``), and the edit's own
gradient norm per entry (``gradient_input``), added to z as ``gate * rank`` with one zero-initialised
gate head per matrix beside its score head; and the edit's first-order fix per spill on clean
anchors (``spill_input``, models/spill.py), read the same way through gates of its own. A
``spill_input`` network carries its anchors (``spill-anchors.safetensors``, a few lowest-margin
clean images of its backbone), since a user's edit brings none.

Output layout: a flat ``(B, n_entries)`` tensor in :attr:`models.sites.Sites.matrices` order
(site0.fc1, site0.fc2, site1.fc1, ...), each matrix contributing ``hidden`` entries, so
``sites.split(scores)`` gives one ``(B, H_i)`` tensor per matrix.

Saved as ``hypernet.safetensors`` + ``hypernet.json`` (full config, backbone identity, sites,
training summary); :meth:`Hypernetwork.load` refuses a backbone or sites it was not trained for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block
from torch import nn

from models.backbones import Backbone, check_unbuilt, non_finite
from models.errors import HypernetworkMismatchError, IntegrityError, ManifestError, SiteError
from models.sites import Sites
from models.spill import MAX_ANCHORS, SpillReference, SpillReferences
from models.store.manifest import read_json, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

HYPERNET_FORMAT = "vitedit.hypernet/1"
WEIGHTS_FILE = "hypernet.safetensors"
MANIFEST_FILE = "hypernet.json"
CONFIG_HINT = (
    "Check the config in hypernet.json (width, depth, heads, mlp_hidden, hidden, target_token, "
    "gradient_input, spill_input, rank_feature): it must be the one these weights were trained "
    "with."
)
ANCHORS_FILE = "spill-anchors.safetensors"
RANK_FEATURES = ("linear", "tail")
DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo" / "hypernet"


@dataclass(frozen=True)
class HypernetConfig:
    """Shape of a hypernetwork. ViT-B/16 reference: feature_dim = width = 768, 6 heads, depth 3,
    mlp_hidden 768, hidden = (3072,) * 6 -> 24.8 M parameters."""

    feature_dim: int  # backbone's pre-logits CLS width
    hidden: tuple[int, ...]  # neurons per editable matrix, in Sites.matrices order
    width: int = 768
    depth: int = 3
    heads: int = 6
    mlp_hidden: int | None = None  # None = width (the reference uses 1x, not 4x)
    score_scale: float = 3.0
    clamp: float = 1e-5
    # also read the edit's target class, as one more token: its row of the backbone's classifier
    # (the image alone does not say which class the edit moves it to; saliency's gradient does)
    target_token: bool = False
    # also read the edit's own gradient: each entry's rank by the edit loss's gradient norm at the
    # unedited weights (what saliency ranks by), weighed per entry by a gate read from the tokens
    # (zero at the start, so adding it changes nothing until meta-training moves it)
    gradient_input: bool = False
    # also read the edit's first-order fix per spill on the network's clean anchors (the ranking
    # of scripts/spill_saliency.py's saliency-spill), through gates of its own (zero at the start)
    spill_input: bool = False
    # how those two inputs' rankings are read (:func:`rank_features`): "linear", each entry's rank
    # in [-1, 1]; or "tail", the same rank as an exponential quantile, so a ranking's top stands
    # out (top 1% +3.6, median -0.3, bottom -1)
    rank_feature: str = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not self.hidden or min(self.hidden) < 1 or self.depth < 1 or self.feature_dim < 1:
            raise ValueError(f"invalid hypernetwork shape: {self}")
        if not 0.0 <= self.clamp < 0.5:
            raise ValueError(f"clamp must be in [0, 0.5), got {self.clamp}")
        for name in (
            "target_token",
            "gradient_input",
            "spill_input",
        ):  # a manifest's "no" is not False
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.rank_feature not in RANK_FEATURES:
            raise ValueError(
                f"rank_feature must be one of {', '.join(RANK_FEATURES)}, got {self.rank_feature!r}"
            )

    @property
    def n_matrices(self) -> int:
        return len(self.hidden)  # = 2 * number of sites

    @property
    def n_entries(self) -> int:
        return sum(self.hidden)

    @classmethod
    def for_sites(
        cls,
        feature_dim: int,
        sites: Sites,
        width: int | None = None,
        heads: int | None = None,
        **kwargs: Any,
    ) -> HypernetConfig:
        """Default shape: width = the backbone's feature width, 6 heads (4 if 6 does not divide)."""
        width = width or feature_dim
        heads = heads or (6 if width % 6 == 0 else 4)
        return cls(
            feature_dim, tuple(m.hidden for m in sites.matrices), width=width, heads=heads, **kwargs
        )

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["hidden"] = list(self.hidden)
        return data


class Hypernetwork(nn.Module):
    """CLS features (B, feature_dim) -> mask scores (B, n_entries) in (0, 1), Sites order."""

    def __init__(self, config: HypernetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        mlp_hidden = c.mlp_hidden or c.width
        self.proj = nn.Linear(c.feature_dim, c.width) if c.feature_dim != c.width else nn.Identity()
        self.queries = nn.Parameter(torch.zeros(c.n_matrices, c.width))  # one per editable matrix
        ratio = mlp_hidden / c.width
        self.blocks = nn.Sequential(
            *[Block(c.width, c.heads, mlp_ratio=ratio, qkv_bias=True) for _ in range(c.depth)]
        )
        self.norm = nn.LayerNorm(c.width)  # final norm of a pre-LN trunk
        self.heads = nn.ModuleList(nn.Linear(c.width, h) for h in c.hidden)
        self.target_proj = nn.Linear(c.feature_dim, c.width) if c.target_token else None
        self.gates = _zero_heads(c.width, c.hidden) if c.gradient_input else None
        self.spill_gates = _zero_heads(c.width, c.hidden) if c.spill_input else None
        self.sites: Sites | None = None  # the sites it was trained for (set by save and load)
        # a spill_input network's clean anchors (A, C, H, W), saved beside its weights
        self.anchor_images: torch.Tensor | None = None
        self._references: SpillReferences | None = None  # of anchor_images, once asked for

    def logits(
        self,
        features: torch.Tensor,
        target_features: torch.Tensor | None = None,
        gradient: torch.Tensor | None = None,
        spill: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pre-sigmoid scores z, (B, n_entries). ``target_features`` (B, feature_dim): the edit
        targets' classifier rows (:func:`target_features`), for a ``target_token`` network.
        ``gradient`` (B, n_entries): the edit loss's gradient norm per entry at the unedited
        weights, for a ``gradient_input`` network (z = head + gate * its ranks in [-1, 1]).
        ``spill`` (B, n_entries): the edit's fix per spill (:func:`models.spill.spill_ranking`),
        for a ``spill_input`` network (+ spill gate * its ranks)."""
        terms = list(self.logit_terms(features, target_features, gradient, spill).values())
        return sum(terms[1:], terms[0])

    def logit_terms(
        self,
        features: torch.Tensor,
        target_features: torch.Tensor | None = None,
        gradient: torch.Tensor | None = None,
        spill: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`logits` as the sum of its terms, each (B, n_entries): ``heads``, then
        ``gradient`` (gate * rank) for a ``gradient_input`` network and ``spill`` for a
        ``spill_input`` one."""
        x = self.proj(features).unsqueeze(1)  # (B, 1, W)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, M, W)
        tokens = [q, x]
        if self.target_proj is not None:
            if target_features is None:
                raise ValueError("this hypernetwork reads the edit's target: give its features")
            tokens.append(self.target_proj(target_features).unsqueeze(1))
        x = self.norm(self.blocks(torch.cat(tokens, dim=1)))  # (B, M + 1 [+ 1], W)
        z = torch.cat([head(x[:, i]) for i, head in enumerate(self.heads)], dim=-1)
        terms = {"heads": z}
        for name, gates, values, what in (
            ("gradient", self.gates, gradient, "gradient: give its norms"),
            ("spill", self.spill_gates, spill, "fix per spill: give it"),
        ):
            if gates is None:
                continue
            if values is None:
                raise ValueError(f"this hypernetwork reads the edit's {what}")
            gate = torch.cat([head(x[:, i]) for i, head in enumerate(gates)], dim=-1)
            terms[name] = gate * rank_features(values.expand_as(z), self.config.rank_feature)
        return terms

    def forward(
        self,
        features: torch.Tensor,
        target_features: torch.Tensor | None = None,
        gradient: torch.Tensor | None = None,
        spill: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores in [clamp, 1 - clamp], (B, n_entries), in Sites.matrices order."""
        eps = self.config.clamp
        z = self.logits(features, target_features, gradient, spill)
        return torch.sigmoid(self.config.score_scale * z).clamp(eps, 1 - eps)

    @torch.no_grad()
    def mask_scores(
        self,
        model: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor | None = None,
        gradient: torch.Tensor | None = None,
        spill: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores for a set of edit images (and their target labels, which a ``target_token``
        network reads; the edit loss's gradient norms (n_entries,), which a ``gradient_input``
        network reads; the edit's fix per spill (n_entries,), which a ``spill_input`` network
        reads), averaged over them: (n_entries,)."""
        rows = None
        if self.config.target_token:
            if targets is None:
                raise ValueError("this hypernetwork reads the edit's target labels: give them")
            rows = target_features(model, targets)
        if self.config.gradient_input and gradient is None:
            raise ValueError("this hypernetwork reads the edit's gradient norms: give them")
        if self.config.spill_input and spill is None:
            raise ValueError("this hypernetwork reads the edit's fix per spill: give it")
        features = cls_features(model, images)
        if gradient is not None:
            gradient = gradient.to(features.device).reshape(1, -1)
        if spill is not None:
            spill = spill.to(features.device).reshape(1, -1)
        return self(features, rows, gradient, spill).mean(dim=0)

    def spill_reference(self, model: nn.Module, sites: Sites) -> SpillReference:
        """Its anchors' margin gradients on ``model`` at ``sites``, at the weights the model
        holds now: what a ``spill_input`` network's spill input is measured against. Kept while
        the site weights stay as they were (a worker that writes a parent version's weights in
        place, or back, gets them taken again)."""
        if self.anchor_images is None:
            raise ValueError("this hypernetwork has no spill anchors (it is not spill_input)")
        if self._references is None or self._references.images is not self.anchor_images:
            self._references = SpillReferences(self.anchor_images)
        return self._references.at(model, sites)

    def with_target_token(self, seed: int = 0) -> Hypernetwork:
        """This network with a target token added (its projection seeded, the rest copied): the
        start of a target-reading meta-training from an image-only network."""
        torch.manual_seed(seed)
        return self._with_inputs(target_token=True)

    def with_gradient_input(self) -> Hypernetwork:
        """This network with the gradient input added (its gates zero, the rest copied): the same
        scores as this network until meta-training moves the gates."""
        return self._with_inputs(gradient_input=True)

    def with_spill_input(self, anchor_images: torch.Tensor | None = None) -> Hypernetwork:
        """This network with the spill input added (its gates zero, the rest copied): the same
        scores as this network until meta-training moves the gates. ``anchor_images``: its
        clean anchors; None leaves them to the meta-trainer (``--spill-anchors``)."""
        net = self._with_inputs(spill_input=True)
        net.anchor_images = None if anchor_images is None else anchor_images.detach().cpu()
        return net

    def with_rank_feature(self, kind: str) -> Hypernetwork:
        """This network reading its rankings as ``kind`` (:func:`rank_features`), all weights
        copied. Refused for a network whose gates were already trained on another reading."""
        if kind == self.config.rank_feature:
            return self
        if self.config.gradient_input or self.config.spill_input:
            raise ValueError(
                f"this hypernetwork's gates were trained on {self.config.rank_feature!r} ranks: "
                f"it cannot be switched to {kind!r} (start from a network without the inputs)"
            )
        return self._with_inputs(rank_feature=kind)

    def _with_inputs(self, **inputs: bool | str) -> Hypernetwork:
        net = Hypernetwork(dataclasses.replace(self.config, **inputs))
        missing, unexpected = net.load_state_dict(self.state_dict(), strict=False)
        # the only parameters not copied (a new rank feature adds none)
        added = tuple(_INPUT_PARAMS[name] for name in inputs if name in _INPUT_PARAMS)
        if unexpected or any(not k.startswith(added) for k in missing):
            raise ValueError(f"cannot add {', '.join(inputs)}: {missing} {unexpected}")
        net.sites, net.anchor_images = self.sites, self.anchor_images
        for name in ("weights_sha256", "training_episodes", "episode_source"):  # its origin
            if hasattr(self, name):
                setattr(net, name, getattr(self, name))
        return net.to(next(self.parameters()).device)

    # ------------------------------------------------------------------ persistence

    def save(
        self,
        out_dir: Path,
        backbone: Backbone,
        sites: Sites,
        training: dict[str, Any] | None = None,
    ) -> Path:
        """Write weights + manifest into ``out_dir`` (each file replaced atomically)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if tuple(m.hidden for m in sites.matrices) != self.config.hidden:
            raise HypernetworkMismatchError(f"sites {sites.mlps} do not fit this hypernetwork")
        weights = out_dir / WEIGHTS_FILE
        tmp = out_dir / f".{WEIGHTS_FILE}.tmp"
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        broken = non_finite(state)
        if broken:
            raise IntegrityError(
                f"refusing to save a hypernetwork with non-finite weights ({', '.join(broken[:3])})"
            )
        save_file(
            state,
            str(tmp),
            metadata={"format": HYPERNET_FORMAT, "backbone_sha256": backbone.weights_sha256},
        )
        os.replace(tmp, weights)
        anchors = self._save_anchors(out_dir)
        manifest = {
            "format": HYPERNET_FORMAT,
            "config": self.config.to_json(),
            "backbone": {
                "name": backbone.manifest.name,
                "timm_name": backbone.manifest.timm_name,
                "weights_sha256": backbone.weights_sha256,
            },
            "sites": sites.to_json(),
            "weights": WEIGHTS_FILE,
            "weights_sha256": sha256_file(weights),
            "n_parameters": sum(p.numel() for p in self.parameters()),
            **({"spill_anchors": anchors} if anchors else {}),
            "training": training or {},
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json_atomic(out_dir / MANIFEST_FILE, manifest)
        self.sites = sites
        log.info("saved hypernetwork (%d parameters) to %s", manifest["n_parameters"], out_dir)
        return out_dir

    def _save_anchors(self, out_dir: Path) -> dict[str, Any] | None:
        """A ``spill_input`` network's anchors, written atomically; their manifest entry."""
        if not self.config.spill_input:
            return None
        images = self.anchor_images
        if images is None or images.dim() != 4 or not images.isfinite().all():
            raise IntegrityError("refusing to save a spill_input hypernetwork without its anchors")
        path, tmp = out_dir / ANCHORS_FILE, out_dir / f".{ANCHORS_FILE}.tmp"
        save_file({"images": images.detach().cpu().float().contiguous()}, str(tmp))
        os.replace(tmp, path)
        return {"file": ANCHORS_FILE, "sha256": sha256_file(path), "count": len(images)}

    @classmethod
    def load(cls, in_dir: Path, backbone: Backbone, sites: Sites | None = None) -> Hypernetwork:
        """Load onto ``backbone.device``, checking it was trained for this backbone (weights
        sha256) and these sites (``None``: its recorded sites, which must exist in the model).
        """
        manifest = read_manifest(in_dir)
        check_compatible(manifest, backbone.weights_sha256, sites, backbone.model)
        if manifest.get("weights") != WEIGHTS_FILE:  # a name from a user: never a path elsewhere
            raise ManifestError(
                f"{Path(in_dir) / MANIFEST_FILE} names weights {manifest.get('weights')!r}: a "
                f"hypernetwork's weights are the {WEIGHTS_FILE} beside it"
            )
        weights = Path(in_dir) / WEIGHTS_FILE
        actual = sha256_file(weights)
        if actual != manifest["weights_sha256"]:
            raise IntegrityError(
                f"{weights} has sha256 {actual[:16]}..., its manifest says "
                f"{manifest['weights_sha256'][:16]}...: the file was changed"
            )
        cfg = manifest["config"]
        try:
            config = HypernetConfig(**{**cfg, "hidden": tuple(cfg["hidden"])})
        except (TypeError, ValueError) as exc:  # an unknown field, a "no" for false, ...
            # the message quotes the value, which may be of any length: shown cut short
            said = str(exc) if len(str(exc)) <= 200 else f"{str(exc)[:200]}..."
            raise ManifestError(f"{Path(in_dir) / MANIFEST_FILE}: its config: {said}") from None
        # the shapes and dtypes first: a config far larger than its weights (a depth of 10**6)
        # is refused unbuilt, as are integer weights
        check_unbuilt(lambda: cls(config), weights, CONFIG_HINT, "hypernetwork")
        net = cls(config)
        state = load_file(str(weights))
        bad = sorted(non_finite(state))
        if bad:  # it would score every neuron NaN: masks picked from nothing (save refuses too)
            raise IntegrityError(
                f"{weights} holds NaN or inf in {bad[:5]}: a hypernetwork's weights must be "
                "finite; send one whose meta-training ended well (vitedit hypernet train)"
            )
        net.load_state_dict(state)
        net.sites = Sites.from_json(manifest["sites"])
        if config.spill_input:
            net.anchor_images = read_anchors(Path(in_dir), manifest, backbone)
        net.weights_sha256 = manifest["weights_sha256"]  # its identity, for the results it makes
        net.training_episodes = manifest.get("training", {}).get("episodes")
        # how its episodes were made; None = the paper's CutMix (manifests before the option)
        source = manifest.get("training", {}).get("episode_source")
        net.episode_source = None if not source or source.get("kind") == "cutmix" else source
        return net.eval().requires_grad_(False).to(backbone.device)

    def check_sites(self, sites: Sites) -> None:
        """Refuse to score other sites than its own, even of the same widths."""
        if self.sites is not None and sites != self.sites:
            raise HypernetworkMismatchError(
                f"this hypernetwork scores the neurons of {list(self.sites.mlps)}, not of "
                f"{list(sites.mlps)}: edit its sites, or meta-train one for yours"
            )


def read_manifest(in_dir: Path) -> dict[str, Any]:
    manifest = read_json(Path(in_dir) / MANIFEST_FILE)
    if manifest.get("format") != HYPERNET_FORMAT:
        fmt = manifest.get("format")
        raise ManifestError(f"{in_dir}: not a vitedit hypernetwork (format {fmt!r})")
    where = Path(in_dir) / MANIFEST_FILE
    objects = {k: manifest.get(k) for k in ("backbone", "sites", "config")}
    objects["training"] = manifest.get("training", {})  # the one that may be left out
    for key, value in objects.items():
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: its {key!r} must be a JSON object")
    backbone = manifest["backbone"]
    strings = {
        "weights_sha256": manifest.get("weights_sha256"),
        "backbone.name": backbone.get("name"),
        "backbone.weights_sha256": backbone.get("weights_sha256"),
    }
    for key, value in strings.items():
        if not isinstance(value, str):
            raise ManifestError(f"{where}: its {key!r} must be a string")
    sites = manifest["sites"]
    if not all(isinstance(sites.get(k), list) for k in ("mlps", "hidden")):
        raise ManifestError(f"{where}: its 'sites' must hold the lists 'mlps' and 'hidden'")
    return manifest


def check_compatible(
    manifest: dict[str, Any],
    backbone_sha256: str,
    sites: Sites | None,
    model: nn.Module | None = None,
) -> None:
    """Raise HypernetworkMismatchError unless the manifest fits this backbone and these sites."""
    trained_for = manifest["backbone"]
    if trained_for["weights_sha256"] != backbone_sha256:
        raise HypernetworkMismatchError(
            f"this hypernetwork was trained for backbone {trained_for['name']!r} (weights sha256 "
            f"{trained_for['weights_sha256'][:16]}...), not for the loaded backbone (sha256 "
            f"{backbone_sha256[:16]}...). Meta-train one for this backbone: vitedit hypernet train"
        )
    recorded = Sites.from_json(manifest["sites"])
    if sites is not None and sites != recorded:
        raise HypernetworkMismatchError(
            f"this hypernetwork edits sites {list(recorded.mlps)} (hidden "
            f"{list(recorded.hidden)}), but sites {list(sites.mlps)} (hidden "
            f"{list(sites.hidden)}) were requested. Use its sites, or meta-train one for yours"
        )
    if model is not None:
        try:
            found = Sites.from_names(model, recorded.mlps)
        except SiteError as exc:
            raise HypernetworkMismatchError(
                f"the hypernetwork's sites are not in this model: {exc}"
            ) from exc
        if found != recorded:
            raise HypernetworkMismatchError(
                f"the model's FFN widths {list(found.hidden)} differ from the hypernetwork's "
                f"{list(recorded.hidden)} at sites {list(recorded.mlps)}"
            )


def read_anchors(in_dir: Path, manifest: dict[str, Any], backbone: Backbone) -> torch.Tensor:
    """A ``spill_input`` network's anchor images, checked against its manifest and the
    backbone's input size: (A, C, H, W)."""
    entry = manifest.get("spill_anchors")
    if not isinstance(entry, dict) or entry.get("file") != ANCHORS_FILE:
        raise ManifestError(
            f"{in_dir}: the hypernetwork reads fix per spill but its manifest names no "
            f"{ANCHORS_FILE}; save it again with its anchors"
        )
    path = in_dir / ANCHORS_FILE
    if not path.is_file():
        raise IntegrityError(f"{path} is missing: a spill_input hypernetwork needs its anchors")
    actual = sha256_file(path)
    if actual != entry.get("sha256"):
        raise IntegrityError(
            f"{path} has sha256 {actual[:16]}..., its manifest says "
            f"{str(entry.get('sha256'))[:16]}...: the file was changed"
        )
    images = load_file(str(path)).get("images")
    expected = tuple(int(n) for n in backbone.data_config["input_size"])  # (C, H, W)
    if (
        images is None
        or images.dim() != 4
        or not 1 <= len(images) <= MAX_ANCHORS
        or not images.is_floating_point()
        or not images.isfinite().all()
        or tuple(images.shape[1:]) != expected
    ):
        shape = None if images is None else tuple(images.shape)
        raise IntegrityError(
            f"{path}: expected 1 to {MAX_ANCHORS} finite images of shape {expected}, found {shape}"
        )
    if entry.get("count") != len(images):
        raise IntegrityError(
            f"{path} holds {len(images)} anchors, its manifest says {entry.get('count')}"
        )
    return images


def recorded_sites(in_dir: Path) -> Sites:
    """The sites a saved hypernetwork edits (reads only its manifest)."""
    return Sites.from_json(read_manifest(in_dir)["sites"])


@torch.no_grad()
def cls_features(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The backbone's pre-logits CLS features (N, feature_dim): forward_features -> forward_head."""
    chunks = [
        model.forward_head(model.forward_features(images[i : i + batch_size]), pre_logits=True)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


def feature_dim(model: nn.Module) -> int:
    """Width of :func:`cls_features` for a timm classifier."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


_INPUT_PARAMS = {
    "target_token": "target_proj.",
    "gradient_input": "gates.",
    "spill_input": "spill_gates.",
}


def row_ranks(values: torch.Tensor) -> torch.Tensor:
    """Each row's entries ranked, scaled to [-1, 1] (1: the largest; ties in index order). What a
    ``gradient_input`` network reads of the gradient norms: ranks, not norms, because the edit's
    CE and meta-training's tempered KL give gradients of unrelated scales."""
    n = values.shape[-1]
    return 2 * _ranks(values) / max(n - 1, 1) - 1


def rank_features(values: torch.Tensor, kind: str = "linear") -> torch.Tensor:
    """What a ``gradient_input`` or ``spill_input`` network reads of a ranking, per row.
    ``linear``: :func:`row_ranks`. ``tail``: the entry's quantile q in [0, 1) (0: the smallest)
    mapped to -log(1 - q) - 1, an exponential variate centred on 0: it spreads the top apart
    (top 1% above +3.6, top 10% above +1.3) and packs the lower half into [-1, -0.3], so a gate
    can lift a ranking's top alone (scripts/rank_input_fit.py measures what each gives the regression)."""
    if kind == "linear":
        return row_ranks(values)
    if kind != "tail":
        raise ValueError(f"unknown rank feature {kind!r}: one of {', '.join(RANK_FEATURES)}")
    q = _ranks(values) / values.shape[-1]
    return -torch.log1p(-q) - 1


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Each row's entries' ranks 0..n-1 (0: the smallest; ties in index order), as floats."""
    return values.argsort(dim=-1).argsort(dim=-1).to(values.dtype)


def _zero_heads(width: int, hidden: tuple[int, ...]) -> nn.ModuleList:
    heads = nn.ModuleList(nn.Linear(width, h) for h in hidden)
    for head in heads:
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return heads


def target_features(model: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """(N, feature_dim): the backbone classifier's rows of the target classes (timm's head)."""
    weight = model.get_classifier().weight
    return weight[targets.to(weight.device)].detach()


def load_demo_hypernetwork(backbone: Backbone, directory: Path = DEMO_DIR) -> Hypernetwork | None:
    """The shipped demo hypernetwork for the demo backbone; None while it is not shipped."""
    if not (directory / MANIFEST_FILE).is_file():
        return None
    return Hypernetwork.load(directory, backbone)
