"""`offsite serve`, `offsite serve-token` and `offsite remote ...` (registered in offsite.cli).

The server needs the `serve` extra (FastAPI, uvicorn); the client only the standard library.
The client takes `--url`/`--token`, or $OFFSITE_URL/$OFFSITE_TOKEN (keeps the token out of
the shell history and the process list).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..options import _reject_leftovers, split_for, take
from ..errors import ConfigError, UsageError
from .config import TOKEN_ENV, URL_ENV
from .config import ServeConfig

SERVE_INSTALL = "pip install 'offsite[serve]'"


def cmd_serve(opts: dict) -> None:
    bundles, state = take(opts, "bundles"), take(opts, "state")
    config = ServeConfig(bundles=bundles, state=state, **split_for(ServeConfig, opts))
    _reject_leftovers(opts)
    try:
        from .server import serve
    except ImportError as e:
        raise ConfigError(f"offsite serve needs the serve extra ({e.name} is missing): {SERVE_INSTALL}") from None
    serve(config)


def cmd_serve_token(opts: dict) -> None:
    from ..signing import load_public_key
    from .store import Store

    state, name, key = take(opts, "state"), take(opts, "name"), take(opts, "trusted_key", None)
    _reject_leftovers(opts)
    pem = None
    if key:
        load_public_key(key)  # a one-line error for a bad key file, before anything is stored
        pem = Path(key).read_text()
    store = Store(state)
    try:
        token = store.create_token(name, pem)
    finally:
        store.close()
    print(f"token for data owner {name} (shown once; give it to them, they send it as --token or ${TOKEN_ENV}):")
    print(token)
    if pem:
        print(f"uploads from {name} must be signed with the key in {key}")


def add_remote_actions(parser: argparse.ArgumentParser) -> None:
    """`offsite remote ACTION ...`: one sub-command per action, each with --url/--token/--config."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML file with option values (flags given here override it)")
    common.add_argument("--url", default=argparse.SUPPRESS, help=f"server URL (default: ${URL_ENV})")
    common.add_argument("--token", default=argparse.SUPPRESS, help=f"your API token (default: ${TOKEN_ENV})")
    actions = parser.add_subparsers(dest="action", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, parents=[common], help=help, description=help)

    action("list", "The emulator bundles the server publishes.")
    p = action("download", "Download an emulator bundle (resumes an interrupted download; verified at the end).")
    p.add_argument("name", nargs="?", default=argparse.SUPPRESS, help="bundle name (see remote list)")
    p.add_argument("--out", default=argparse.SUPPRESS, help="directory to create (default: the bundle name)")
    p.add_argument("--trusted-key", default=argparse.SUPPRESS,
                   help="the model owner's public key: the bundle must be signed with it (default: $OFFSITE_TRUSTED_KEY)")
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS, help="replace an existing directory")
    p = action("upload", "Upload an adapter bundle; prints its upload id.")
    p.add_argument("adapter", nargs="?", default=argparse.SUPPRESS, help="adapter bundle directory (run/adapter)")
    p = action("submit", "Start a plug-in + evaluation job for an upload; prints its job id.")
    p.add_argument("--upload", default=argparse.SUPPRESS, help="upload id (from remote upload)")
    p.add_argument("--task", default=argparse.SUPPRESS, help="a built-in task's evaluation split (piqa, arc_easy, ...)")
    p.add_argument("--docs", default=argparse.SUPPRESS, help="or your own docs: JSONL of {context, choices, gold}")
    p.add_argument("--eval-limit", type=int, default=argparse.SUPPRESS, help="score the first N docs")
    p.add_argument("--wait", action="store_true", default=argparse.SUPPRESS, help="wait for the job and print its report")
    p = action("status", "A job's status, or all your jobs and uploads.")
    p.add_argument("job", nargs="?", default=argparse.SUPPRESS, help="job id (default: list all)")
    p = action("report", "A finished job's report.")
    p.add_argument("job", nargs="?", default=argparse.SUPPRESS, help="job id")
    p.add_argument("--out", default=argparse.SUPPRESS, help="also write the report JSON here")


def cmd_remote(opts: dict) -> None:
    from .client import Client

    action = take(opts, "action")
    client = Client.from_options(take(opts, "url", None), take(opts, "token", None))
    try:
        REMOTE_ACTIONS[action](client, opts)
    finally:
        client.close()


