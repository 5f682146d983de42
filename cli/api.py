"""HTTP client commands (torch-free): ``vitedit edit``, ``jobs``, ``versions``, ``download``.

    vitedit edit shoe.png --label Sneaker --model demo-vit@latest
    vitedit versions demo-vit
    vitedit download demo-vit latest --weights --out model.safetensors

The server is ``--server`` or ``$VITEDIT_SERVER`` (default http://127.0.0.1:8000); an API key is
``--api-key`` or ``$VITEDIT_API_KEY`` (one key: the server accepts those of its
``$VITEDIT_API_KEYS``). Errors are one line on stderr, saying what to do, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import httpx
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.http_client import Job, NotOurAPI, VersionList, ViteditClient, check_header_text
from models.errors import (
    IntegrityError,
    StoreError,
    Unauthorized,
    Unavailable,
    VitEditError,
    quoted,
)
from models.store.files import check_name

console = Console()
errors = Console(stderr=True, soft_wrap=True)  # one line per error, whatever the terminal width

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_EPILOG = (
    f"The server is --server or $VITEDIT_SERVER (default {DEFAULT_SERVER}). If it needs an API "
    "key, pass it as --api-key KEY or $VITEDIT_API_KEY (one key; the server reads the keys it "
    "accepts from $VITEDIT_API_KEYS, comma-separated)."
)


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("VITEDIT_SERVER", DEFAULT_SERVER),
        help="URL of the vitedit API (default: $VITEDIT_SERVER, else %(default)s)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("VITEDIT_API_KEY"),
        help="API key sent as a Bearer token (default: $VITEDIT_API_KEY); "
        "the server accepts the keys listed in its $VITEDIT_API_KEYS",
    )


def register(sub: argparse._SubParsersAction) -> None:
    edit = sub.add_parser(
        "edit",
        help="submit failure images to a vitedit server and wait",
        description="Submit images the model gets wrong and their true label; follow the job, "
        "then print the report, the new version's id and its URL.",
        epilog=SERVER_EPILOG,
    )
    edit.add_argument("images", type=Path, nargs="+")
    edit.add_argument(
        "--label",
        action="append",
        required=True,
        help="target class (index or name): once for all images, or once per image",
    )
    edit.add_argument(
        "--model",
        default="demo-vit@latest",
        help="model, model@version, model@alias or model@latest",
    )
    edit.add_argument(
        "--holdout",
        type=Path,
        nargs="*",
        default=[],
        help="held-out failures of the same group (for the report's GR)",
    )
    edit.add_argument("--method")
    edit.add_argument("--rho", type=float)
    edit.add_argument("--max-steps", type=int)
    edit.add_argument("--seed", type=int)
    edit.add_argument("--lr", type=float)
    edit.add_argument("--min-sr", type=float, help="acceptance gate: least SR (server default 1.0)")
    edit.add_argument("--min-lr", type=float, help="acceptance gate: least LR_vs_parent")
    edit.add_argument("--min-retention", type=float, help="acceptance gate: least retention")
    edit.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another method option, e.g. c=0.01 (repeatable)",
    )
    edit.add_argument("--idempotency-key")
    edit.add_argument("--no-wait", action="store_true", help="print the job and return")
    edit.add_argument("--json", action="store_true", help="print the final job as JSON")
    _server_args(edit)
    edit.set_defaults(func=run_edit)

    jobs = sub.add_parser(
        "jobs", help="list your edit jobs on a server, newest first", epilog=SERVER_EPILOG
    )
    jobs.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    _server_args(jobs)
    jobs.set_defaults(func=run_jobs)

    versions = sub.add_parser(
        "versions", help="list a model's versions (lineage) on a server", epilog=SERVER_EPILOG
    )
    versions.add_argument("model")
    _server_args(versions)
    versions.set_defaults(func=run_versions)

    download = sub.add_parser(
        "download", help="download a version's patch (or merged weights)", epilog=SERVER_EPILOG
    )
    download.add_argument("model")
    download.add_argument("version", help="version id, alias, latest or base")
    kind = download.add_mutually_exclusive_group()
    kind.add_argument("--weights", action="store_true", help="full merged weights")
    kind.add_argument(
        "--review",
        action="store_true",
        help="the review page as one HTML file, figures inside (open it in a browser: for a "
        "server with API keys, whose page a browser cannot fetch)",
    )
    download.add_argument("--out", type=Path, help="file to write (default: from the names)")
    _server_args(download)
    download.set_defaults(func=run_download)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "method": args.method,
        "rho": args.rho,
        "max_steps": args.max_steps,
        "seed": args.seed,
        "lr": args.lr,
        "min_sr": args.min_sr,
        "min_lr": args.min_lr,
        "min_retention": args.min_retention,
    }
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option {item!r}: use KEY=VALUE")
        try:
            options[key] = json.loads(value) if value[:1] in "-0123456789[{tf" else value
        except (ValueError, RecursionError):
            raise SystemExit(
                f"--option {quoted(item)}: a value starting with a digit, '-', '[', '{{', 't' or 'f' "
                "is read as JSON and this one is not valid JSON"
            ) from None
    return options


def _with_client(args: argparse.Namespace, fn: Any) -> int:
    """Run ``fn(client)``; an error of ours, a local file's or a server's odd answer is one line
    on stderr (the server's text shown as it is, never read as markup) and exit code 2."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll is noise here
    client = None
    try:
        if args.api_key:  # before anything is sent: httpx would fail in a traceback
            check_header_text(args.api_key, "--api-key (or $VITEDIT_API_KEY)")
        if getattr(args, "idempotency_key", None):
            check_header_text(args.idempotency_key, "--idempotency-key")
        client = ViteditClient(args.server, args.api_key)
        return fn(client)
    except VitEditError as exc:
        _error(explain(exc, args.server, args.api_key))
        return 2
    except OSError as exc:  # a local file: an image to send, a download to write
        where = f": {exc.filename}" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}")
        return 2
    finally:
        if client is not None:
            client.close()


