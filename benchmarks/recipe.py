"""The data owner's recipe, tuned on validation docs carved from the train split (never the evaluation split).

    python benchmarks/recipe.py --list                       # the configs, and what is measured
    python benchmarks/recipe.py                              # every missing config (resumable)
    python benchmarks/recipe.py --configs lr3e-4,epochs2     # some of them
    python benchmarks/recipe.py --table --update-readme      # the table from what is measured

The frontier's recipe (lr 1e-4, one epoch, batch 8, the 2 + 2 adapter as full blocks) was fixed
before anything was tuned. This sweeps it one knob at a time on the ~85% LayerDrop emulator
(the size where the issue's goal is plug-in >= full fine-tuning - 1): learning rate, epochs,
a 3 + 3 adapter (LayerDrop keeping 20 of the 24 middle blocks, 83%), length-grouped batches
(offsite's default since they double tokens/s), and LoRA on the adapter blocks. Full fine-tuning gets the same learning-rate and epoch sweep, so the gap is measured
between two tuned recipes. `on-full*` train the adapter on the full model itself (no emulator): they split the
plug-in's gap to full fine-tuning into the emulator's part and the adapter's own.

Validation: for each task the train docs are shuffled by seed 0 (the order `load_train_examples`
uses); the first `--val` docs are validation and the next `--train-limit` are trained on (SciQ
has 500 train docs: 100 and 400). Each config trains one adapter per task and scores the plug-in
(and, for full fine-tuning, the tuned model) on the validation docs. Every number is written to
benchmarks/results/recipe/<model>/<config>.json as it finishes; the emulators and adapters under
runs/recipe/ are scratch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from record import ROOT, update_readme

TASKS = ("arc_easy", "sciq", "piqa")
BASE = {"lr": 1e-4, "epochs": 1, "adapter": 2, "lora": False, "grouped": False}
# One knob at a time from the frontier's recipe. "full-*": fine-tuning the whole model, the ceiling.
CONFIGS = {
    "base": {},
    "lr3e-5": {"lr": 3e-5},
    "lr3e-4": {"lr": 3e-4},
    "lr1e-3": {"lr": 1e-3},
    "epochs2": {"epochs": 2},
    "epochs3": {"epochs": 3},
    "adapter3": {"adapter": 3},
    "lr3e-4-epochs2-adapter3": {"lr": 3e-4, "epochs": 2, "adapter": 3},  # the three knobs that each helped, together
    "grouped": {"grouped": True},
    "lora-lr1e-3": {"lora": True, "lr": 1e-3},
    "lora-lr3e-4": {"lora": True, "lr": 3e-4},
    # The adapter trained on the full model itself (all middle blocks kept, nothing emulated): the ceiling of
    # adapter-only tuning. Between it and full-base lies the adapter's capacity; below it, the emulator's mismatch.
    "on-full": {"share": 1.0},
    "on-full-tuned": {"share": 1.0, "lr": 3e-4, "epochs": 2, "adapter": 3},
    "full-base": {"full": True},
    "full-lr3e-5": {"full": True, "lr": 3e-5},
    "full-lr3e-4": {"full": True, "lr": 3e-4},
    "full-epochs2": {"full": True, "epochs": 2},
}
SHARE = 0.85


def settings_of(name: str) -> dict:
    return {**BASE, "full": False, **CONFIGS[name]}


def split(task: str, val: int, train_limit: int):
    """(validation docs, training examples) from the task's train split, disjoint."""
    from offsite.data import Example
    from offsite.tasks import load_train_docs

    docs = load_train_docs(task, seed=0)  # doc i is load_train_examples' example i
    n_val = min(val, len(docs) // 5)
    return docs[:n_val], [Example(d.context, d.choices[d.gold]) for d in docs[n_val:n_val + train_limit]]


def emulator_for(adapter: int, model_path: Path, name: str, runs: Path, share: float = SHARE) -> Path:
    from transformers import AutoConfig

    from offsite.emulator import compress_checkpoint
    from offsite.methods import make_config

    blocks = AutoConfig.from_pretrained(model_path, local_files_only=True).get_text_config().num_hidden_layers
    middle = blocks - 2 * adapter
    kept = round(share * middle)
    out = runs / f"emulator-{adapter}-{kept}-{adapter}"
    if not (out / "manifest.json").exists():
        compress_checkpoint(model_path, out, "layerdrop", make_config("layerdrop", num_kept=kept, num_bottom=adapter, num_top=adapter),
                            base_name=name, overwrite=out.exists())
    return out


def run_config(name: str, args) -> dict:
    import torch

    from offsite.emulator import load_checkpoint
    from offsite.evaluation import score_multiple_choice
    from offsite.models import resolve_model
    from offsite.plugin import plug_in
    from offsite.report import full_finetune
    from offsite.training import FinetuneConfig, finetune

    s = settings_of(name)
    model_path, model_name = resolve_model(args.model)
    runs = Path(args.runs)
    results_path = Path(args.results) / f"{name}.json"
    done = json.loads(results_path.read_text()) if results_path.exists() else {"settings": s, "tasks": {}}
    if done.get("settings") != s:
        raise SystemExit(f"{results_path} holds another config's numbers; move it away first")
    config = FinetuneConfig(lr=s["lr"], epochs=s["epochs"], lora=s["lora"], batch_size=8, max_length=128, seed=0,
                            group_by_length=s["grouped"])
    for task in args.tasks:
        if task in done["tasks"]:
            continue
        start = time.perf_counter()
        val_docs, examples = split(task, args.val, args.train_limit)
        if s["full"]:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
            model = full_finetune(model_path, tokenizer, examples, config, progress=False)
        else:
            emulator = emulator_for(s["adapter"], model_path, model_name, runs, s.get("share", SHARE))
            adapter = finetune(emulator, examples, runs / name / task, config, overwrite=True, progress=False)
            model, tokenizer = load_checkpoint(model_path)
            model = plug_in(model, adapter, emulator=emulator)
        with torch.inference_mode():
            scores = score_multiple_choice(model, tokenizer, val_docs, batch_size=32, progress=False)
        done["tasks"][task] = {**scores, "train_examples": len(examples), "seconds": round(time.perf_counter() - start, 1)}
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(done, indent=1))
        print(f"[recipe] {name} {task}: validation acc {100 * scores['acc']:.1f} ({len(val_docs)} docs, "
              f"{done['tasks'][task]['seconds']:.0f} s)", flush=True)
    return done


