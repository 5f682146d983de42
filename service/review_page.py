"""The review page of a version: one HTML page, rendered from its manifest alone. Torch-free.

The figures are PNGs the worker drew at report time (:mod:`models.review`), listed in the manifest
with their sha256; the numbers come from the manifest's ``report`` and ``review``. The page is a
``string.Template`` with its CSS inline: no build step, no script, nothing from another host.
Every value from a manifest or a registry entry is HTML-escaped.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from string import Template
from typing import Any

from models.store.manifest import VersionManifest

PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Review of $model@$version</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1em 2em;
       color: #1f2328; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #d0d7de; padding: .25em .6em; text-align: left; }
th { background: #f6f8fa; } img { max-width: 100%; border: 1px solid #d0d7de; margin: .4em 0; }
.note { color: #57606a; font-style: italic; } .good { color: #1a7f37; } .bad { color: #cf222e; }
.status { padding: .1em .5em; border-radius: 1em; background: #ddf4ff; }
.status.rejected { background: #ffebe9; } code { background: #f6f8fa; padding: 0 .2em; }
</style></head><body>
<h1>Review of <code>$model</code> version <code>$version</code></h1>
<p><span class="status $status">$status</span> $reason</p>
<p>parent: $parent &middot; method <code>$method</code> &middot; created $created &middot;
<a href="$version_url">manifest and report (JSON)</a> &middot; <a href="$patch_url">patch</a></p>
$sections
</body></html>
""")

OLD = "this version was stored before review figures existed: no figure"
METRICS = ("SR", "GR", "LR_vs_parent", "LR_vs_root")  # the summary's order
TITLES = {
    "summary": "Summary",
    "edits": "Edit images: predictions before and after",
    "holdout": "Held-out failures fixed and not fixed",
    "locality": "Locality images that flipped",
    "retention": "Retention of earlier edits",
    "mask": "Mask: where the edit changed the network",
    "front": "GR / LR on the model's benchmark front",
}
SOURCES = {
    "request": "the request's holdout images",
    "benchmark": "the model's benchmark groups of the target label",
}


def _e(value: object) -> str:
    return escape(str(value))


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return ""
    cells = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