def _error(message: str) -> None:
    """One line on stderr: ``error: message``, the message's text as it is (no markup)."""
    errors.print(f"[red]error:[/red] {escape(message)}", markup=True)


def explain(exc: VitEditError, server: str, api_key: str | None) -> str:
    """What a CLI user should do about an error (the HTTP client's message speaks HTTP)."""
    if isinstance(exc, Unauthorized):
        if not api_key:
            return (
                f"the server at {server} needs an API key: pass --api-key KEY or set "
                "VITEDIT_API_KEY (a key from the server's VITEDIT_API_KEYS)"
            )
        return (
            f"the server at {server} refused the API key given by --api-key or VITEDIT_API_KEY: "
            "it is not one of the server's VITEDIT_API_KEYS"
        )
    if isinstance(exc, Unavailable) and isinstance(
        exc.__cause__, httpx.ConnectError | httpx.ConnectTimeout
    ):
        return (
            f"no vitedit server answers at {server}: start one with `make run` (or "
            "`.venv/bin/vitedit serve`) in another terminal, or point --server or "
            "VITEDIT_SERVER at one"
        )
    return str(exc)


def run_edit(args: argparse.Namespace) -> int:
    for path in [*args.images, *(args.holdout or [])]:  # before the server is asked anything
        if not Path(path).is_file():
            raise SystemExit(f"vitedit edit: {path} is not a file (give the images to edit)")

    def go(client: ViteditClient) -> int:
        job = client.submit_edit(
            args.images,
            args.label,
            args.model,
            holdout=args.holdout,
            options=_options(args),
            idempotency_key=args.idempotency_key,
        )
        console.print(escape(f"job {job.id}: {job.status} (position {job.position})"))
        if not args.no_wait:
            job = _follow(client, job.id)
        if args.json:
            console.print_json(json.dumps(dataclasses.asdict(job)))
        else:
            _print_result(job)
            for line in key_figures(job, args.server):
                console.print(escape(line), soft_wrap=True, highlight=False)
            if args.api_key and job.version:  # a browser cannot send the key: save the page
                console.print(
                    escape(
                        f"        (API keys: `vitedit download {job.model} {job.version} "
                        "--review` saves it with its figures)"
                    ),
                    soft_wrap=True,
                    highlight=False,
                )
        return 0 if job.status in ("succeeded", "queued", "running") else 1

    return _with_client(args, go)


