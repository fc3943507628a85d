"""The Flower apps of a federation: the owner's ServerApp runs the rounds, a data owner's ClientApp trains one.

Each round the ServerApp sends every connected data owner the round number, the federation's training
recipe and (after the first round) the last aggregated adapter; each ClientApp checks that adapter
against its own emulator bundle, trains the recipe's local steps on its private data from there, and
replies with its adapter bundle and example count. Only adapter bundles and numbers travel (`wire`);
the emulator reached the data owners beforehand as a bundle. The owner checks and averages the replies
(`aggregate.aggregate_round`), so every round is on disk and a restarted server continues after the
last finished one. Both apps read their side's settings file (`configs.write_settings`), whose path
is the only thing Flower's run and node configuration carry.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..bundle import MANIFEST
from ..errors import OffsiteError
from .aggregate import EVAL_FILE, FederationError, RoundResult, Update, aggregate_round, latest_round, start_from
from .configs import ClientConfig, ServerConfig, read_settings
from .wire import bundle_record, write_record

log = logging.getLogger(__name__)
SETTINGS_KEY = "settings"  # run config (server) and node config (client): the path of the side's settings file
TRAIN = "train"


def _say(text: str) -> None:
    print(f"offsite federate: {text}", flush=True)  # streamed to the owner's terminal by `flwr run --stream`


def _record_bytes(record) -> int:
    return sum(len(array.data) for array in record.values())


def wait_for_clients(grid: Grid, needed: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of the {needed} data owners needed connected within {wait_s:g} s")
        time.sleep(0.5)


def round_message(number: int, recipe: dict, previous: Path | None) -> RecordDict:
    content = {"config": ConfigRecord({"round": number, "recipe": json.dumps(recipe)})}
    if previous is not None:
        content["adapter"] = bundle_record(previous)
    return RecordDict(content)


def receive_updates(replies, nodes: list[int], updates_dir: Path, timeout_s: float) -> tuple[list[Update], dict[str, str], int]:
    """(the updates to check, the clients dropped before the checks with why, bytes received)."""
    updates, dropped, received, seen = [], {}, 0, set()
    for reply in replies:
        node = reply.metadata.src_node_id
        name = f"node-{node}"
        seen.add(node)
        if reply.has_error():
            dropped[name] = f"the client failed: {reply.error.reason}"
            continue
        try:
            adapter, metrics = reply.content["adapter"], reply.content["metrics"]
            examples = metrics["num-examples"]
            received += _record_bytes(adapter)
            path = write_record(adapter, updates_dir / name)
        except (KeyError, TypeError, AttributeError, OffsiteError) as e:
            dropped[name] = f"its reply is not an adapter update ({type(e).__name__}: {str(e)[:200]})"
            continue
        updates.append(Update(name, path, examples))
    for node in nodes:
        if node not in seen:
            dropped[f"node-{node}"] = f"no reply within the round timeout ({timeout_s:g} s)"
    return updates, dropped, received


class RoundEvaluator:
    """The owner's view after each round: the aggregated adapter plugged into the full model, scored
    on held-out docs (loaded, with the model, before the first round)."""

    def __init__(self, config: ServerConfig):
        from ..models import resolve_model
        from ..tasks import load_task_docs

        self.config = config
        self.path, _ = resolve_model(config.model)
        self.docs = {task: load_task_docs(task, config.eval_limit) for task in config.eval_tasks.split(",") if task}

    def __call__(self, adapter: Path) -> dict:
        from ..emulator import load_checkpoint
        from ..evaluation import score_multiple_choice
        from ..plugin import plug_in

        model, tokenizer = load_checkpoint(self.path)  # fresh each round: a LoRA merge changes the weights
        model = plug_in(model, adapter, emulator=self.config.emulator, max_norm_ratio=self.config.max_norm_ratio or None)
        scores = {}
        for task, docs in self.docs.items():
            r = score_multiple_choice(model, tokenizer, docs, progress=False)
            scores[task] = {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"]}
        return scores


def run_rounds(grid: Grid, config: ServerConfig, recipe: dict) -> RoundResult | None:
    """Rounds from the one after the last finished (on disk) to `config.rounds`; returns the last."""
    out = Path(config.out)
    done = latest_round(out)
    if done is not None and done.round >= config.rounds:
        _say(f"all {config.rounds} rounds are done: {done.adapter}")
        return done
    evaluator = RoundEvaluator(config) if config.eval_tasks else None
    previous = done.adapter if done else None
    for number in range(done.round + 1 if done else 1, config.rounds + 1):
        nodes = wait_for_clients(grid, config.min_clients, config.wait_s)
        updates_dir = out / f"round-{number:04d}" / "updates"
        shutil.rmtree(updates_dir, ignore_errors=True)  # a round cut short by a restart starts over
        start = time.perf_counter()
        content = round_message(number, recipe, previous)
        sent = _record_bytes(content["adapter"]) if previous is not None else 0
        messages = [Message(content, dst_node_id=node, message_type=TRAIN) for node in nodes]
        _say(f"round {number}/{config.rounds}: training on {len(nodes)} data owners")
        replies = list(grid.send_and_receive(messages, timeout=config.round_timeout_s))
        updates, dropped, received = receive_updates(replies, nodes, updates_dir, config.round_timeout_s)
        info = {"seconds": round(time.perf_counter() - start, 2), "clients": len(nodes),
                "bytes_sent_per_client": sent, "bytes_received": received}
        result = aggregate_round(config.emulator, updates, out, number, config.max_norm_ratio or None, dropped=dropped, info=info)
        line = f"round {number}/{config.rounds}: {len(result.accepted)} accepted ({result.examples} examples), {len(result.dropped)} dropped"
        for client, why in result.dropped.items():
            _say(f"round {number}: dropped {client}: {why}")
        if evaluator is not None:
            scores = evaluator(result.adapter)
            (result.adapter.parent / EVAL_FILE).write_text(json.dumps(scores, indent=2) + "\n")
            line += "; plug-in " + ", ".join(f"{t} acc {100 * s['acc']:.1f}" for t, s in scores.items())
        _say(line)
        previous = result.adapter
    _say(f"done: {config.rounds} rounds; the federated adapter is {previous}")
    return latest_round(out)


def train_round(message: Message, config: ClientConfig) -> Message:
    """One data owner's round: start from the round's adapter (checked against this client's emulator),
    train the federation's recipe on the local data, reply with the adapter bundle."""
    from ..configs import FinetuneConfig
    from ..options import build_dataclass
    from ..training import finetune, load_training_examples

    settings = message.content["config"]
    number = int(settings["round"])
    recipe = build_dataclass(FinetuneConfig, json.loads(settings["recipe"]))
    # Every round draws its own batches and dropout; the clients of one round start LoRA alike.
    recipe = dataclasses.replace(recipe, seed=recipe.seed + number - 1, checkpoint_every=0, report_to="none")
    round_dir = Path(config.work) / f"round-{number:04d}"
    shutil.rmtree(round_dir, ignore_errors=True)
    start = None
    if "adapter" in message.content:
        start = start_from(write_record(message.content["adapter"], round_dir / "start"), config.max_norm_ratio or None)
    examples = load_training_examples(config.bundle, config.data, config.task, config.limit, recipe.seed, config.trusted_key)
    adapter = finetune(config.bundle, examples, round_dir / "run", recipe, progress=False, trusted_key=config.trusted_key,
                       sign_key=config.sign_key, start=start)
    trained = json.loads((adapter / MANIFEST).read_text()).get("metrics", {})
    metrics = {"num-examples": len(examples)}
    metrics.update({k.replace("_", "-"): v for k, v in trained.items() if k in ("final_loss", "steps", "seconds") and v is not None})
    return Message(RecordDict({"adapter": bundle_record(adapter), "metrics": MetricRecord(metrics)}), reply_to=message)


server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    config, extra = read_settings(ServerConfig, context.run_config[SETTINGS_KEY])
    try:
        run_rounds(grid, config, extra["recipe"])
    except OffsiteError as e:
        _say(f"error: {e}")
        raise


@client_app.train()
def _client_train(message: Message, context: Context) -> Message:
    config, _ = read_settings(ClientConfig, context.node_config[SETTINGS_KEY])
    return train_round(message, config)


__all__ = ["RoundEvaluator", "client_app", "receive_updates", "round_message", "run_rounds", "server_app", "train_round",
           "wait_for_clients"]
