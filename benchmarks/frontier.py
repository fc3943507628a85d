"""The privacy-utility frontier: every emulator method at two sizes, against full fine-tuning.

    python benchmarks/frontier.py --list                       # the grid, and what is already measured
    python benchmarks/frontier.py --points layerdrop-50        # measure one point (all its seeds)
    python benchmarks/frontier.py                              # everything missing, in grid order
    python benchmarks/frontier.py --table --update-readme      # table, plot, README record from what is measured

A point is (method, size): size is the share of the original middle's parameters the emulator
keeps (~85% and ~50%; the 2 + 2 adapter and the embeddings are the same everywhere). Each
(point, data-owner seed) is one five-number report (offsite.report) without the full-model
numbers, which do not depend on the emulator: `full` is its own report per seed (full zero-shot
once, full fine-tuning per seed) with the same training recipe and data.

Resumable across sessions: every finished number is written at once to
benchmarks/results/frontier/<model>/<point>-s<seed>.json, which is committed; the bundles and
adapters under runs/frontier/ are scratch (a point whose numbers are all there is never rebuilt).
Every evaluation stores per-doc outcomes, so every difference in the table carries a paired
bootstrap 95% interval (stratified by task; seeds enter as the per-doc mean over seeds).

Utility = plug-in accuracy (higher is better; full fine-tuning is the ceiling). Privacy = the
emulator's own accuracy after fine-tuning (lower is more private), its perplexity, the share of
base parameters it ships verbatim, and (at 50%) the healing attack: a data owner trains the
emulator's middle on generic text for `--healing-steps` steps; how much of the emulator -> full
perplexity gap (in log space) that closes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from offsite.report import ReportConfig, run_report
from offsite.stats import paired_bootstrap, seed_mean
from offsite.training import FinetuneConfig

from record import ROOT, update_readme

TASKS = "arc_easy,sciq,piqa"
# The six OT tasks: the best point of each method (its 85% point) and full fine-tuning also run on the other
# three (`--six-tasks`), which extends the same per-point files (ARC-Challenge's validation split has 299 docs).
SIX_TASKS = "arc_easy,sciq,piqa,arc_challenge,openbookqa,hellaswag"
SIX_TASK_POINTS = ["full"] + [f"{m}-85" for m in ("layerdrop", "gradot", "scaleot-local", "crash", "layerdrop+kd", "magnitude")]
DISTILL = {"tokens": 150_000, "block_size": 128, "batch_size": 8, "lr": 1e-4, "eval_every": 25, "eval_chars": 10_000}
# Share of the middle each size keeps. LayerDrop and CRaSh keep k = round(share x M) of the M middle
# blocks (SmolLM2, M = 26: 22 and 13; Gemma3-270M, M = 14: 12 and 7) and GradOT the same fraction k / M
# of the middle's parameters, so every method of one size ships the same middle size.
SHARES = {"85": 0.85, "50": 0.5}


def middle_size(model: str, adapter: int = 2) -> int:
    """M, the middle blocks between the adapter's `adapter` + `adapter` blocks, from the model's config alone."""
    from transformers import AutoConfig

    from offsite.models import resolve_model

    model_path, _ = resolve_model(model)
    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    return config.get_text_config().num_hidden_layers - 2 * adapter


def size_of(size: str, model: str, adapter: int = 2) -> tuple[int, float]:
    """(LayerDrop's k, the fraction of the middle's parameters) of a size on this model."""
    m = middle_size(model, adapter)
    k = round(SHARES[size] * m)
    return k, k / m


# ScaleOT stage (a), one artifact per harmonizer objective: K = 4 policy samples with the leave-one-out
# baseline, harmonizer rank ~3% of d (the paper's rank 64 on d = 2048 is 3.1%), direct swap measurement.
IMPORTANCE = {"steps": 120, "rank_fraction": 1 / 32, "policy_samples": 4, "batch_size": 8, "block_size": 128,
              "checkpoint_every": 20, "direct_sequences": 32}
# alpha per size: 4 of 26 blocks replaced (~85% of the middle), 13 (~50%); harmonizers add < 0.6%.
SCALEOT_ALPHA = {"85": 0.15, "50": 0.5}


def artifact_dir(model: str, objective: str) -> Path:
    """Stage-(a) artifacts are owner-side and expensive (tens of minutes): kept outside the work tree."""
    import hashlib

    key = hashlib.sha256(json.dumps([model, objective, IMPORTANCE], sort_keys=True).encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "offsite" / "scaleot" / f"{Path(model).name}-{objective}-{key}"


def ensure_artifact(model: str, objective: str) -> Path:
    from offsite.methods.scaleot import ImportanceConfig, importance_checkpoint
    from offsite.models import resolve_model

    path = artifact_dir(model, objective)
    if not path.exists():
        model_path, name = resolve_model(model)
        start = time.perf_counter()
        importance_checkpoint(model_path, path, ImportanceConfig(objective=objective, **IMPORTANCE), base_name=name,
                              resume=True, progress=False)
        print(f"[frontier] scaleot stage (a), objective {objective}: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return path


def scaleot_kept(model: str, objective: str, alpha: float) -> tuple[list[int], list[int]]:
    """(replaced, kept) middle blocks of the ScaleOT emulator at `alpha` from this objective's artifact."""
    from offsite.methods import make_config
    from offsite.methods.scaleot import load_artifact, select_replaced

    art = load_artifact(ensure_artifact(model, objective))
    config = make_config("scaleot", artifact=str(art.path), alpha=alpha)
    replaced = select_replaced(config, art, max(art.middle) + 3)  # 2 + 2 adapter: blocks = last middle + 1 + the top 2
    return replaced, [b for b in art.middle if b not in replaced]


