"""`offsite` command line. Every step also runs from a YAML file: `offsite STEP --config step.yaml`.

Options of the config dataclasses (method configs, FinetuneConfig) become flags automatically,
so the CLI, YAML keys and the Python API never drift apart. Precedence: defaults < YAML < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path


from . import __version__
from .errors import ConfigError, OffsiteError, UsageError
from .options import (  # noqa: F401  (shared with the pema and service command modules)
    _reject_leftovers,
    add_dataclass_flags,
    env_options,
    suggest_option,
    build_dataclass,
    merged_options,
    print_summary,
    split_for,
    take,
    terminal_safe,
    typed_values,
)


# ---------------------------------------------------------------- commands
def cmd_compress(opts: dict) -> None:
    from .bundle import parse_dtype
    from .emulator import compress_checkpoint
    from .methods import get_method, make_config
    from .models import resolve_model

    method = take(opts, "method", "layerdrop")
    model_arg = take(opts, "model")
    out = take(opts, "out")
    dtype = take(opts, "dtype", "auto")
    dtype = dtype if dtype == "auto" else parse_dtype(dtype)
    overwrite, sign_key = take(opts, "overwrite", False), take(opts, "sign_key", None)
    stream, shard = take(opts, "stream", None), _shard_bytes(take(opts, "max_shard_size", None))
    config_class = get_method(method).config_class
    config = make_config(method, **typed_values(config_class, split_for(config_class, opts)))
    _reject_leftovers(opts)
    model_path, name = resolve_model(model_arg)  # after the cheap checks: an asset name may be converted first
    path = compress_checkpoint(model_path, out, method, config, dtype=dtype, base_name=name, overwrite=overwrite, sign_key=sign_key,
                               stream=stream, **shard)
    print(f"emulator bundle written to {path}")
    print_summary(path)


def cmd_finetune(opts: dict) -> None:
    from .training import FinetuneConfig, finetune, load_training_examples

    bundle, out = take(opts, "bundle"), take(opts, "out")
    data, task = take(opts, "data", None), take(opts, "task", None)
    limit = take(opts, "limit", None)
    resume, overwrite = take(opts, "resume", False), take(opts, "overwrite", False)
    sign_key, trusted_key = take(opts, "sign_key", None), take(opts, "trusted_key", None)
    config = build_dataclass(FinetuneConfig, split_for(FinetuneConfig, opts))
    _reject_leftovers(opts)
    if bool(data) == bool(task):
        raise UsageError("give exactly one of --data FILE.jsonl or --task NAME")
    examples = load_training_examples(bundle, data, task, limit, config.seed, trusted_key)
    adapter = finetune(bundle, examples, out, config, resume=resume, overwrite=overwrite, sign_key=sign_key, trusted_key=trusted_key)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under accelerate launch / torchrun every rank gets here: one summary
        print(f"adapter bundle written to {adapter}")
        print_summary(adapter)


def cmd_distill(opts: dict) -> None:
    from .distill import DistillConfig, distill
    from .models import resolve_model
    from .tasks import load_generic_text, load_plain_text

    model_path, _ = resolve_model(take(opts, "model"))
    bundle, out = take(opts, "bundle"), take(opts, "out")
    resume, overwrite = take(opts, "resume", False), take(opts, "overwrite", False)
    sign_key = take(opts, "sign_key", None)
    config = build_dataclass(DistillConfig, split_for(DistillConfig, opts))
    _reject_leftovers(opts)
    # About 4 characters per token of English; the held-out text is disjoint from the training text.
    texts = load_generic_text(limit_chars=5 * config.tokens)
    path = distill(model_path, bundle, out, texts, load_plain_text(config.eval_chars), config, resume=resume,
                   overwrite=overwrite, sign_key=sign_key)
    print(f"distilled emulator bundle written to {path}")
    print_summary(path)


def cmd_scaleot_importance(opts: dict) -> None:
    from .methods.scaleot import ImportanceConfig, importance_checkpoint
    from .models import resolve_model

    model_path, name = resolve_model(take(opts, "model"))
    out = take(opts, "out")
    resume, overwrite = take(opts, "resume", False), take(opts, "overwrite", False)
    config = build_dataclass(ImportanceConfig, split_for(ImportanceConfig, opts))
    _reject_leftovers(opts)
    if config.onload:  # block by block from the checkpoint (models larger than memory)
        from .methods.scaleot_onload import onload_importance

        if resume:
            raise UsageError("--onload keeps no checkpoints to resume; run it again without --resume")
        path = onload_importance(model_path, out, config, base_name=name, overwrite=overwrite)
    else:
        path = importance_checkpoint(model_path, out, config, base_name=name, resume=resume, overwrite=overwrite)
    print(f"scaleot artifact written to {path}  (use it: offsite compress --method scaleot --artifact {path} --alpha A --beta B)")
    print_summary(path)


def _stream_flags(p, what: str) -> None:
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=what)
    p.add_argument("--max-shard-size", default=argparse.SUPPRESS, help="largest safetensors shard written when streaming (default 5GB)")


def _shard_bytes(text) -> dict:
    """--max-shard-size as max_shard_bytes: a number of bytes or one with a unit (5GB, 500MB, 2GiB)."""
    if text is None:
        return {}
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.I)
    if not match:
        raise UsageError(f"--max-shard-size must be a size such as 5GB or 500MB, got {text!r}")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(float(match.group(1)) * scale)
    if size < 1:
        raise UsageError(f"--max-shard-size must be positive, got {text!r}")
    return {"max_shard_bytes": size}


def cmd_plugin(opts: dict) -> None:
    from .models import resolve_model
    from .plugin import plugin_checkpoint

    emulator = _issued_emulator_option(opts)
    model_path, _ = resolve_model(take(opts, "model"))
    adapter, out = take(opts, "adapter"), take(opts, "out")
    merge = not take(opts, "keep_lora", False)
    overwrite, sign_key = take(opts, "overwrite", False), take(opts, "sign_key", None)
    trust = _trust_options(opts)
    stream, shard = take(opts, "stream", None), _shard_bytes(take(opts, "max_shard_size", None))
    _reject_leftovers(opts)
    path = plugin_checkpoint(model_path, adapter, out, merge=merge, overwrite=overwrite, emulator=emulator, sign_key=sign_key,
                             stream=stream, **shard, **trust)
    print(f"plugged model written to {path}")


def _issued_emulator_option(opts: dict) -> str:
    emulator = take(opts, "emulator", None)
    if not emulator:
        raise UsageError(
            "missing required option --emulator: the emulator bundle you issued for this adapter "
            "(its manifest says which blocks the adapter may change)"
        )
    return emulator


def _trust_options(opts: dict) -> dict:
    """--trusted-key and --max-norm-ratio (0 = no bound) as keyword arguments of plug_in."""
    out = {"trusted_key": take(opts, "trusted_key", None)}
    if "max_norm_ratio" in opts:
        ratio = opts.pop("max_norm_ratio")
        out["max_norm_ratio"] = None if ratio <= 0 else ratio
    return out


def cmd_keygen(opts: dict) -> None:
    from .signing import generate_keypair, key_id, load_public_key

    out = take(opts, "out")
    _reject_leftovers(opts)
    private, public = generate_keypair(out)
    print(f"private key {private}  (keep it; mode 600; sign with --sign-key {private})")
    print(f"public key  {public}  (give it to the other party; verify with --key/--trusted-key {public})")
    print(f"key id      {key_id(load_public_key(public))}")


def cmd_verify(opts: dict) -> None:
    from .bundle import read_manifest
    from .signing import key_id, trusted_keys

    bundle, key = take(opts, "bundle"), take(opts, "key", None)
    _reject_leftovers(opts)
    keys = trusted_keys(key)
    if not keys:
        raise UsageError("give --key PUBLIC_KEY_FILE (or set OFFSITE_TRUSTED_KEY) to verify a bundle's signature")
    manifest = read_manifest(bundle, trusted_key=keys)
    print(f"OK: {bundle}: {manifest['kind']} bundle, signature by trusted key {' or '.join(key_id(k) for k in keys)}, "
          f"{len(manifest['files'])} files SHA-256 verified")


def cmd_inspect(opts: dict) -> None:
    from .bundle import read_manifest

    bundle = take(opts, "bundle")
    as_json = take(opts, "json", False)
    if as_json:
        print(json.dumps(read_manifest(bundle), indent=2))
    else:
        print_summary(bundle)


def cmd_evaluate(opts: dict) -> None:
    """Score one model (a checkpoint, or an emulator bundle, optionally with an adapter)."""
    from .evaluation import evaluate_lm_eval_task, lm_eval_task_name, perplexity, score_multiple_choice
    from .models import resolve_device
    from .tasks import load_plain_text, load_task_docs

    model_arg, bundle, adapter = take(opts, "model", None), take(opts, "bundle", None), take(opts, "adapter", None)
    tasks = [t for t in str(take(opts, "tasks", "arc_easy")).split(",") if t]
    limit, batch_size = take(opts, "limit", None), take(opts, "batch_size", 32)
    with_ppl, out = take(opts, "perplexity", False), take(opts, "out", None)
    device = resolve_device(take(opts, "device", "auto"))
    emulator = _issued_emulator_option(opts) if adapter and model_arg else take(opts, "emulator", None)
    trust = _trust_options(opts)
    _reject_leftovers(opts)
    # Every name and file is checked before a model loads: built-in tasks, MC JSONL files, lm-eval task YAMLs.
    lm_eval_tasks = {task: lm_eval_task_name(task) for task in tasks if task.endswith((".yaml", ".yml"))}
    docs = {task: load_task_docs(task, limit) for task in tasks if task not in lm_eval_tasks}
    model, tokenizer, what = _model_for_evaluation(model_arg, bundle, adapter, emulator, trust)
    model.to(device)
    results = {"model": what, "tasks": {}}

    def save() -> None:
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(results, indent=2))

    for task in tasks:
        if task in lm_eval_tasks:  # lm-eval's own implementation and metrics, on this model
            r = evaluate_lm_eval_task(model, tokenizer, task, limit=limit, batch_size=batch_size)
            results["tasks"][task] = r
            save()
            shown = ", ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float))
            print(f"{lm_eval_tasks[task]:<14} (lm-eval) {shown}")
            continue
        r = score_multiple_choice(model, tokenizer, docs[task], batch_size=batch_size)
        results["tasks"][task] = r
        save()  # each task's result is kept as soon as it is known
        print(f"{task:<14} acc {100 * r['acc']:5.1f} ± {100 * r['acc_stderr']:.1f}   "
              f"acc_norm {100 * r['acc_norm']:5.1f} ± {100 * r['acc_norm_stderr']:.1f}   (n={r['n']})")
    if with_ppl:
        results["perplexity"] = perplexity(model, tokenizer, load_plain_text(), batch_size=4)
        print(f"{'perplexity':<14} {results['perplexity']['ppl']:.2f} over {results['perplexity']['tokens']:,} tokens")
    if out:
        save()
        print(f"results written to {out}")


def _model_for_evaluation(model_arg, bundle, adapter, emulator=None, trust=None):
    from .emulator import load_checkpoint, load_emulator
    from .models import resolve_model
    from .plugin import plug_in, plug_into_emulator

    if bool(model_arg) == bool(bundle):
        raise UsageError("give exactly one of --model (full model) or --bundle (emulator bundle)")
    if bundle:
        trust = trust or {}
        loaded = load_emulator(bundle, trusted_key=trust.get("trusted_key"))
        model = plug_into_emulator(loaded, adapter, **trust) if adapter else loaded.model
        return model, loaded.tokenizer, f"emulator {bundle}" + (f" + adapter {adapter}" if adapter else "")
    path, name = resolve_model(model_arg)
    model, tokenizer = load_checkpoint(path)
    if adapter:
        model = plug_in(model, adapter, emulator=emulator, **(trust or {}))
    return model, tokenizer, name + (f" + adapter {adapter}" if adapter else "")


def cmd_report(opts: dict) -> None:
    from .report import ReportConfig, markdown_table, run_report

    config = ReportConfig.from_dict(opts)
    data = run_report(config)
    print()
    print(markdown_table(data))
    print(f"\nwritten: {Path(config.out) / 'results.json'}, report.md, report.png")


def cmd_demo(opts: dict) -> None:
    from .report import demo_config

    config = demo_config(**opts)
    print(
        f"offsite demo: {config.model}, task {','.join(config.tasks)}, {config.method} {config.method_params}; "
        "the owner compresses, the data owner fine-tunes the adapter on the emulator, the owner plugs it in."
    )
    cmd_report(dataclasses.asdict(config) | {"finetune": dataclasses.asdict(config.finetune)})


def cmd_serve(opts: dict) -> None:
    from .service.commands import cmd_serve as serve

    serve(opts)


def cmd_serve_token(opts: dict) -> None:
    from .service.commands import cmd_serve_token as serve_token

    serve_token(opts)


def cmd_federate(opts: dict) -> None:
    from .federation.commands import cmd_federate as federate

    federate(opts)


def cmd_remote(opts: dict) -> None:
    from .service.commands import cmd_remote as remote

    remote(opts)


# ---------------------------------------------------------------- effective configuration
def _config_classes(command: str, opts: dict) -> list:
    """The config dataclasses whose fields a command takes (torch-free modules)."""
    if command == "compress":
        from .methods.configs import METHOD_CONFIGS

        method = opts.get("method", "layerdrop")
        if method not in METHOD_CONFIGS:
            raise UsageError(f"unknown emulator method {method!r}; available: {', '.join(sorted(METHOD_CONFIGS))}")
        return [METHOD_CONFIGS[method]]
    module, names = CONFIG_OF[command]
    import importlib

    return [getattr(importlib.import_module(module, __package__), n) for n in names]


# command -> (module, config classes) of the commands whose options are config dataclasses
CONFIG_OF = {
    "compress": (".methods.configs", ()), "distill": (".configs", ("DistillConfig",)), "finetune": (".configs", ("FinetuneConfig",)),
    "scaleot-importance": (".methods.configs", ("ImportanceConfig",)), "pema-memory": (".pema.configs", ("MemoryConfig",)),
    "pema-train": (".pema.configs", ("PemaConfig",)), "pema-generate": (".pema.configs", ("GenerateConfig",)),
    "serve": (".service.config", ("ServeConfig",)),
}


def print_config(command: str, opts: dict) -> None:
    """The options a command would run with: every config field (defaults filled in, values type-checked)
    and the other options given, as YAML that `--config` reads back."""
    import yaml

    opts = dict(opts)
    out = {}
    for cls in _config_classes(command, opts):
        out.update(dataclasses.asdict(build_dataclass(cls, split_for(cls, opts))))
    out = {**{k: v for k, v in opts.items() if not k.startswith("_")}, **out}
    print(yaml.safe_dump(out, sort_keys=False, default_flow_style=False), end="")


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The `offsite` parser. Its flags come from config dataclasses in torch-free modules (offsite.configs,
    offsite.methods.configs, offsite.pema.configs), so `offsite --help` and every `-h` never import torch."""
    from .configs import DistillConfig, FinetuneConfig
    from .methods.configs import METHOD_CONFIGS, ImportanceConfig
    from .service.commands import add_remote_actions
    from .service.config import ServeConfig

    parser = argparse.ArgumentParser(prog="offsite", description="Offsite-tuning of Hugging Face causal LMs.",
                                     epilog="Exit codes: 0 success, 1 the command failed or refused (one line says why), "
                                            "2 the command line is wrong.")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars (as TQDM_DISABLE=1)")
    parser.add_argument("--version", action="version", version=f"offsite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--config", help="YAML file with option values (flags given here override it)")
        if name in CONFIG_OF:
            p.add_argument("--print-config", action="store_true", default=argparse.SUPPRESS,
                           help="print the effective options (defaults < --config < flags) as YAML, usable as --config, and exit")
        return p

    p = command("compress", cmd_compress, "Owner: compress a model into an emulator bundle.")
    p.add_argument("--model", default=argparse.SUPPRESS, help="(required) HF checkpoint directory or a bundled asset name (smollm2-135m)")
    p.add_argument("--out", default=argparse.SUPPRESS, help="(required) emulator bundle directory to create")
    p.add_argument("--method", default=argparse.SUPPRESS, choices=sorted(METHOD_CONFIGS),
                   help="emulator method (default: layerdrop)")
    p.add_argument("--dtype", default=argparse.SUPPRESS, help="dtype of the emulator: auto (the checkpoint's own, default), float32, bfloat16, float16")
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS, help="replace an existing bundle")
    p.add_argument("--sign-key", default=argparse.SUPPRESS, help="your private key (offsite keygen): sign the bundle")
    _stream_flags(p, "LayerDrop and GradOT compress without loading the whole model (default); --no-stream loads it")
    from .methods.configs import EmulatorConfig

    seen: set[str] = set()
    add_dataclass_flags(p.add_argument_group("every method (the adapter: bottom and top blocks)"), EmulatorConfig, seen)
    for method, config_class in METHOD_CONFIGS.items():  # a flag shared by methods is listed under the first
        shared = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(config_class) if f.name in seen
                  and f.name not in {g.name for g in dataclasses.fields(EmulatorConfig)}]
        about = (config_class.__doc__ or "").split("\n")[0] + (f" Also takes {', '.join(shared)} (listed above)." if shared else "")
        add_dataclass_flags(p.add_argument_group(f"--method {method}", about), config_class, seen)

    p = command("distill", cmd_distill, "Owner: distil an emulator's middle blocks towards the full model (OT + KD).")
    p.add_argument("--model", default=argparse.SUPPRESS, help="(required) the base model the emulator was made from")
    p.add_argument("--bundle", default=argparse.SUPPRESS, help="(required) emulator bundle to distil")
    p.add_argument("--out", default=argparse.SUPPRESS, help="(required) new emulator bundle directory")
    p.add_argument("--resume", action="store_true", default=argparse.SUPPRESS, help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS, help="replace an existing bundle")
    p.add_argument("--sign-key", default=argparse.SUPPRESS, help="your private key (offsite keygen): sign the bundle")
    add_dataclass_flags(p, DistillConfig)

    p = command("scaleot-importance", cmd_scaleot_importance,
                "Owner: ScaleOT stage (a), train harmonizers and learn block importance (artifact for --method scaleot).")
    p.add_argument("--model", default=argparse.SUPPRESS, help="HF checkpoint directory or a bundled asset name (smollm2-135m)")
    p.add_argument("--out", default=argparse.SUPPRESS, help="artifact directory to create (checkpoints go to OUT.checkpoints/)")
    p.add_argument("--resume", action="store_true", default=argparse.SUPPRESS, help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS, help="replace an existing artifact")
    add_dataclass_flags(p, ImportanceConfig)

    p = command("finetune", cmd_finetune, "Data owner: train the adapter on the emulator, export an adapter bundle.")
    p.add_argument("--bundle", default=argparse.SUPPRESS, help="(required) emulator bundle directory")
    p.add_argument("--data", default=argparse.SUPPRESS, help="JSONL of {context, continuation} (or {text}) records")
    p.add_argument("--task", default=argparse.SUPPRESS, help="or a built-in task's train split (piqa, arc_easy, ...)")
    p.add_argument("--limit", type=int, default=argparse.SUPPRESS, help="use at most this many examples")
    p.add_argument("--out", default=argparse.SUPPRESS, help="(required) run directory (adapter/ and checkpoints/ go inside)")
    p.add_argument("--resume", action="store_true", default=argparse.SUPPRESS, help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS, help="replace an existing adapter")
    p.add_argument("--sign-key", default=argparse.SUPPRESS, help="your private key (offsite keygen): sign the adapter bundle")
    p.add_argument("--trusted-key", default=argparse.SUPPRESS,
                   help="the model owner's public key: the emulator bundle must be signed with it (default: $OFFSITE_TRUSTED_KEY)")
    add_dataclass_flags(p, FinetuneConfig)

    p = command("plugin", cmd_plugin, "Owner: plug an adapter bundle into the full model.")
    p.add_argument("--model", default=argparse.SUPPRESS, help="(required) the base model the emulator was made from")
    p.add_argument("--adapter", default=argparse.SUPPRESS, help="(required) adapter bundle directory")
    p.add_argument("--emulator", default=argparse.SUPPRESS,
                   help="(required) the emulator bundle you issued; only its manifest is read")
    p.add_argument("--out", default=argparse.SUPPRESS, help="(required) directory for the adapted model")
    p.add_argument("--keep-lora", action="store_true", default=argparse.SUPPRESS, help="write a PEFT adapter instead of merging")
    _stream_flags(p, "a merged plug-in streams the base checkpoint tensor by tensor (default); --no-stream loads the model")
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS, help="replace an existing output")
    p.add_argument("--sign-key", default=argparse.SUPPRESS, help="your private key: sign the plugged-model bundle")
    add_trust_flags(p)

    p = command("evaluate", cmd_evaluate, "Zero-shot accuracy (and perplexity) of a model, emulator or adapted model.")
    p.add_argument("--model", default=argparse.SUPPRESS, help="full model: checkpoint directory or asset name")
    p.add_argument("--bundle", default=argparse.SUPPRESS, help="or an emulator bundle")
    p.add_argument("--adapter", default=argparse.SUPPRESS, help="adapter bundle to apply first")
    p.add_argument("--emulator", default=argparse.SUPPRESS, help="with --model and --adapter: the emulator bundle you issued")
    add_trust_flags(p)
    p.add_argument("--tasks", default=argparse.SUPPRESS,
                   help="comma-separated built-in task names, .jsonl files of {context, choices, gold}, or lm-eval 0.4 task "
                        "YAML files over local data (default: arc_easy)")
    p.add_argument("--limit", type=int, default=argparse.SUPPRESS, help="first N docs of each evaluation split")
    p.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, help="(default: 32)")
    p.add_argument("--perplexity", action="store_true", default=argparse.SUPPRESS, help="also held-out perplexity")
    p.add_argument("--device", default=argparse.SUPPRESS, help="auto, cpu, cuda (default: auto)")
    p.add_argument("--out", default=argparse.SUPPRESS, help="write results as JSON")

    p = command("report", cmd_report, "The five-number report (JSON, Markdown, PNG) for a YAML experiment.")
    p.add_argument("--out", default=argparse.SUPPRESS, help="report directory (resumes if it exists)")
    p.add_argument("--tasks", default=argparse.SUPPRESS, help="comma-separated task names")
    p.add_argument("--eval-limit", type=int, default=argparse.SUPPRESS, help="evaluation docs per task")
    p.add_argument("--train-limit", type=int, default=argparse.SUPPRESS, help="training examples per task")
    p.add_argument("--full-finetune", action="store_true", default=argparse.SUPPRESS, help="also the full fine-tuning baseline")
    p.add_argument("--healing-steps", type=int, default=argparse.SUPPRESS, help="privacy check: heal the emulator for N steps")
    p.add_argument("--set", action="append", metavar="KEY.SUB=VALUE",
                   help="set a nested key of the YAML config (repeatable), e.g. --set finetune.lr=1e-4 --set method_params.num_kept=20")

    p = command("demo", cmd_demo, "The two-party round trip on the default real model, with the five-number table.")
    p.add_argument("--out", default=argparse.SUPPRESS, help="(default: runs/demo)")
    p.add_argument("--tasks", default=argparse.SUPPRESS, help="(default: arc_easy)")

    from .pema.cli import add_commands as add_pema_commands

    add_pema_commands(command)

    p = command("inspect", cmd_inspect, "Verify a bundle and print what it contains.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the raw manifest")

    p = command("keygen", cmd_keygen, "Create an Ed25519 key pair for signing bundles (offsite.key, offsite.pub).")
    p.add_argument("--out", default=argparse.SUPPRESS, help="directory for the two key files (never overwritten)")

    p = command("verify", cmd_verify, "Check a bundle's signature and every file's SHA-256; prints OK or one error line.")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--key", default=argparse.SUPPRESS, help="the signer's public key (default: $OFFSITE_TRUSTED_KEY)")

    p = command("serve", cmd_serve, "Owner: serve emulator bundles, adapter uploads, plug-in jobs and representation queries over HTTP.")
    add_dataclass_flags(p, ServeConfig)
    p = command("serve-token", cmd_serve_token, "Owner: create an API token for a data owner of offsite serve (printed once).")
    p.add_argument("--state", default=argparse.SUPPRESS, help="the server's state directory")
    p.add_argument("--name", default=argparse.SUPPRESS, help="the data owner's name")
    p.add_argument("--trusted-key", default=argparse.SUPPRESS, help="the data owner's public key: its uploads must be signed with it")
    from .federation.commands import add_federate_actions

    p = command("federate", cmd_federate, "Many data owners: federated adapter training on Flower (server: owner, client: data owner).")
    add_federate_actions(p)
    p = command("remote", cmd_remote, "Data owner: use an offsite server (list, download, upload, submit, status, report).")
    add_remote_actions(p)
    return parser


