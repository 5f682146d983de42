"""The README as a newcomer follows it: every ``vitedit`` command it shows exists with those
flags, bare ``vitedit`` comes after the line that puts the venv on PATH, both API-key variables
are named, and what the session downloads stays out of git."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
FENCED = re.compile(r"```(?:bash|sh)?\n(.*?)```", re.S)
INLINE = re.compile(r"(?<!`)`((?:\.venv/bin/)?vitedit [^`]+)`(?!`)")
PLACEHOLDERS = {"MU": "1000"}  # prose spans name a value: `--locality MU`
SHELL_ENDS = {"|", "||", "&&", ";", ")", ">", "2>"}


def _commands_in(text: str) -> list[list[str]]:
    """``vitedit`` argument lists in ``text`` (one shell line each, continuations joined)."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            if word in ("vitedit", ".venv/bin/vitedit"):
                argv = []
                for arg in words[i + 1 :]:
                    if arg in SHELL_ENDS:
                        break
                    argv.append(PLACEHOLDERS.get(arg, arg))
                found.append(argv)
    return found


def fenced_commands() -> list[list[str]]:
    """Commands of the README's code blocks: whole command lines, run as they stand."""
    return [argv for block in FENCED.findall(README) for argv in _commands_in(block)]


def inline_commands() -> list[list[str]]:
    """Commands named in prose (`vitedit bench`, `vitedit hypernet train --locality MU`): often
    a part of a command line, so only their subcommand and flags are checked."""
    return [
        [PLACEHOLDERS.get(a, a) for a in shlex.split(span)[1:]] for span in INLINE.findall(README)
    ]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_the_readme_shows_the_cli_at_all() -> None:
    commands = fenced_commands() + inline_commands()
    assert len(commands) >= 15
    for needed in ("edit", "versions", "download", "demo", "bench", "hypernet"):
        assert any(argv and argv[0] == needed for argv in fenced_commands()), needed


@pytest.mark.parametrize("argv", fenced_commands(), ids=" ".join)
def test_every_readme_command_line_parses(argv: list[str]) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's answer to an unknown command, flag or value
        if exc.code != 0:  # 0: --help
            pytest.fail(f"`vitedit {' '.join(argv)}` does not parse (exit {exc.code})")


@pytest.mark.parametrize("argv", inline_commands(), ids=" ".join)
def test_every_command_the_prose_names_exists_with_those_flags(argv: list[str]) -> None:
    parser, words = build_parser(), list(argv)
    while words and words[0] in _subparsers(parser):
        parser = _subparsers(parser)[words.pop(0)]
    assert parser.prog != "vitedit" or not words or words[0].startswith("-"), argv
    known = {flag for action in parser._actions for flag in action.option_strings}
    flags = [w.split("=")[0] for w in words if w.startswith("--")]
    assert not [f for f in flags if f not in known], f"{parser.prog}: unknown {flags}"


def test_bare_vitedit_comes_after_the_venv_is_on_path() -> None:
    activate = README.find("source .venv/bin/activate")
    assert activate >= 0, "the README never says how to put `vitedit` on PATH"
    bare = re.search(r"(?m)(?:^|`|\$ |# )vitedit \w", README[: README.find("## The demo world")])
    assert bare is not None and activate < bare.start()


def test_readme_names_both_api_key_variables_side_by_side() -> None:
    client, server = README.find("`VITEDIT_API_KEY`"), README.find("`VITEDIT_API_KEYS`")
    assert client >= 0 and server >= 0
    assert abs(client - server) < 400  # in the same short table
    assert "--api-key" in README


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("demo-vit-v20261122-015000-3f9a2c.patch.safetensors", True),  # curl -OJ in the root
        ("demo-vit-v20261122-015000-3f9a2c.safetensors", True),
        ("shirt.png", True),
        ("session/shirt.png", True),
        ("session/demo-vit-v1.patch.safetensors", True),
        ("models/assets/demo/backbone.safetensors", False),  # shipped: never ignored
        ("models/assets/demo/hypernet/hypernet.safetensors", False),
        ("models/assets/other/weights.safetensors", False),
        ("docs/bench/gr_vs_lr.png", False),
    ],
)
def test_gitignore_keeps_session_downloads_out_and_assets_in(path: str, ignored: bool) -> None:
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, capture_output=True
    )
    if done.returncode == 128:
        pytest.skip(f"not a git checkout: {done.stderr.decode().strip()}")
    assert (done.returncode == 0) is ignored, path
