"""Experiment record: OT uniform LayerDrop on SmolLM2-135M, several emulator depths, six tasks.

    python benchmarks/ot_layerdrop.py                       # the recorded setting (hours on 2 CPU cores)
    python benchmarks/ot_layerdrop.py --tasks arc_easy,sciq --kept 22 --eval-limit 200
    python benchmarks/ot_layerdrop.py --update-readme       # also rewrite the README's table

Each (k, task) runs the five-number report (offsite.report) into runs/ot_layerdrop/k<K>/, which
resumes where it stopped. The combined table goes to runs/ot_layerdrop/table.md and, with
--update-readme, between the `ot-layerdrop` markers in README.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from offsite.report import ReportConfig, run_report
from offsite.training import FinetuneConfig

from record import ROOT, five_number_table, update_readme

TASKS = "piqa,arc_easy,arc_challenge,openbookqa,hellaswag,sciq"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--kept", default="22,13", help="middle blocks kept (k), comma-separated; 2+k+2 blocks")
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--healing-steps", type=int, default=100, help="privacy check per emulator (0 = skip)")
    p.add_argument("--full-finetune", action="store_true", help="also the full fine-tuning baseline (expensive)")
    p.add_argument("--out", default=str(ROOT / "runs" / "ot_layerdrop"))
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args()

    finetune = FinetuneConfig(lora=args.lora, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, max_length=128,
                              group_by_length=False)
    sections = []
    for k in [int(x) for x in args.kept.split(",")]:
        start = time.perf_counter()
        config = ReportConfig(
            model=args.model,
            tasks=args.tasks.split(","),
            method="layerdrop",
            method_params={"num_kept": k},
            finetune=finetune,
            train_limit=args.train_limit,
            eval_limit=args.eval_limit,
            full_finetune=args.full_finetune,
            healing_steps=args.healing_steps,
            out=str(Path(args.out) / f"k{k}"),
            title=f"OT LayerDrop 2-{k}-2",
        )
        data = run_report(config)
        sections.append((k, data, time.perf_counter() - start))

    table = combined_table(sections, args)
    out = Path(args.out) / "table.md"
    out.write_text(table + "\n")
    print("\n" + table + f"\n\nwritten to {out}")
    if args.update_readme:
        update_readme("ot-layerdrop", table)


def combined_table(sections, args) -> str:
    header = (
        f"Model {args.model}; adapter 2+2 {'LoRA' if args.lora else 'full blocks'}; lr {args.lr}, batch {args.batch_size}, "
        f"{args.epochs} epoch over at most {args.train_limit} train examples per task; first {args.eval_limit} docs of each "
        "standard zero-shot split. Accuracy %, raw / per-character normalised."
    )
    named = [(f"2-{k}-2", data) for k, data, _ in sections]
    return header + "\n\n" + five_number_table(named, args.tasks.split(","))


if __name__ == "__main__":
    main()
