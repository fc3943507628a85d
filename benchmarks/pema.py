"""Experiment record: PEMA against LoRA, OT and no adaptation, SmolLM2-135M.

    python benchmarks/pema.py                                    # KJV -> WEB style transfer (offsite.pema.parallel)
    python benchmarks/pema.py --task piqa                        # the first record: PIQA solutions
    python benchmarks/pema.py --task sciq --train-limit 500      # SciQ answers (only 500 training questions exist offline)
    python benchmarks/pema.py --train-limit 100 --eval-limit 50  # a quick look
    python benchmarks/pema.py --update-readme                    # also rewrite the README's PEMA table
    python benchmarks/pema.py --train-limit 1500 --eval-limit 300 --max-new-tokens 64 --variant rank576 --rank 576
                                                                 # one PEMA variant against the committed record

Settings compared, all scored on the same evaluation prompts of the task (offsite.pema.task:
PIQA solutions or SciQ answers; greedy decoding, the answer is the generation up to its first
line break):

- no adaptation: the model alone;
- LoRA on the full model (every linear layer of every block, peft, offsite's training loop):
  what a data owner could do if the owner handed over all weights;
- PEMA with Gradual Unrolling, and PEMA with a constant lambda (same adapter): the data owner
  holds only the head bundle and the external memory, and asks the owner for representations;
- OT: a 2-22-2 LayerDrop emulator's adapter trained by the data owner, plugged into the full model;
- copy the source (style-transfer tasks): the source verse itself, what changing nothing scores.

On the style-transfer tasks every setting sees the same prompt, wrapped in the tokenizer's chat
template when it has one (`--chat`, on by default; SmolLM2-Instruct has one); the archaic-marker
rate of each setting's outputs is reported beside sacreBLEU, and every BLEU difference against no
adaptation carries a paired bootstrap 95% interval (1,000 resamples of the evaluation verses).
Token-level, without generation: the held-out NLL per target token of lambda P_PEMA + (1 - lambda)
P_LM (offsite.pema.evaluate), with lambda chosen on a validation split carved from the training
verses, against the model alone (lambda = 0), with a paired bootstrap interval over examples.

Metrics: sacreBLEU (effective order, see offsite.pema.task) and normalised exact match, and the
training peak memory of each method: each training runs in a fresh subprocess that reports
its peak resident set size (ru_maxrss) minus its RSS after imports (CPU), or
torch.cuda.max_memory_allocated (GPU). LoRA's figure includes the full model it must hold
(fp32), PEMA's the head bundle; the external memory is memory-mapped and its pages count as
resident once read. Building the memory is the owner's inference cost and is timed apart.

Memory contexts: `gold` (teacher forcing) by default, `--contexts greedy` for the reference
code's pairing. On these short-answer tasks the model's greedy continuation leaves the gold
answer at the first token (SmolLM2 starts most SciQ answers with "The"), so a greedy memory pairs
contexts like "Answer: The" with the gold answer's *second* token: on SciQ the model alone
predicts 4.5% of such rows and 34.8% of teacher-forced ones. PEMA also needs many more memory
rows than the representation has dimensions (576 here): SciQ's 500 questions give about 1,000
rows, too few to learn anything that generalises; PIQA's solutions give about 20 rows each.

`--variant NAME` is the diagnosis loop: it trains only PEMA with the given settings (rank,
dropout, lr, lambda_max) on the record's memory and scores it against the record's committed
predictions (no adaptation, copy, LoRA, the record's PEMA) with paired bootstrap intervals, so
one variant costs one PEMA training and one generation pass, not the whole record. lambda_max is
chosen on the validation carve-out when `--lambda-max` is not given. Results go to
benchmarks/results/pema/<task>/variants/.

Everything is cached under --out (runs/pema by default): the head bundle, the memory (resumable),
each trained adapter, each setting's predictions; a stage reruns only when its settings change.
The table goes to runs/pema/table.md and, with --update-readme, between the `pema` markers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from record import ROOT, update_readme


# ---------------------------------------------------------------- stages run in a fresh process (measured)
def measured(fn) -> dict:
    """Run fn(); its result plus wall time and peak memory of this (fresh) process."""
    import resource

    import psutil
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    result = fn()
    out = {"result": result, "seconds": round(time.perf_counter() - start, 1)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    out["peak_rss_delta_mb"] = round((peak - baseline) / 2**20, 1)
    if cuda:
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    out["memory_measure"] = "torch.cuda.max_memory_allocated" if cuda else "peak RSS - RSS after imports"
    return out


def stage_pema(s: dict) -> dict:
    from offsite.pema import PemaConfig, train_pema_bundle

    config = PemaConfig(rank=s["rank"], epochs=s["pema_epochs"], batch_size=s["pema_batch_size"], seed=s["seed"],
                        dropout=s.get("dropout", 0.2), lr=s.get("lr", 1e-3))
    path = train_pema_bundle(s["memory"], s["head"], s["adapter"], config, overwrite=True, progress=True)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    d, r = manifest["pema"]["hidden_size"], manifest["pema"]["rank"]
    return {"trainable_parameters": 3 * d * r, "metrics": manifest["metrics"]}


def stage_lora(s: dict) -> dict:
    from peft import get_peft_model

    from offsite.adapter import LoraSettings
    from offsite.emulator import load_checkpoint
    from offsite.surgery import discover_layout, linear_module_names
    from offsite.training import FinetuneConfig, pad_token_id, tokenize_examples, train

    model, tokenizer = load_checkpoint(s["model_path"])
    layout = discover_layout(model)
    targets = linear_module_names(model, layout, list(range(layout.num_blocks)))
    conv1d = any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets)  # GPT-2 stores weights transposed
    settings = LoraSettings(s["lora_r"], 2.0 * s["lora_r"], targets, fan_in_fan_out=conv1d)
    model.requires_grad_(False)
    peft_model = get_peft_model(model, settings.to_peft())
    examples = training_examples(s, tokenizer)
    config = FinetuneConfig(lora=True, lora_r=s["lora_r"], lora_alpha=2.0 * s["lora_r"], lr=s["lora_lr"], epochs=s["lora_epochs"],
                            batch_size=s["lora_batch_size"], max_length=s["max_length"], seed=s["seed"],
                            group_by_length=s.get("group_by_length", False))
    run = train(peft_model, tokenize_examples(tokenizer, examples, config.max_length), pad_token_id(tokenizer), config, desc="lora")
    run.model.save_pretrained(s["adapter"])
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    return {"trainable_parameters": trainable, "metrics": run.metrics}


def stage_ot(s: dict) -> dict:
    """The data owner's OT adapter: full 2+2 blocks trained on a LayerDrop emulator (the emulator bundle exists)."""
    from offsite.emulator import load_emulator
    from offsite.training import FinetuneConfig, finetune

    tokenizer = load_emulator(s["emulator"]).tokenizer
    examples = training_examples(s, tokenizer)
    config = FinetuneConfig(lr=s["ot_lr"], epochs=s["lora_epochs"], batch_size=s["lora_batch_size"], max_length=s["max_length"], seed=s["seed"],
                            group_by_length=s.get("group_by_length", False))
    adapter = finetune(s["emulator"], examples, Path(s["adapter"]).parent, config, overwrite=True, progress=True)
    from offsite.adapter import load_adapter

    manifest = json.loads((adapter / "manifest.json").read_text())
    return {"trainable_parameters": sum(t.numel() for t in load_adapter(adapter).tensors.values()), "metrics": manifest["metrics"]}


