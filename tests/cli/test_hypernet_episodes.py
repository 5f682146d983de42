"""`vitedit hypernet train --episodes`: CutMix stays the default; failures need their file."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.hypernet import _episode_source
from cli.main import build_parser

EDIT = {"lr": 3e-4, "max_steps": 50, "stop_loss": 0.5}  # a backbone's edit setting


def parse(*argv: str):
    return build_parser().parse_args(["hypernet", "train", "--world", "tiny-imagenet", *argv])


def test_cutmix_is_the_default_episode_source_and_is_recorded() -> None:
    args = parse()
    assert args.episodes == "cutmix" and args.failures is None
    assert _episode_source(args, backbone=None) == (None, {"kind": "cutmix"})


def test_failures_need_their_file_and_a_file_needs_failures() -> None:
    with pytest.raises(SystemExit, match="needs --failures"):
        _episode_source(parse("--episodes", "failures"), backbone=None)
    with pytest.raises(SystemExit, match="needs --episodes failures"):
        _episode_source(parse("--failures", "f.npz"), backbone=None)
    with pytest.raises(SystemExit, match="sibling-per-spill reads each failure's sibling"):
        _episode_source(parse("--target-pick", "sibling-per-spill"), backbone=None)
    assert parse("--target-pick", "sibling-per-spill").target_pick == "sibling-per-spill"
    assert parse().target_pick is None  # the config's default, spill


def test_the_failure_options_parse() -> None:
    args = parse("--episodes", "failures", "--failures", "f.npz", "--failure-target", "uniform")
    assert args.failures == Path("f.npz") and args.failure_target == "uniform"
    build = build_parser().parse_args(
        ["hypernet", "failures", "--world", "tiny-imagenet", "--root", "d.tar.gz", "--out", "f.npz"]
    )
    assert build.seed == 0 and build.out == Path("f.npz")


def test_the_outer_lr_reaches_the_config_and_a_bad_rate_says_which() -> None:
    from cli.hypernet import _config, _options
    from models.hypernet.metatrain import MetaTrainConfig

    cfg = _config(_options(parse("--outer-lr", "0.03"), {}, EDIT))
    assert cfg.outer_lr == 0.03 and cfg.inner_lr == 0.1  # the world's recipe keeps the rest
    with pytest.raises(SystemExit, match=r"vitedit hypernet train: .*outer_lr must be positive"):
        _config(_options(parse("--outer-lr", "0"), {}, EDIT))
    with pytest.raises(ValueError, match=r"outer_lr must be positive.*outer_lr=nan"):
        MetaTrainConfig(outer_lr=float("nan"))
    with pytest.raises(ValueError, match="batch must be at least 1; inner_lr must be positive"):
        MetaTrainConfig(batch=0, inner_lr=-1.0)


def test_the_rmsprop_inner_loop_takes_the_edit_lr_unless_an_inner_lr_is_given() -> None:
    from cli.hypernet import _config, _options

    # the recipe's and the calibrated inner lrs are SGD's (0.1, 1.0): far too large for RMSprop
    cfg = _config(_options(parse("--inner-optimiser", "rmsprop"), {"inner_lr": 1.0}, EDIT))
    assert cfg.inner_optimiser == "rmsprop" and cfg.inner_lr == 3e-4
    given = parse("--inner-optimiser", "rmsprop", "--inner-lr", "1e-3")
    assert _config(_options(given, {}, EDIT)).inner_lr == 1e-3
    assert _config(_options(parse(), {"inner_lr": 1.0}, EDIT)).inner_lr == 1.0  # sgd: unchanged
    with pytest.raises(SystemExit):  # argparse: not one of sgd, rmsprop
        parse("--inner-optimiser", "adam")


def test_the_regression_target_is_the_papers_unless_movement_is_asked_for() -> None:
    from cli.hypernet import _config, _options

    assert _config(_options(parse(), {}, EDIT)).regression_target == "logits"
    moved = _config(_options(parse("--regression-target", "movement"), {}, EDIT))
    assert moved.regression_target == "movement"
    with pytest.raises(SystemExit):  # argparse: not one of logits, movement
        parse("--regression-target", "ranks")


def test_the_search_start_and_outer_optimiser_reach_the_config() -> None:
    from cli.hypernet import _config, _options

    cfg = _config(_options(parse(), {}, EDIT))
    assert (cfg.search_start, cfg.outer_optimiser) == ("uniform", "rmsprop")  # the paper's
    given = parse("--search-start", "zero", "--outer-optimiser", "sgd", "--outer-lr", "1000")
    cfg = _config(_options(given, {}, EDIT))
    assert (cfg.search_start, cfg.outer_optimiser, cfg.outer_lr) == ("zero", "sgd", 1000.0)
    for bad in (("--search-start", "gauss"), ("--outer-optimiser", "adam")):
        with pytest.raises(SystemExit):
            parse(*bad)


def test_edit_targets_take_the_backbones_edit_setting_unless_given() -> None:
    from cli.hypernet import _config, _options

    assert _config(_options(parse(), {}, EDIT)).target_source == "search"  # the paper's
    edits = parse("--target-from", "edits", "--inner-optimiser", "rmsprop", "--candidates", "6")
    cfg = _config(_options(edits, {}, {"lr": 1e-3, "max_steps": 30, "stop_loss": 0.25}))
    assert (cfg.target_source, cfg.candidates, cfg.inner_lr) == ("edits", 6, 1e-3)
    assert (cfg.edit_steps, cfg.edit_stop, cfg.edit_rho) == (30, 0.25, 0.02)
    given = parse("--target-from", "edits", "--inner-optimiser", "rmsprop", "--edit-steps", "9")
    assert _config(_options(given, {}, EDIT)).edit_steps == 9
    with pytest.raises(SystemExit, match="inner_optimiser must be rmsprop"):
        _config(_options(parse("--target-from", "edits"), {}, EDIT))  # the recipe's sgd
    bad = parse("--target-from", "edits", "--inner-optimiser", "rmsprop", "--candidates", "1")
    with pytest.raises(SystemExit, match="candidates must be 2"):
        _config(_options(bad, {}, EDIT))
    bad = parse("--target-from", "edits", "--inner-optimiser", "rmsprop", "--edit-rho", "0")
    with pytest.raises(SystemExit, match=r"edit_rho must be in \(0, 1\]"):
        _config(_options(bad, {}, EDIT))
    spill = parse("--target-from", "edits", "--inner-optimiser", "rmsprop", "--spill-anchors", "64")
    assert _config(_options(spill, {}, EDIT)).spill_anchors == 64
    assert _config(_options(edits, {}, EDIT)).spill_anchors == 0  # off unless asked
    with pytest.raises(SystemExit, match="spill_anchors needs targets from edits"):
        _config(_options(parse("--spill-anchors", "64"), {}, EDIT))
    with pytest.raises(SystemExit):  # argparse: not one of search, edits
        parse("--target-from", "oracle")


def test_the_anchor_draws_reach_the_config_and_are_bounded() -> None:
    from cli.hypernet import _config, _options

    assert _config(_options(parse(), {}, EDIT)).anchor_draws == 4  # the default
    draws = parse("--anchors", "32", "--anchor-draws", "16")
    cfg = _config(_options(draws, {}, EDIT))
    assert (cfg.anchors, cfg.anchor_draws) == (32, 16)
    with pytest.raises(SystemExit, match="anchor_draws must be at least 1"):
        _config(_options(parse("--anchor-draws", "0"), {}, EDIT))
    with pytest.raises(SystemExit, match="batch x anchors x anchor_draws must be at most"):
        _config(_options(parse("--anchors", "64", "--anchor-draws", "99999999"), {}, EDIT))
