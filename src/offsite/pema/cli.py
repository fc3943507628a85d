"""The `offsite pema-*` commands (registered by offsite.cli), one small function each.

The commands that need representation queries (`pema-memory`, `pema-generate`) ask the owner's
service (`--url`/`--token`, as `offsite remote`; `offsite serve --model` answers them), or, for
an owner working alone or a test, run the `RepresentationServer` in-process on `--model`. The
data owner's side only ever uses the head bundle.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..options import _reject_leftovers, add_dataclass_flags, build_dataclass, split_for, take
from ..errors import ConfigError, UsageError
from .configs import GenerateConfig, MemoryConfig, PemaConfig  # torch-free: `offsite --help` imports no torch


def _server(opts: dict):
    """The owner answering representation queries: its service at --url, or --model in-process on --device."""
    from ..emulator import load_checkpoint
    from ..models import resolve_device, resolve_model
    from .owner import RepresentationServer

    url, token, model = take(opts, "url", None), take(opts, "token", None), take(opts, "model", None)
    if url and model:
        raise UsageError("give --url (the owner's service) or --model (an in-process owner), not both")
    if not model:
        from ..service.client import URL_ENV, Client, RemoteOwner

        if not (url or os.environ.get(URL_ENV)):
            raise UsageError(f"no owner to ask for representations: give --url (or set ${URL_ENV}) or --model")
        if "device" in opts:
            raise UsageError("--device is for an in-process owner (--model); the service chooses its own")
        return RemoteOwner(Client.from_options(url, token))
    if token:
        raise UsageError("--token goes with --url, not with --model")
    path, _ = resolve_model(model)
    device = resolve_device(take(opts, "device", "auto"))
    model, _ = load_checkpoint(path)
    return RepresentationServer(model.to(device))


def _examples(opts: dict, split: str):
    from ..data import load_examples
    from .task import load_generation_examples

    data, task, limit = take(opts, "data", None), take(opts, "task", None), take(opts, "limit", None)
    shots = take(opts, "shots", 0)
    if bool(data) == bool(task):
        raise UsageError("give exactly one of --data FILE.jsonl or --task (piqa, sciq, kjv2web, web2bbe)")
    if data and shots:
        raise UsageError("--shots goes with --task (a built-in style-transfer task); put demonstrations in your own prompts")
    return load_examples(data)[:limit] if data else load_generation_examples(task, split, limit=limit, shots=shots)


def cmd_pema_head(opts: dict) -> None:
    from ..options import print_summary
    from ..models import resolve_model
    from .head import export_head_checkpoint

    model_path, name = resolve_model(take(opts, "model"))
    out, overwrite, sign_key = take(opts, "out"), take(opts, "overwrite", False), take(opts, "sign_key", None)
    _reject_leftovers(opts)
    path = export_head_checkpoint(model_path, out, overwrite=overwrite, sign_key=sign_key, base_name=name)
    print(f"head bundle written to {path}")
    print_summary(path)


def cmd_pema_memory(opts: dict) -> None:
    from .head import load_head
    from .memory import build_memory

    head = load_head(take(opts, "head"), trusted_key=take(opts, "trusted_key", None))
    out = take(opts, "out")
    config = build_dataclass(MemoryConfig, split_for(MemoryConfig, opts))
    examples = _examples(opts, "train")
    server = _server(opts)
    _reject_leftovers(opts)
    head.check_owner(server.info())
    path = build_memory(server, head.tokenizer, examples, out, config)
    meta = json.loads((Path(path) / "memory.json").read_text())
    print(f"external memory written to {path}: {meta['rows']:,} rows of size {meta['hidden_size']} "
          f"from {meta['examples']:,} examples ({config.contexts} contexts)")


def cmd_pema_train(opts: dict) -> None:
    from ..options import print_summary
    from .train import train_pema_bundle

    memory, head, out = take(opts, "memory"), take(opts, "head"), take(opts, "out")
    overwrite, sign_key, trusted_key = take(opts, "overwrite", False), take(opts, "sign_key", None), take(opts, "trusted_key", None)
    config = build_dataclass(PemaConfig, split_for(PemaConfig, opts))
    _reject_leftovers(opts)
    path = train_pema_bundle(memory, head, out, config, overwrite=overwrite, sign_key=sign_key, trusted_key=trusted_key)
    print(f"PEMA adapter bundle written to {path}")
    print_summary(path)


def cmd_pema_generate(opts: dict) -> None:
    from .generate import generate_texts
    from .head import load_head
    from .task import score_generations
    from .train import load_pema_adapter

    trusted_key = take(opts, "trusted_key", None)
    head = load_head(take(opts, "head"), trusted_key=trusted_key)
    adapter_dir, out = take(opts, "adapter", None), take(opts, "out", None)
    adapter = load_pema_adapter(adapter_dir, head) if adapter_dir else None
    config = build_dataclass(GenerateConfig, split_for(GenerateConfig, opts))
    task = opts.get("task")
    examples = _examples(opts, take(opts, "split", "eval"))
    server = _server(opts)
    _reject_leftovers(opts)
    head.check_owner(server.info())
    predictions = generate_texts(server, head, [e.context for e in examples], adapter, config)
    scores = score_generations(predictions, [e.continuation for e in examples])
    print(f"sacreBLEU {scores['bleu']:.2f}   exact match {scores['exact_match']:.1f}%   (n={scores['n']}, "
          f"{'PEMA' if adapter else 'no adaptation'}{', Gradual Unrolling' if adapter and config.gradual_unrolling else ''})")
    if task in ("kjv2web", "web2bbe"):
        from .parallel import archaic_rate, source_of

        references = [e.continuation for e in examples]
        copied = score_generations([source_of(e) for e in examples], references)
        print(f"archaic markers per 100 words: output {archaic_rate(predictions):.2f}, source {archaic_rate([source_of(e) for e in examples]):.2f}, "
              f"reference {archaic_rate(references):.2f}; copying the source scores sacreBLEU {copied['bleu']:.2f}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with Path(out).open("w", encoding="utf-8") as f:
            for ex, pred in zip(examples, predictions):
                f.write(json.dumps({"context": ex.context, "reference": ex.continuation.strip(), "prediction": pred}) + "\n")
        print(f"predictions written to {out}")


def cmd_pema_score(opts: dict) -> None:
    """Held-out NLL and next-token accuracy of lambda * P_PEMA + (1 - lambda) * P_LM, for each lambda."""
    from .evaluate import LAMBDAS, mixture_scores
    from .head import load_head
    from .train import load_pema_adapter

    trusted_key = take(opts, "trusted_key", None)
    head = load_head(take(opts, "head"), trusted_key=trusted_key)
    adapter = load_pema_adapter(take(opts, "adapter"), head)
    lambdas = [float(x) for x in str(take(opts, "lambdas", ",".join(map(str, LAMBDAS)))).split(",") if x]
    out = take(opts, "out", None)
    examples = _examples(opts, take(opts, "split", "eval"))
    server = _server(opts)
    _reject_leftovers(opts)
    head.check_owner(server.info())
    scores = mixture_scores(server, head, adapter, examples, lambdas)
    print(f"{'lambda':>6}  {'NLL/token':>9}  {'next-token acc':>14}   ({scores[min(scores)]['tokens']:,} target tokens, {len(examples)} examples)")
    for x, r in scores.items():
        print(f"{x:>6.2f}  {r['nll']:>9.4f}  {100 * r['acc']:>13.1f}%" + ("   (the model alone)" if x == 0 else ""))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({str(x): r for x, r in scores.items()}, indent=1))
        print(f"scores written to {out}")


def add_commands(command) -> None:
    """Add the PEMA commands through offsite.cli's `command(name, func, help)` helper."""
    S = argparse.SUPPRESS

    def owner_flags(p):
        p.add_argument("--url", default=S, help="the owner's service answering representation queries (default: $OFFSITE_URL)")
        p.add_argument("--token", default=S, help="your API token for --url (default: $OFFSITE_TOKEN)")
        p.add_argument("--model", default=S, help="or the owner's model, answering in-process")
        p.add_argument("--device", default=S, help="with --model: auto, cpu, cuda (default: auto)")

    def data_flags(p, split: bool):
        p.add_argument("--task", default=S, help="a built-in generation task (piqa, sciq; kjv2web, web2bbe: style transfer)")
        p.add_argument("--data", default=S, help="or a JSONL of {context, continuation} records")
        p.add_argument("--limit", type=int, default=S, help="use at most this many examples")
        p.add_argument("--shots", type=int, default=S, help="style transfer: this many fixed worked demonstrations in every prompt "
                       "(use the same number for memory, generation and evaluation)")
        if split:
            p.add_argument("--split", default=S, choices=["train", "eval"], help="with --task (default: eval)")

    def trust_flag(p):
        p.add_argument("--trusted-key", default=S, help="the model owner's public key: the head bundle must be signed with it")

    p = command("pema-head", cmd_pema_head, "PEMA owner: export the head bundle (final norm + LM head + tokenizer).")
    p.add_argument("--model", default=S, help="HF checkpoint directory or a bundled asset name (smollm2-135m)")
    p.add_argument("--out", default=S, help="head bundle directory to create")
    p.add_argument("--overwrite", action="store_true", default=S, help="replace an existing bundle")
    p.add_argument("--sign-key", default=S, help="your private key (offsite keygen): sign the bundle")

    p = command("pema-memory", cmd_pema_memory, "PEMA data owner: build the external memory from representation queries (resumable).")
    p.add_argument("--head", default=S, help="the owner's head bundle (its tokenizer encodes the data)")
    p.add_argument("--out", default=S, help="memory directory; re-running the same command continues it")
    owner_flags(p)
    data_flags(p, split=False)
    trust_flag(p)
    add_dataclass_flags(p, MemoryConfig)

    p = command("pema-score", cmd_pema_score, "PEMA data owner: held-out NLL and accuracy of the mixture for each lambda (no generation).")
    p.add_argument("--head", default=S, help="the owner's head bundle")
    p.add_argument("--adapter", default=S, help="the PEMA adapter bundle (pema-train)")
    p.add_argument("--lambdas", default=S, help="comma-separated mixture weights in [0, 1) (default: 0,0.1,...,0.9)")
    p.add_argument("--out", default=S, help="write the scores (with per-example NLLs) as JSON here")
    owner_flags(p)
    data_flags(p, split=True)
    trust_flag(p)

    p = command("pema-train", cmd_pema_train, "PEMA data owner: train the adapter on the external memory, export its bundle.")
    p.add_argument("--memory", default=S, help="external memory directory (pema-memory)")
    p.add_argument("--head", default=S, help="the owner's head bundle")
    p.add_argument("--out", default=S, help="PEMA adapter bundle directory to create")
    p.add_argument("--overwrite", action="store_true", default=S, help="replace an existing bundle")
    p.add_argument("--sign-key", default=S, help="your private key: sign the adapter bundle")
    trust_flag(p)
    add_dataclass_flags(p, PemaConfig)

    p = command("pema-generate", cmd_pema_generate, "PEMA data owner: generate answers (with or without an adapter) and score them.")
    p.add_argument("--head", default=S, help="the owner's head bundle")
    p.add_argument("--adapter", default=S, help="PEMA adapter bundle (omit for the model alone)")
    p.add_argument("--out", default=S, help="write predictions as JSONL")
    owner_flags(p)
    data_flags(p, split=True)
    trust_flag(p)
    add_dataclass_flags(p, GenerateConfig)