def table(args) -> str:
    from offsite.stats import paired_bootstrap

    rows = {}
    for name in CONFIGS:
        path = Path(args.results) / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text())
            if all(t in data["tasks"] for t in args.tasks):
                rows[name] = data
    if not rows:
        return "nothing measured yet"

    def bits(name):
        return {t: [c == "1" for c in rows[name]["tasks"][t]["correct"]] for t in args.tasks}

    lines = [f"Validation docs carved from each task's train split ({', '.join(args.tasks)}); accuracy %, mean over the tasks. "
             "Brackets: paired bootstrap 95% interval of the difference to the frontier's recipe (`base`, or `full-base` for "
             "full fine-tuning); last column: the plug-in against the best full fine-tuning config measured (the goal is >= -1).", "",
             "| config | what changes | " + " | ".join(args.tasks) + " | mean | − its base | − best full FT |",
             "|---|---|" + "---|" * len(args.tasks) + "---|---|---|"]
    full_means = {n: sum(d["tasks"][t]["acc"] for t in args.tasks) for n, d in rows.items() if settings_of(n)["full"]}
    best_full = max(full_means, key=full_means.get) if full_means else None
    for name, data in rows.items():
        s = settings_of(name)
        change = ", ".join(f"{k} {v}" for k, v in CONFIGS[name].items() if k not in ("full", "share")) or "the frontier's recipe"
        change = ("full fine-tuning; " if s["full"] else "adapter on the full model, no emulator; " if s.get("share") == 1.0 else "") + change
        accs = [100 * data["tasks"][t]["acc"] for t in args.tasks]
        base = "full-base" if s["full"] else "base"
        diff = "–"
        if base in rows and name != base:
            d = paired_bootstrap([bits(name)[t] for t in args.tasks], [bits(base)[t] for t in args.tasks])
            diff = str(d)
        to_full = "–"
        if best_full and not s["full"]:
            d = paired_bootstrap([bits(name)[t] for t in args.tasks], [bits(best_full)[t] for t in args.tasks])
            to_full = f"{d} ({best_full})"
        lines.append(f"| {name} | {change} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {sum(accs) / len(accs):.1f} | {diff} | {to_full} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--configs", default=None, help=f"comma-separated (default: all of {', '.join(CONFIGS)})")
    p.add_argument("--val", type=int, default=300, help="validation docs per task (at most a fifth of its train docs)")
    p.add_argument("--train-limit", type=int, default=1000)
    p.add_argument("--runs", default=str(ROOT / "runs" / "recipe"))
    p.add_argument("--results", default=None)
    p.add_argument("--list", action="store_true")
    p.add_argument("--table", action="store_true")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args()
    args.tasks = args.tasks.split(",")
    args.results = args.results or str(ROOT / "benchmarks" / "results" / "recipe" / Path(args.model).name)
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    if args.list:
        for name in names:
            path = Path(args.results) / f"{name}.json"
            have = json.loads(path.read_text())["tasks"] if path.exists() else {}
            print(f"{name:<14} {', '.join(t for t in args.tasks if t in have) or 'nothing'} measured")
        return
    if not args.table:
        for name in names:
            run_config(name, args)
    text = table(args)
    print(text)
    if args.update_readme:
        update_readme("recipe", text)


if __name__ == "__main__":
    main()
