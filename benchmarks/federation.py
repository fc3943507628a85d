"""Federated offsite-tuning on the real Flower engine: 4 data owners against one owner holding all the data.

    python benchmarks/federation.py                        # every arm missing, resumable (arm by arm, round by round)
    python benchmarks/federation.py --table --update-readme
    python benchmarks/federation.py --model tiny:DIR --train-limit 40 --eval-limit 20 --rounds 2   # a smoke run

One task's training set (ARC-Easy, `--train-limit` examples) is split across `--clients` data owners,
IID (a random split) and non-IID (each owner holds one quantile of question length). Every arm
trains the 2+2 adapter of one uniform LayerDrop emulator (2-22-2 on SmolLM2-135M) with the same
recipe and the same total data budget (one pass over each example), and is scored as a plug-in into
the full model on the same evaluation docs:

- central:    one owner holding all the data (the ceiling federation aims for);
- alone-k:    data owner k alone, on its own IID shard (what each could do without the federation);
- fed-iid:    FedAvg over `--rounds` rounds on the IID shards, each round `1/rounds` of every shard;
- fed-noniid: the same on the non-IID shards;
- full-zs:    the full model with no adaptation.

The federated arms run `offsite.federation.launch.serve` and one `join` SuperNode per data owner on
127.0.0.1 (SuperLink, SuperNodes, flwr run: the real engine), so the bytes sent per round and the wall
time are those of the engine (on this machine the clients share its cores). Every difference is
quoted with a paired bootstrap 95% interval over the evaluation docs (offsite.stats).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def log(text: str) -> None:
    print(f"[federation] {text}", flush=True)


def recipe_for(args, examples: int, rounds: int = 1):
    from offsite.configs import FinetuneConfig

    steps = max(1, math.ceil(math.ceil(examples / args.batch_size) / rounds))  # one pass over the data in all
    return FinetuneConfig(lr=args.lr, batch_size=args.batch_size, max_steps=steps, max_length=args.max_length, seed=args.seed,
                          group_by_length=False)  # the recorded runs' recipe


def shards(examples, clients: int, seed: int) -> dict[str, list]:
    """IID: a seeded random split. Non-IID: sorted by question length, one contiguous quantile each."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    iid = [[examples[i] for i in order[k::clients]] for k in range(clients)]
    by_length = sorted(range(len(examples)), key=lambda i: (len(examples[i].context), i))
    size = math.ceil(len(examples) / clients)
    noniid = [[examples[i] for i in by_length[k * size:(k + 1) * size]] for k in range(clients)]
    return {"iid": iid, "noniid": noniid}