def add_trust_flags(p: argparse.ArgumentParser) -> None:
    from .configs import MAX_NORM_RATIO

    p.add_argument("--trusted-key", default=argparse.SUPPRESS,
                   help="the data owner's public key: the adapter bundle must be signed with it (default: $OFFSITE_TRUSTED_KEY)")
    p.add_argument("--max-norm-ratio", type=float, default=argparse.SUPPRESS,
                   help=f"norm bound on adapter tensors relative to the weights they change; 0 disables (default: {MAX_NORM_RATIO:g})")


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (sub-)sub-command parser that `args` went through (where an unknown flag belongs), and its path."""
    path = []
    for dest in ("command", "side", "action"):
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction) and a.dest == dest), None)
        if sub is None or getattr(args, dest, None) not in sub.choices:
            break
        parser = sub.choices[getattr(args, dest)]
        path.append(getattr(args, dest))
    return parser, path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    chosen, path = _chosen_parser(parser, args)
    if unknown:  # as argparse would say, plus the nearest flag of that command
        chosen.error(f"unrecognized arguments: {' '.join(unknown)}{suggest_option(chosen, unknown)}")
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # every offsite bar honours it (offsite.progress)
    try:
        opts = merged_options(args, env_options(chosen, path))
        if opts.pop("print_config", False):
            print_config(args.command, opts)
            return 0
        args.func(opts)
    except UsageError as e:
        print(f"offsite: error: {terminal_safe(e)}", file=sys.stderr)
        return 2  # the command line is wrong (as argparse's own usage errors)
    except OffsiteError as e:
        print(f"offsite: error: {terminal_safe(e)}", file=sys.stderr)
        return 1  # the command was understood and refused or failed: one line says why
    except KeyboardInterrupt:
        print("offsite: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
