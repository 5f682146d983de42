"""Class names of a backbone manifest: each class is chosen by its name and only by it, and a
label is a class index only when it is ASCII digits (models/store/manifest.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from models.errors import DataError, ManifestError
from models.store.manifest import BackboneManifest, MethodInfo, ModelEntry


def manifest(names: list[str]) -> BackboneManifest:
    return BackboneManifest.from_json({"name": "b", "timm_name": "vit", "class_names": names})


def entry(names: tuple[str, ...]) -> ModelEntry:
    return ModelEntry(
        name="m",
        backbone="b.json",
        weights_sha256="a" * 64,
        num_classes=len(names),
        class_names=names,
        default_method="ft",
        methods={"ft": MethodInfo(options={})},
    )


@pytest.mark.parametrize(
    ("names", "why"),
    [
        (["Cat", "cat", "dog"], r"differ only by case: 'Cat' \(class 0\) and 'cat' \(class 1\)"),
        (["dog", "STRASSE", "straße"], r"'STRASSE' \(class 1\) and 'straße' \(class 2\)"),
        (["cat", " Cat "], r"'cat' \(class 0\) and ' Cat ' \(class 1\)"),
        (["cat", "7"], r"class 1 is named '7', which as a label is a class index"),
        (["-1", "cat"], r"class 0 is named '-1'"),
        (["0" * 25], r"class 0 is named '0000"),
        (["a", "a"], r"name classes twice: \['a'\]"),
    ],
)
def test_class_names_a_label_could_not_tell_apart_are_refused(names: list[str], why: str) -> None:
    with pytest.raises(ManifestError, match=why):
        manifest(names)


@pytest.mark.parametrize(
    "names",
    [
        ["0", "1", "2"],  # the default names (a manifest without class_names): each its own index
        ["cat", "1", "dog", "03"],  # '03' as a label is index 3: the same class
        ["\u0660", "cat"],  # an Arabic-Indic zero is a name, not an index
        ["T-shirt/top", "Trouser"],
    ],
)
def test_class_names_every_label_tells_apart_are_kept(names: list[str]) -> None:
    assert manifest(names).class_names == tuple(names)


def test_the_shipped_backbones_names_pass() -> None:
    assets = Path(__file__).parents[3] / "models" / "assets"
    backbones = sorted(assets.glob("*/backbone.json"))
    assert len(backbones) >= 2
    for path in backbones:
        assert BackboneManifest.read(path).class_names


def test_a_label_is_an_index_only_in_ascii_digits() -> None:
    model = entry(("cat", "dog", "\u0660"))
    assert model.label_index("0") == 0 and model.label_index(" 2 ") == 2
    assert model.label_index("\u0660") == 2  # the class of that name, not index 0
    with pytest.raises(DataError, match="unknown label"):
        model.label_index("\u0661")  # an Arabic-Indic one: not index 1
    with pytest.raises(DataError, match="out of range"):
        model.label_index("-1")


def test_an_exact_name_wins_over_a_case_insensitive_one() -> None:
    """An entry registered before names differing by case were refused: 'Cat' chose 'cat'."""
    model = entry(("Cat", "cat", "dog"))
    assert model.label_index("Cat") == 0 and model.label_index("cat") == 1
    assert model.label_index("DOG") == 2
    assert replace(model, class_names=("cat", "Cat", "dog")).label_index("Cat") == 1
