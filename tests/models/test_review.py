"""The review figures (models/review.py): what each section counts, the PNGs it writes, the mask's
per-neuron changes and where the benchmark front comes from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.reports import ReportSets, TokenSet
from models.review import (
    REVIEW_DIR,
    ReviewInputs,
    neuron_changes,
    read_front,
    thumbnail,
    write_review,
)
from models.sites import Patch, Sites
from tests.conftest import tiny_vit

NAMES = tuple(f"class-{i}" for i in range(10))
SHA = "ab" * 32


def noise(seed: int, size: int = 28, mode: str = "L") -> Image.Image:
    shape = (size, size) if mode == "L" else (size, size, 3)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def token_set(targets: list[int] | None, n: int, seed: int) -> TokenSet:
    labels = torch.tensor(targets) if targets is not None else None
    return TokenSet(torch.zeros(n, 2, 4), labels, [noise(seed + i) for i in range(n)])


def bench_results(path: Path, sha: str = SHA) -> Path:
    """A `vitedit bench` results.json reduced to what the review reads."""
    methods = {
        "where2edit": {"front": [{"lr": 0.84, "gr": 0.37, "knob": 0.1, "sr": 1.0}]},
        "ft": {"front": [{"lr": 0.79, "gr": 0.47, "knob": None, "sr": 1.0}]},
    }
    data = {"backbone": {"sha256": sha}, "methods": methods, "settings": {"lr": 3e-4}}
    path.write_text(json.dumps(data))
    return path


def inputs(front_path: Path | None) -> ReviewInputs:
    """One edit image fixed; held out: one failure fixed, one not, one image broken; two of
    four locality images flipped; one of two earlier edit images kept."""
    sets = ReportSets(
        edit=token_set([3], 1, 0),
        holdout=token_set([3, 3, 3, 3], 4, 10),
        holdout_source="benchmark",
        locality=token_set(None, 4, 20),
        retention={"v20260101-000000-aaaaaa": token_set([2, 2], 2, 30)},
    )
    before = {
        "edit": torch.tensor([5]),
        "holdout": torch.tensor([5, 5, 3, 3]),
        "locality": torch.tensor([0, 1, 2, 3]),
    }
    after = {
        "edit": torch.tensor([3]),
        "holdout": torch.tensor([3, 5, 3, 1]),
        "locality": torch.tensor([0, 3, 2, 1]),
        "retention:v20260101-000000-aaaaaa": torch.tensor([2, 4]),
    }
    changes = {"blocks.1.mlp": np.zeros((2, 64), np.float32)}
    changes["blocks.1.mlp"][0, [1, 5]] = [0.5, 1.0]
    front, note = read_front(front_path, SHA)
    retention_images = {"v20260101-000000-aaaaaa": [noise(30), noise(31)]}
    metrics = {"SR": 1.0, "GR": 0.5, "LR_vs_parent": 0.5}
    return ReviewInputs(sets, before, after, metrics, NAMES, changes, retention_images, front, note)


def test_write_review_counts_what_each_section_shows(tmp_path: Path) -> None:
    summary = write_review(tmp_path, inputs(bench_results(tmp_path / "results.json")))
    assert summary["holdout"] == {
        "source": "benchmark",
        "images": 4,
        "failures": 2,
        "fixed": 1,
        "not_fixed": 1,
        "broken": 1,
    }
    assert summary["locality"]["flipped"] == 2
    assert summary["locality"]["flips"] == [
        {"old": 1, "new": 3, "count": 1},
        {"old": 3, "new": 1, "count": 1},
    ]
    assert summary["retention"] == {"v20260101-000000-aaaaaa": {"images": 2, "kept": 1}}
    assert summary["mask"] == {"blocks.1.mlp": {"hidden": 64, "fc1": 2, "fc2": 0}}
    assert summary["front"]["point"] == {"LR": 0.5, "GR": 0.5}
    assert set(summary["front"]["methods"]) == {"where2edit", "ft"}
    json.dumps(summary)  # it goes into the manifest


def test_write_review_writes_one_png_per_figure_in_the_review_folder(tmp_path: Path) -> None:
    summary = write_review(tmp_path, inputs(None))
    expected = {
        "edits",
        "holdout_fixed",
        "holdout_not_fixed",
        "locality",
        "retention",
        "mask",
        "front",
    }
    assert set(summary["figures"]) == expected
    for name, file in summary["figures"].items():
        assert file == f"{REVIEW_DIR}/{name}.png"
        with Image.open(tmp_path / file) as im:
            assert im.format == "PNG" and min(im.size) > 50
    assert sorted(p.name for p in (tmp_path / REVIEW_DIR).iterdir()) == sorted(
        f"{n}.png" for n in expected
    )


def test_sections_without_images_write_no_figure(tmp_path: Path) -> None:
    review = inputs(None)
    review.sets.holdout = None
    review.after["locality"] = review.before["locality"]  # nothing flipped
    review.metrics = {"SR": 1.0}  # no GR: no point to place, and no front registered
    summary = write_review(tmp_path, review)
    assert summary["holdout"] == {"source": None, "images": 0}
    assert summary["locality"]["flipped"] == 0
    assert not {"holdout_fixed", "holdout_not_fixed", "locality", "front"} & set(summary["figures"])
    assert summary["front"]["point"] is None


def test_front_without_registered_results_shows_the_point_alone(tmp_path: Path) -> None:
    summary = write_review(tmp_path, inputs(None))
    assert summary["front"]["methods"] == {} and summary["front"]["source"] is None
    assert "shown alone" in summary["front"]["note"]
    assert "front" in summary["figures"]


def test_read_front_reads_each_methods_front_with_the_bench_settings(tmp_path: Path) -> None:
    front, note = read_front(bench_results(tmp_path / "r.json"), SHA)
    assert front is not None
    assert front.methods["where2edit"] == [{"lr": 0.84, "gr": 0.37, "knob": 0.1}]
    assert "r.json" in note and "lr 0.0003" in note


def test_read_front_refuses_results_measured_on_other_weights(tmp_path: Path) -> None:
    front, note = read_front(bench_results(tmp_path / "r.json", sha="cd" * 32), SHA)
    assert front is None and "other base weights" in note


def test_read_front_of_an_unreadable_file_is_a_note_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("{not json")
    front, note = read_front(tmp_path / "r.json", SHA)
    assert front is None and "unreadable" in note


def test_read_front_names_the_results_file_without_this_hosts_folder(tmp_path: Path) -> None:
    """The note and the source reach clients (the page, the manifest): no server path."""
    readable = read_front(bench_results(tmp_path / "r.json"), SHA)
    other = read_front(bench_results(tmp_path / "o.json", sha="cd" * 32), SHA)
    missing = read_front(tmp_path / "gone.json", SHA)  # its OSError names the full path
    assert readable[0] is not None and readable[0].source == "r.json"
    for front, note in (readable, other, missing):
        assert str(tmp_path) not in note and (front is None or str(tmp_path) not in front.source)
    assert "gone.json" in missing[1]


def test_neuron_changes_measure_each_changed_row_and_column_only() -> None:
    model = tiny_vit()
    sites = Sites.for_model(model, (1, 2))
    before = [p.detach().clone() for p in sites.params(model)]
    after = [w.clone() for w in before]
    after[0][3] += 2.0  # blocks.1 fc1 row 3: |dW| = 2 * sqrt(in)
    after[3][:, 7] -= 1.0  # blocks.2 fc2 column 7: |dW| = sqrt(out)
    patch = Patch.from_diff(sites, before, after)
    changes = neuron_changes(sites, before, patch)
    assert set(changes) == {"blocks.1.mlp", "blocks.2.mlp"}
    one, two = changes["blocks.1.mlp"], changes["blocks.2.mlp"]
    assert one.shape == (2, sites.hidden[0])
    assert one[0, 3] == pytest.approx(2.0 * before[0].shape[1] ** 0.5, rel=1e-5)
    assert two[1, 7] == pytest.approx(before[3].shape[0] ** 0.5, rel=1e-5)
    assert np.count_nonzero(one) == 1 and np.count_nonzero(two) == 1


def test_thumbnail_shrinks_large_images_and_keeps_small_ones() -> None:
    large = thumbnail(noise(1, size=400, mode="RGB"))
    assert max(large.size) == 96 and large.mode == "RGB"
    small = thumbnail(noise(2))
    assert small.size == (28, 28) and small.mode == "L"


def test_a_section_that_fails_to_draw_costs_only_that_section(tmp_path: Path) -> None:
    review = inputs(None)
    review.changes = {"blocks.1.mlp": np.zeros(64, np.float32)}  # not (2, hidden): IndexError
    summary = write_review(tmp_path, review)
    assert set(summary["errors"]) == {"mask"} and "IndexError" in summary["errors"]["mask"]
    assert "mask" not in summary["figures"] and not (tmp_path / REVIEW_DIR / "mask.png").exists()
    assert {"edits", "locality", "retention", "front"} <= set(summary["figures"])
