"""Experiment record: PEMA against LoRA and no adaptation, answer generation, SmolLM2-135M.

    python benchmarks/pema.py                                    # the recorded setting: PIQA (see --help for its size)
    python benchmarks/pema.py --task sciq --train-limit 500      # SciQ answers (only 500 training questions exist offline)
    python benchmarks/pema.py --train-limit 100 --eval-limit 50  # a quick look
    python benchmarks/pema.py --update-readme                    # also rewrite the README's PEMA table

Settings compared, all scored on the same evaluation prompts of the task (offsite.pema.task:
PIQA solutions or SciQ answers; greedy decoding, the answer is the generation up to its first
line break):

- no adaptation: the model alone;
- LoRA on the full model (every linear layer of every block, peft, offsite's training loop):
  what a data owner could do if the owner handed over all weights;
- PEMA with Gradual Unrolling, and PEMA with a constant lambda (same adapter): the data owner
  holds only the head bundle and the external memory, and asks the owner for representations.

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

    config = PemaConfig(rank=s["rank"], epochs=s["pema_epochs"], batch_size=s["pema_batch_size"], seed=s["seed"])
    path = train_pema_bundle(s["memory"], s["head"], s["adapter"], config, overwrite=True, progress=True)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    d, r = manifest["pema"]["hidden_size"], manifest["pema"]["rank"]
    return {"trainable_parameters": 3 * d * r, "metrics": manifest["metrics"]}


def stage_lora(s: dict) -> dict:
    from peft import get_peft_model

    from offsite.adapter import LoraSettings
    from offsite.emulator import load_checkpoint
    from offsite.pema import load_generation_examples
    from offsite.surgery import discover_layout, linear_module_names
    from offsite.training import FinetuneConfig, pad_token_id, tokenize_examples, train

    model, tokenizer = load_checkpoint(s["model_path"])
    layout = discover_layout(model)
    targets = linear_module_names(model, layout, list(range(layout.num_blocks)))
    conv1d = any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets)  # GPT-2 stores weights transposed
    settings = LoraSettings(s["lora_r"], 2.0 * s["lora_r"], targets, fan_in_fan_out=conv1d)
    model.requires_grad_(False)
    peft_model = get_peft_model(model, settings.to_peft())
    examples = load_generation_examples(s["task"], "train", limit=s["train_limit"], seed=s["seed"])
    config = FinetuneConfig(lora=True, lora_r=s["lora_r"], lora_alpha=2.0 * s["lora_r"], lr=s["lora_lr"], epochs=s["lora_epochs"],
                            batch_size=s["lora_batch_size"], max_length=s["max_length"], seed=s["seed"])
    run = train(peft_model, tokenize_examples(tokenizer, examples, config.max_length), pad_token_id(tokenizer), config, desc="lora")
    run.model.save_pretrained(s["adapter"])
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    return {"trainable_parameters": trainable, "metrics": run.metrics}


STAGES = {"pema": stage_pema, "lora": stage_lora}


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


def evaluate(name: str, out: Path, settings: dict, make) -> dict:
    """Predictions and scores of one setting, cached by its settings."""
    from offsite.pema import generate_texts, load_generation_examples, score_generations

    path = out / f"{name}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("settings") == settings:
            return cached
    examples = load_generation_examples(settings["task"], "eval", limit=settings["eval_limit"])
    server, head, adapter, config = make()
    start = time.perf_counter()
    predictions = generate_texts(server, head, [e.context for e in examples], adapter, config)
    result = {"settings": settings, "seconds": round(time.perf_counter() - start, 1),
              "scores": score_generations(predictions, [e.continuation for e in examples]),
              "predictions": [{"reference": e.continuation.strip(), "prediction": p} for e, p in zip(examples, predictions)]}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"{name}: {result['scores']}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="checkpoint directory or asset name")
    p.add_argument("--task", default="piqa", choices=["piqa", "sciq"], help="generation task (offsite.pema.task)")
    p.add_argument("--train-limit", type=int, default=3000, help="training examples (SciQ has 500, PIQA 15,561)")
    p.add_argument("--eval-limit", type=int, default=300, help="evaluation prompts, the first of the task's eval split")
    p.add_argument("--contexts", default="gold", choices=["greedy", "gold"], help="memory contexts (see above)")
    p.add_argument("--memory-batch-size", type=int, default=32, help="prompts per representation request")
    p.add_argument("--rank", type=int, default=512)
    p.add_argument("--pema-epochs", type=int, default=10, help="at most, per phase (early stopping)")
    p.add_argument("--pema-batch-size", type=int, default=256)
    p.add_argument("--lambda-max", type=float, default=0.9)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=3e-4)
    p.add_argument("--lora-epochs", type=int, default=1)
    p.add_argument("--lora-batch-size", type=int, default=8)
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
    record(args)


def record(args) -> None:
    from offsite.emulator import load_checkpoint
    from offsite.models import resolve_device, resolve_model
    from offsite.pema import (GenerateConfig, MemoryConfig, RepresentationServer, build_memory, export_head_checkpoint,
                              load_generation_examples, load_head, load_pema_adapter)

    out = Path(args.out)
    model_path, name = resolve_model(args.model)
    started = time.perf_counter()

    # Owner: the head bundle. Data owner + owner: the external memory (resumable).
    head_dir = out / "head"
    if not (head_dir / "manifest.json").exists():
        export_head_checkpoint(model_path, head_dir, base_name=name, overwrite=head_dir.exists())
    head = load_head(head_dir)
    model, _ = load_checkpoint(model_path)
    device = resolve_device("auto").type
    server = RepresentationServer(model.to(device))
    head.check_owner(server.info())
    memory_settings = {"task": args.task, "train_limit": args.train_limit, "contexts": args.contexts, "seed": args.seed,
                       "batch_size": args.memory_batch_size}
    memory_dir = out / f"memory-{key(memory_settings)}"
    start = time.perf_counter()
    train_examples = load_generation_examples(args.task, "train", limit=args.train_limit, seed=args.seed)
    build_memory(server, head.tokenizer, train_examples, memory_dir, MemoryConfig(contexts=args.contexts, batch_size=args.memory_batch_size))
    memory_seconds = round(time.perf_counter() - start, 1)

    # Data owner: PEMA. Baseline: LoRA on the full model. Each in its own process, memory measured.
    pema_settings = {"memory": str(memory_dir), "head": str(head_dir), "rank": args.rank, "pema_epochs": args.pema_epochs,
                     "pema_batch_size": args.pema_batch_size, "seed": args.seed}
    pema_dir = out / f"pema-{key(pema_settings)}"
    pema = run_measured("pema", {**pema_settings, "adapter": str(pema_dir / "adapter")}, pema_dir)
    lora_settings = {"model_path": str(model_path), "task": args.task, "train_limit": args.train_limit, "lora_r": args.lora_r, "lora_lr": args.lora_lr,
                     "lora_epochs": args.lora_epochs, "lora_batch_size": args.lora_batch_size, "max_length": args.max_length, "seed": args.seed}
    lora_dir = out / f"lora-{key(lora_settings)}"
    lora = run_measured("lora", {**lora_settings, "adapter": str(lora_dir / "adapter")}, lora_dir)

    # Evaluation: greedy answers of each setting.
    adapter = load_pema_adapter(pema_dir / "adapter", head)
    eval_dir = out / f"eval-{args.task}-{args.eval_limit}"
    base = {"task": args.task, "eval_limit": args.eval_limit, "max_new_tokens": args.max_new_tokens, "model": str(model_path)}
    generate = GenerateConfig(max_new_tokens=args.max_new_tokens, lambda_max=args.lambda_max)
    constant = GenerateConfig(max_new_tokens=args.max_new_tokens, lambda_max=args.lambda_max, gradual_unrolling=False)

    def lora_server():
        from peft import PeftModel

        tuned, _ = load_checkpoint(model_path)
        merged = PeftModel.from_pretrained(tuned, lora_dir / "adapter").merge_and_unload()
        return RepresentationServer(merged.to(device)), head, None, generate  # the head is untouched by LoRA

    results = {
        "none": evaluate("none", eval_dir, base, lambda: (server, head, None, generate)),
        "lora": evaluate("lora", eval_dir, {**base, "lora": lora_settings}, lora_server),
        "pema_gu": evaluate("pema_gu", eval_dir, {**base, "pema": pema_settings, "lambda_max": args.lambda_max, "gu": True},
                            lambda: (server, head, adapter, generate)),
        "pema_constant": evaluate("pema_constant", eval_dir, {**base, "pema": pema_settings, "lambda_max": args.lambda_max, "gu": False},
                                  lambda: (server, head, adapter, constant)),
    }
    table = make_table(args, name, len(train_examples), results, pema, lora, adapter.mean_target_length, memory_seconds, device)
    (out / "table.md").write_text(table + "\n")
    print("\n" + table + f"\n\nwritten to {out / 'table.md'} ({time.perf_counter() - started:.0f} s this run)")
    if args.update_readme:
        update_readme("pema", table)


TASK_TEXT = {"piqa": "PIQA solution generation (goal -> correct solution)",
             "sciq": "SciQ answer generation (support paragraph + question -> answer)"}


def make_table(args, name, n_train, results, pema, lora, mean_length, memory_seconds, device) -> str:
    def mb(stage):
        value = stage.get("cuda_max_allocated_mb", stage["peak_rss_delta_mb"])
        return f"{value:,.0f}"

    def row(label, key_, stage=None):
        s = results[key_]["scores"]
        train = f"{stage['result']['trainable_parameters']:,} | {mb(stage)} | {stage['seconds']:,.0f}" if stage else "0 | – | –"
        return f"| {label} | {s['bleu']:.1f} | {s['exact_match']:.1f} | {train} |"

    n = results["none"]["scores"]["n"]
    pm = pema["result"]["metrics"]
    measure = pema["memory_measure"]
    lines = [
        f"Model {name}; {TASK_TEXT[args.task]} (greedy, answer = first line, at most {args.max_new_tokens} tokens), "
        f"{n_train:,} training / {n} evaluation prompts (disjoint). PEMA: rank {args.rank}, {args.contexts} memory contexts "
        f"({pm['train_rows'] + pm['val_rows']:,} memory rows, built in {memory_seconds:.0f} s of owner inference), "
        f"lambda_max {args.lambda_max}; Gradual Unrolling over the estimated length L = {mean_length:.2f} tokens (mean target length "
        f"of the memory). LoRA: r {args.lora_r} on every linear layer of every block, lr {args.lora_lr}, {args.lora_epochs} epochs, "
        f"batch {args.lora_batch_size}. Training memory on {device}: {measure} of the training process "
        "(LoRA holds the whole fp32 model, PEMA the head bundle).",
        "",
        "| setting | sacreBLEU | exact match % | trainable parameters | training peak memory (MB) | training time (s) |",
        "|---|---|---|---|---|---|",
        row("no adaptation", "none"),
        row("LoRA, full model", "lora", lora),
        row("PEMA, Gradual Unrolling", "pema_gu", pema),
        row(f"PEMA, constant lambda {args.lambda_max}", "pema_constant", pema),
        "",
        f"PEMA validation next-token accuracy on memory rows: {100 * pm['val_accuracy_pema']:.1f}% (the model alone: "
        f"{100 * pm['val_accuracy_lm']:.1f}%); sacreBLEU signature {results['none']['scores']['bleu_signature']}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
