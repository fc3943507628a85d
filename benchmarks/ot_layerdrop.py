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
import re
import time
from pathlib import Path

from offsite.report import SETTINGS, ReportConfig, run_report, summary_rows
from offsite.training import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
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

    finetune = FinetuneConfig(lora=args.lora, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, max_length=128)
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
        update_readme(table)


def combined_table(sections, args) -> str:
    tasks = args.tasks.split(",")
    present = [s for s in SETTINGS if any(s in r for _, d, _ in sections for r in summary_rows(d))]
    lines = [
        f"Model {args.model}; adapter 2+2 {'LoRA' if args.lora else 'full blocks'}; lr {args.lr}, batch {args.batch_size}, "
        f"{args.epochs} epoch over at most {args.train_limit} train examples per task; first {args.eval_limit} docs of each "
        "standard zero-shot split. Accuracy %, raw / per-character normalised.",
        "",
        "| emulator | task | " + " | ".join(s.replace("_", " ") for s in present) + " | plug-in − emu FT |",
        "|---" * (len(present) + 3) + "|",
    ]
    for k, data, _ in sections:
        for row in summary_rows(data):
            if row["task"] not in tasks + ["mean"]:
                continue
            cells = [f"{row[s][0]:.1f} / {row[s][1]:.1f}" if s in row else "–" for s in present]
            gap = f"{row['gap'][0]:+.1f} / {row['gap'][1]:+.1f}" if "gap" in row else "–"
            lines.append(f"| 2-{k}-2 | {row['task']} | " + " | ".join(cells) + f" | {gap} |")
    return "\n".join(lines)


def update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    pattern = re.compile(r"(<!-- ot-layerdrop:start -->\n).*?(\n<!-- ot-layerdrop:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit("README.md has no <!-- ot-layerdrop:start/end --> markers")
    readme.write_text(pattern.sub(lambda m: m.group(1) + table + m.group(2), text))
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
