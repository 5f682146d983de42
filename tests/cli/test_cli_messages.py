"""What a newcomer sees first: ``vitedit --help``, the answer when no server runs, and how long
``vitedit demo failure`` takes. In-process (``cli.main.main``) except the timing, a real process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from cli import launcher
from cli.main import main


def test_help_describes_the_product_and_both_key_variables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and "under ``cli/``" not in out  # no developer docstring
    assert "Repair the mistakes of a pretrained vision transformer" in out
    assert "vitedit edit shirt.png --label T-shirt/top" in out
    assert re.search(r"VITEDIT_API_KEY\b", out) and "VITEDIT_API_KEYS" in out


@pytest.mark.parametrize("command", ["edit", "versions", "download"])
def test_server_commands_document_both_key_variables(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--api-key" in out and re.search(r"\$VITEDIT_API_KEY\b", out)
    assert "$VITEDIT_API_KEYS" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["versions", "demo-vit"],
        ["download", "demo-vit", "base"],  # streamed: it used to end in an httpx traceback
    ],
)
def test_no_server_is_one_line_saying_how_to_start_one(
    argv: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server = f"http://127.0.0.1:{launcher.free_port()}"
    out = tmp_path / "patch.safetensors"
    extra = ["--out", str(out)] if argv[0] == "download" else []
    assert main([*argv, *extra, "--server", server]) != 0
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()  # one line, however narrow the terminal
    assert line.startswith("error: no vitedit server answers at " + server)
    assert "make run" in line and "--server" in line
    assert "Traceback" not in captured.out + captured.err
    assert not out.exists() and not list(tmp_path.iterdir())  # no partial download left


def test_demo_failure_writes_the_shipped_image_without_loading_torch(tmp_path: Path) -> None:
    """It took 8.8 s (importing torch, timm and torchvision for one PNG); now well under 5 s,
    even on a busy 2-core machine (about 0.8 s measured)."""
    out = tmp_path / "shirt.png"
    code = (
        "import sys; from cli.main import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    argv = ["demo", "failure", "--group", "4-invert", "--index", "3", "--out", str(out)]
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "file": str(out),
        "group": "4-invert",
        "label": 4,
        "label_name": "Coat",
    }
    with Image.open(out) as image:
        assert image.size == (28, 28) and image.mode == "L"
    assert seconds < 5.0, f"vitedit demo failure took {seconds:.1f} s"


def test_demo_failure_image_is_the_worlds_own(tmp_path: Path) -> None:
    """The torch-free reader gives the very image the demo world's loader gives."""
    import numpy as np

    from models.worlds import demo as demo_world

    out = tmp_path / "x.png"
    assert (
        main(["demo", "failure", "--group", "6-lowlight", "--index", "7", "--out", str(out)]) == 0
    )
    group = {g.name: g for g in demo_world.load_world().benchmark.groups}["6-lowlight"]
    with Image.open(out) as image:
        assert np.array_equal(np.asarray(image), np.asarray(group.images[7]))


def test_demo_failure_names_the_groups_of_an_unknown_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "failure", "--group", "nope", "--out", str(tmp_path / "x.png")]) == 2
    assert "0-6" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("script", ["mask_probe", "locality_probe", "mask_diversity"])
def test_a_probe_script_says_a_wrong_locality_set_in_one_line(script: str) -> None:
    run = subprocess.run(
        [sys.executable, f"scripts/{script}.py", "--world", "demo", "--locality-rule", "reference"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == "error: world 'demo' has no locality set 'reference'; it has one"


@pytest.mark.parametrize("rho", ["5", "0", "nan"])
def test_the_locality_probe_refuses_a_density_outside_0_1_before_any_work(rho: str) -> None:
    run = subprocess.run(
        [sys.executable, "scripts/locality_probe.py", "--world", "demo", "--rho", rho],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert run.stderr.strip().endswith("must be a number in (0, 1]")


class _HostileServer(BaseHTTPRequestHandler):
    """Answers every GET with a version whose id would leave the download's folder."""

    def do_GET(self) -> None:
        body = json.dumps(
            {
                "model": "m",
                "version": "../../../escaped",
                "lineage": [],
                "aliases": [],
                "manifest": {},
                "links": {},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_download_refuses_a_version_id_that_is_not_a_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file name comes from the server's answer: a server that is not vitedit (or lies) must
    not make the CLI write outside the working folder."""
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostileServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["download", "m", "latest", "--server", url]) == 2
    finally:
        server.shutdown()
        server.server_close()
    (line,) = capsys.readouterr().err.splitlines()
    assert "'../../../escaped'" in line and "not a version name" in line
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    ("argv", "what"),
    [(["../m", "latest"], "invalid model name"), (["m", "../v"], "invalid version")],
)
def test_download_checks_the_names_it_is_given_before_asking(
    argv: list[str], what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    server = f"http://127.0.0.1:{launcher.free_port()}"  # nothing listens: no request is made
    assert main(["download", *argv, "--server", server]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert what in line and "letters, digits" in line


def test_a_name_of_many_characters_is_quoted_cut_short(capsys: pytest.CaptureFixture[str]) -> None:
    server = f"http://127.0.0.1:{launcher.free_port()}"
    assert main(["download", "demo-vit", "v" * 10_000, "--server", server]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "(10000 characters)" in line and len(line) < 400


def test_serve_refuses_an_unusable_api_key_in_one_line_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key the API would refuse (here a non-ASCII letter) used to crash the API child with a
    traceback, then the launcher with another."""
    monkeypatch.setenv("VITEDIT_API_KEYS", "bob:k\u00fc")
    store = tmp_path / "store"
    assert main(["serve", "--store", str(store), "--port", str(launcher.free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: VITEDIT_API_KEYS: a key of 'bob'") and "printable ASCII" in err
    assert "Traceback" not in err and not store.exists()  # nothing was started or written


def test_a_launch_failure_is_one_of_our_errors() -> None:
    """The CLI prints errors of ours as one line (`one_line_errors`): a child that dies during
    start-up is one, its own log above says why."""
    from models.errors import VitEditError

    assert issubclass(launcher.LaunchError, VitEditError)
