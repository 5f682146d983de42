"""The ``vitedit`` command line: one subcommand module per area, under ``cli/``.

Each module exposes ``register(subparsers)``, which adds its parser(s) and sets ``func``.
Modules import torch lazily, so ``vitedit edit ...`` (an HTTP client) starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

COMMAND_MODULES = ("world", "demo", "bench", "calibrate", "hypernet", "models", "serve", "api")

DESCRIPTION = """\
Repair the mistakes of a pretrained vision transformer: send the images it gets wrong and
their labels, get back a new, versioned checkpoint (a sparse patch) and a report.

  vitedit serve                                  run the service here (what `make run` does)
  vitedit demo failure --out shirt.png           a failure image of the demo model
  vitedit edit shirt.png --label T-shirt/top     edit the served model, print the report
  vitedit versions demo-vit                      the model's versions
"""

EPILOG = """\
server commands (edit, jobs, versions, download) talk to --server or $VITEDIT_SERVER
(default http://127.0.0.1:8000) and send --api-key or $VITEDIT_API_KEY, one key;
the server takes its accepted keys from $VITEDIT_API_KEYS (comma-separated).
'vitedit COMMAND --help' for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitedit",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(
        sys.argv[1:] if argv is None else argv
    )  # what a manifest records as its command
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return one_line_errors(lambda: args.func(args))


def one_line_errors(run: Callable[[], object]) -> int:
    """Run a command (or a script's ``main``): its exit code, an error of ours printed as one line
    on stderr with code 2 (never a traceback), Ctrl-C as 130."""
    from models.errors import VitEditError

    try:
        return int(run() or 0)
    except VitEditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