def training_examples(s: dict, tokenizer):
    """The task's training pairs less the validation carve-out, in the chat template when asked."""
    from offsite.pema import load_generation_examples
    from offsite.pema.parallel import with_chat_template

    examples = load_generation_examples(s["task"], "train", limit=s["train_limit"] + s.get("val_limit", 0), seed=s["seed"],
                                        shots=s.get("shots", 0))
    examples = examples[s.get("val_limit", 0):]
    return with_chat_template(examples, tokenizer) if s.get("chat") else examples


STAGES = {"pema": stage_pema, "lora": stage_lora, "ot": stage_ot}


def run_measured(stage: str, settings: dict, out: Path) -> dict:
    """The stage in a subprocess (a clean peak-memory measurement), cached in out/result.json."""
    result_path = out / "result.json"
    if result_path.exists():
        cached = json.loads(result_path.read_text())
        if cached.get("settings") == settings:
            return cached
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, __file__, "--stage", stage, "--stage-settings", json.dumps(settings), "--stage-out", str(result_path)],
                   check=True, cwd=ROOT)
    return json.loads(result_path.read_text())


# ---------------------------------------------------------------- the record
def key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def evaluate(name: str, out: Path, settings: dict, make, examples) -> dict:
    """Predictions and scores of one setting, cached by its settings. `make` returns (server, head, adapter,
    config), or a list of predictions (a setting that generates nothing, e.g. copying the source)."""
    from offsite.pema import generate_texts, score_generations
    from offsite.pema.parallel import archaic_rate

    path = out / f"{name}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("settings") == settings:
            return cached
    made = make()
    start = time.perf_counter()
    if isinstance(made, list):
        predictions = made
    else:
        server, head, adapter, config = made
        predictions = generate_texts(server, head, [e.context for e in examples], adapter, config)
    scores = score_generations(predictions, [e.continuation for e in examples])
    scores["archaic_per_100_words"] = round(archaic_rate(predictions), 2)
    result = {"settings": settings, "seconds": round(time.perf_counter() - start, 1), "scores": scores,
              "predictions": [{"reference": e.continuation.strip(), "prediction": p} for e, p in zip(examples, predictions)]}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"{name}: {result['scores']}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="checkpoint directory or asset name")
    p.add_argument("--task", default="kjv2web", choices=["kjv2web", "web2bbe", "piqa", "sciq"], help="generation task (offsite.pema.task)")
    p.add_argument("--train-limit", type=int, default=10_000, help="training examples (KJV -> WEB ~30k, PIQA 15,561, SciQ 500)")
    p.add_argument("--val-limit", type=int, default=200, help="validation prompts carved from train (lambda for the token-level score)")
    p.add_argument("--shots", type=int, default=0, help="style transfer: worked demonstrations at the start of every prompt")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="style transfer: prompts in the chat template")
    p.add_argument("--ot", action=argparse.BooleanOptionalAction, default=True, help="also the OT LayerDrop 2-22-2 adapter")
    p.add_argument("--ot-lr", type=float, default=1e-4)
    p.add_argument("--ot-kept", type=int, default=22, help="middle blocks the OT LayerDrop emulator keeps")
    p.add_argument("--eval-limit", type=int, default=300, help="evaluation prompts, the first of the task's eval split")
    p.add_argument("--contexts", default="gold", choices=["greedy", "gold"], help="memory contexts (see above)")
    p.add_argument("--memory-batch-size", type=int, default=32, help="prompts per representation request")
    p.add_argument("--rank", type=int, default=None, help="PEMA rank (default d/4)")
    p.add_argument("--pema-epochs", type=int, default=100, help="a cap per phase; validation with patience stops it")
    p.add_argument("--pema-batch-size", type=int, default=256)
    p.add_argument("--lambda-max", type=float, default=None, help="default 0.9 (a --variant without it: chosen on validation)")
    p.add_argument("--dropout", type=float, default=0.2, help="PEMA input dropout")
    p.add_argument("--pema-lr", type=float, default=1e-3)
    p.add_argument("--variant", default=None, help="train and score only this PEMA variant against the committed record")
    p.add_argument("--baseline-only", action="store_true",
                   help="only the model alone, at --shots, scored against the committed zero-shot record (prompting probe)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=3e-4)
    p.add_argument("--lora-epochs", type=int, default=1)
    p.add_argument("--lora-batch-size", type=int, default=8)
    p.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                   help="LoRA and OT training: batches of similar length (verses vary from ~10 to ~90 tokens; less padding)")
    p.add_argument("--max-length", type=int, default=384, help="LoRA training: tokens per example (context cut from the left)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "pema"))
    p.add_argument("--update-readme", action="store_true")
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    p.add_argument("--stage-settings", help=argparse.SUPPRESS)
    p.add_argument("--stage-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:  # child process: one measured training
        import offsite.pema  # noqa: F401  (imports before the baseline: they are not training memory)
        import offsite.training  # noqa: F401
        import peft  # noqa: F401

        settings = json.loads(args.stage_settings)
        result = measured(lambda: STAGES[args.stage](settings))
        Path(args.stage_out).write_text(json.dumps({"settings": settings, **result}, indent=1))
        return
    if args.baseline_only:
        baseline_only(args)
        return
    if args.variant:
        variant(args)
        return
    args.lambda_max = 0.9 if args.lambda_max is None else args.lambda_max
    record(args)


def owner_side(args):
    """The head bundle, the model's representation server and the external memory (each cached under --out)."""
    from offsite.emulator import load_checkpoint
    from offsite.models import resolve_device, resolve_model
    from offsite.pema import MemoryConfig, RepresentationServer, build_memory, export_head_checkpoint, load_head
    from offsite.pema.parallel import PARALLEL_TASKS

    out = Path(args.out)
    model_path, name = resolve_model(args.model)
    parallel = args.task in PARALLEL_TASKS
    head_dir = out / "head"
    if not (head_dir / "manifest.json").exists():
        export_head_checkpoint(model_path, head_dir, base_name=name, overwrite=head_dir.exists())
    head = load_head(head_dir)
    model, _ = load_checkpoint(model_path)
    device = resolve_device("auto").type
    server = RepresentationServer(model.to(device))
    head.check_owner(server.info())
    chat = args.chat and parallel and bool(getattr(head.tokenizer, "chat_template", None))
    common = {"task": args.task, "train_limit": args.train_limit, "val_limit": args.val_limit, "seed": args.seed, "chat": chat}
    if args.shots:  # only when used, so the zero-shot record's cache keys stay what they were
        common["shots"] = args.shots
    memory_settings = {**common, "contexts": args.contexts, "batch_size": args.memory_batch_size}
    memory_dir = out / f"memory-{key(memory_settings)}"
    start = time.perf_counter()
    train_examples = training_examples(common, head.tokenizer)
    build_memory(server, head.tokenizer, train_examples, memory_dir, MemoryConfig(contexts=args.contexts, batch_size=args.memory_batch_size))
    return dict(out=out, model_path=model_path, name=name, head_dir=head_dir, head=head, server=server, device=device, chat=chat,
                common=common, memory_dir=memory_dir, train_examples=train_examples, memory_seconds=round(time.perf_counter() - start, 1))


def prompts(args, head, chat, split: str) -> list:
    """The evaluation split's first --eval-limit prompts, or the training split's first --val-limit (the validation
    carve-out that `training_examples` skips), in the record's prompt format."""
    from offsite.pema import load_generation_examples
    from offsite.pema.parallel import with_chat_template

    limit = args.eval_limit if split == "eval" else args.val_limit
    examples = load_generation_examples(args.task, split, limit=limit, seed=args.seed, shots=args.shots)
    return with_chat_template(examples, head.tokenizer) if chat else examples


def variant(args) -> None:
    """One PEMA variant: trained on the record's memory, scored against the record's committed predictions."""
    from offsite.pema import GenerateConfig, generate_texts, load_pema_adapter, score_generations
    from offsite.pema.evaluate import best_lambda, mixture_scores
    from offsite.pema.parallel import archaic_rate

    committed = ROOT / "benchmarks" / "results" / "pema" / args.task
    baselines = {k: json.loads((committed / f"{k}.json").read_text()) for k in ("none", "copy", "lora", "pema_gu")
                 if (committed / f"{k}.json").exists()}
    if "none" not in baselines:
        raise SystemExit(f"--variant compares against the committed record in {committed}; it has no none.json")
    ref = baselines["none"]["settings"]
    for field, value in (("eval_limit", args.eval_limit), ("max_new_tokens", args.max_new_tokens), ("shots", args.shots)):
        if ref.get(field, 0 if field == "shots" else None) != value:  # the zero-shot record predates "shots"
            raise SystemExit(f"the committed record has {field} {ref.get(field)}, this run {value}: pass the record's settings")
    o = owner_side(args)
    started = time.perf_counter()
    pema_settings = {"memory": str(o["memory_dir"]), "head": str(o["head_dir"]), "rank": args.rank, "pema_epochs": args.pema_epochs,
                     "pema_batch_size": args.pema_batch_size, "seed": args.seed, "dropout": args.dropout, "lr": args.pema_lr}
    pema_dir = o["out"] / f"pema-{key(pema_settings)}"
    pema = run_measured("pema", {**pema_settings, "adapter": str(pema_dir / "adapter")}, pema_dir)
    head, server = o["head"], o["server"]
    adapter = load_pema_adapter(pema_dir / "adapter", head)
    val = prompts(args, head, o["chat"], "train")
    token_val = mixture_scores(server, head, adapter, val)
    chosen = best_lambda(token_val)
    lambda_max = args.lambda_max if args.lambda_max is not None else max(chosen, 0.1)
    examples = prompts(args, head, o["chat"], "eval")
    if [e.continuation.strip() for e in examples] != [p["reference"] for p in baselines["none"]["predictions"]]:
        raise SystemExit("the evaluation references differ from the committed record's; pass the record's settings")
    predictions = generate_texts(server, head, [e.context for e in examples], adapter,
                                 GenerateConfig(max_new_tokens=args.max_new_tokens, lambda_max=lambda_max))
    scores = score_generations(predictions, [e.continuation for e in examples])
    scores["archaic_per_100_words"] = round(archaic_rate(predictions), 2)
    mine = {"predictions": [{"reference": e.continuation.strip(), "prediction": p} for e, p in zip(examples, predictions)]}
    scored = mixture_scores(server, head, adapter, examples, lambdas=(0.0, chosen))
    result = {
        "variant": args.variant, "settings": pema_settings, "lambda_max": lambda_max, "lambda_max_chosen_on": None if args.lambda_max
        is not None else "validation mixture NLL", "scores": scores, "training": pema,
        "token": {"lambda": chosen, "nll_model": scored[0.0]["nll"], "nll_mixture": scored[chosen]["nll"], "acc_model": scored[0.0]["acc"],
                  "acc_mixture": scored[chosen]["acc"],
                  "interval": mean_interval(scored[chosen]["example_nll"], scored[0.0]["example_nll"])},
        "validation_mixture": {str(k): {"nll": v["nll"], "acc": v["acc"]} for k, v in token_val.items()},
        "bleu_vs": {k: bleu_interval(mine, b) for k, b in baselines.items()},
        "seconds": round(time.perf_counter() - started, 1), **mine,
    }
    target = committed / "variants" / f"{args.variant}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1))
    m = pema["result"]["metrics"]
    print(f"{args.variant}: BLEU {scores['bleu']:.1f}, archaic {scores['archaic_per_100_words']:.2f}; val next-token accuracy "
          f"PEMA {100 * m['val_accuracy_pema']:.1f}% vs model {100 * m['val_accuracy_lm']:.1f}%; "
          + ", ".join(f"vs {k} {d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for k, (d, lo, hi) in result["bleu_vs"].items()))
    print(f"written to {target}")


def baseline_only(args) -> None:
    """The model alone with --shots demonstrations in every prompt, against the committed zero-shot record: does
    prompting alone make the model copy and edit? Written to benchmarks/results/pema/<task>/prompting/."""
    from offsite.emulator import load_checkpoint
    from offsite.models import resolve_device, resolve_model
    from offsite.pema import GenerateConfig, RepresentationServer, export_head_checkpoint, load_head

    committed = ROOT / "benchmarks" / "results" / "pema" / args.task
    zero_shot = json.loads((committed / "none.json").read_text())
    if (zero_shot["settings"]["eval_limit"], zero_shot["settings"]["max_new_tokens"]) != (args.eval_limit, args.max_new_tokens):
        raise SystemExit("pass the committed record's --eval-limit and --max-new-tokens")
    model_path, name = resolve_model(args.model)
    head_dir = Path(args.out) / "head"
    if not (head_dir / "manifest.json").exists():
        export_head_checkpoint(model_path, head_dir, base_name=name, overwrite=head_dir.exists())
    head = load_head(head_dir)
    server = RepresentationServer(load_checkpoint(model_path)[0].to(resolve_device("auto").type))
    chat = args.chat and bool(getattr(head.tokenizer, "chat_template", None))
    examples = prompts(argparse.Namespace(**{**vars(args), "val_limit": 0}), head, chat, "eval")
    settings = {**zero_shot["settings"], "shots": args.shots}
    result = evaluate(f"none-{args.shots}shot", committed / "prompting", settings,
                      lambda: (server, head, None, GenerateConfig(max_new_tokens=args.max_new_tokens)), examples)
    result["bleu_vs"] = {k: bleu_interval(result, json.loads((committed / f"{k}.json").read_text())) for k in ("none", "copy")}
    (committed / "prompting" / f"none-{args.shots}shot.json").write_text(json.dumps(result, indent=1))
    print(", ".join(f"vs {k} {d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for k, (d, lo, hi) in result["bleu_vs"].items()))


def record(args) -> None:
    from offsite.emulator import compress_checkpoint, load_checkpoint
    from offsite.methods import make_config
    from offsite.pema import GenerateConfig, RepresentationServer, load_generation_examples, load_pema_adapter
    from offsite.pema.evaluate import best_lambda, mixture_scores
    from offsite.pema.parallel import PARALLEL_TASKS, source_of
    from offsite.plugin import plug_in

    started = time.perf_counter()
    parallel = args.task in PARALLEL_TASKS
    o = owner_side(args)
    out, model_path, name, head_dir, head, server, device = (o[k] for k in ("out", "model_path", "name", "head_dir", "head", "server", "device"))
    chat = args.chat = o["chat"]
    common, memory_dir, train_examples, memory_seconds = o["common"], o["memory_dir"], o["train_examples"], o["memory_seconds"]

    # Data owner: PEMA. Baselines: LoRA on the full model, OT (LayerDrop 2-22-2). Each in its own process, memory measured.
    pema_settings = {"memory": str(memory_dir), "head": str(head_dir), "rank": args.rank, "pema_epochs": args.pema_epochs,
                     "pema_batch_size": args.pema_batch_size, "seed": args.seed}
    pema_dir = out / f"pema-{key(pema_settings)}"
    pema = run_measured("pema", {**pema_settings, "adapter": str(pema_dir / "adapter")}, pema_dir)
    train_common = {**common, "lora_epochs": args.lora_epochs, "lora_batch_size": args.lora_batch_size, "max_length": args.max_length,
                    "group_by_length": args.group_by_length}
    lora_settings = {**train_common, "model_path": str(model_path), "lora_r": args.lora_r, "lora_lr": args.lora_lr}
    lora_dir = out / f"lora-{key(lora_settings)}"
    lora = run_measured("lora", {**lora_settings, "adapter": str(lora_dir / "adapter")}, lora_dir)
    ot = None
    if args.ot:
        emulator = out / f"emulator-2-{args.ot_kept}-2"
        if not (emulator / "manifest.json").exists():
            compress_checkpoint(model_path, emulator, "layerdrop", make_config("layerdrop", num_kept=args.ot_kept), base_name=name,
                                overwrite=emulator.exists())
        ot_settings = {**train_common, "emulator": str(emulator), "ot_lr": args.ot_lr}
        ot_dir = out / f"ot-{key(ot_settings)}"
        ot = run_measured("ot", {**ot_settings, "adapter": str(ot_dir / "run" / "adapter")}, ot_dir)

    # Evaluation: greedy answers of each setting, on the same prompts.
    adapter = load_pema_adapter(pema_dir / "adapter", head)
    examples = prompts(args, head, chat, "eval")
    eval_dir = out / f"eval-{args.task}-{args.eval_limit}{'-chat' if chat else ''}{f'-{args.shots}shot' if args.shots else ''}"
    base = {"task": args.task, "eval_limit": args.eval_limit, "max_new_tokens": args.max_new_tokens, "model": str(model_path), "chat": chat}
    if args.shots:  # as in owner_side: a zero-shot record's cached predictions keep their key
        base["shots"] = args.shots
    generate = GenerateConfig(max_new_tokens=args.max_new_tokens, lambda_max=args.lambda_max)
    constant = GenerateConfig(max_new_tokens=args.max_new_tokens, lambda_max=args.lambda_max, gradual_unrolling=False)

    def lora_server():
        from peft import PeftModel

        tuned, _ = load_checkpoint(model_path)
        merged = PeftModel.from_pretrained(tuned, lora_dir / "adapter").merge_and_unload()
        return RepresentationServer(merged.to(device)), head, None, generate  # the head is untouched by LoRA

    def ot_server():
        plugged = plug_in(load_checkpoint(model_path)[0], ot_dir / "run" / "adapter", emulator=emulator)
        return RepresentationServer(plugged.to(device)), head, None, generate  # OT's adapter blocks never include the head

    results = {"none": evaluate("none", eval_dir, base, lambda: (server, head, None, generate), examples)}
    if parallel:
        plain = load_generation_examples(args.task, "eval", limit=args.eval_limit)
        results["copy"] = evaluate("copy", eval_dir, {**base, "copy": True}, lambda: [source_of(e) for e in plain], examples)
    results["lora"] = evaluate("lora", eval_dir, {**base, "lora": lora_settings}, lora_server, examples)
    if ot is not None:
        results["ot"] = evaluate("ot", eval_dir, {**base, "ot": ot_settings}, ot_server, examples)
    results["pema_gu"] = evaluate("pema_gu", eval_dir, {**base, "pema": pema_settings, "lambda_max": args.lambda_max, "gu": True},
                                  lambda: (server, head, adapter, generate), examples)
    results["pema_constant"] = evaluate("pema_constant", eval_dir, {**base, "pema": pema_settings, "lambda_max": args.lambda_max, "gu": False},
                                        lambda: (server, head, adapter, constant), examples)
    intervals = {k: bleu_interval(results[k], results["none"]) for k in results if k != "none"}

    # Token level: lambda chosen on the validation carve-out of the training split, then the evaluation split.
    token = None
    if args.val_limit:
        val = prompts(args, head, chat, "train")
        chosen = best_lambda(mixture_scores(server, head, adapter, val))
        scored = mixture_scores(server, head, adapter, examples, lambdas=(0.0, chosen))
        token = {"lambda": chosen, "nll_model": scored[0.0]["nll"], "nll_mixture": scored[chosen]["nll"],
                 "acc_model": scored[0.0]["acc"], "acc_mixture": scored[chosen]["acc"], "tokens": scored[0.0]["tokens"],
                 "interval": mean_interval(scored[chosen]["example_nll"], scored[0.0]["example_nll"])}
    table = make_table(args, name, len(train_examples), results, pema, lora, ot, adapter.mean_target_length, memory_seconds, device,
                       intervals, token)
    (out / "table.md").write_text(table + "\n")
    print("\n" + table + f"\n\nwritten to {out / 'table.md'} ({time.perf_counter() - started:.0f} s this run)")
    if args.update_readme:
        update_readme("pema", table)


def bleu_interval(a: dict, b: dict, resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Corpus sacreBLEU of a minus b with a paired bootstrap 95% interval over the evaluation sentences."""
    import numpy as np
    import sacrebleu

    hyp_a = [p["prediction"].strip() for p in a["predictions"]]
    hyp_b = [p["prediction"].strip() for p in b["predictions"]]
    refs = [p["reference"] for p in a["predictions"]]
    metric = sacrebleu.BLEU(effective_order=True)

    def bleu(hyps, idx):
        return metric.corpus_score([hyps[i] for i in idx], [[refs[i] for i in idx]]).score

    everything = list(range(len(refs)))
    point = bleu(hyp_a, everything) - bleu(hyp_b, everything)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        idx = rng.integers(0, len(refs), len(refs)).tolist()
        diffs.append(bleu(hyp_a, idx) - bleu(hyp_b, idx))
    low, high = np.quantile(diffs, [0.025, 0.975])
    return point, float(low), float(high)


def mean_interval(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a - b) over paired examples, with a bootstrap 95% interval."""
    import numpy as np

    d = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (resamples, d.size))].mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(d.mean()), float(low), float(high)


TASK_TEXT = {"piqa": "PIQA solution generation (goal -> correct solution)",
             "sciq": "SciQ answer generation (support paragraph + question -> answer)",
             "kjv2web": "KJV -> World English Bible style transfer (archaic -> modern), evaluation books held out",
             "web2bbe": "World English -> Basic English Bible simplification, evaluation books held out"}


def make_table(args, name, n_train, results, pema, lora, ot, mean_length, memory_seconds, device, intervals, token) -> str:
    def mb(stage):
        value = stage.get("cuda_max_allocated_mb", stage["peak_rss_delta_mb"])
        return f"{value:,.0f}"

    def row(label, key_, stage=None):
        s = results[key_]["scores"]
        train = f"{stage['result']['trainable_parameters']:,} | {mb(stage)} | {stage['seconds']:,.0f}" if stage else "0 | – | –"
        iv = intervals.get(key_)
        diff = f"{iv[0]:+.1f} [{iv[1]:+.1f}, {iv[2]:+.1f}]" if iv else "–"
        return f"| {label} | {s['bleu']:.1f} | {diff} | {s['exact_match']:.1f} | {s['archaic_per_100_words']:.2f} | {train} |"

    n = results["none"]["scores"]["n"]
    pm = pema["result"]["metrics"]
    measure = pema["memory_measure"]
    lines = [
        f"Model {name}; {TASK_TEXT[args.task]} (greedy, answer = first line, at most {args.max_new_tokens} tokens), "
        f"{n_train:,} training / {n} evaluation prompts (disjoint){'; prompts in the chat template' if args.chat else ''}. "
        f"PEMA: rank {'d/4' if args.rank is None else args.rank}, "
        f"{args.contexts} memory contexts ({pm['train_rows'] + pm['val_rows']:,} memory rows, built in {memory_seconds:.0f} s of owner "
        f"inference), lambda_max {args.lambda_max}; Gradual Unrolling over the prompt length + the estimated answer length "
        f"{mean_length:.2f} tokens (mean target length of the memory). LoRA: r {args.lora_r} on every linear layer of every block, "
        f"lr {args.lora_lr}, {args.lora_epochs} epoch(s), batch {args.lora_batch_size}. Training memory on {device}: {measure} of the "
        "training process (LoRA holds the whole fp32 model, OT the emulator, PEMA the head bundle). BLEU differences against no "
        "adaptation with paired bootstrap 95% intervals.",
        "",
        "| setting | sacreBLEU | − no adaptation | exact match % | archaic / 100 words | trainable parameters | training peak memory (MB) | training time (s) |",
        "|---|---|---|---|---|---|---|---|",
        row("no adaptation", "none"),
    ]
    if "copy" in results:
        lines.append(row("copy the source", "copy"))
    lines.append(row("LoRA, full model", "lora", lora))
    if ot is not None:
        lines.append(row(f"OT, LayerDrop 2-{args.ot_kept}-2 adapter plugged in", "ot", ot))
    lines += [
        row("PEMA, Gradual Unrolling", "pema_gu", pema),
        row(f"PEMA, constant lambda {args.lambda_max}", "pema_constant", pema),
        "",
        f"PEMA validation next-token accuracy on memory rows: {100 * pm['val_accuracy_pema']:.1f}% (the model alone: "
        f"{100 * pm['val_accuracy_lm']:.1f}%); phases stopped by {pm['rct'].get('stopped_by', '?')} / {pm['joint'].get('stopped_by', '?')}; "
        f"sacreBLEU signature {results['none']['scores']['bleu_signature']}.",
    ]
    if token:
        d, lo, hi = token["interval"]
        lines.append(f"Token level (no generation), {token['tokens']:,} evaluation target tokens: NLL per token of the mixture at lambda "
                     f"{token['lambda']:g} (chosen on {args.val_limit} validation prompts carved from train) {token['nll_mixture']:.3f} against "
                     f"{token['nll_model']:.3f} for the model alone ({d:+.3f} [{lo:+.3f}, {hi:+.3f}] per example); next-token accuracy "
                     f"{100 * token['acc_mixture']:.1f}% against {100 * token['acc_model']:.1f}%.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