def method_spec(name: str, size: str, model: str = "smollm2-135m", adapter: int = 2) -> tuple[str, dict, dict | None]:
    """(method, method_params, distill settings) of a frontier point."""
    if adapter != 2:  # a wider adapter (the tuned recipe): the same share of the narrower middle
        if name not in TUNED_METHODS:
            raise SystemExit(f"a {adapter} + {adapter} adapter is wired for {', '.join(TUNED_METHODS)} only, not {name}")
        k, fraction = size_of(size, model, adapter)
        wide = {"num_bottom": adapter, "num_top": adapter}
        if name == "layerdrop":
            return "layerdrop", {"num_kept": k, **wide}, None
        return "gradot", {"target_fraction": round(fraction, 4), **wide}, None
    k, fraction = size_of(size, model)
    if name.startswith("scaleot-"):  # scaleot-<objective>, or scaleot-<objective>+direct: ranked by the direct swap measurement
        objective = name.removeprefix("scaleot-")
        params = {"alpha": SCALEOT_ALPHA[size]}
        if objective.endswith("+direct"):
            objective, params["ranking"] = objective.removesuffix("+direct"), "direct"
        return "scaleot", {"artifact": str(ensure_artifact(model, objective)), **params}, None
    if name.startswith("ld@scaleot-"):  # ablation: LayerDrop keeping exactly ScaleOT's kept blocks (placement alone)
        _, kept = scaleot_kept(model, name.removeprefix("ld@scaleot-"), SCALEOT_ALPHA[size])
        return "layerdrop", {"kept_blocks": kept}, None
    if name.startswith("harm@ld-"):  # ablation: harmonizers at uniform LayerDrop's dropped positions
        from offsite.methods.layerdrop import uniform_indices

        art = ensure_artifact(model, name.removeprefix("harm@ld-"))
        middle = list(range(2, 2 + middle_size(model)))
        kept = {middle[0] + i for i in uniform_indices(len(middle), k)}
        return "scaleot", {"artifact": str(art), "replaced_blocks": [b for b in middle if b not in kept]}, None
    if name.startswith("gradot-bal"):  # GradOT's lambda sweep on the balanced scale: gradot-bal<lambda>
        lam = float(name.removeprefix("gradot-bal"))
        return "gradot", {"target_fraction": round(fraction, 4), "lambda_scale": "balanced", "lambda_attn": lam,
                          "lambda_mlp": lam}, None
    specs = {
        "layerdrop": ("layerdrop", {"num_kept": k}, None),
        "layerdrop+kd": ("layerdrop", {"num_kept": k}, DISTILL),
        "gradot": ("gradot", {"target_fraction": round(fraction, 4)}, None),
        "magnitude": ("gradot", {"target_fraction": round(fraction, 4), "score": "magnitude"}, None),
        "crash": ("crash", {"num_clusters": k}, None),
    }
    return specs[name]


