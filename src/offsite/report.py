"""The five-number report: what offsite-tuning achieves on real tasks.

Per task: full zero-shot | emulator zero-shot | emulator fine-tuned | plug-in | full fine-tuning
(the last optional, it is the expensive one), plus the plug-in minus emulator-FT gap. The
recipe plays both parties in one process but keeps the data flow of the real protocol: the
adapter is trained from the emulator bundle alone and comes back as an adapter bundle.
Every finished number is cached in `out/results.json`, so an interrupted report resumes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import model_fingerprint, read_manifest
from .configs import build_dataclass
from .distill import DistillConfig, distill
from .emulator import load_checkpoint, load_emulator, save_emulator
from .errors import ConfigError
from .methods import build_emulator, make_config
from .models import resolve_device, resolve_model
from .plugin import plug_in, plug_into_emulator
from .privacy import gap_closed, heal, verbatim_fraction
from .training import FinetuneConfig, finetune, pad_token_id, tokenize_examples, train

SETTINGS = ("full_zs", "emulator_zs", "emulator_ft", "plugin", "full_ft")
LABELS = {
    "full_zs": "full zero-shot",
    "emulator_zs": "emulator zero-shot",
    "emulator_ft": "emulator fine-tuned",
    "plugin": "plug-in",
    "full_ft": "full fine-tuning",
}


@dataclass
class ReportConfig:
    """One experiment. In YAML, `method_params` and `finetune` are nested mappings."""

    model: str = "smollm2-135m"
    tasks: list[str] = field(default_factory=lambda: ["arc_easy"])
    method: str = "layerdrop"
    method_params: dict = field(default_factory=lambda: {"num_kept": 22})
    distill: dict | None = None  # DistillConfig fields: distil the emulator before handing it over
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train_limit: int | None = None  # training examples per task (random subset, fixed seed)
    eval_limit: int | None = None  # evaluation docs per task (first N of the standard split)
    eval_batch_size: int = 32
    full_finetune: bool = False
    # Which of SETTINGS to compute (default: all but full_ft, plus full_ft with full_finetune); a benchmark that
    # shares the full model's numbers across emulators computes them in one report and the emulator ones in others.
    settings: list[str] | None = None
    perplexity_chars: int = 20_000  # held-out plain text for full vs emulator perplexity; 0 = skip
    healing_steps: int = 0  # privacy check: steps of middle-block training on generic text; 0 = skip
    out: str = "runs/report"
    results: str = ""  # where results.json goes (default: out/results.json); a benchmark keeps it under version control
    title: str = ""
    device: str = "auto"  # where evaluation runs; training places itself via accelerate

    @classmethod
    def from_dict(cls, data: dict) -> "ReportConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"report config has no option(s) {unknown}")
        if isinstance(data.get("finetune"), dict):  # typed as flags are: `lr: 1e-4` is a number, "no" is not false
            data["finetune"] = build_dataclass(FinetuneConfig, data["finetune"])
        if isinstance(data.get("distill"), dict):
            build_dataclass(DistillConfig, data["distill"])  # checked now, before any model loads
        if isinstance(data.get("tasks"), str):
            data["tasks"] = [t for t in data["tasks"].split(",") if t]
        if isinstance(data.get("settings"), str):
            data["settings"] = [t for t in data["settings"].split(",") if t]
        return cls(**data)

    def __post_init__(self):
        if self.settings is not None:
            bad = sorted(set(self.settings) - set(SETTINGS))
            if bad or not self.settings:
                raise ConfigError(f"settings must be a non-empty subset of {list(SETTINGS)}, got {self.settings}")

    def wanted(self, setting: str) -> bool:
        if self.settings is not None:
            return setting in self.settings
        return setting != "full_ft" or self.full_finetune


# What the cached numbers depend on; other options (tasks, output paths, batch size for scoring,
# extra checks) can change between runs of the same report.
RESULT_KEYS = ("model", "method", "method_params", "distill", "finetune", "train_limit", "eval_limit")
# Training options that cannot change a number (logging, checkpoint cadence, recomputation), and the value a field
# added later had implicitly before it existed (stored configs written earlier lack it): group_by_length arrived
# with the default True, but runs before it used plain shuffled batches.
FINETUNE_NEUTRAL = ("report_to", "log_every", "checkpoint_every", "gradient_checkpointing")
FINETUNE_BEFORE_IT_EXISTED = {"group_by_length": False}


def _result_identity(config: dict) -> dict:
    identity = {k: config.get(k) for k in RESULT_KEYS}
    if isinstance(identity["finetune"], dict):
        finetune = {**FINETUNE_BEFORE_IT_EXISTED, **identity["finetune"]}
        identity["finetune"] = {k: v for k, v in finetune.items() if k not in FINETUNE_NEUTRAL}
    return identity


class ResultStore:
    """results.json: {task: {setting: metrics}}, rewritten atomically after every number."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        stored = self.data.get("config")
        if stored is not None and _result_identity(stored) != _result_identity(config):
            raise ConfigError(f"{path} holds results of a different configuration; choose another --out")
        self.data["config"] = config
        self.data.setdefault("tasks", {})

    def get(self, task: str, setting: str):
        return self.data["tasks"].get(task, {}).get(setting)

    def put(self, task: str, setting: str, value: dict) -> None:
        self.data["tasks"].setdefault(task, {})[setting] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def run_report(config: ReportConfig, progress: bool = True, log=print) -> dict:
    """Compute every missing number of the report and write results.json, report.md and report.png."""
    from .evaluation import perplexity, score_multiple_choice
    from .tasks import load_eval_docs, load_generic_text, load_plain_text, load_train_examples

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = Path(config.results) if config.results else out / "results.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    store = ResultStore(results_path, _jsonable(dataclasses.asdict(config)))
    model_path, model_name = resolve_model(config.model)
    device = resolve_device(config.device)
    t0 = time.perf_counter()

    base, tokenizer = load_checkpoint(model_path)
    fingerprint = model_fingerprint(base)
    made: list[Path] = []

    def emulator_path() -> Path:
        """The emulator bundle the data owner gets, built (and distilled) on first use only: a report whose
        numbers are all cached never compresses anything."""
        if made:
            return made[0]
        emulator_dir = out / "emulator"
        if not emulator_dir.exists():
            log(f"[owner] compressing {model_name} with {config.method} {config.method_params}")
            emulator = build_emulator(base, config.method, make_config(config.method, **config.method_params))
            save_emulator(emulator, tokenizer, emulator_dir, fingerprint, model_name)
            del emulator
        elif read_manifest(emulator_dir)["base"]["fingerprint"] != fingerprint:
            raise ConfigError(f"{emulator_dir} was made from another model; choose another --out")
        if config.distill is not None:
            distilled_dir = out / "emulator-distilled"
            if not distilled_dir.exists():
                settings = build_dataclass(DistillConfig, config.distill)
                log(f"[owner] distilling the emulator on {settings.tokens:,} tokens of generic text")
                distill(model_path, emulator_dir, distilled_dir, load_generic_text(5 * settings.tokens),
                        load_plain_text(settings.eval_chars), settings, resume=True, progress=progress, log=log)
            emulator_dir = distilled_dir
        made.append(emulator_dir)
        return emulator_dir

    def score(model, docs):
        return score_multiple_choice(model, tokenizer, docs, batch_size=config.eval_batch_size, progress=progress)

    with_emulator = any(config.wanted(s) for s in ("emulator_zs", "emulator_ft", "plugin"))
    if config.perplexity_chars:
        text = load_plain_text(config.perplexity_chars)
        models = [("full", lambda: base)] + [("emulator", lambda: load_emulator(emulator_path()).model)] * with_emulator
        for name, make_model in models:
            if (store.get("_perplexity", name) or {}).get("chars") != config.perplexity_chars:
                log(f"[perplexity] {name} model on {len(text):,} characters of held-out text ...")
                result = perplexity(make_model().to(device), tokenizer, text, progress=progress)
                store.put("_perplexity", name, result | {"chars": config.perplexity_chars})
            log(f"[perplexity] {name:<8} {store.get('_perplexity', name)['ppl']:.1f}")

    if with_emulator and store.get("_privacy", "verbatim") is None:
        store.put("_privacy", "verbatim", verbatim_fraction(base, load_emulator(emulator_path())))
    if with_emulator:
        log(f"[privacy] the emulator bundle ships {100 * store.get('_privacy', 'verbatim')['fraction']:.1f}% of the base parameters verbatim")
    if with_emulator and config.healing_steps and config.perplexity_chars:
        if (store.get("_privacy", "healing") or {}).get("steps") != config.healing_steps:
            log(f"[privacy] healing: {config.healing_steps} steps of middle-block training on generic text ...")
            healed = heal(load_emulator(emulator_path()), load_generic_text(), config.healing_steps, progress=progress)
            ppl = {name: store.get("_perplexity", name)["ppl"] for name in ("full", "emulator")}
            healed_ppl = perplexity(healed.to(device), tokenizer, text, progress=progress)["ppl"]
            store.put("_privacy", "healing", {
                "steps": config.healing_steps,
                "ppl_full": ppl["full"],
                "ppl_emulator": ppl["emulator"],
                "ppl_healed": healed_ppl,
                "gap_closed": gap_closed(ppl["emulator"], healed_ppl, ppl["full"]),
            })
        h = store.get("_privacy", "healing")
        log(f"[privacy] healed emulator perplexity {h['ppl_healed']:.1f} (emulator {h['ppl_emulator']:.1f}, "
            f"full {h['ppl_full']:.1f}): {100 * h['gap_closed']:.0f}% of the gap closed")

    for task in config.tasks:
        docs = load_eval_docs(task, config.eval_limit)
        train_examples = load_train_examples(task, config.train_limit, seed=config.finetune.seed)
        log(f"[{task}] {len(train_examples)} training examples, {len(docs)} evaluation docs")

        def measure(setting: str, make_model):
            if store.get(task, setting) is None:
                log(f"[{task}] {LABELS[setting]} ...")
                start = time.perf_counter()
                model = make_model().to(device)
                result = score(model, docs)
                del model
                result["seconds"] = round(time.perf_counter() - start, 1)
                store.put(task, setting, result)
            r = store.get(task, setting)
            log(f"[{task}] {LABELS[setting]:<20} acc {100 * r['acc']:5.1f}  acc_norm {100 * r['acc_norm']:5.1f}")

        if config.wanted("full_zs"):
            measure("full_zs", lambda: base)
        base.cpu()
        if config.wanted("emulator_zs"):
            measure("emulator_zs", lambda: load_emulator(emulator_path()).model)
        run_dir = out / task / "offsite"
        adapter_dir = run_dir / "adapter"

        def adapter() -> Path:
            if not adapter_dir.exists():
                log(f"[{task}] data owner fine-tunes the adapter on the emulator")
                finetune(emulator_path(), train_examples, run_dir, config.finetune, resume=True, progress=progress)
            return adapter_dir

        if config.wanted("emulator_ft"):
            measure("emulator_ft", lambda: plug_into_emulator(load_emulator(emulator_path()), adapter()))
        if config.wanted("plugin"):
            measure("plugin", lambda: plug_in(load_checkpoint(model_path)[0], adapter(), fingerprint=fingerprint, emulator=emulator_path()))
        if config.wanted("full_ft"):
            measure("full_ft", lambda: full_finetune(model_path, tokenizer, train_examples, config.finetune, progress))

    store.data["seconds_total_last_run"] = round(time.perf_counter() - t0, 1)
    store.put("_meta", "model", {"name": model_name, "fingerprint": fingerprint})
    write_outputs(store.data, out, config)
    return store.data


