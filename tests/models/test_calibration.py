"""Calibration's choices: the edit setting, the inner lr, and which groups it may look at."""

from __future__ import annotations

from PIL import Image

from models.calibration import choose_edit_setting, choose_inner_lr, tuning_groups
from models.worlds.layout import EditBenchmark, EditGroup


def row(lr: float, method: str, sr: float, gr: float, locality: float, steps: float = 10) -> dict:
    return dict(
        lr=lr,
        max_steps=50,
        stop_loss=0.5,
        method=method,
        sr=sr,
        gr=gr,
        locality=locality,
        steps_mean=steps,
    )


def test_the_edit_setting_fixes_every_edit_first_then_keeps_the_most_locality():
    rows = [
        row(1e-4, "random", 0.60, 0.2, 0.99),
        row(1e-4, "ft", 1.0, 0.5, 0.95),  # random fails
        row(1e-3, "random", 1.0, 0.4, 0.80),
        row(1e-3, "ft", 1.0, 0.8, 0.60),  # mean LR 0.70
        row(1e-2, "random", 1.0, 0.6, 0.70),
        row(1e-2, "ft", 1.0, 0.9, 0.50),  # mean LR 0.60
    ]
    assert choose_edit_setting(rows) == (1e-3, 50, 0.5)
    assert choose_edit_setting(rows[:2]) is None  # nothing fixes every edit


def test_the_inner_lr_learns_most_with_selective_masks():
    rows = [
        {"inner_lr": 1e-3, "kl_drop": 0.001, "s_density": 0.003},  # the paper's: masks empty
        {"inner_lr": 1e-2, "kl_drop": 0.08, "s_density": 0.04},
        {"inner_lr": 1e-1, "kl_drop": 0.25, "s_density": 0.06},
        {"inner_lr": 1.0, "kl_drop": 0.40, "s_density": 0.70},  # learns, but selects most neurons
    ]
    assert choose_inner_lr(rows) == 1e-1
    assert choose_inner_lr(rows[:1]) is None


def _groups(names: list[str], split: str = "all") -> list[EditGroup]:
    image = Image.new("L", (4, 4))
    return [EditGroup(n, i, [image, image], split) for i, n in enumerate(names)]


def test_tuning_groups_are_the_tuning_half_or_a_seeded_half():
    halves = EditBenchmark(_groups(["a", "b"], "tuning") + _groups(["c", "d"], "test"), [])
    assert [g.name for g in tuning_groups(halves).groups] == ["a", "b"]

    names = [f"g{i}" for i in range(10)]
    plain = EditBenchmark(_groups(names), [])
    first = [g.name for g in tuning_groups(plain, seed=0).groups]
    assert first == [g.name for g in tuning_groups(plain, seed=0).groups]  # same seed, same half
    assert len(first) == 5 and set(first) <= set(names)
    assert first != [g.name for g in tuning_groups(plain, seed=1).groups]


def test_a_calibration_keeps_the_default_density_a_tuning_half_chose(tmp_path):
    import shutil

    from models.calibration import EditSearch, write_calibration
    from models.store.manifest import BackboneManifest
    from models.worlds import tiny_imagenet as tin

    path = tmp_path / "backbone.json"
    shutil.copy(tin.ASSETS / "backbone.json", path)  # records rho 0.02 (choose_default_rho.py)
    written = write_calibration(path, EditSearch([], (1e-3, 20, 0.1), 1.0), None, "cmd", [])
    expected = {"lr": 1e-3, "max_steps": 20, "stop_loss": 0.1, "rho": 0.02}
    assert written.extra["edit_defaults"] == expected
    assert BackboneManifest.read(path).extra["edit_defaults"] == expected