METHODS = ("layerdrop", "gradot", "scaleot-local", "crash", "layerdrop+kd", "magnitude")
# Grid order: the 50% size first (where methods differ most), then 85%.
GRID = [f"{m}-50" for m in METHODS] + [f"{m}-85" for m in METHODS]
# ScaleOT's objectives and ablations (issue: which component fails), and GradOT's lambda sweep.
SCALEOT_STUDY = ["scaleot-match-50", "ld@scaleot-match-50", "harm@ld-match-50", "scaleot-match+direct-50", "scaleot-lm-50",
                 "scaleot-local-50", "scaleot-local+direct-50", "scaleot-match-85", "scaleot-lm-85", "scaleot-local-85"]
LAMBDA_SWEEP = ["gradot-bal0.3-50", "gradot-bal1-50", "gradot-bal3-50"]
# The data owner's recipe as tuned on validation (benchmarks/recipe.py: lr 3e-4, two epochs and a 3 + 3 adapter, each
# +3 points there, +4.0 together); `<point>+tuned` evaluates it once on the evaluation docs. Full fine-tuning's best
# validated recipe is the grid's own, so the `full` point stays its reference.
TUNED = {"lr": 3e-4, "epochs": 2, "adapter": 3}
TUNED_METHODS = ("layerdrop", "gradot")
TUNED_POINTS = [f"{m}-{size}+tuned" for size in ("85", "50") for m in TUNED_METHODS]
# The study repeats the grid's ScaleOT points for its own reading; each point is listed (and tabled) once.
ALL_POINTS = list(dict.fromkeys(GRID + SCALEOT_STUDY + LAMBDA_SWEEP + TUNED_POINTS))


def parse_point(point: str) -> tuple[str, str, bool]:
    """'layerdrop-85+tuned' -> ('layerdrop', '85', True): the method as method_spec names it, the size, the tuned recipe."""
    name, size = point.removesuffix("+tuned").rsplit("-", 1)
    return name, size, point.endswith("+tuned")


def method_name(point: str) -> str:
    """The tables' and plots' method label: 'gradot-85' -> 'gradot', 'layerdrop-85+tuned' -> 'layerdrop (tuned)'."""
    name, _, tuned = parse_point(point)
    return name + (" (tuned)" if tuned else "")


def result_path(results: Path, point: str, seed: int) -> Path:
    return results / f"{point.replace('+', '_').replace('@', '_at_')}-s{seed}.json"


def point_config(point: str, seed: int, args) -> ReportConfig:
    tuned = point.endswith("+tuned")
    recipe = TUNED if tuned else {"lr": args.lr, "epochs": 1, "adapter": 2}
    finetune = FinetuneConfig(lr=recipe["lr"], batch_size=8, epochs=recipe["epochs"], max_length=128, seed=seed,
                              group_by_length=False)  # the grid's recipe, fixed before the default changed
    common = dict(model=args.model, tasks=args.tasks.split(","), finetune=finetune, train_limit=args.train_limit,
                  eval_limit=args.eval_limit, results=str(result_path(Path(args.results), point, seed)),
                  out=str(Path(args.runs) / point / f"s{seed}"), title=f"frontier {point} seed {seed}")
    if point == "full":
        return ReportConfig(method="layerdrop", method_params={"num_kept": 2}, settings=point_settings(point, seed, args),
                            perplexity_chars=20_000, **common)
    name, size, _ = parse_point(point)
    method, params, distill = method_spec(name, size, args.model, recipe["adapter"])  # may run ScaleOT stage (a): only when measuring
    return ReportConfig(method=method, method_params=params, distill=distill, settings=point_settings(point, seed, args),
                        healing_steps=args.healing_steps if size == "50" else 0, perplexity_chars=20_000, **common)


