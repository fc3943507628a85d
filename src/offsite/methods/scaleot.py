"""ScaleOT (Yao et al., AAAI 2025): harmonizers, learned block importance, Selective Rank Compression.

Two stages, both on the model owner's side.

(a) Importance estimation with Dynamic LayerReplace (`estimate_importance`, `offsite
scaleot-importance`). Every middle block i gets a harmonizer (offsite.structure.Harmonizer: the
residual low-rank MLP x -> x + up(act(down(x))), `up` zero-initialised, so it starts as the
identity) and a logit s_i, its keep-probability being p_i = sigmoid(s_i). The middle blocks are cut
into consecutive groups of about `group_size` (M // group_size groups, sizes as even as possible);
at every step, in each group of n blocks, floor(n/2) are replaced by their harmonizers, drawn
without replacement with probability proportional to 1 - p_i (a Plackett-Luce sample: the less
important a block, the more often it is replaced). Each step then
  1. trains the harmonizers: one AdamW step on the LM loss of this mixed network on a training
     batch (the original blocks, embeddings and head stay frozen; only the replaced blocks'
     harmonizers receive gradient);
  2. updates the importances: the same mixed network is scored on a held-out batch, reward
     R = exp(-loss), and REINFORCE with a baseline takes one Adam step on
     -(R - b) * log P(sample | s); b is an exponential moving average of R (`baseline_decay`),
     started at the first reward.
What the harmonizers learn is selectable (`objective`): "lm", the mixed network's LM loss above
(free to learn a different middle from the one it replaces); "match", that plus `match_weight` x
the normalised MSE mean((t - s)^2) / mean(t^2) between the mixed network's hidden state after each
run of harmonized blocks and the original network's at the same block (as OT's distillation);
"local", each harmonizer regressed on its own block's input -> output in the original network
(every harmonizer, every step; the default, the one objective that beat size-matched LayerDrop's
plug-in here without narrowing the plug-in - emulator gap). With `policy_samples` K >= 2 (default
4) the importance step scores K sampled mixed networks on the same held-out batch and each
sample's advantage is its reward minus the
mean of the other K - 1 (leave-one-out; unbiased, no state across steps); the logits are trained
by AdamW without weight decay at `policy_lr`. After training, unless `direct_sequences` is 0,
each block is measured directly: the held-out loss increase when it alone is swapped for its
harmonizer; the artifact records it, the ranking it gives, and its Spearman correlation with the
learned importance (`ranking="direct"` in stage (b) uses it instead). `rank_fraction` sets the
harmonizer rank as a share of the hidden size.
The data is packed generic text (`offsite.tasks.load_generic_text`) unless `data` names a task or
a JSONL file; the last `heldout_fraction` of the packed blocks is the held-out reward set. The
result is an owner-side artifact (a bundle of kind "scaleot-artifact": harmonizers.safetensors
with a harmonizer for every middle block, and in manifest.json the importances, the settings, the
training curve and the base model's fingerprint), so any emulator is assembled from it later
without retraining. Checkpoints (offsite.checkpoint) make the run resumable bit for bit.

(b) Emulator generation (method "scaleot", `offsite compress --method scaleot`). An emulator is
the triplet (N_a, alpha, beta): N_a = num_bottom + num_top adapter blocks, verbatim; of the M
middle blocks the round(alpha * M) least important (lowest s_i; round half up) are replaced by
their harmonizers (never a block whose KV cache transformers reads for all blocks: block 0 and
the first block of each attention type, see `cache_anchor_blocks`, nor, with
`protect_adapter_neighbours` (default), the first and last middle block, which LayerDrop always
keeps; `replaced_blocks` names the blocks outright, for ablations); the attention projections of every kept middle block get Selective Rank
Compression: beta is the fraction of rank KEPT, each attention linear W (out x in) becomes its
rank-r truncated SVD with r = ceil(beta * min(in, out)) (at least 1; beta = 1 leaves the block
verbatim). The FFN is never touched. A truncated matrix is stored as a LowRankLinear (two thin
linears, r * (in + out) weights) when that is smaller than the dense matrix, else as the dense
rank-r product (same size, still lossy). Harmonizers and low-rank linears are declared in the
manifest's "structure" (offsite.structure), so the data owner loads the emulator with offsite
alone and no ScaleOT code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..errors import BundleError, ConfigError, UnsupportedModelError
from ..models import resolve_device
from ..progress import bars_disabled
from ..structure import (
    ACTIVATIONS,
    TUPLE_OUTPUT_BLOCKS,
    Harmonizer,
    apply_structure,
    count_parameters,
    dense_weight,
    harmonizer_parameters,
    linear_shape,
)
from ..surgery import BlockLayout, attention_linear_names, build_reduced_model, discover_layout, get_blocks
from .base import Emulator, EmulatorConfig, register
from .configs import OBJECTIVES, RANKINGS, ImportanceConfig, ScaleOTConfig  # noqa: F401  (re-exported)

ARTIFACT_KIND = "scaleot-artifact"
HARMONIZERS_FILE = "harmonizers.safetensors"
HARMONIZER_PARAMS = ("down.weight", "down.bias", "up.weight", "up.bias")
# Settings that may change when a run is resumed (they do not change what a step computes).
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "device", "direct_sequences")




def make_groups(middle: list[int], group_size: int) -> list[list[int]]:
    """Consecutive groups: M // group_size of them (at least one), sizes differing by at most one."""
    count = max(1, len(middle) // group_size)
    base, extra = divmod(len(middle), count)
    groups, start = [], 0
    for g in range(count):
        size = base + (1 if g < extra else 0)
        groups.append(middle[start : start + size])
        start += size
    return groups


def sample_replaced(logits: torch.Tensor, groups: list[list[int]], position: dict[int, int]) -> tuple[list[int], torch.Tensor]:
    """Draw the blocks to replace: floor(n/2) per group of n, without replacement, with probability
    proportional to 1 - sigmoid(s_i). Returns them (ascending) and the sample's log-probability
    (differentiable in `logits`). Uses the global torch RNG (saved in checkpoints)."""
    replaced, log_prob = [], logits.new_zeros(())
    for group in groups:
        index = torch.tensor([position[b] for b in group], device=logits.device)
        weights = torch.sigmoid(-logits[index])
        remaining = list(range(len(group)))
        for _ in range(len(group) // 2):
            w = weights[remaining]
            probs = w / w.sum()
            pick = int(torch.multinomial(probs.detach().float().cpu(), 1))
            log_prob = log_prob + torch.log(probs[pick])
            replaced.append(group[remaining.pop(pick)])
    return sorted(replaced), log_prob


# ------------------------------------------------------------------ stage (a): data
def importance_texts(config: ImportanceConfig) -> list[str]:
    """The text stage (a) trains and scores on, as configured by `data`."""
    from ..tasks import TASKS

    if config.data == "generic":
        from ..tasks import load_generic_text

        return load_generic_text(limit_chars=config.data_chars)
    if config.data in TASKS:
        from ..tasks import load_train_examples

        return [ex.context + ex.continuation for ex in load_train_examples(config.data, seed=config.seed)]
    if Path(config.data).suffix == ".jsonl":
        from ..data import load_examples

        return [ex.context + ex.continuation for ex in load_examples(config.data)]
    raise ConfigError(f"data must be 'generic', a task name ({', '.join(sorted(TASKS))}) or a .jsonl file, got {config.data!r}")


def split_features(tokenizer, texts: list[str], config: ImportanceConfig):
    """Packed blocks of `block_size` tokens: (training blocks, held-out blocks), the held-out ones last."""
    from ..lm import pack_blocks

    blocks = pack_blocks(tokenizer, texts, config.block_size)
    heldout = max(1, round(config.heldout_fraction * len(blocks)))
    if len(blocks) - heldout < 1:
        raise ConfigError(f"scaleot: the text yields only {len(blocks)} block(s) of {config.block_size} tokens; "
                          "need at least one for training and one held out (more text, or a smaller block_size)")
    return blocks[:-heldout], blocks[-heldout:]


def _batch(features: list[dict], indices: list[int], device) -> dict[str, torch.Tensor]:
    from ..data import pad_batch

    return {k: v.to(device) for k, v in pad_batch([features[i] for i in indices], 0).items()}


def train_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Batch `step` of an endless stream of shuffled epochs: a function of the step alone (exact resume)."""
    from ..data import epoch_order

    orders: dict[int, list[int]] = {}
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch = k // n
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        out.append(orders[epoch][k % n])
    return out


# ------------------------------------------------------------------ block output form
def check_block_output(model: PreTrainedModel, layout: BlockLayout, index: int) -> None:
    """A harmonizer can stand in for block `index`: the block returns what a Harmonizer returns for
    this family (the hidden states, or a tuple led by them). Checked on one short forward pass."""
    blocks = get_blocks(model, layout)
    seen = {}

    def hook(module, args, out):
        seen["in"], seen["out"] = args[0] if args else None, out

    handle = blocks[index].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device), use_cache=False)
    finally:
        handle.remove()
    out, expect_tuple = seen.get("out"), layout.model_type in TUPLE_OUTPUT_BLOCKS
    hidden = out[0] if isinstance(out, tuple) and out else out
    if isinstance(out, tuple) != expect_tuple or not torch.is_tensor(hidden) or not torch.is_tensor(seen.get("in")) \
            or hidden.shape != seen["in"].shape:
        form = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, tuple) else "")
        raise UnsupportedModelError(
            f"{layout.model_type}: its blocks return {form}, not what a harmonizer returns for it "
            f"({'a tuple' if expect_tuple else 'the hidden states'}); see offsite.structure.TUPLE_OUTPUT_BLOCKS"
        )


# ------------------------------------------------------------------ stage (a): the run
def new_harmonizers(model: PreTrainedModel, layout: BlockLayout, blocks: list[int], rank: int, activation: str = "relu") -> nn.ModuleDict:
    """A fresh harmonizer (the identity) for each of `blocks`, keyed by block index, on the model's
    device and in its dtype, answering in the family's block output form."""
    parameter = next(model.parameters())
    tuple_output = layout.model_type in TUPLE_OUTPUT_BLOCKS
    return nn.ModuleDict({str(i): Harmonizer(model.config.hidden_size, rank, activation, tuple_output,
                                             dtype=parameter.dtype, device=parameter.device) for i in blocks})


def _use_bf16(config: ImportanceConfig, device: torch.device) -> bool:
    if config.mixed_precision == "no" or device.type != "cuda":
        return False
    return config.mixed_precision == "bf16" or torch.cuda.is_bf16_supported()


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean((t - s)^2) / mean(t^2) over the positions where `mask` is 1 (OT's distillation loss):
    scale-free, so blocks with large activations do not outweigh the rest."""
    m = mask.unsqueeze(-1).to(teacher.dtype)
    return (((student.float() - teacher.float()) ** 2) * m).sum() / ((teacher.float() ** 2) * m).sum().clamp_min(1e-12)


class _Taps:
    """Forward hooks recording the hidden states a module reads (`inputs`) and returns (`outputs`), by key."""

    def __init__(self):
        self.inputs: dict = {}
        self.outputs: dict = {}
        self._handles = []

    def watch(self, module: nn.Module, key, record_input: bool = False) -> None:
        def hook(mod, args, out):
            if record_input:
                self.inputs[key] = args[0]
            self.outputs[key] = out[0] if isinstance(out, tuple) else out

        self._handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def span_ends(replaced: list[int]) -> list[int]:
    """The last block of each run of consecutive replaced blocks."""
    return [b for b in replaced if b + 1 not in replaced]


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return torch.tensor(r, dtype=torch.float64)

    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator else 0.0


def _run_identity(config: ImportanceConfig, fingerprint: str) -> dict:
    """What a checkpoint must agree with to be resumed."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    return {"settings": settings, "base_fingerprint": fingerprint}


def estimate_importance(
    model: PreTrainedModel,
    tokenizer,
    out_dir: str | Path,
    config: ImportanceConfig | None = None,
    texts: list[str] | None = None,
    base_name: str = "",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callback=None,
    log=print,
) -> Path:
    """ScaleOT stage (a) on `model` (left unchanged): write the artifact to `out_dir`.

    Checkpoints go to `<out_dir>.checkpoints/` every `checkpoint_every` steps; `resume` continues the
    latest one (same settings and base model required) to the same result as an uninterrupted run.
    `texts` overrides the configured data. `callback(step)` runs after each checkpoint.
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from ..bundle import model_fingerprint
    from ..checkpoint import list_checkpoints, restore_checkpoint, save_checkpoint
    from ..lm import causal_lm_loss

    config = config or ImportanceConfig()
    out_dir = Path(out_dir)
    ckpt_dir = out_dir.with_name(out_dir.name + ".checkpoints")
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"output already exists, not overwriting: {out_dir}")
    if list_checkpoints(ckpt_dir) and not resume and not overwrite:
        raise ConfigError(f"{ckpt_dir} holds checkpoints of an earlier run; pass --resume to continue it or --overwrite")
    layout = discover_layout(model)
    middle = config.middle(layout.num_blocks)
    if len(middle) < 2:
        raise ConfigError(f"scaleot needs at least 2 middle blocks, the adapter {config.num_bottom}+{config.num_top} leaves {len(middle)}")
    groups = make_groups(middle, config.group_size)
    position = {b: i for i, b in enumerate(middle)}
    hidden = model.config.hidden_size
    rank = config.harmonizer_rank(hidden)
    if rank > hidden:
        raise ConfigError(f"rank {rank} is more than the hidden size {hidden}")
    fingerprint = model_fingerprint(model)
    identity = _run_identity(config, fingerprint)
    train_set, heldout_set = split_features(tokenizer, texts if texts is not None else importance_texts(config), config)

    device = resolve_device(config.device)
    home = next(model.parameters()).device
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    blocks = get_blocks(model, layout)
    originals = {i: blocks[i] for i in middle}
    model.to(device)
    check_block_output(model, layout, middle[0])

    torch.manual_seed(config.seed)
    dtype = next(model.parameters()).dtype
    harmonizers = new_harmonizers(model, layout, middle, rank, config.activation)
    logits = nn.Parameter(torch.full((len(middle),), float(config.init_logit), device=device))
    optimizer = torch.optim.AdamW([
        {"params": list(harmonizers.parameters()), "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": [logits], "lr": config.policy_lr, "weight_decay": 0.0},
    ])
    scheduler = get_scheduler("constant", optimizer)
    trainable = {f"harmonizers.{n}": p for n, p in harmonizers.named_parameters()} | {"importance_logits": logits}

    step, baseline, history, window = 0, None, [], []  # window: training losses since the last history entry
    if resume and list_checkpoints(ckpt_dir):
        latest = list_checkpoints(ckpt_dir)[-1]
        state = json.loads((latest / "state.json").read_text())["position"]
        if state.get("identity") != identity:
            raise ConfigError(f"{ckpt_dir} holds a run with other settings or another base model; choose another --out or --overwrite")
        pos = restore_checkpoint(latest, trainable, optimizer, scheduler)
        step, baseline, history, window = pos["step"], pos["baseline"], pos["history"], pos["window"]
        log(f"[scaleot] resumed from {latest} at step {step}")

    use_bf16 = _use_bf16(config, device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731
    params = list(harmonizers.parameters())
    bar = tqdm(total=config.steps, initial=step, disable=bars_disabled(progress), desc="scaleot importance", unit="step")
    start = time.perf_counter()
    model.eval()  # no dropout: the mixed network is compared across steps by its loss
    model.requires_grad_(False)
    try:
        def use(replaced: list[int]) -> None:
            for i in middle:
                blocks[i] = harmonizers[str(i)] if i in replaced else originals[i]

        while step < config.steps:
            samples = [sample_replaced(logits, groups, position) for _ in range(config.policy_samples)]
            replaced = samples[0][0]
            batch = _batch(train_set, train_indices(len(train_set), step, config.batch_size, config.seed), device)
            with autocast():
                loss = harmonizer_loss(model, blocks, originals, harmonizers, middle, replaced, batch, config, use)
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # Importance: every sample scored on the same held-out batch.
            held = _batch(heldout_set, [(step * config.batch_size + j) % len(heldout_set) for j in range(config.batch_size)], device)
            rewards = []
            for sample, _ in samples:
                use(sample)
                with torch.no_grad(), autocast():
                    rewards.append(math.exp(-float(causal_lm_loss(model, held))))
            heldout_loss = -math.log(rewards[0])
            reward = sum(rewards) / len(rewards)
            if len(samples) == 1:
                baseline = reward if baseline is None else baseline
                advantages = [rewards[0] - baseline]
            else:  # leave-one-out: each sample against the mean of the others, no state carried between steps
                total = sum(rewards)
                advantages = [r - (total - r) / (len(rewards) - 1) for r in rewards]
            policy_loss = -sum(a * lp for a, (_, lp) in zip(advantages, samples)) / len(samples)
            policy_loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if len(samples) == 1:
                baseline = config.baseline_decay * baseline + (1 - config.baseline_decay) * reward
            else:
                baseline = reward

            step += 1
            window.append(float(loss.detach()))
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                history.append({"step": step, "loss": round(sum(window) / len(window), 6),
                                "heldout_loss": round(heldout_loss, 6), "reward": reward, "baseline": baseline})
                window = []
                bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", heldout=f"{heldout_loss:.3f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                save_checkpoint(ckpt_dir, step, trainable, optimizer, scheduler,
                                {"baseline": baseline, "history": history, "window": window, "identity": identity})
                if callback:
                    callback(step)
        direct = None
        if config.direct_sequences:
            direct = measure_swaps(model, blocks, originals, harmonizers, middle, heldout_set[: config.direct_sequences],
                                   config.batch_size, device, autocast)
    finally:
        bar.close()
        for i in middle:
            blocks[i] = originals[i]
        model.to(home)
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)

    s = logits.detach().float().cpu()
    importance = [{"block": b, "logit": float(s[position[b]]), "keep_probability": float(torch.sigmoid(s[position[b]]))}
                  for b in middle]
    training = {
        "steps": step,
        "seconds_this_run": round(time.perf_counter() - start, 1),
        "train_blocks": len(train_set),
        "heldout_blocks": len(heldout_set),
        "final_loss": history[-1]["loss"] if history else None,
        "final_heldout_loss": history[-1]["heldout_loss"] if history else None,
        "history": history,
    }
    manifest = {
        "base": {"fingerprint": fingerprint, "name": base_name, "model_type": layout.model_type,
                 "num_blocks": layout.num_blocks, "hidden_size": hidden, "dtype": str(dtype).removeprefix("torch.")},
        "scaleot": {
            "config": dataclasses.asdict(config),
            "middle": middle,
            "groups": groups,
            "harmonizer": {"rank": rank, "activation": config.activation},
            "importance": importance,
            "ranking": least_important_first({e["block"]: e["logit"] for e in importance}),
            "training": training,
        },
    }
    if direct is not None:
        learned = [e["logit"] for e in importance]
        increase = [direct["loss_increase"][str(b)] for b in middle]
        direct["spearman_with_learned"] = round(spearman(learned, increase), 4)
        direct["ranking"] = least_important_first({b: v for b, v in zip(middle, increase)})
        manifest["scaleot"]["direct"] = direct
        log(f"[scaleot] direct swap measurement: Spearman correlation with the learned importance "
            f"{direct['spearman_with_learned']:+.2f}; least important first {direct['ranking']}")
    tensors = {f"{i}.{n}": p.detach().cpu().contiguous().clone() for i in middle for n, p in harmonizers[str(i)].named_parameters()}
    path = write_artifact(out_dir, manifest, tensors, overwrite=overwrite)
    keep = {e["block"]: e["keep_probability"] for e in importance}
    log("[scaleot] keep probability by block, least important first: "
        + ", ".join(f"{b}: {keep[b]:.2f}" for b in manifest["scaleot"]["ranking"]))
    return path


def harmonizer_loss(model, blocks, originals, harmonizers, middle, replaced, batch, config: ImportanceConfig, use) -> torch.Tensor:
    """The loss one harmonizer step minimises, by `config.objective` (see ImportanceConfig)."""
    from ..lm import causal_lm_loss

    mask = batch["attention_mask"]
    if config.objective == "local":
        use([])  # the original network: every middle block's own input and output
        taps = _Taps()
        for i in middle:
            taps.watch(originals[i], i, record_input=True)
        try:
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
        finally:
            taps.close()
        losses = []
        for i in middle:
            out = harmonizers[str(i)](taps.inputs[i].detach())
            losses.append(normalised_mse(out[0] if isinstance(out, tuple) else out, taps.outputs[i].detach(), mask))
        return sum(losses) / len(losses)
    if config.objective == "match" and replaced:
        ends = span_ends(replaced)
        use([])
        teacher = _Taps()
        for e in ends:
            teacher.watch(originals[e], e)
        try:
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False, output_hidden_states=False)
        finally:
            teacher.close()
        use(replaced)
        student = _Taps()
        for e in ends:
            student.watch(harmonizers[str(e)], e)
        try:
            lm = causal_lm_loss(model, batch)
        finally:
            student.close()
        match = sum(normalised_mse(student.outputs[e], teacher.outputs[e].detach(), mask) for e in ends) / len(ends)
        return lm + config.match_weight * match
    use(replaced)
    return causal_lm_loss(model, batch)


@torch.no_grad()
def measure_swaps(model, blocks, originals, harmonizers, middle, sequences, batch_size, device, autocast) -> dict:
    """Held-out loss with each middle block alone swapped for its harmonizer, against the original network's."""
    from ..lm import causal_lm_loss

    def heldout_loss(swapped: list[int]) -> float:
        for i in middle:
            blocks[i] = harmonizers[str(i)] if i in swapped else originals[i]
        total = 0.0
        for start in range(0, len(sequences), batch_size):
            chunk = list(range(start, min(start + batch_size, len(sequences))))
            with autocast():
                total += float(causal_lm_loss(model, _batch(sequences, chunk, device))) * len(chunk)
        return total / len(sequences)

    base = heldout_loss([])
    return {"sequences": len(sequences), "base_loss": round(base, 6),
            "loss_increase": {str(b): round(heldout_loss([b]) - base, 6) for b in middle}}


def importance_checkpoint(model_path: str | Path, out_dir: str | Path, config: ImportanceConfig | None = None,
                          base_name: str = "", **kwargs) -> Path:
    """Stage (a) on a checkpoint directory (what `offsite scaleot-importance` runs)."""
    from ..models import load_checkpoint

    config = config or ImportanceConfig()
    if Path(out_dir).exists() and not kwargs.get("overwrite"):
        raise ConfigError(f"output already exists, not overwriting: {out_dir}")
    if config.onload:
        raise ConfigError("onload=True is stage (a) block by block: offsite.methods.scaleot_onload.onload_importance runs it")
    model, tokenizer = load_checkpoint(model_path)
    return estimate_importance(model, tokenizer, out_dir, config, base_name=base_name or str(model_path), **kwargs)


def least_important_first(logits: dict[int, float]) -> list[int]:
    """Blocks by ascending importance logit (ties: lower block index first)."""
    return sorted(logits, key=lambda b: (logits[b], b))


# ------------------------------------------------------------------ the artifact
def write_artifact(out_dir: Path, manifest: dict, tensors: dict[str, torch.Tensor], overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    from ..bundle import write_bundle

    return write_bundle(out_dir, ARTIFACT_KIND, manifest, lambda tmp: save_file(tensors, tmp / HARMONIZERS_FILE), overwrite=overwrite)


@dataclass
class Artifact:
    """A verified stage-(a) artifact."""

    path: Path
    manifest: dict
    middle: list[int]
    logits: dict[int, float] | None  # None: made block by block (onload), ranked by the direct measurement only
    rank: int
    activation: str
    harmonizers: dict[int, dict[str, torch.Tensor]]  # block -> {down.weight, down.bias, up.weight, up.bias}
    direct: dict[int, float] | None = None  # block -> held-out loss increase when swapped alone (if measured)

    @property
    def base_fingerprint(self) -> str:
        return self.manifest["base"]["fingerprint"]

    @property
    def hidden_size(self) -> int:
        return self.manifest["base"]["hidden_size"]

    def ranking(self, source: str = "learned") -> list[int]:
        """Middle blocks, least important first, by the learned logits or the direct swap measurement."""
        if source == "direct":
            if self.direct is None:
                raise ConfigError(f"scaleot artifact {self.path} has no direct swap measurement (stage (a) ran with "
                                  "direct_sequences=0); use ranking='learned'")
            return least_important_first(self.direct)
        if self.logits is None:
            raise ConfigError(f"scaleot artifact {self.path} was made block by block (onload) and has no learned importance; "
                              "use ranking='direct'")
        return least_important_first(self.logits)


def load_artifact(path: str | Path) -> Artifact:
    """Read and verify a stage-(a) artifact (hashes, structure, tensor shapes), or one BundleError line."""
    from safetensors.torch import load_file

    from ..bundle import read_manifest, safetensors_header

    path = Path(path)
    # The owner's own file, never crossing to the other party: hashes are checked, no signature needed.
    manifest = read_manifest(path, kind=ARTIFACT_KIND, trusted_key=False)

    def fail(why: str):
        raise BundleError(f"scaleot artifact is malformed ({why}): {path}")

    base, body = manifest.get("base"), manifest.get("scaleot")
    if not isinstance(base, dict) or not isinstance(body, dict) or not isinstance(base.get("fingerprint"), str):
        fail("no 'base' or 'scaleot' section")
    hidden = base.get("hidden_size")
    middle, spec, importance = body.get("middle"), body.get("harmonizer"), body.get("importance")
    if type(hidden) is not int or hidden < 1:
        fail("base.hidden_size")
    if not isinstance(middle, list) or not middle or any(type(b) is not int or b < 0 for b in middle) or sorted(set(middle)) != middle:
        fail("middle must be ascending block indices")
    if not isinstance(spec, dict) or type(spec.get("rank")) is not int or not 1 <= spec["rank"] <= hidden \
            or spec.get("activation") not in ACTIVATIONS:
        fail("harmonizer rank/activation")
    if importance is None and "direct" not in body:
        fail("no learned importance and no direct swap measurement")
    if importance is not None and (not isinstance(importance, list) or not all(
        isinstance(e, dict) and type(e.get("block")) is int and isinstance(e.get("logit"), (int, float))
        and not isinstance(e.get("logit"), bool) and math.isfinite(e["logit"]) for e in importance
    ) or [e["block"] for e in importance] != middle):
        fail("importance must give a finite logit for every middle block")
    rank = spec["rank"]
    shapes = {"down.weight": (rank, hidden), "down.bias": (rank,), "up.weight": (hidden, rank), "up.bias": (hidden,)}
    expected = {f"{b}.{n}": shape for b in middle for n, shape in shapes.items()}
    header = safetensors_header(path / HARMONIZERS_FILE)
    if {k: v[1] for k, v in header.items()} != expected or any(v[0] not in ("F32", "BF16", "F16") for v in header.values()):
        fail(f"{HARMONIZERS_FILE} does not hold one rank-{rank} harmonizer per middle block")
    tensors = load_file(path / HARMONIZERS_FILE)
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        fail("non-finite harmonizer weights")
    harmonizers = {b: {n: tensors[f"{b}.{n}"] for n in HARMONIZER_PARAMS} for b in middle}
    direct = None
    if "direct" in body:
        increase = body["direct"].get("loss_increase") if isinstance(body["direct"], dict) else None
        if not isinstance(increase, dict) or set(increase) != {str(b) for b in middle} or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in increase.values()):
            fail("direct.loss_increase must give a finite number for every middle block")
        direct = {int(b): float(v) for b, v in increase.items()}
    logits = None if importance is None else {e["block"]: float(e["logit"]) for e in importance}
    return Artifact(path, manifest, middle, logits, rank, spec["activation"], harmonizers, direct)




def num_replaced(alpha: float, num_middle: int) -> int:
    """round(alpha * M), half up."""
    return min(num_middle, math.floor(alpha * num_middle + 0.5))


def kept_rank(beta: float, full_rank: int) -> int:
    """ceil(beta * full_rank), at least 1 (the tolerance keeps 0.3 * 10 at 3, not 4)."""
    return max(1, min(full_rank, math.ceil(beta * full_rank - 1e-9)))


def cache_anchor_blocks(model_config, num_blocks: int) -> set[int]:
    """Blocks whose KV cache transformers reads on behalf of all blocks: block 0 (the cached length,
    hence the positions) and the first block of each attention type in `layer_types` (the mask
    sizes of that type). A harmonizer keeps no cache, so these blocks are never replaced:
    generation with a cache would lose its place."""
    layer_types = getattr(model_config, "layer_types", None)
    anchors = {0}
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == num_blocks:
        anchors |= {list(layer_types).index(t) for t in set(layer_types)}
    return anchors


def select_replaced(config: ScaleOTConfig, artifact: Artifact, num_blocks: int, anchors: set[int] = frozenset()) -> list[int]:
    """The middle blocks (ascending) that become harmonizers: the round(alpha * M) least important by
    the artifact, passing over `anchors` (see `cache_anchor_blocks`)."""
    middle = config.middle_blocks(num_blocks)
    missing = sorted(set(middle) - set(artifact.middle))
    if missing:
        raise ConfigError(
            f"scaleot artifact {artifact.path} has harmonizers for blocks {artifact.middle[0]}-{artifact.middle[-1]} only, "
            f"not for middle blocks {missing}; use a larger adapter or run stage (a) with a smaller one"
        )
    if config.replaced_blocks is not None:
        bad = [b for b in config.replaced_blocks if b not in middle or b in anchors]
        if bad:
            raise ConfigError(f"replaced_blocks {bad} are not replaceable middle blocks (middle {middle[0]}-{middle[-1]}, "
                              f"KV-cache anchors {sorted(anchors)})")
        return list(config.replaced_blocks)
    if config.protect_adapter_neighbours:
        anchors = set(anchors) | {middle[0], middle[-1]}
    ranked = [b for b in artifact.ranking(config.ranking) if b in middle and b not in anchors]
    count = num_replaced(config.alpha, len(middle))
    if count > len(ranked):
        raise ConfigError(f"alpha={config.alpha} replaces {count} of {len(middle)} middle blocks, but blocks "
                          f"{sorted(set(middle) & set(anchors))} are never replaced (the KV-cache anchors transformers reads for "
                          f"all blocks, and the adapter's neighbours unless protect_adapter_neighbours=False); at most {len(ranked)} can")
    return sorted(ranked[:count])


def _compressed_size(in_f: int, out_f: int, rank: int) -> int:
    return rank * (in_f + out_f)


def _attention_saving(module: nn.Module, beta: float) -> int:
    """Parameters Selective Rank Compression frees in one attention linear (0 when it stays dense)."""
    in_f, out_f = linear_shape(module)
    return max(0, in_f * out_f - _compressed_size(in_f, out_f, kept_rank(beta, min(in_f, out_f))))


def middle_parameters(model: PreTrainedModel, layout: BlockLayout, config: ScaleOTConfig, artifact: Artifact | None = None) -> int:
    """Parameters of the middle of the emulator `config` would build, computed from shapes alone."""
    artifact = artifact or load_artifact(config.artifact)
    replaced = select_replaced(config, artifact, layout.num_blocks, cache_anchor_blocks(model.config, layout.num_blocks))
    blocks = get_blocks(model, layout)
    total = 0
    for i in config.middle_blocks(layout.num_blocks):
        if i in replaced:
            total += harmonizer_parameters(model.config.hidden_size, artifact.rank)
            continue
        total += count_parameters(blocks[i])
        if config.beta < 1:
            total -= sum(_attention_saving(model.get_submodule(p), config.beta) for p in attention_linear_names(model, layout, i))
    return total


def closest_layerdrop(model: PreTrainedModel, layout: BlockLayout, target: int, num_bottom: int = 2, num_top: int = 2) -> tuple[int, int]:
    """(k, middle parameters) of the uniform LayerDrop emulator whose middle is closest to `target`
    parameters (ties: the smaller k)."""
    from .layerdrop import uniform_indices

    middle = EmulatorConfig(num_bottom, num_top).middle_blocks(layout.num_blocks)
    sizes = [count_parameters(b) for b in get_blocks(model, layout)]
    best = None
    for k in range(2, len(middle) + 1):
        params = sum(sizes[middle[0] + j] for j in uniform_indices(len(middle), k))
        if best is None or abs(params - target) < abs(best[1] - target):
            best = (k, params)
    return best


def _truncate(module: nn.Module, beta: float):
    """(structure change or None, state for the module) of the rank-r truncated SVD of its weight."""
    from .gradot import low_rank_state, svd

    in_f, out_f = linear_shape(module)
    rank = kept_rank(beta, min(in_f, out_f))
    U, S, Vh = svd(dense_weight(module).detach())
    keep = torch.arange(rank)
    if _compressed_size(in_f, out_f, rank) < in_f * out_f:
        return {"low_rank": rank}, low_rank_state(module, U, S, Vh, keep)
    W = (U[:, :rank] * S[:rank]) @ Vh[:rank]  # no smaller as two factors: the rank-r matrix, dense
    state = {"weight": (W.T if isinstance(module, Conv1D) else W).to(module.weight.dtype).contiguous()}
    if getattr(module, "bias", None) is not None:
        state["bias"] = module.bias.detach().clone()
    return None, state


@register("scaleot", ScaleOTConfig)
def build_scaleot(model: PreTrainedModel, layout: BlockLayout, config: ScaleOTConfig) -> Emulator:
    from ..bundle import bundle_fingerprint, model_fingerprint

    artifact = load_artifact(config.artifact)
    fingerprint = model_fingerprint(model)
    if fingerprint != artifact.base_fingerprint:
        raise ConfigError(f"scaleot artifact {artifact.path} was made from another base model "
                          f"(fingerprint {artifact.base_fingerprint[:12]}, this model {fingerprint[:12]})")
    adapter = config.adapter_blocks(layout.num_blocks)
    middle = config.middle_blocks(layout.num_blocks)
    replaced = select_replaced(config, artifact, layout.num_blocks, cache_anchor_blocks(model.config, layout.num_blocks))
    kept_middle = [i for i in middle if i not in replaced]
    if replaced:
        check_block_output(model, layout, replaced[0])
    block_map = list(range(layout.num_blocks))  # every position keeps its block, a harmonizer or the (compressed) original
    reduced = build_reduced_model(model, layout, block_map)

    structure: dict[str, dict] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    low_rank = dense_truncated = 0
    spec = {"rank": artifact.rank, "activation": artifact.activation}
    dtype = next(reduced.parameters()).dtype
    for i in replaced:
        path = f"{layout.blocks}.{i}"
        structure[path] = {"harmonizer": dict(spec)}
        states[path] = {n: t.to(dtype) for n, t in artifact.harmonizers[i].items()}
    if config.beta < 1:
        with torch.no_grad():
            for i in kept_middle:
                for path in attention_linear_names(reduced, layout, i):
                    change, state = _truncate(reduced.get_submodule(path), config.beta)
                    if change is None:
                        reduced.get_submodule(path).load_state_dict(state, strict=True)
                        dense_truncated += 1
                    else:
                        structure[path], states[path] = change, state
                        low_rank += 1
    apply_structure(reduced, structure)
    with torch.no_grad():
        for path, state in states.items():
            reduced.get_submodule(path).load_state_dict(state, strict=True)
    reduced.requires_grad_(True)
    reduced.eval()

    blocks = get_blocks(reduced, layout)
    middle_now = sum(count_parameters(blocks[i]) for i in middle)
    original = sum(count_parameters(get_blocks(model, layout)[i]) for i in middle)
    result = {
        "replaced_blocks": replaced,
        "num_replaced": len(replaced),
        "middle_parameters": middle_now,
        "original_middle_parameters": original,
        "middle_fraction": round(middle_now / original, 6),
        "low_rank_matrices": low_rank,
        "dense_truncated_matrices": dense_truncated,
        "artifact_fingerprint": bundle_fingerprint(artifact.manifest),
    }
    print(f"[scaleot] alpha {config.alpha}: {len(replaced)} of {len(middle)} middle blocks replaced by rank-{artifact.rank} "
          f"harmonizers {replaced}; beta {config.beta}: attention rank kept in {len(kept_middle)} blocks "
          f"({low_rank} low-rank, {dense_truncated} dense truncated); middle {middle_now:,} of {original:,} parameters "
          f"({100 * result['middle_fraction']:.1f}%)", flush=True)
    return Emulator(
        model=reduced,
        layout=layout,
        block_map=block_map,
        adapter_blocks=adapter,
        method="scaleot",
        params=dataclasses.asdict(config) | {"result": result},
        structure=structure,
    )