def full_finetune(model_path: Path, tokenizer, examples, config: FinetuneConfig, progress: bool = True):
    """Baseline: the same training on the full model, every block trainable (or LoRA on every block)."""
    from peft import get_peft_model

    from .adapter import LoraSettings
    from .surgery import discover_layout, linear_module_names

    model, _ = load_checkpoint(model_path)
    if config.lora:
        layout = discover_layout(model)
        targets = linear_module_names(model, layout, list(range(layout.num_blocks)))
        model = get_peft_model(model, LoraSettings(config.lora_r, config.lora_alpha, targets, config.lora_dropout).to_peft())
    else:
        model.requires_grad_(True)
    features = tokenize_examples(tokenizer, examples, config.max_length)
    return train(model, features, pad_token_id(tokenizer), config, progress=progress, desc="full fine-tuning").model


# ---------------------------------------------------------------- outputs
def summary_rows(data: dict) -> list[dict]:
    """One row per task plus the mean: each setting's acc and acc_norm (in %), and the gap."""
    tasks = [t for t in data["tasks"] if not t.startswith("_")]
    rows = []
    for task in tasks:
        results = data["tasks"][task]
        row = {"task": task}
        for s in SETTINGS:
            if s in results:
                row[s] = (100 * results[s]["acc"], 100 * results[s]["acc_norm"])
                row[s + "_n"] = results[s]["n"]
                row[s + "_stderr"] = 100 * results[s]["acc_stderr"]
        rows.append(row)
    if len(rows) > 1:
        mean = {"task": "mean"}
        for s in SETTINGS:
            if all(s in r for r in rows):
                mean[s] = tuple(sum(r[s][i] for r in rows) / len(rows) for i in range(2))
        rows.append(mean)
    for row in rows:
        if "plugin" in row and "emulator_ft" in row:
            row["gap"] = tuple(row["plugin"][i] - row["emulator_ft"][i] for i in range(2))
    return rows


