"""Experiment record: emulator methods side by side at equal size on SmolLM2-135M.

    python benchmarks/emulator_methods.py                        # every variant, the recorded setting
    python benchmarks/emulator_methods.py --variants gradot,magnitude --tasks arc_easy
    python benchmarks/emulator_methods.py --update-readme

Every variant keeps half of the middle (13 of SmolLM2's 26 middle blocks' parameters) and the
same 2+2 full-block adapter, so the rows differ only in how the middle was made:

- layerdrop:   OT uniform LayerDrop, 2-13-2 (shares its cache with benchmarks/ot_layerdrop.py);
- layerdrop+kd: the same emulator distilled on generic text before it is handed over (OT + KD);
- gradot:      GradOT, training-free, gradient-preserving scores, 50% of the middle parameters;
- magnitude:   the GradOT pipeline with components ranked by singular value / channel norm (ablation).

Each variant runs the five-number report into runs/<variant dir>/, resuming where it stopped; the
table goes to runs/emulator_methods/table.md and, with --update-readme, into README.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from offsite.report import ReportConfig, run_report
from offsite.training import FinetuneConfig

from record import ROOT, five_number_table, update_readme

TASKS = "arc_easy,sciq"
HALF = 0.5  # share of the middle parameters every emulator keeps
DISTILL = {"tokens": 150_000, "block_size": 128, "batch_size": 8, "lr": 1e-4, "eval_every": 25, "eval_chars": 10_000}
VARIANTS = {
    # name: (output dir under runs/, method, method params, distillation settings)
    "layerdrop": ("ot_layerdrop/k13", "layerdrop", {"num_kept": 13}, None),
    "layerdrop+kd": ("emulator_methods/layerdrop-kd", "layerdrop", {"num_kept": 13}, DISTILL),
    "gradot": ("emulator_methods/gradot", "gradot", {"target_fraction": HALF}, None),
    "magnitude": ("emulator_methods/magnitude", "gradot", {"target_fraction": HALF, "score": "magnitude"}, None),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--train-limit", type=int, default=1000)
    p.add_argument("--eval-limit", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--runs", default=str(ROOT / "runs"))
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args()

    finetune = FinetuneConfig(lr=args.lr, batch_size=8, epochs=1, max_length=128, group_by_length=False)
    sections, notes = [], []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        subdir, method, params, distill = VARIANTS[name]
        start = time.perf_counter()
        config = ReportConfig(
            model=args.model, tasks=args.tasks.split(","), method=method, method_params=params, distill=distill,
            finetune=finetune, train_limit=args.train_limit, eval_limit=args.eval_limit,
            out=str(Path(args.runs) / subdir), title=f"{name} at half the middle",
        )
        data = run_report(config)
        sections.append((name, data))
        notes.append(describe(name, config, data))
        print(f"{name}: {(time.perf_counter() - start) / 60:.0f} min")

    header = (
        f"Model {args.model}; every emulator keeps {HALF:.0%} of the middle parameters; adapter 2+2 full blocks; lr {args.lr}, "
        f"batch 8, 1 epoch over at most {args.train_limit} train examples per task; first {args.eval_limit} docs of each "
        "standard zero-shot split. Accuracy %, raw / per-character normalised."
    )
    table = header + "\n\n" + five_number_table(sections, args.tasks.split(","), label="method") + "\n\n" + "\n".join(notes)
    out = Path(args.runs) / "emulator_methods" / "table.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print("\n" + table + f"\n\nwritten to {out}")
    if args.update_readme:
        update_readme("emulator-methods", table)


def describe(name: str, config: ReportConfig, data: dict) -> str:
    """One line per variant: emulator size and perplexity, plus what compression/distillation recorded."""
    out = Path(config.out)
    manifest = json.loads((out / ("emulator-distilled" if config.distill else "emulator") / "manifest.json").read_text())
    ppl = data["tasks"].get("_perplexity", {})
    verbatim = data["tasks"].get("_privacy", {}).get("verbatim", {})
    parts = [f"- {name}: emulator perplexity {ppl['emulator']['ppl']:,.0f} (full {ppl['full']['ppl']:.1f})" if ppl else f"- {name}:"]
    if verbatim:
        parts.append(f"ships {100 * verbatim['fraction']:.1f}% of the base parameters verbatim")
    distilled = manifest["method"]["params"].get("distillation")
    if distilled:
        parts.append(f"distilled {distilled['steps']} steps ({distilled['train_tokens']:,} tokens), kept step "
                     f"{distilled['selected_step']} (held-out perplexity {distilled['selected_perplexity']:,.1f})")
    return "; ".join(parts)


if __name__ == "__main__":
    main()