def point_settings(point: str, seed: int, args) -> list[str]:
    if point == "full":
        return ["full_zs", "full_ft"] if seed == args.seeds_list[0] else ["full_ft"]
    return ["emulator_zs", "emulator_ft", "plugin"]


def seeds_of(point: str, args) -> list[int]:
    """Two data-owner seeds for the baseline and the grid's 50% points (where the claims are made); one for
    the 85% points, the lambda sweep and the ablations (until a second is run with --seeds). The six-task record
    is one seed throughout, its full-model baseline included."""
    if (point == "full" and not args.six_tasks) or (point in GRID and point.endswith("-50")):
        return args.seeds_list
    return args.seeds_list[:1]


def measured_runs(results: Path, point: str, tasks: list[str], args) -> list[dict]:
    """Every seed of `point` measured on every task (a second seed run later with --seeds counts too; a seed
    still running must not hide the ones that are done)."""
    return [d for s in args.seeds_list if complete(d := load(results, point, s), tasks, point_settings(point, s, args))]


def share_emulator(point: str, seed: int, args) -> None:
    """The owner issues one emulator per point; every data-owner seed trains on it. A later seed's report starts
    from a copy of the first built seed's bundles (emulator, and distilled emulator) instead of rebuilding them
    (distillation alone is ~40 min here). The report checks the copy's base fingerprint as it would its own."""
    import shutil

    target = Path(args.runs) / point / f"s{seed}"
    for source in sorted((Path(args.runs) / point).glob("s*")):
        if source == target or not (source / "emulator" / "manifest.json").exists():
            continue
        for name in ("emulator", "emulator-distilled"):
            if (source / name / "manifest.json").exists() and not (target / name).exists():
                target.mkdir(parents=True, exist_ok=True)
                tmp = target / f".{name}.copying"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(source / name, tmp)
                tmp.rename(target / name)
        return


def load(results: Path, point: str, seed: int) -> dict | None:
    path = result_path(results, point, seed)
    return json.loads(path.read_text()) if path.is_file() else None


def complete(data: dict | None, tasks: list[str], settings: list[str]) -> bool:
    if data is None:
        return False
    return all(s in data["tasks"].get(t, {}) for t in tasks for s in settings)


# ------------------------------------------------------------------ the table
def outcomes(runs: list[dict], tasks: list[str], setting: str) -> list | None:
    """Per task, the per-doc outcomes of `setting` (mean over the seeds' runs), or None if any is missing."""
    per_task = []
    for t in tasks:
        got = [r["tasks"].get(t, {}).get(setting, {}).get("correct") for r in runs]
        if not got or None in got:
            return None
        per_task.append(seed_mean(got))
    return per_task


# ScaleOT's study: which part moves the plug-in. (label, point, reference point), paired over the same docs.
STUDY_PAIRS = [
    ("ScaleOT's placement alone (LayerDrop keeping ScaleOT's blocks − uniform LayerDrop)", "ld@scaleot-match-50", "layerdrop-50"),
    ("harmonizers at ScaleOT's placement (ScaleOT − LayerDrop keeping ScaleOT's blocks)", "scaleot-match-50", "ld@scaleot-match-50"),
    ("harmonizers at uniform placement (harmonizers at LayerDrop's dropped blocks − uniform LayerDrop)", "harm@ld-match-50", "layerdrop-50"),
    ("learned vs direct ranking (ScaleOT ranked by direct swaps − learned importance)", "scaleot-match+direct-50", "scaleot-match-50"),
    ("harmonizer objective: LM loss only − LM + matching", "scaleot-lm-50", "scaleot-match-50"),
    ("harmonizer objective: block-local regression − LM + matching", "scaleot-local-50", "scaleot-match-50"),
    ("block-local harmonizers ranked by direct swaps (the --onload path) − learned importance", "scaleot-local+direct-50",
     "scaleot-local-50"),
    ("ScaleOT (LM + matching) at 85% − uniform LayerDrop at 85%", "scaleot-match-85", "layerdrop-85"),
    ("ScaleOT (block-local) at 85% − uniform LayerDrop at 85%", "scaleot-local-85", "layerdrop-85"),
]


