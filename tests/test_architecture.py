"""The import contracts of docs/architecture.md section 2: cli -> service -> workers -> models."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    # in a process of its own: import-linter reconfigures logging in the process that runs it,
    # which silenced the log capture of later tests (test_metatrain's resume test)
    code = (
        "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_models_package_init_is_trivial():
    assert (ROOT / "models" / "__init__.py").read_text().strip() == ""


def test_ml_core_reads_no_environment_variables():
    offenders = [
        p.name
        for p in (ROOT / "models").rglob("*.py")
        if "os.environ" in p.read_text() or "getenv" in p.read_text()
    ]
    assert offenders == []


def test_cli_help_lists_every_area():
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    for command in ("demo", "bench", "hypernet", "serve", "edit"):
        assert command in out