def score_plugin(args, model_path, emulator, adapter, docs) -> dict:
    from offsite.emulator import load_checkpoint
    from offsite.evaluation import score_multiple_choice
    from offsite.plugin import plug_in

    model, tokenizer = load_checkpoint(model_path)
    if adapter is not None:
        model = plug_in(model, adapter, emulator=emulator)
    r = score_multiple_choice(model, tokenizer, docs, batch_size=16, progress=False)
    return {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"], "correct": r["correct"]}


def train_alone(args, emulator, examples, run_dir: Path) -> Path:
    from offsite.training import finetune

    adapter = run_dir / "adapter"
    if (adapter / "manifest.json").exists():
        return adapter
    return finetune(emulator, examples, run_dir, recipe_for(args, len(examples)), overwrite=True, progress=False)


def train_federated(args, emulator, parts: list, run_dir: Path) -> tuple[Path, list[dict]]:
    from offsite.data import save_examples
    from offsite.federation.aggregate import load_round
    from offsite.federation.configs import ClientConfig, ServerConfig
    from offsite.federation.launch import free_port, join, serve, stop

    port = free_port()
    recipe = recipe_for(args, max(len(p) for p in parts), args.rounds)
    nodes = []
    try:
        for k, part in enumerate(parts):
            work = run_dir / f"owner-{k}"
            work.mkdir(parents=True, exist_ok=True)
            save_examples(part, work / "data.jsonl")
            nodes.append(join(ClientConfig(superlink=f"127.0.0.1:{port}", bundle=str(emulator), data=str(work / "data.jsonl"),
                                           work=str(work), insecure=True), wait=False))
        config = ServerConfig(emulator=str(emulator), out=str(run_dir / "server"), rounds=args.rounds, min_clients=len(parts),
                              wait_s=600, round_timeout_s=3 * 3600, port=port, insecure=True)
        adapter = serve(config, dataclasses.asdict(recipe))
    finally:
        for node in nodes:
            stop(node)
    rounds = [dataclasses.asdict(load_round(run_dir / "server" / f"round-{r:04d}")) for r in range(1, args.rounds + 1)]
    for r in rounds:
        r["adapter"] = str(r["adapter"])
    return adapter, rounds


def run_arm(arm: str, args, ctx) -> dict:
    runs = Path(args.runs)
    started = time.perf_counter()
    info: dict = {}
    if arm == "full-zs":
        adapter = None
    elif arm == "central":
        adapter = train_alone(args, ctx["emulator"], ctx["train"], runs / "central")
    elif arm.startswith("alone-"):
        k = int(arm.removeprefix("alone-"))
        adapter = train_alone(args, ctx["emulator"], ctx["shards"]["iid"][k], runs / arm)
    elif arm in ("fed-iid", "fed-noniid"):
        adapter, rounds = train_federated(args, ctx["emulator"], ctx["shards"][arm.removeprefix("fed-")], runs / arm)
        info["round_log"] = rounds
    else:
        raise SystemExit(f"unknown arm {arm}")
    info["train_seconds"] = round(time.perf_counter() - started, 1)
    info["plugin"] = score_plugin(args, ctx["model_path"], ctx["emulator"], adapter, ctx["docs"])
    return info


def arms_of(args) -> list[str]:
    return ["full-zs", "central"] + [f"alone-{k}" for k in range(args.clients)] + ["fed-iid", "fed-noniid"]


def table(results: Path, args) -> str:
    from offsite.stats import paired_bootstrap

    found = {a: json.loads((results / f"{a}.json").read_text()) for a in arms_of(args) if (results / f"{a}.json").exists()}
    if "central" not in found:
        return "(nothing measured yet)"
    central = found["central"]["plugin"]["correct"]
    lines = ["| arm | plug-in acc | vs central (95% CI) | bytes sent per client per round | bytes received per round | wall time |",
             "|---|---|---|---|---|---|"]
    for arm, data in found.items():
        plug = data["plugin"]
        diff = "–" if arm == "central" else str(paired_bootstrap([plug["correct"]], [central]))
        rounds = data.get("round_log", [])
        sent = f"{rounds[-1]['info']['bytes_sent_per_client'] / 1e6:.1f} MB" if rounds else "–"
        got = f"{sum(r['info']['bytes_received'] for r in rounds) / len(rounds) / 1e6:.1f} MB" if rounds else "–"
        wall = f"{data['train_seconds'] / 60:.1f} min" if arm != "full-zs" else "–"
        lines.append(f"| {arm} | {100 * plug['acc']:.1f} | {diff} | {sent} | {got} | {wall} |")
    alone = [found[a]["plugin"]["correct"] for a in found if a.startswith("alone-")]
    notes = []
    if alone and "fed-iid" in found:
        from offsite.stats import seed_mean

        notes.append(f"fed-iid − mean of the owners alone: "
                     f"{paired_bootstrap([found['fed-iid']['plugin']['correct']], [seed_mean(alone)])}")
    return "\n".join(lines + ([""] + notes if notes else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--train-limit", type=int, default=1000)
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--num-kept", type=int, default=22, help="middle blocks the LayerDrop emulator keeps (2-22-2 on SmolLM2)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default="", help="comma-separated (default: every arm not yet measured)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "federation"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "federation"))
    p.add_argument("--table", action="store_true")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args()
    results = Path(args.results)
    if args.table or args.update_readme:
        text = table(results, args)
        print(text)
        if args.update_readme:
            readme = ROOT / "README.md"
            body = readme.read_text()
            start, end = body.index("<!-- federation -->"), body.index("<!-- /federation -->")
            readme.write_text(body[:start] + "<!-- federation -->\n" + text + "\n" + body[end:])
        return

    os.environ.setdefault("TQDM_DISABLE", "1")
    from offsite.emulator import compress_checkpoint
    from offsite.methods import make_config
    from offsite.models import resolve_model
    from offsite.tasks import load_task_docs, load_train_examples

    model_path, name = resolve_model(args.model)
    runs = Path(args.runs)
    emulator = runs / f"emulator-2-{args.num_kept}-2"
    if not (emulator / "manifest.json").exists():
        log(f"compressing {name} into a 2-{args.num_kept}-2 LayerDrop emulator")
        compress_checkpoint(model_path, emulator, "layerdrop", make_config("layerdrop", num_kept=args.num_kept), overwrite=True)
    train = load_train_examples(args.task, limit=args.train_limit, seed=args.seed)
    ctx = {"model_path": model_path, "emulator": emulator, "train": train, "shards": shards(train, args.clients, args.seed),
           "docs": load_task_docs(args.task, args.eval_limit)}
    results.mkdir(parents=True, exist_ok=True)
    wanted = [a for a in args.arms.split(",") if a] or arms_of(args)
    for arm in wanted:
        path = results / f"{arm}.json"
        if path.exists():
            continue
        log(f"{arm} ...")
        data = {"arm": arm, "model": name, "task": args.task, "train_limit": args.train_limit, "eval_limit": args.eval_limit,
                "clients": args.clients, "rounds": args.rounds, "lr": args.lr, "batch_size": args.batch_size, **run_arm(arm, args, ctx)}
        path.write_text(json.dumps(data, indent=2) + "\n")
        log(f"{arm}: plug-in acc {100 * data['plugin']['acc']:.1f} ({data['train_seconds']:.0f} s)")
    print(table(results, args))


if __name__ == "__main__":
    main()
