"""`vitedit calibrate` on a backbone that is not built in: the demo ViT copied to a folder, its
benchmark exported in the paper's layout, unlabeled images for the inner-lr search."""

from __future__ import annotations

import argparse

from cli.hypernet import _CONFIG_OPTIONS, _options
from cli.main import main
from models.store.manifest import BackboneManifest
from models.worlds import demo


def test_calibrate_writes_the_measured_choices_that_hypernet_train_then_uses(
    demo_as_user, capsys
) -> None:
    user = demo_as_user
    code = main(
        [
            "calibrate",
            *("--backbone", str(user.manifest)),
            *("--groups", str(user.groups)),
            *("--locality", str(user.locality)),
            *("--images", str(user.images)),
            *("--lrs", "1e-3", "--stop-losses", "0.5", "--inner-lrs", "1e-3,0.1"),
            *("--max-groups", "2", "--edits", "1", "--write"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    extra = BackboneManifest.read(user.manifest).extra
    assert extra["edit_defaults"] == {"lr": 1e-3, "max_steps": 50, "stop_loss": 0.5}
    assert extra["meta_defaults"] == {"inner_lr": 0.1}  # the paper's 1e-3 leaves masks empty
    evidence = extra["calibration"]
    assert len(evidence["edit"]["rows"]) == 2 and len(evidence["inner_lr"]["rows"]) == 2
    paper = evidence["inner_lr"]["rows"][0]
    assert paper["inner_lr"] == 1e-3 and paper["kl_drop"] < 0.01
    assert len(evidence["tuning_groups"]) == len(demo.load_world().benchmark.groups) // 2
    assert "chosen: inner lr 0.1" in out

    args = argparse.Namespace(world=None, width=None, **dict.fromkeys(_CONFIG_OPTIONS))
    assert _options(args, extra["meta_defaults"], extra["edit_defaults"])["inner_lr"] == 0.1
    args.inner_lr = 0.5
    assert (
        _options(args, extra["meta_defaults"], extra["edit_defaults"])["inner_lr"] == 0.5
    )  # an explicit option wins