# GradOT's lambda sweep: the balanced privacy term against the default absolute lambda, same docs.
GRADOT_SWEEP_PAIRS = [
    (f"balanced lambda {lam} − absolute lambda 1 (the default)", f"gradot-bal{lam}-50", "gradot-50") for lam in ("0.3", "1", "3")
]


def study_lines(rows: list[dict], title: str = "ScaleOT study", pairs: list[tuple[str, str, str]] = STUDY_PAIRS) -> str:
    """A study's paired differences of plug-in and emulator-FT accuracy, for the pairs measured so far."""
    by_point = {r["point"]: r for r in rows}
    lines = [f"- {label}: {paired_bootstrap(by_point[a]['_plugin'], by_point[b]['_plugin'])} (plug-in), "
             f"{paired_bootstrap(by_point[a]['_emu_ft'], by_point[b]['_emu_ft'])} (emulator FT)"
             for label, a, b in pairs if a in by_point and b in by_point and by_point[a]["_emu_ft"] and by_point[b]["_emu_ft"]]
    return (f"\n\n{title}, differences in points with paired 95% intervals:\n\n" + "\n".join(lines)) if lines else ""


def mean_acc(per_task) -> float:
    return 100 * sum(x.mean() for x in per_task) / len(per_task)


def frontier_rows(results: Path, tasks: list[str], args, points: list[str] | None = None) -> tuple[list[dict], dict]:
    baseline = [d for s in args.seeds_list if (d := load(results, "full", s))]
    full_zs = outcomes(baseline[:1], tasks, "full_zs") if baseline else None
    full_ft_runs = [d for d in baseline if all("full_ft" in d["tasks"].get(t, {}) for t in tasks)]
    full_ft = outcomes(full_ft_runs, tasks, "full_ft") if full_ft_runs else None
    rows = []
    for point in points or ALL_POINTS:
        runs = measured_runs(results, point, tasks, args)
        plugin = outcomes(runs, tasks, "plugin") if runs else None
        if plugin is None:
            continue
        name, size = method_name(point), parse_point(point)[1]
        emu_ft, emu_zs = outcomes(runs, tasks, "emulator_ft"), outcomes(runs, tasks, "emulator_zs")
        first = runs[0]["tasks"]
        row = {"point": point, "method": name, "size": size, "seeds": len(runs), "plugin": mean_acc(plugin),
               "emulator_ft": mean_acc(emu_ft) if emu_ft else None, "emulator_zs": mean_acc(emu_zs) if emu_zs else None,
               "ppl": first.get("_perplexity", {}).get("emulator", {}).get("ppl"),
               "verbatim": first.get("_privacy", {}).get("verbatim", {}).get("fraction"),
               "healing": first.get("_privacy", {}).get("healing", {}).get("gap_closed"), "_plugin": plugin, "_emu_ft": emu_ft}
        if emu_ft:
            row["gap"] = paired_bootstrap(plugin, emu_ft)
        if full_ft:
            row["vs_full_ft"] = paired_bootstrap(plugin, full_ft)
        rows.append(row)
    by_point = {r["point"]: r for r in rows}
    for r in rows:  # against LayerDrop of the same size, paired over the same docs
        ref = by_point.get(f"layerdrop-{r['size']}")
        if ref and r is not ref:
            r["vs_layerdrop"] = paired_bootstrap(r["_plugin"], ref["_plugin"])
    full = {"full_zs": mean_acc(full_zs) if full_zs else None, "full_ft": mean_acc(full_ft) if full_ft else None,
            "full_ft_seeds": len(full_ft_runs), "ppl": baseline[0]["tasks"].get("_perplexity", {}).get("full", {}).get("ppl") if baseline else None}
    if full_zs and full_ft:
        full["ft_vs_zs"] = paired_bootstrap(full_ft, full_zs)
    return rows, full


