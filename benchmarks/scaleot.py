"""Experiment record: ScaleOT(alpha, beta) against OT uniform LayerDrop at equal emulator size.

    python benchmarks/scaleot.py                                  # the recorded setting (hours on 2 CPU cores)
    python benchmarks/scaleot.py --plan                           # stage (a) + the size-matched pairs only
    python benchmarks/scaleot.py --settings 0.5:1 --tasks arc_easy
    python benchmarks/scaleot.py --update-readme                  # also fill the README's scaleot markers

ScaleOT stage (a) (harmonizers + block importance, `offsite scaleot-importance`) runs once into
runs/scaleot/artifact (resumable: checkpoints in runs/scaleot/artifact.checkpoints). For every
setting alpha:beta, the uniform LayerDrop emulator 2-k-2 whose middle has the parameter count
closest to the ScaleOT middle's (harmonizers included) is its partner; the pairs are printed
before anything is trained. Each emulator runs the five-number report (offsite.report): ScaleOT
into runs/scaleot/a<alpha>-b<beta>/, LayerDrop into runs/ot_layerdrop/k<k>/ (the cache
benchmarks/ot_layerdrop.py fills with the same settings, so a k already measured there is reused).
Full fine-tuning does not depend on the emulator: it is trained once, in the first ScaleOT report,
and shown on every row. The table goes to runs/scaleot/table.md and, with --update-readme,
between the `scaleot` markers of README.md when they exist.

`--model` also takes a checkpoint directory, so a tiny random model checks the whole path quickly:
    python benchmarks/scaleot.py --model /tmp/tiny --tasks arc_easy --train-limit 8 --eval-limit 4 \\
        --importance-steps 4 --importance-chars 20000 --rank 4 --settings 0.5:0.25,1:1 --runs /tmp/runs
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from offsite.emulator import load_checkpoint
from offsite.methods import make_config
from offsite.methods.scaleot import (
    ImportanceConfig,
    cache_anchor_blocks,
    closest_layerdrop,
    importance_checkpoint,
    load_artifact,
    middle_parameters,
    select_replaced,
)
from offsite.models import resolve_model
from offsite.report import ReportConfig, run_report
from offsite.surgery import discover_layout, get_blocks
from offsite.training import FinetuneConfig

from record import ROOT, five_number_table, update_readme

TASKS = "piqa,arc_easy,arc_challenge,openbookqa,hellaswag,sciq"
# alpha:beta. On SmolLM2-135M (26 middle blocks of 3.54 M parameters, harmonizer 74 k at rank 64):
# 0.15:1 replaces 4 blocks (~ LayerDrop k=22), 0.5:1 replaces 13 (~ k=13), 0.4:0.25 replaces 10
# and keeps a quarter of the attention rank in the other 16 (~ k=14).
SETTINGS = "0.15:1,0.5:1,0.4:0.25"


@dataclasses.dataclass
class Pair:
    alpha: float
    beta: float
    replaced: list[int]
    scaleot_params: int
    k: int
    layerdrop_params: int

    @property
    def name(self) -> str:
        return f"ScaleOT a={self.alpha:g} b={self.beta:g}"


def size_matched_pairs(model_path: Path, artifact: Path, settings: list[tuple[float, float]], num_bottom: int = 2,
                       num_top: int = 2) -> tuple[list[Pair], int]:
    """For each (alpha, beta): the ScaleOT middle's parameter count and the LayerDrop k closest to it.
    Also returns the original middle's parameter count."""
    base, _ = load_checkpoint(model_path)
    layout = discover_layout(base)
    art = load_artifact(artifact)
    anchors = cache_anchor_blocks(base.config, layout.num_blocks)
    pairs = []
    for alpha, beta in settings:
        config = make_config("scaleot", artifact=str(artifact), alpha=alpha, beta=beta, num_bottom=num_bottom, num_top=num_top)
        params = middle_parameters(base, layout, config, art)
        k, ld_params = closest_layerdrop(base, layout, params, num_bottom, num_top)
        pairs.append(Pair(alpha, beta, select_replaced(config, art, layout.num_blocks, anchors), params, k, ld_params))
    middle = range(num_bottom, layout.num_blocks - num_top)
    original = sum(p.numel() for i in middle for p in get_blocks(base, layout)[i].parameters())
    return pairs, original