class ReviewPage:
    """The page of one version: ``figure_url(name)`` is where the figure ``name`` is served."""

    def __init__(
        self,
        manifest: VersionManifest,
        class_names: tuple[str, ...],
        versions_url: str,
        figure_url: Callable[[str], str],
    ) -> None:
        self.m = manifest
        self.names = class_names
        self.versions_url = versions_url  # /v1/models/<model>/versions
        self.figure_url = figure_url
        self.report: dict[str, Any] = manifest.report
        self.review: dict[str, Any] = manifest.review

    def render(self) -> str:
        m = self.m
        return PAGE.substitute(
            model=_e(m.model),
            version=_e(m.version),
            status=_e(m.status),
            reason=_e(m.reason or ""),
            parent=self.link(m.parent) if m.parent else "the base backbone",
            method=_e(m.method),
            created=_e(m.created_at),
            version_url=f"{self.versions_url}/{_e(m.version)}",
            patch_url=f"{self.versions_url}/{_e(m.version)}/patch",
            sections="\n".join(
                f'<section id="{key}"><h2>{_e(title)}</h2>\n{getattr(self, key)()}</section>'
                for key, title in TITLES.items()
            ),
        )

    # ------------------------------------------------------------------ pieces

    def name(self, label: int) -> str:
        text = self.names[label] if 0 <= label < len(self.names) else str(label)
        return f"{_e(text)} ({_e(label)})"

    def link(self, version: str) -> str:
        return f'<a href="{self.versions_url}/{_e(version)}/review"><code>{_e(version)}</code></a>'

    def unavailable(self, section: str) -> str | None:
        """Why a section has no numbers or figures: an old version, or a drawing error."""
        if not self.review:
            return OLD
        error = self.review.get("errors", {}).get(section)
        return f"this section could not be drawn ({error})" if error else None

    def figure(self, key: str, missing: str) -> str:
        if key in self.review.get("figures", {}):
            return f'<img src="{self.figure_url(key)}" alt="{_e(key.replace("_", " "))}">'
        return _note(self.unavailable(key.split("_")[0]) or missing)

    # ------------------------------------------------------------------ sections

    def summary(self) -> str:
        after, before = self.report.get("metrics", {}), self.report.get("before", {})
        order = [k for k in METRICS if k in after] + sorted(set(after) - set(METRICS))
        rows = [[_e(k), _share(before.get(k)), _share(after[k])] for k in order]
        edit = self.report.get("edit", {})
        facts = (
            f"<p>{_e(edit.get('steps', '-'))} optimiser steps, final loss "
            f"{_e(edit.get('final_loss', '-'))}; {_e(edit.get('edit_neurons', '-'))} neurons "
            f"changed by this edit ({_e(edit.get('patch_neurons', '-'))} by the lineage).</p>"
        )
        return _table(["metric", "before", "after"], rows) + facts

    def edits(self) -> str:
        preds = self.report.get("edit_predictions", {})
        triples = zip(*(preds.get(k, []) for k in ("targets", "before", "after")), strict=False)
        rows = [
            [str(i), self.name(t), self.name(b), self.marked(a, a == t)]
            for i, (t, b, a) in enumerate(triples)
        ]
        table = _table(["image", "target", "before", "after"], rows)
        return table + self.figure("edits", "no edit images kept")

    def marked(self, label: int, good: bool) -> str:
        return f'<span class="{"good" if good else "bad"}">{self.name(label)}</span>'

    def holdout(self) -> str:
        h = self.review.get("holdout") or {}
        if reason := self.unavailable("holdout"):
            return _note(reason)
        if not h.get("images"):
            return _note(
                "No held-out images: the request sent no holdout and the model has no "
                "benchmark group of the target label, so GR is not measured."
            )
        source = SOURCES.get(h.get("source"), h.get("source"))
        text = (
            f"<p>{_e(h['images'])} held-out images ({_e(source)}); {_e(h['failures'])} were "
            f'failures before the edit: <span class="good">{_e(h["fixed"])} fixed</span>, '
            f'<span class="bad">{_e(h["not_fixed"])} not fixed</span>; {_e(h["broken"])} were '
            "right before and are wrong after.</p>"
        )
        fixed = self.figure("holdout_fixed", "no held-out failure was fixed")
        not_fixed = self.figure("holdout_not_fixed", "every held-out failure was fixed")
        return f"{text}<h3>Fixed</h3>{fixed}<h3>Not fixed</h3>{not_fixed}"

    def locality(self) -> str:
        loc = self.review.get("locality") or {}
        if reason := self.unavailable("locality"):
            return _note(reason)
        if not loc.get("images"):
            return _note("The model has no locality set: LR is not measured.")
        rows = [[self.name(f["old"]), self.name(f["new"]), _e(f["count"])] for f in loc["flips"]]
        text = (
            f"<p>{_e(loc['flipped'])} of {_e(loc['images'])} locality images changed their "
            "prediction (against the parent version).</p>"
        )
        table = _table(["old class", "new class", "images"], rows)
        return text + table + self.figure("locality", "no locality image flipped")

    def retention(self) -> str:
        per_version = self.report.get("retention", {}).get("per_version", {})
        if not per_version:
            return _note("The first edit over the base backbone: no earlier edit to retain.")
        counts = self.review.get("retention") or {}
        rows = [
            [
                self.link(v),
                f"{_e(counts[v]['kept'])} of {_e(counts[v]['images'])}" if v in counts else "-",
                _share(share),
            ]
            for v, share in per_version.items()
        ]
        table = _table(["earlier version", "edit images still right", "retention"], rows)
        return table + self.figure("retention", "no earlier edit images kept")

    def mask(self) -> str:
        rows = [
            [f"<code>{_e(site)}</code>", _e(v["fc1"]), _e(v["fc2"]), _e(v["hidden"])]
            for site, v in (self.review.get("mask") or {}).items()
        ]
        edit = self.report.get("edit", {})
        text = (
            f"<p>The method was allowed {_e(edit.get('mask_entries') or 'all')} of "
            f"{_e(edit.get('n_entries', '-'))} mask entries (fc1 rows and fc2 columns); the "
            "heatmaps show, per site and per neuron, how much its row and column changed.</p>"
        )
        table = _table(["site", "fc1 rows changed", "fc2 columns changed", "neurons"], rows)
        return text + table + self.figure("mask", "no mask figure")

    def front(self) -> str:
        f = self.review.get("front") or {}
        point = f.get("point")
        where = (
            f"<p>This edit: GR {_share(point['GR'])}, LR {_share(point['LR'])} "
            "(against its parent).</p>"
            if point
            else _note("This edit has no GR/LR point (no held-out images or no locality set).")
        )
        note = _note(f["note"]) if f.get("note") else ""
        return where + note + self.figure("front", "nothing to plot")