def markdown_table(data: dict) -> str:
    rows = summary_rows(data)
    present = [s for s in SETTINGS if any(s in r for r in rows)]
    head = "| task | " + " | ".join(LABELS[s] for s in present) + " | plug-in − emulator FT |"
    sep = "|---" * (len(present) + 2) + "|"
    lines = [head, sep]
    for r in rows:
        cells = [f"{r[s][0]:.1f} / {r[s][1]:.1f}" if s in r else "–" for s in present]
        gap = f"{r['gap'][0]:+.1f} / {r['gap'][1]:+.1f}" if "gap" in r else "–"
        lines.append(f"| {r['task']} | " + " | ".join(cells) + f" | {gap} |")
    return "\n".join(lines)


def write_outputs(data: dict, out: Path, config: ReportConfig) -> None:
    body = [
        f"# {config.title or 'offsite report'}",
        "",
        f"Model `{config.model}`, method `{config.method}` {json.dumps(config.method_params)}; "
        f"{'LoRA' if config.finetune.lora else 'full-block'} adapter, lr {config.finetune.learning_rate}, "
        f"{config.finetune.epochs} epoch(s), batch {config.finetune.batch_size}x{config.finetune.grad_accum}, "
        f"train limit {config.train_limit}, eval limit {config.eval_limit}.",
        "Accuracy in %, raw / length-normalised (per character).",
        "",
        markdown_table(data),
        "",
    ]
    privacy = data["tasks"].get("_privacy", {})
    if "verbatim" in privacy:
        body.append(f"Privacy: the emulator bundle ships {100 * privacy['verbatim']['fraction']:.1f}% of the base "
                    f"parameters verbatim ({privacy['verbatim']['verbatim_parameters']:,} of {privacy['verbatim']['base_parameters']:,}).")
    if "healing" in privacy:
        h = privacy["healing"]
        body.append(f"Healing check: {h['steps']} steps of training the emulator's middle blocks on generic text take its "
                    f"perplexity from {h['ppl_emulator']:.1f} to {h['ppl_healed']:.1f} (full model {h['ppl_full']:.1f}): "
                    f"{100 * h['gap_closed']:.0f}% of the gap closed.")
    body.append("")
    ppl = data["tasks"].get("_perplexity", {})
    if ppl:
        body += [
            f"Perplexity on held-out plain text ({config.perplexity_chars:,} characters of BoolQ passages): "
            + ", ".join(f"{name} {r['ppl']:.1f}" for name, r in ppl.items()),
            "",
        ]
    (out / "report.md").write_text("\n".join(body))
    size = json.dumps(config.method_params, sort_keys=True)
    plot(data, out / "report.png", title=f"{config.title or 'offsite report'}: {config.model}, {config.method} {size}")


