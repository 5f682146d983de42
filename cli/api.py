"""HTTP client commands (torch-free): ``vitedit edit``, ``vitedit versions``, ``vitedit download``.

    vitedit edit shoe.png --label Sneaker --model demo-vit@latest
    vitedit versions demo-vit
    vitedit download demo-vit latest --weights --out model.safetensors

The server is ``--server`` or ``$VITEDIT_SERVER`` (default http://127.0.0.1:8000); an API key is
``--api-key`` or ``$VITEDIT_API_KEY``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.http_client import Job, ViteditClient
from models.errors import VitEditError

console = Console()


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get("VITEDIT_SERVER", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("VITEDIT_API_KEY"))


def register(sub: argparse._SubParsersAction) -> None:
    edit = sub.add_parser("edit", help="submit failure images to a vitedit server and wait")
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

    versions = sub.add_parser("versions", help="list a model's versions (lineage) on a server")
    versions.add_argument("model")
    _server_args(versions)
    versions.set_defaults(func=run_versions)

    download = sub.add_parser("download", help="download a version's patch (or merged weights)")
    download.add_argument("model")
    download.add_argument("version", help="version id, alias, latest or base")
    download.add_argument("--weights", action="store_true", help="full merged weights")
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
        options[key] = json.loads(value) if value[:1] in "-0123456789[{tf" else value
    return options


def _with_client(args: argparse.Namespace, fn: Any) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll is noise here
    client = ViteditClient(args.server, args.api_key)
    try:
        return fn(client)
    except VitEditError as exc:
        console.print(f"[red]error[/red] {exc}")
        return 2
    finally:
        client.close()


def run_edit(args: argparse.Namespace) -> int:
    def go(client: ViteditClient) -> int:
        job = client.submit_edit(
            args.images,
            args.label,
            args.model,
            holdout=args.holdout,
            options=_options(args),
            idempotency_key=args.idempotency_key,
        )
        console.print(f"job {job.id}: {job.status} (position {job.position})")
        if not args.no_wait:
            job = _follow(client, job.id)
        if args.json:
            console.print_json(json.dumps(dataclasses.asdict(job)))
        else:
            _print_result(job)
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
            bar.update(
                task, description=status, total=job.max_steps, completed=job.step or 0, info=info
            )

        return client.wait(job_id, on_update=update)


def _print_result(job: Job) -> None:
    if job.status != "succeeded" or job.report is None:
        console.print(f"job {job.id}: [bold]{job.status}[/bold] {job.error or ''}")
        if job.version:
            console.print(f"version {job.version} was stored as {job.status}, without an alias")
        return
    report = job.report
    table = Table(
        title=f"new version {job.version} of {job.model} (parent {job.parent_version or 'base'})"
    )
    for col in ("metric", "before", "after"):
        table.add_column(col)
    for name, after in report["metrics"].items():
        before = report["before"].get(name)
        table.add_row(
            name,
            "-" if before is None else f"{before:.3f}",
            "-" if after is None else f"{after:.3f}",
        )
    console.print(table)
    edit = report["edit"]
    console.print(
        f"method {edit['method']}: {edit['steps']} steps, loss {edit['final_loss']}, "
        f"{edit['edit_neurons']} neurons changed; retention min "
        f"{report['retention']['min']}; seconds {report['seconds']}"
    )
    console.print(f"patch: {job.links.get('patch')}")


def run_versions(args: argparse.Namespace) -> int:
    def go(client: ViteditClient) -> int:
        listing = client.versions(args.model)
        table = Table(title=f"{args.model}: {len(listing.versions)} version(s)")
        columns = ("version", "parent", "method", "created", "status", "aliases", "SR", "GR")
        for col in (*columns, "LR root"):
            table.add_column(col)
        for v in listing.versions:
            table.add_row(
                v.version,
                v.parent or "base",
                v.method,
                v.created_at[:19],
                v.status,
                ",".join(v.aliases),
                *(_fmt(v.metrics.get(k)) for k in ("SR", "GR", "LR_vs_root")),
            )
        console.print(table)
        return 0

    return _with_client(args, go)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_download(args: argparse.Namespace) -> int:
    def go(client: ViteditClient) -> int:
        kind = "weights" if args.weights else "patch"
        version = args.version
        if version != "base":  # resolve an alias or 'latest' to the id, for the file name
            version = client.version(args.model, version).version
        suffix = "safetensors" if args.weights else "patch.safetensors"
        out = args.out or Path(f"{args.model}-{version}.{suffix}")
        sha = client.download(f"/v1/models/{args.model}/versions/{version}/{kind}", out)
        console.print(f"wrote {out} (sha256 {sha})")
        return 0

    return _with_client(args, go)