def pairs_table(pairs: list[Pair], original: int) -> str:
    lines = [
        "| ScaleOT alpha : beta | blocks replaced by harmonizers | ScaleOT middle | LayerDrop k | LayerDrop middle | difference |",
        "|---|---|---|---|---|---|",
    ]
    for p in pairs:
        lines.append(
            f"| {p.alpha:g} : {p.beta:g} | {len(p.replaced)} {p.replaced} | {p.scaleot_params / 1e6:.2f} M "
            f"({100 * p.scaleot_params / original:.1f}%) | 2-{p.k}-2 | {p.layerdrop_params / 1e6:.2f} M "
            f"({100 * p.layerdrop_params / original:.1f}%) | {100 * (p.scaleot_params - p.layerdrop_params) / p.layerdrop_params:+.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="asset name or HF checkpoint directory")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--settings", default=SETTINGS, help="alpha:beta pairs, comma-separated")
    p.add_argument("--importance-steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=64, help="harmonizer rank")
    p.add_argument("--importance-batch-size", type=int, default=8)
    p.add_argument("--importance-block-size", type=int, default=128)
    p.add_argument("--importance-chars", type=int, default=None, help="characters of generic text for stage (a) (default: all)")
    p.add_argument("--train-limit", type=int, default=1000)
    p.add_argument("--eval-limit", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--full-finetune", action=argparse.BooleanOptionalAction, default=True,
                   help="the full fine-tuning baseline, trained once (default: on)")
    p.add_argument("--healing-steps", type=int, default=0, help="privacy check per emulator (0 = skip)")
    p.add_argument("--runs", default=str(ROOT / "runs"), help="parent of scaleot/ and ot_layerdrop/")
    p.add_argument("--plan", action="store_true", help="stage (a) and the size-matched pairs only")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args()

    tasks = args.tasks.split(",")
    settings = [tuple(float(x) for x in s.split(":")) for s in args.settings.split(",")]
    runs = Path(args.runs)
    model_path, model_name = resolve_model(args.model)

    start = time.perf_counter()
    artifact = runs / "scaleot" / "artifact"
    if not artifact.exists():
        # The first record's stage (a): the paper's LM-loss objective, one policy sample (before the defaults changed).
        importance = ImportanceConfig(objective="lm", policy_samples=1, rank=args.rank, steps=args.importance_steps,
                                      batch_size=args.importance_batch_size,
                                      block_size=args.importance_block_size, data_chars=args.importance_chars, checkpoint_every=25)
        importance_checkpoint(model_path, artifact, importance, base_name=model_name, resume=True)
    stage_a = load_artifact(artifact).manifest["scaleot"]["training"]
    print(f"[scaleot] stage (a): {stage_a['steps']} steps, final held-out loss {stage_a['final_heldout_loss']} "
          f"({time.perf_counter() - start:.0f} s this run)")

    pairs, original = size_matched_pairs(model_path, artifact, settings)
    plan = pairs_table(pairs, original)
    print("\nSize-matched pairs (middle parameters; the 2 + 2 adapter and the embeddings are the same for all):\n" + plan)
    if args.plan:
        return

    finetune = FinetuneConfig(lr=args.lr, batch_size=8, epochs=1, max_length=128, group_by_length=False)
    common = dict(model=args.model, tasks=tasks, finetune=finetune, train_limit=args.train_limit, eval_limit=args.eval_limit,
                  healing_steps=args.healing_steps)
    sections, done_k, notes = [], set(), []
    for n, pair in enumerate(pairs):
        clock = time.perf_counter()
        data = run_report(ReportConfig(
            method="scaleot", method_params={"artifact": str(artifact), "alpha": pair.alpha, "beta": pair.beta},
            full_finetune=args.full_finetune and n == 0, out=str(runs / "scaleot" / f"a{pair.alpha:g}-b{pair.beta:g}"),
            title=f"{pair.name}", **common,
        ))
        sections.append((f"{pair.name} ({pair.scaleot_params / 1e6:.1f} M)", data))
        notes.append(f"- {pair.name}: harmonizers for blocks {pair.replaced}; {note(data)}; this run {(time.perf_counter() - clock) / 60:.0f} min")
        if pair.k in done_k:
            continue
        done_k.add(pair.k)
        clock = time.perf_counter()
        data = run_report(ReportConfig(method="layerdrop", method_params={"num_kept": pair.k},
                                       out=str(runs / "ot_layerdrop" / f"k{pair.k}"), title=f"OT LayerDrop 2-{pair.k}-2", **common))
        sections.append((f"LayerDrop 2-{pair.k}-2 ({pair.layerdrop_params / 1e6:.1f} M)", data))
        notes.append(f"- LayerDrop 2-{pair.k}-2: {note(data)}; this run {(time.perf_counter() - clock) / 60:.0f} min")

    share_full_finetune(sections)
    header = (
        f"Model {model_name}; ScaleOT stage (a): {stage_a['steps']} steps, rank-{args.rank} harmonizers, generic text; "
        f"adapter 2+2 full blocks; lr {args.lr}, batch 8, 1 epoch over at most {args.train_limit} train examples per task; "
        f"first {args.eval_limit} docs of each standard zero-shot split. Accuracy %, raw / per-character normalised. "
        "Middle parameter counts in brackets; full fine-tuning trained once and shown on every row."
    )
    table = "\n\n".join([header, plan, five_number_table(sections, tasks), "\n".join(notes)])
    out = runs / "scaleot" / "table.md"
    out.write_text(table + "\n")
    print("\n" + table + f"\n\nwritten to {out}")
    if args.update_readme:
        if "<!-- scaleot:start -->" in (ROOT / "README.md").read_text():
            update_readme("scaleot", table)
        else:
            print("README.md has no <!-- scaleot:start/end --> markers; left unchanged")


def note(data: dict) -> str:
    ppl = data["tasks"].get("_perplexity", {})
    verbatim = data["tasks"].get("_privacy", {}).get("verbatim", {})
    parts = []
    if ppl:
        parts.append(f"emulator perplexity {ppl['emulator']['ppl']:,.0f} (full {ppl['full']['ppl']:.1f})")
    if verbatim:
        parts.append(f"ships {100 * verbatim['fraction']:.1f}% of the base parameters verbatim")
    return "; ".join(parts) or "no perplexity/privacy numbers"


def share_full_finetune(sections: list[tuple[str, dict]]) -> None:
    """Copy the full fine-tuning numbers (same model, data and recipe for every emulator) to rows without them."""
    shared = {}
    for _, data in sections:
        for task, results in data["tasks"].items():
            if "full_ft" in results:
                shared.setdefault(task, results["full_ft"])
    for _, data in sections:
        for task, value in shared.items():
            if task in data["tasks"]:
                data["tasks"][task].setdefault("full_ft", value)


if __name__ == "__main__":
    main()
