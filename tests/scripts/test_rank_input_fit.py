"""scripts/rank_input_fit.py: the best fit of a target that is a ranking's top rho, by how the
ranking is fed, against a perfect fit and a constant guess."""

from __future__ import annotations

import re

from tests.scripts import run_script


def rows(stdout: str) -> dict[tuple[str, str], float]:
    """(share, fed as) -> best BCE, from the printed table."""
    found = re.findall(r"^\| ([0-9.]+) \| ([^|]+?) \| ([0-9.]+) \|", stdout, flags=re.M)
    return {(share, fed): float(bce) for share, fed, bce in found}


def test_only_an_indicator_of_the_top_reaches_a_perfect_fit_and_a_linear_rank_barely_helps() -> (
    None
):
    run = run_script("rank_input_fit", "--share", "1", "--entries", "2000")
    assert run.returncode == 0, run.stderr
    bce = rows(run.stdout)
    perfect, constant = bce[("1", "a perfect fit")], bce[("1", "a constant guess")]
    linear = bce[("1", "its rank in [-1, 1] (what the networks read)")]
    tail = bce[("1", "-log(1 - q) (a tail that grows at the top)")]
    indicator = bce[("1", "1 on the ranking's top 0.02, else 0")]
    assert perfect < constant
    assert abs(indicator - perfect) <= 2e-4  # the top's indicator is the target itself
    assert perfect < tail < linear < constant  # the sharper the feature, the better the fit
    assert (constant - linear) < 0.25 * (constant - perfect)  # a linear rank: little to gain


def test_bad_arguments_get_one_line_errors() -> None:
    # its own checks (a bound that keeps a run short, a rho out of range); argparse's
    for args in (["--entries", "1000000"], ["--rho", "2"], ["--share", ","]):
        run = run_script("rank_input_fit", *args)
        assert run.returncode != 0 and "Traceback" not in run.stderr, args
        assert args[0] in run.stderr, args  # the message names the argument to fix