def _remote_list(client, opts: dict) -> None:
    _reject_leftovers(opts)
    bundles = client.list_bundles()
    if not bundles:
        print("no bundles published")
    for b in bundles:
        print(f"{b['name']:<24} {b['method']:<10} blocks {len(b['blocks'])} of {b['num_blocks']}, adapter {b['adapter_blocks']}  "
              f"{b['size']:>14,} B  {'signed' if b['signed'] else 'unsigned'}  {b['fingerprint'][:16]}")


def _remote_download(client, opts: dict) -> None:
    name = take(opts, "name")
    out = take(opts, "out", None) or name
    trusted_key, overwrite = take(opts, "trusted_key", None), take(opts, "overwrite", False)
    _reject_leftovers(opts)
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn()) as bar:
        tasks: dict[str, int] = {}

        def progress(rel: str, done: int, total: int) -> None:
            if rel not in tasks:
                tasks[rel] = bar.add_task(rel, total=total)
            bar.update(tasks[rel], completed=done)

        path = client.download(name, out, trusted_key=trusted_key, overwrite=overwrite, progress=progress)
    print(f"emulator bundle {name} downloaded to {path} (every file SHA-256 verified)")


def _remote_upload(client, opts: dict) -> None:
    adapter = take(opts, "adapter")
    _reject_leftovers(opts)
    info = client.upload(adapter)
    print(f"upload {info['id']}: adapter {info['fingerprint'][:16]} ({info['adapter_type']}, blocks {info['blocks']}) "
          f"for emulator {info['emulator']}, {info['size']:,} bytes")
    print(f"next: offsite remote submit --upload {info['id']} --task TASK (or --docs FILE.jsonl)")


def _remote_submit(client, opts: dict) -> None:
    upload, task, docs_file = take(opts, "upload"), take(opts, "task", None), take(opts, "docs", None)
    eval_limit, wait = take(opts, "eval_limit", None), take(opts, "wait", False)
    _reject_leftovers(opts)
    if bool(task) == bool(docs_file):
        raise UsageError("give exactly one of --task NAME or --docs FILE.jsonl")
    docs = load_docs(docs_file) if docs_file else None
    job = client.submit(upload, task=task, docs=docs, eval_limit=eval_limit)
    print(f"job {job['id']} {job['state']}")
    if wait:
        status = client.wait(job["id"])
        if status["state"] == "failed":
            raise ConfigError(f"job {job['id']} failed: {status['error']}")
        _print_report(client.report(job["id"]))


def load_docs(path: str) -> list[dict]:
    """Multiple-choice docs for a job: JSONL of {"context": str, "choices": [str, ...], "gold": int}."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"docs file not found: {p}")
    docs = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            raise ConfigError(f"{p}:{n} is not valid JSON") from None
        if not isinstance(doc, dict) or set(doc) != {"context", "choices", "gold"}:
            raise ConfigError(f"{p}:{n} must be an object with exactly context, choices and gold")
        docs.append(doc)
    if not docs:
        raise ConfigError(f"{p} holds no docs")
    return docs


def _remote_status(client, opts: dict) -> None:
    job = take(opts, "job", None)
    _reject_leftovers(opts)
    for status in [client.job(job)] if job else client.jobs():
        line = f"{status['id']}  {status['state']:<8} upload {status['upload_id']}  {status['task']}  attempts {status['attempts']}"
        print(line + (f"  error: {status['error']}" if status["error"] else ""))
    if not job:
        for up in client.uploads():
            print(f"{up['id']}  upload   emulator {up['emulator']}  adapter {up['fingerprint'][:16]} ({up['adapter_type']})")


def _remote_report(client, opts: dict) -> None:
    job, out = take(opts, "job"), take(opts, "out", None)
    _reject_leftovers(opts)
    report = client.report(job)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    _print_report(report)


def _print_report(report: dict) -> None:
    print(f"job {report['job']}: model {report['model']}, emulator {report['emulator']}, {report['task']} (n={report['n']})")
    for setting, label in (("full_zs", "full zero-shot"), ("plugin", "plug-in")):
        r = report["results"][setting]
        print(f"  {label:<15} acc {100 * r['acc']:5.1f} ± {100 * r['acc_stderr']:.1f}   acc_norm {100 * r['acc_norm']:5.1f} ± {100 * r['acc_norm_stderr']:.1f}")
    print(f"  {'gain':<15} acc {100 * report['gain']['acc']:+5.1f}         acc_norm {100 * report['gain']['acc_norm']:+5.1f}")


REMOTE_ACTIONS = {
    "list": _remote_list,
    "download": _remote_download,
    "upload": _remote_upload,
    "submit": _remote_submit,
    "status": _remote_status,
    "report": _remote_report,
}