def _follow(client: ViteditClient, job_id: str) -> Job:
    columns = (
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("queued", total=None, info="")

        def update(job: Job) -> None:
            status = job.status if job.status != "running" else job.phase or "running"
            info = f"loss {job.loss:.4f}" if job.loss is not None else ""
            if job.status == "queued":
                info = f"{job.position or 0} job(s) ahead"
            bar.update(  # the columns read markup: the server's words are escaped
                task,
                description=escape(status),
                total=job.max_steps,
                completed=job.step or 0,
                info=escape(info),
            )

        return client.wait(job_id, on_update=update)


def _print_result(job: Job) -> None:
    """The job's end as text; every word of the server's escaped (it is not rich markup)."""
    if job.status != "succeeded" or job.report is None:
        console.print(
            f"{escape(f'job {job.id}:')} [bold]{escape(job.status)}[/bold] "
            f"{escape(job.error or '')}"
        )
        if job.version:
            console.print(
                escape(f"version {job.version} was stored as {job.status}, without an alias")
            )
        return
    try:
        table, line = _report(job, job.report)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise NotOurAPI(
            f"the server answered a report that is not vitedit's for job {job.id} "
            f"({type(exc).__name__}: {exc}): is --server a vitedit server?"
        ) from None
    console.print(table)
    console.print(escape(line))
    console.print(escape(f"patch: {job.links.get('patch')}"))


def _report(job: Job, report: dict[str, Any]) -> tuple[Table, str]:
    """The report's table of metrics and its line about the edit."""
    table = Table(
        title=escape(
            f"new version {job.version} of {job.model} (parent {job.parent_version or 'base'})"
        )
    )
    for col in ("metric", "before", "after"):
        table.add_column(col)
    for name, after in report["metrics"].items():
        before = report["before"].get(name)
        table.add_row(escape(str(name)), _fmt(before), _fmt(after))
    edit = report["edit"]
    loss = edit.get("final_loss")
    line = (
        f"method {edit['method']}: {edit['steps']} steps, "
        f"loss {'-' if loss is None else format(loss, '.4g')}, "
        f"{edit['edit_neurons']} neurons changed"
    )
    if (retention := report.get("retention", {}).get("min")) is not None:
        line += f"; earlier fixes kept: {retention:.3f} (least)"
    if seconds := report.get("seconds"):
        line += "; seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
    return table, line


def key_figures(job: Job, server: str) -> list[str]:
    """The last lines of ``vitedit edit``: the version, its URL, SR / GR / LR and the URL of its
    review page, unwrapped."""
    if not job.version:
        return []
    url = server.rstrip("/") + job.links.get(
        "version", f"/v1/models/{job.model}/versions/{job.version}"
    )
    lines = [f"version {job.version} ({job.status})", f"url     {url}"]
    if job.report:
        m = job.report.get("metrics", {})
        lines.append(
            f"SR {_fmt(m.get('SR'))}  GR {_fmt(m.get('GR'))}  "
            f"LR {_fmt(m.get('LR_vs_parent'))} (vs parent; {_fmt(m.get('LR_vs_root'))} vs base)"
        )
    return [*lines, f"review  {url}/review"]  # the review page (HTML) of the version


def run_jobs(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise SystemExit(f"--limit must be at least 1, got {args.limit}")

    def go(client: ViteditClient) -> int:
        console.print(jobs_table(client.jobs(args.limit)))
        return 0

    return _with_client(args, go)


def _listing(title: str) -> Table:
    """The compact table the listing commands print (jobs, versions)."""
    return Table(
        title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True
    )


def jobs_table(jobs: list[Job]) -> Table:
    """One row per job, newest first, ids never cut (80 columns): the job's id above the version
    it made, its status above its submit time, and what it edited."""
    table = _listing(f"{len(jobs)} edit job(s), newest first")
    ids = [j.id for j in jobs] + [f"  {j.version}" for j in jobs if j.version]
    table.add_column("job\n  version", no_wrap=True, min_width=max(map(len, ids), default=0))
    table.add_column("status\nsubmitted (UTC)", no_wrap=True)
    table.add_column("model@parent", overflow="fold", min_width=len("model@parent"))
    table.add_column("method", no_wrap=True)
    for job in jobs:  # a table's cells read markup: the server's words are escaped
        table.add_row(
            escape(f"{job.id}\n  {job.version or '-'}"),
            escape(f"{job.status}\n{(job.created_at or '-')[:16].replace('T', ' ')}"),
            escape(f"{job.model}@{job.parent_version or 'base'}"),
            escape(job.method or "-"),
        )
    return table


def run_versions(args: argparse.Namespace) -> int:
    def go(client: ViteditClient) -> int:
        console.print(versions_table(client.versions(args.model)))
        return 0

    return _with_client(args, go)


def versions_table(listing: VersionList) -> Table:
    """One row per version, ids never cut: an id (which tells its creation time, UTC) and its
    parent's share the first column, one above the other, so the table fits 80 columns."""
    table = _listing(escape(f"{listing.model}: {len(listing.versions)} version(s)"))
    ids = [v.version for v in listing.versions] + [v.parent or "" for v in listing.versions]
    table.add_column("version\n  parent", no_wrap=True, min_width=max(map(len, ids), default=0) + 2)
    table.add_column("method", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("aliases", overflow="fold", min_width=len("aliases"))
    for col in ("SR", "GR", "LR root"):
        table.add_column(col, no_wrap=True)
    for v in listing.versions:  # a table's cells read markup: the server's words are escaped
        table.add_row(
            escape(f"{v.version}\n  {v.parent or 'base'}"),
            escape(v.method),
            escape(v.status),
            escape("\n".join(v.aliases)),
            *(_fmt(v.metrics.get(k)) for k in ("SR", "GR", "LR_vs_root")),
        )
    return table


def _fmt(value: Any) -> str:
    """A metric as a table shows it: 3 decimals, ``-`` for none, ``?`` for what is no number."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "?"
    return f"{value:.3f}"


def run_download(args: argparse.Namespace) -> int:
    def go(client: ViteditClient) -> int:
        kind = "weights" if args.weights else "review?inline=true" if args.review else "patch"
        check_name(args.model, "model name")  # it becomes part of the URL and of the file name
        version = check_name(args.version, "version, alias or 'latest'")
        if version != "base":  # resolve an alias or 'latest' to the id, for the file name
            version = client.version(args.model, version).version
            try:  # a file name from a server must not leave the working folder
                check_name(version, "version")
            except StoreError:
                raise IntegrityError(
                    f"the server answered version {version!r} for {args.model}@{args.version}, "
                    "which is not a version name: is --server a vitedit server?"
                ) from None
        suffix = {"weights": "safetensors", "patch": "patch.safetensors"}.get(kind, "review.html")
        name = f"{args.model}-{version}.{suffix}"
        out = args.out or Path(name)
        if out.is_dir():  # --out names a folder: the file goes in it, under its own name
            out = out / name
        sha = client.download(f"/v1/models/{args.model}/versions/{version}/{kind}", out)
        console.print(escape(f"wrote {out} (sha256 {sha})"), soft_wrap=True)
        return 0

    return _with_client(args, go)