def plot(data: dict, path: Path, title: str = "") -> Path | None:
    """Grouped bars: one group per task (and the mean), one bar per setting, raw accuracy with one
    standard error; full zero-shot as a reference line per group. Skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = summary_rows(data)
    present = [s for s in SETTINGS if any(s in r for r in rows)]
    fig, ax = plt.subplots(figsize=(3.6 + 1.6 * len(rows), 4))
    width = 0.8 / len(present)
    for j, s in enumerate(present):
        xs = [i + j * width for i, r in enumerate(rows) if s in r]
        ys = [r[s][0] for r in rows if s in r]
        errors = [r.get(s + "_stderr", 0.0) for r in rows if s in r]  # the mean row has none: its bar stands alone
        ax.bar(xs, ys, width, yerr=errors, capsize=2, label=LABELS[s])
    for i, r in enumerate(rows):
        if "full_zs" in r:
            ax.hlines(r["full_zs"][0], i - width / 2, i + 0.8 - width / 2, colors="black", linestyles=":", linewidth=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["task"] for r in rows])
    ax.set_ylabel("raw accuracy (%), ± one standard error")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def demo_config(**overrides) -> ReportConfig:
    """Small settings that finish in minutes on two CPU cores and still show the effect."""
    config = ReportConfig(
        model="smollm2-135m",
        tasks=["arc_easy"],
        method="layerdrop",
        method_params={"num_kept": 22},
        finetune=FinetuneConfig(lr=1e-4, batch_size=8, epochs=1, max_length=128),
        train_limit=1000,
        eval_limit=300,
        perplexity_chars=0,  # keeps the demo to the five numbers; `offsite report` adds these checks
        out="runs/demo",
        title="offsite demo",
    )
    return ReportConfig.from_dict(dataclasses.asdict(config) | {"finetune": dataclasses.asdict(config.finetune)} | overrides)