def markdown(rows: list[dict], full: dict, tasks: list[str], args) -> str:
    def pct(x):
        return "–" if x is None else f"{x:.1f}"

    lines = [
        f"Model {args.model}; adapter 2+2 full blocks; lr {args.lr}, batch 8, 1 epoch over {args.train_limit} train examples "
        f"per task and seed; first {args.eval_limit} docs of each standard zero-shot split of {', '.join(tasks)}. Raw accuracy %, "
        "mean over the tasks (and over seeds where there are two). Brackets: paired bootstrap 95% intervals of the difference "
        "(10,000 resamples, stratified by task). Rows marked (tuned): the recipe chosen on validation (lr "
        f"{TUNED['lr']}, {TUNED['epochs']} epochs, a {TUNED['adapter']} + {TUNED['adapter']} adapter, the same share of the "
        "narrower middle), scored once on these docs; their LayerDrop column is against the grid's recipe.",
        "",
        f"Full model: zero-shot {pct(full['full_zs'])}, fine-tuned {pct(full['full_ft'])} ({full['full_ft_seeds']} seed(s))"
        + (f", fine-tuning gains {full['ft_vs_zs']}" if "ft_vs_zs" in full else "") + f"; perplexity {pct(full['ppl'])}.",
        "",
        "| method | size | seeds | emulator ZS | emulator FT | plug-in | plug-in − emulator FT | plug-in − LayerDrop | plug-in − full FT | emulator ppl | verbatim | healing closes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = "–" if r["ppl"] is None else f"{r['ppl']:,.0f}"
        verbatim = "–" if r["verbatim"] is None else f"{100 * r['verbatim']:.1f}%"
        healing = "–" if r["healing"] is None else f"{100 * r['healing']:.0f}%"
        lines.append(
            f"| {r['method']} | {r['size']}% | {r['seeds']} | {pct(r['emulator_zs'])} | {pct(r['emulator_ft'])} | {r['plugin']:.1f} | "
            f"{r.get('gap', '–')} | {r.get('vs_layerdrop', '–')} | {r.get('vs_full_ft', '–')} | {ppl} | {verbatim} | {healing} |")
    return "\n".join(lines)


def per_task_table(results: Path, tasks: list[str], args) -> str:
    """Every number measured so far, point by point and task by task (complete points or not)."""
    baseline = load(results, "full", args.seeds_list[0]) or {"tasks": {}}
    lines = ["| point | seed | task | full ZS | full FT | emulator ZS | emulator FT | plug-in |", "|---|---|---|---|---|---|---|---|"]

    def cell(data, task, setting):
        r = data["tasks"].get(task, {}).get(setting)
        return f"{100 * r['acc']:.1f}" if r else "–"

    for point in ALL_POINTS:
        for seed in args.seeds_list:
            data = load(results, point, seed)
            if not data:
                continue
            for task in [t for t in SIX_TASKS.split(",") if t in tasks or t in data["tasks"]]:
                if task not in data["tasks"]:
                    continue
                lines.append(f"| {point} | {seed} | {task} | {cell(baseline, task, 'full_zs')} | {cell(baseline, task, 'full_ft')} | "
                             f"{cell(data, task, 'emulator_zs')} | {cell(data, task, 'emulator_ft')} | {cell(data, task, 'plugin')} |")
    return "\n".join(lines)


def plot(rows: list[dict], full: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = {"85": "o", "50": "s"}
    # One colour per method across every plot, in the grid's order, so the two plots read alike.
    # tab10 for the first ten (the grid's methods first), then tab20's light shades.
    colours = {m: f"C{i}" if i < 10 else plt.cm.tab20((2 * (i - 10) + 1) % 20)
               for i, m in enumerate(dict.fromkeys(map(method_name, ALL_POINTS)))}
    for r in rows:
        if r["emulator_ft"] is None:
            continue
        yerr = None
        if "vs_full_ft" in r:  # the plug-in's own interval: the difference's interval shifted to the plug-in
            iv = r["vs_full_ft"]
            yerr = [[iv.diff - iv.low], [iv.high - iv.diff]]
        ax.errorbar(r["emulator_ft"], r["plugin"], yerr=yerr, fmt=markers[r["size"]], color=colours[r["method"]], capsize=3,
                    label=f"{r['method']} {r['size']}%")
    for key, style, label in (("full_ft", "--", "full fine-tuning"), ("full_zs", ":", "full zero-shot")):
        if full[key] is not None:
            ax.axhline(full[key], linestyle=style, color="grey", label=label)
    ax.set_xlabel("emulator fine-tuned accuracy (%)  ← more private")
    ax.set_ylabel("plug-in accuracy (%)  ↑ more useful")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--six-tasks", action="store_true",
                   help="run the six OT tasks for the best point of each method and full fine-tuning (default points: "
                        + ", ".join(SIX_TASK_POINTS) + ")")
    p.add_argument("--points", default=None, help="comma-separated points (default: the whole grid, 'full' first)")
    p.add_argument("--seeds", default="0,1", help="data-owner seeds (the 85%% points use the first only)")
    p.add_argument("--train-limit", type=int, default=1000)
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--healing-steps", type=int, default=100)
    p.add_argument("--runs", default=str(ROOT / "runs" / "frontier"))
    p.add_argument("--results", default=None, help="where the per-point JSON goes (default: benchmarks/results/frontier/<model>)")
    p.add_argument("--list", action="store_true", help="print the grid and what is measured, run nothing")
    p.add_argument("--table", action="store_true", help="only build the table and plot from what is measured")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args()
    args.seeds_list = [int(s) for s in args.seeds.split(",")]
    args.results = args.results or str(ROOT / "benchmarks" / "results" / "frontier" / Path(args.model).name)
    if args.six_tasks:
        args.tasks = SIX_TASKS
    results, tasks = Path(args.results), args.tasks.split(",")

    points = args.points.split(",") if args.points else (SIX_TASK_POINTS if args.six_tasks else ["full"] + ALL_POINTS)
    for point in points:
        if point != "full" and point not in ALL_POINTS:
            raise SystemExit(f"unknown point {point!r}; choose from full, {', '.join(ALL_POINTS)}")
    if not args.table:
        for point in points:
            for seed in seeds_of(point, args):
                done = complete(load(results, point, seed), tasks, point_settings(point, seed, args))
                if args.list:
                    print(f"{point:<22} seed {seed}: {'measured' if done else 'missing'}")
                    continue
                if done:
                    continue
                start = time.perf_counter()
                share_emulator(point, seed, args)
                run_report(point_config(point, seed, args), progress=False)
                print(f"[frontier] {point} seed {seed}: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        if args.list:
            return

    tasks = TASKS.split(",") if args.six_tasks else tasks  # the main table stays on the grid's tasks
    rows, full = frontier_rows(results, tasks, args)
    table = markdown(rows, full, tasks, args) + study_lines(rows) + study_lines(rows, "GradOT's lambda sweep at 50%", GRADOT_SWEEP_PAIRS)
    six = SIX_TASKS.split(",")
    rows6, full6 = frontier_rows(results, six, args, points=SIX_TASK_POINTS[1:])
    if rows6 and full6["full_ft"] is not None:
        table += "\n\nThe six OT tasks, each method's 85% point (seed 0):\n\n" + markdown(rows6, full6, six, args)
        plot(rows6, full6, results / "frontier-six-tasks.png", f"{args.model}: the six OT tasks, each method at ~85%")
    table += "\n\nEvery number measured so far (raw accuracy %, 500 docs per task; ARC-Challenge 299):\n\n" + per_task_table(results, tasks, args)
    results.mkdir(parents=True, exist_ok=True)
    (results / "table.md").write_text(table + "\n")
    plot(rows, full, results / "frontier.png", f"{args.model}: plug-in vs emulator fine-tuned ({', '.join(tasks)})")
    print(table)
    if args.update_readme:
        # The default model's record is the README's frontier table; another model's goes in its own block.
        update_readme("frontier" if args.model == "smollm2-135m" else f"frontier-{Path(args.model).name}", table)


if __name__ == "__main__":
    main()
