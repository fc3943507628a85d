"""GradOT (Yao et al., ACL 2025): training-free, gradient-preserving compression of the middle.

A compression perturbation delta of a weight W is scored by the gradient-preserving
compression score (lower = cheaper to apply)

    GCS(delta) = ||H delta||_1 - lambda <grad_W, delta>,    H ~ A (x) G  =>  H delta ~ G delta A

with K-FAC factors A = E[x x^T] (the layer's input covariance) and G = E[g g^T] (the covariance of
the gradient at its output), both from a support set. The first term is the change of the
gradient the perturbation causes (to preserve what the adapter is trained with), the second the
first-order change of the loss (delta raising the emulator's loss is favoured: privacy).

Statistics (one forward/backward over the support set, after the optional LayerDrop, with
hooks; streaming sums, float32, nothing per token is stored): per token position t of the
N non-padding positions, x_t is the layer's input and g_t the gradient of the summed token
loss at its output; A = sum x x^T / N, G = sum g g^T / N, and grad_W = gradient of the *mean*
token loss. Then A (x) G approximates the Hessian (Fisher) of the mean loss, and GCS is in its units.

Dynamic Rank Decomposition (attention projections). W = sum_k s_k u_k v_k^T; dropping component
k is delta_k = -s_k u_k v_k^T, so G delta_k A = -s_k (G u_k)(A v_k)^T (A symmetric), an outer
product, whose entrywise L1 norm is ||G u_k||_1 ||A v_k||_1; and -lambda <grad, delta_k> =
+lambda s_k u_k^T grad v_k:

    GCS_k = s_k (||G u_k||_1 ||A v_k||_1 + lambda u_k^T grad_W v_k)

The top `min_rank_fraction` (5%) of each matrix's rank by singular value is always kept. The kept
components are stored as two thin linears (rank r costs r (in + out) weights instead of in*out;
a matrix whose kept rank would not save anything stays dense and untouched).

Selective Channel Pruning (MLP). Removing intermediate channel j zeroes row j of every input
projection P (up, gate; delta = -e_j p_j^T) and column j of the output projection D
(delta = -d_j e_j^T). K-FAC is block-diagonal across layers, so H applied to the joint
perturbation is the concatenation of the per-layer products and its L1 norm is their sum: the
channel's GCS is *exactly* (under K-FAC) the sum over the affected linears of

    P: ||G_P[:, j]||_1 ||A_x p_j||_1 + lambda <grad_P[j, :], p_j>
    D: ||G_D d_j||_1 ||A_h[:, j]||_1 + lambda <grad_D[:, j], d_j>

(biases are kept with their channel and not scored). The pruned MLP is the same MLP with
fewer channels. At least `min_rank_fraction` of the channels are kept.

Selection to the target size: the budget is `target_fraction` of the parameters of all original
middle blocks (LayerDrop's `num_kept`/`kept_blocks` first drops whole blocks, by the same uniform
stride as the "layerdrop" method). Every removable item (an SVD component or a channel) is ranked
globally, across matrices, blocks and kinds, by its GCS per parameter it frees, and the cheapest
prefix of that ranking that meets the budget is removed (a greedy knapsack; found by bisection,
since the size falls monotonically with the prefix). `lambda_attn` and `lambda_mlp` weight the
loss term of the two kinds; it is in the units of the curvature term, so its scale is
model-dependent: on SmolLM2-135M (64 x 128 support tokens) the loss term at lambda = 1 is ~1e-3
of the curvature term (a tie-breaker), at ~300 they are comparable, and the emulator's held-out
perplexity at 65% of the middle goes from 75 (lambda 1) to 2,161 (300) and 297,847 (3,000). With
`lambda_scale="balanced"` lambda is reparametrised onto one scale: the loss term is multiplied
by mean|curvature| / mean|loss| over all removable items of its kind (attention components or
MLP channels) before lambda applies, so lambda = 1 weighs the two halves of GCS equally on any
model, and the factor actually used is recorded in the manifest (`result.effective_lambda`). `score="magnitude"` is the data-free ablation: components by their
share of the matrix's energy s_k^2 / ||W||_F^2, channels by their share of the MLP's energy
(squared norms of the channel's rows and column), ranked and selected in the same way.

The emulator keeps the original architecture with smaller modules declared in the manifest's
"structure" (see `offsite.structure`), so a data owner loads it with offsite alone.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError, UnsupportedModelError
from ..structure import LINEAR_TYPES, apply_structure, count_parameters, dense_weight, linear_shape
from ..surgery import BlockLayout, build_reduced_model, get_blocks
from .base import Emulator, model_tokenizer, register
from .configs import LAMBDA_SCALES, SCORES, GradOTConfig  # noqa: F401  (re-exported)





# ------------------------------------------------------------------ where the linears are
@dataclass
class MLPSite:
    inputs: list[str]  # projections from the hidden state (up, gate): rows = channels
    output: str  # projection back to the hidden state (down): columns = channels


def find_sites(model: nn.Module, layout: BlockLayout, blocks: list[int]) -> tuple[list[str], list[MLPSite]]:
    """Attention projections and MLPs of the given blocks (full module paths).

    The attention is the one child of the block whose name contains "attn"/"attention"; every
    linear outside it belongs to the MLP, whose input projections read the hidden state and whose
    single output projection writes it, through one intermediate size.
    """
    hidden = model.config.hidden_size
    attention, mlps = [], []
    for index in blocks:
        block = get_blocks(model, layout)[index]
        prefix = f"{layout.blocks}.{index}."
        attn_children = [n for n, m in block.named_children()
                         if ("attn" in n.lower() or "attention" in n.lower()) and any(isinstance(x, LINEAR_TYPES) for x in m.modules())]
        if len(attn_children) != 1:
            raise UnsupportedModelError(f"gradot: cannot tell the attention module of block {index} (candidates {attn_children})")
        linears = {n: m for n, m in block.named_modules() if isinstance(m, LINEAR_TYPES)}
        attn = [n for n in linears if n.startswith(attn_children[0] + ".")]
        rest = {n: linear_shape(m) for n, m in linears.items() if n not in attn}
        ins = [n for n, (i, o) in rest.items() if i == hidden and o != hidden]
        outs = [n for n, (i, o) in rest.items() if o == hidden and i != hidden]
        width = {rest[n][1] for n in ins}
        if len(outs) != 1 or not ins or width != {rest[outs[0]][0]} or len(ins) + 1 != len(rest):
            raise UnsupportedModelError(
                f"gradot: block {index} has no plain MLP (input projections {ins}, output projections {outs}, other linears "
                f"{sorted(set(rest) - set(ins) - set(outs))})"
            )
        attention += [prefix + n for n in attn]
        mlps.append(MLPSite([prefix + n for n in ins], prefix + outs[0]))
    return attention, mlps


# ------------------------------------------------------------------ support set and K-FAC statistics
def support_features(tokenizer, config: GradOTConfig) -> list[dict[str, list[int]]]:
    """Tokenised support sequences: packed generic text, or a task's train examples (answers labelled)."""
    if config.support_task == "generic":
        from ..lm import pack_blocks
        from ..tasks import load_generic_text

        # ~4 characters per English token; pack_blocks cuts full blocks only.
        texts = load_generic_text(limit_chars=6 * config.support_size * config.support_max_length)
        return pack_blocks(tokenizer, texts, config.support_max_length)[: config.support_size]
    from ..tasks import load_train_examples
    from ..lm import tokenize_examples

    examples = load_train_examples(config.support_task, limit=config.support_size, seed=config.seed)
    return tokenize_examples(tokenizer, examples, config.support_max_length)


@dataclass
class Stats:
    A: torch.Tensor  # (in, in) input covariance (shared by linears that read the same tensor)
    G: torch.Tensor  # (out, out) output-gradient covariance
    grad: torch.Tensor  # (out, in) gradient of the mean token loss w.r.t. the dense weight


class KFACCollector:
    """Forward/backward hooks that accumulate sum x x^T, sum g g^T over non-padding positions."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.A: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.a_key: dict[str, str] = {}  # module -> key of its A (q, k, v read the same input)
        self.tokens = 0
        self.mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self.handles = [m.register_forward_hook(self._forward(name)) for name, m in modules.items()]

    def start_batch(self, attention_mask: torch.Tensor) -> None:
        self.mask = attention_mask.reshape(-1).bool()
        self.tokens += int(self.mask.sum())
        self._seen = {}

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1, t.shape[-1])[self.mask].float()

    @staticmethod
    def _add(store: dict, key: str, rows: torch.Tensor) -> None:
        cov = rows.T @ rows
        if key in store:
            store[key] += cov
        else:
            store[key] = cov

    def _forward(self, name: str):
        def hook(module, args, out):
            x = args[0]
            seen = self._seen.get(id(x))
            shared = seen is not None and seen[0] is x  # the same tensor another hooked linear read
            key = self.a_key.setdefault(name, seen[1] if shared else name)
            if not (shared and seen[1] == key):
                self._add(self.A, key, self._rows(x))
                self._seen[id(x)] = (x, key)
            if out.requires_grad:
                out.register_hook(lambda g: self._add(self.G, name, self._rows(g)))

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self._seen = {}


def collect_statistics(model: PreTrainedModel, modules: dict[str, nn.Module], features, pad_id: int,
                       batch_size: int) -> dict[str, Stats]:
    """K-FAC factors and mean-loss gradients of `modules` over the support `features`."""
    from ..data import IGNORE_INDEX, pad_batch
    from ..lm import causal_lm_loss

    device = next(model.parameters()).device
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
        m.weight.grad = None
    collector = KFACCollector(modules)
    labelled = 0
    try:
        for start in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(features[start : start + batch_size], pad_id).items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n == 0:
                continue
            collector.start_batch(batch["attention_mask"])
            (causal_lm_loss(model, batch) * n).backward()  # summed token loss: g_t per position
            labelled += n
    finally:
        collector.close()
    if labelled == 0:
        raise ConfigError("gradot: the support set has no labelled tokens")
    # In place: for a 7B block the factors are ~3 GB in float32, and a divided copy would double that.
    A = {key: cov.div_(collector.tokens) for key, cov in collector.A.items()}
    out = {}
    for name, m in modules.items():
        grad = m.weight.grad.float().div_(labelled)
        m.weight.grad = None
        out[name] = Stats(
            A=A[collector.a_key[name]],
            G=collector.G[name].div_(collector.tokens),
            grad=grad.T if isinstance(m, Conv1D) else grad,
        )
    for name, p in model.named_parameters():
        p.requires_grad_(requires[name])
    return out


# ------------------------------------------------------------------ scores (closed forms)
def _real(t: torch.Tensor) -> torch.Tensor:
    """A weight in float32 for scoring (float64, used by the exact checks, stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def gcs_direct(delta: torch.Tensor, stats: Stats, lam: float) -> torch.Tensor:
    """GCS of one perturbation of a dense (out, in) weight, by definition: ||G delta A||_1 - lam <grad, delta>."""
    return (stats.G @ delta @ stats.A).abs().sum() - lam * (stats.grad * delta).sum()


# CPU SVDs of matrices up to this size run on one thread: LAPACK's many small parallel regions
# cost more than they gain there (a 576 x 576 SVD took 13x longer on two threads of a busy 2-core machine).
SERIAL_SVD_SIZE = 2048


def svd(W: torch.Tensor):
    """Thin SVD (U, S, Vh) of W in float32 (float64 stays float64)."""
    W = _real(W)
    if W.device.type != "cpu" or max(W.shape) > SERIAL_SVD_SIZE:
        return torch.linalg.svd(W, full_matrices=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(W, full_matrices=False)
    finally:
        torch.set_num_threads(threads)


def svd_terms(W: torch.Tensor, stats: Stats | None):
    """SVD of W (out, in) and the two terms of each component's GCS: (U, S, Vh, curvature, loss) with
    GCS_k = curvature_k + lambda * loss_k (closed form); with `stats=None` the curvature is the
    component's share of the energy s_k^2 / sum s^2 and the loss term is zero."""
    U, S, Vh = svd(W)
    if stats is None:
        return U, S, Vh, S**2 / (S**2).sum().clamp_min(1e-30), torch.zeros_like(S)
    gu = (stats.G @ U).abs().sum(0)  # ||G u_k||_1
    av = (stats.A @ Vh.T).abs().sum(0)  # ||A v_k||_1
    ugv = ((U.T @ stats.grad) * Vh).sum(1)  # u_k^T grad v_k
    return U, S, Vh, S * gu * av, S * ugv


def svd_scores(W: torch.Tensor, stats: Stats | None, lam: float):
    """SVD of W (out, in) and the cost of dropping each component: its GCS (closed form), or with
    `stats=None` its share of the energy s_k^2 / sum s^2. Returns (U, S, Vh, cost)."""
    U, S, Vh, curvature, loss = svd_terms(W, stats)
    return U, S, Vh, curvature + lam * loss


def channel_terms(ins: list[tuple[torch.Tensor, Stats | None]], out: tuple[torch.Tensor, Stats | None]):
    """The two terms (curvature, loss) of the GCS of removing each intermediate channel of an MLP:
    zeroing row j of every input projection P (I, d) and column j of the output projection D (d, I)
    (closed form); with statistics None, the channel's share of the MLP's squared weight norm and zero."""
    D, d_stats = out
    if d_stats is None:
        energy = (_real(D) ** 2).sum(0) + sum((_real(P) ** 2).sum(1) for P, _ in ins)
        return energy / energy.sum().clamp_min(1e-30), torch.zeros_like(energy)
    D = _real(D)
    curvature = (d_stats.G @ D).abs().sum(0) * d_stats.A.abs().sum(0)
    loss = (d_stats.grad * D).sum(0)
    for P, s in ins:
        P = _real(P)
        curvature = curvature + s.G.abs().sum(0) * (P @ s.A).abs().sum(1)
        loss = loss + (s.grad * P).sum(1)
    return curvature, loss


def channel_scores(ins: list[tuple[torch.Tensor, Stats | None]], out: tuple[torch.Tensor, Stats | None], lam: float) -> torch.Tensor:
    """Cost of removing each intermediate channel of an MLP: the summed GCS of zeroing row j of every
    input projection P (I, d) and column j of the output projection D (d, I) (closed form); with
    statistics None, the channel's share of the MLP's squared weight norm."""
    curvature, loss = channel_terms(ins, out)
    return curvature + lam * loss


def balance(units: list["Unit"], kind: str) -> float:
    """mean |curvature term| / mean |loss term| over every removable item of one kind (attn or mlp):
    the factor that puts lambda on one scale, so lambda = 1 weighs the two terms equally on any model."""
    curv = torch.cat([u.curvature.double().abs() for u in units if u.kind == kind] or [torch.zeros(1)])
    loss = torch.cat([u.loss.double().abs() for u in units if u.kind == kind] or [torch.zeros(1)])
    if float(loss.mean()) == 0.0:
        return 0.0
    return float(curv.mean() / loss.mean())


# ------------------------------------------------------------------ selection to the budget
@dataclass
class Unit:
    """One compressible thing: an attention matrix (items: SVD components) or an MLP (items: channels)."""

    kind: str  # "attn" | "mlp"
    paths: list[str]
    curvature: torch.Tensor  # per item: the ||H delta||_1 term of its GCS (or the magnitude score)
    loss: torch.Tensor  # per item: the <grad, delta> term (GCS = curvature + lambda * loss)
    per_item: int  # parameters one item takes
    dense: int  # parameters when untouched (weights + biases of the unit's linears)
    fixed: int  # parameters independent of the item count (biases that stay)
    extra: dict = dataclasses.field(default_factory=dict)
    cost: torch.Tensor | None = None  # per item, set by `price`; +inf = never removed

    def price(self, lam: float, min_rank_fraction: float) -> None:
        """GCS per item at this lambda, with the protected top items set to +inf."""
        cost = self.curvature + lam * self.loss
        order_key = self.extra["svd"][1] if self.kind == "attn" else cost  # singular values / the channel's own cost
        self.cost = protect_top(cost, order_key, min_rank_fraction)

    def size(self, kept: int) -> int:
        """Parameters with `kept` items; a low-rank matrix that would not be smaller stays dense."""
        compressed = self.fixed + kept * self.per_item
        return min(self.dense, compressed) if self.kind == "attn" else compressed

    def stays_dense(self, kept: int) -> bool:
        return self.kind == "attn" and self.fixed + kept * self.per_item >= self.dense


def protect_top(cost: torch.Tensor, order_key: torch.Tensor, fraction: float) -> torch.Tensor:
    """`cost` with the ceil(fraction * n) items of largest `order_key` set to +inf (always kept)."""
    n = cost.numel()
    keep = min(n, max(1, math.ceil(fraction * n)))
    cost = cost.clone()
    cost[torch.topk(order_key, keep).indices] = math.inf
    return cost


def select(units: list[Unit], other: int, budget: float) -> tuple[list[torch.Tensor], int]:
    """Remove the globally cheapest items (cost per freed parameter) until the middle fits `budget`.

    Returns, per unit, a bool mask of the removed items, and the resulting parameter count.
    `other` counts the middle's parameters outside the units.
    """
    ratios, owners, positions = [], [], []
    for u, unit in enumerate(units):
        finite = torch.isfinite(unit.cost).nonzero().flatten()
        ratios.append(unit.cost[finite].double() / unit.per_item)
        owners.append(torch.full((finite.numel(),), u, dtype=torch.long))
        positions.append(finite)
    ratios, owners, positions = torch.cat(ratios), torch.cat(owners), torch.cat(positions)
    order = torch.sort(ratios, stable=True).indices
    owners, positions = owners[order], positions[order]
    lengths = torch.tensor([u.cost.numel() for u in units])

    def total(m: int) -> int:
        removed = torch.bincount(owners[:m], minlength=len(units))
        return other + sum(unit.size(int(n - r)) for unit, n, r in zip(units, lengths, removed))

    lo, hi = 0, len(owners)
    if total(hi) > budget:
        raise ConfigError(
            f"gradot cannot reach the target: even at the minimum ranks/channels the middle keeps {total(hi):,} "
            f"parameters, the target allows {int(budget):,}; raise target_fraction or lower min_rank_fraction"
        )
    while lo < hi:  # smallest prefix that fits (size is monotone in the prefix length)
        mid = (lo + hi) // 2
        if total(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    masks = [torch.zeros(u.cost.numel(), dtype=torch.bool) for u in units]
    for u, p in zip(owners[:lo].tolist(), positions[:lo].tolist()):
        masks[u][p] = True
    return masks, total(lo)


# ------------------------------------------------------------------ building the smaller modules
def _bias(module: nn.Module) -> torch.Tensor | None:
    return module.bias if getattr(module, "bias", None) is not None else None


def low_rank_state(module: nn.Module, U, S, Vh, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weights of the LowRankLinear holding components `keep` (balanced: sqrt(s) on each side)."""
    root = S[keep].sqrt()
    dtype = module.weight.dtype
    state = {"down.weight": (root[:, None] * Vh[keep]).to(dtype), "up.weight": (U[:, keep] * root[None, :]).to(dtype)}
    if _bias(module) is not None:
        state["up.bias"] = module.bias.detach().clone()
    return state


def sliced_state(module: nn.Module, keep_out: torch.Tensor | None = None, keep_in: torch.Tensor | None = None):
    """Weights of `module` keeping output rows `keep_out` and/or input columns `keep_in`."""
    W = dense_weight(module).detach()
    if keep_out is not None:
        W = W[keep_out]
    if keep_in is not None:
        W = W[:, keep_in]
    state = {"weight": (W.T if isinstance(module, Conv1D) else W).contiguous().clone()}
    if _bias(module) is not None:
        state["bias"] = (module.bias[keep_out] if keep_out is not None else module.bias).detach().clone()
    return state


def _unit_params(modules: list[nn.Module]) -> int:
    return sum(count_parameters(m) for m in modules)


def score_units(model, layout: BlockLayout, blocks: list[int], config: GradOTConfig, features, pad_id: int,
                times: dict[str, float]) -> list[Unit]:
    """Support pass over `blocks` (gradient score) and the cost of every removable item in them."""
    attn_paths, mlp_sites = find_sites(model, layout, blocks)
    modules = dict(model.named_modules())
    stats: dict[str, Stats] = {}
    clock = time.perf_counter()
    if features is not None:
        targets = attn_paths + [p for site in mlp_sites for p in site.inputs + [site.output]]
        stats = collect_statistics(model, {p: modules[p] for p in targets}, features, pad_id, config.support_batch_size)
        took = time.perf_counter() - clock
        times["support pass"] = times.get("support pass", 0.0) + took
        print(f"[gradot] support pass: {len(features)} sequences of <= {config.support_max_length} tokens "
              f"({config.support_task}), K-FAC factors of {len(targets)} linears in blocks {blocks[0]}-{blocks[-1]}: "
              f"{took:.1f} s", flush=True)
        clock = time.perf_counter()
    units: list[Unit] = []
    with torch.no_grad():
        for path in attn_paths:
            m = modules[path]
            in_f, out_f = linear_shape(m)
            U, S, Vh, curvature, loss = svd_terms(dense_weight(m), stats.get(path))
            bias = out_f if _bias(m) is not None else 0
            if m.weight.dtype in (torch.bfloat16, torch.float16):  # kept until the build, where they are stored in this dtype anyway
                U, Vh = U.to(m.weight.dtype), Vh.to(m.weight.dtype)
            units.append(Unit("attn", [path], curvature, loss, in_f + out_f, in_f * out_f + bias, bias, {"svd": (U, S, Vh)}))
        for site in mlp_sites:
            ins = [(dense_weight(modules[p]), stats.get(p)) for p in site.inputs]
            out = (dense_weight(modules[site.output]), stats.get(site.output))
            curvature, loss = channel_terms(ins, out)
            hidden = out[0].shape[0]
            per_item = sum(P.shape[1] + (1 if _bias(modules[p]) is not None else 0) for (P, _), p in zip(ins, site.inputs)) + hidden
            fixed = hidden if _bias(modules[site.output]) is not None else 0
            dense = _unit_params([modules[p] for p in site.inputs + [site.output]])
            units.append(Unit("mlp", site.inputs + [site.output], curvature, loss, per_item, dense, fixed))
    times["scores"] = times.get("scores", 0.0) + time.perf_counter() - clock
    return units


@register("gradot", GradOTConfig, needs_tokenizer=True)
def build_gradot(model: PreTrainedModel, layout: BlockLayout, config: GradOTConfig, tokenizer=None, reduced=None) -> Emulator:
    """`reduced`: the model already cut to `config.block_map` (loaded block by block from the checkpoint,
    offsite.streaming); `model` may then be the whole model on the meta device (its sizes are all it gives)."""
    times: dict[str, float] = {}
    start = time.perf_counter()
    adapter = config.adapter_blocks(layout.num_blocks)
    kept_middle = config.kept_middle(layout.num_blocks)
    bottom, top = adapter[: config.num_bottom], adapter[config.num_bottom :]
    block_map = bottom + kept_middle + top
    original_middle = sum(count_parameters(get_blocks(model, layout)[i]) for i in config.middle_blocks(layout.num_blocks))
    budget = config.target_fraction * original_middle

    if reduced is None:
        reduced = build_reduced_model(model, layout, block_map)
    positions = list(range(len(bottom), len(bottom) + len(kept_middle)))  # middle blocks in the emulator
    features, pad_id = None, 0
    if config.score == "gradient":
        from ..lm import pad_token_id

        tokenizer = tokenizer or model_tokenizer(model, "gradot")
        features, pad_id = support_features(tokenizer, config), pad_token_id(tokenizer)
    step = config.blocks_per_pass or len(positions)
    units: list[Unit] = []
    for first in range(0, len(positions), step):  # K-FAC memory is bounded by one group of blocks
        group = positions[first : first + step]
        units += score_units(reduced, layout, group, config, features, pad_id, times)
    middle_now = sum(count_parameters(get_blocks(reduced, layout)[i]) for i in positions)
    clock = time.perf_counter()
    lambdas = {"attn": config.lambda_attn, "mlp": config.lambda_mlp}
    if config.lambda_scale == "balanced":
        lambdas = {kind: lam * balance(units, kind) for kind, lam in lambdas.items()}
    for unit in units:
        unit.price(lambdas[unit.kind], config.min_rank_fraction)
    modules = dict(reduced.named_modules())
    other = middle_now - sum(u.dense for u in units)
    masks, achieved = select(units, other, budget)

    structure: dict[str, dict] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    kept_rank = full_rank = kept_channels = all_channels = 0
    with torch.no_grad():
        for unit, removed in zip(units, masks):
            n = unit.cost.numel()
            kept = n - int(removed.sum())
            if unit.kind == "attn":
                full_rank += n
                if unit.stays_dense(kept):
                    kept_rank += n
                    continue
                kept_rank += kept
                U, S, Vh = unit.extra["svd"]
                (path,) = unit.paths
                structure[path] = {"low_rank": kept}
                states[path] = low_rank_state(modules[path], U, S, Vh, (~removed).nonzero().flatten())
            else:
                all_channels += n
                kept_channels += kept
                if kept == n:
                    continue
                keep = (~removed).nonzero().flatten()
                *inputs, output = unit.paths
                for p in inputs:
                    structure[p] = {"out_features": kept}
                    states[p] = sliced_state(modules[p], keep_out=keep)
                structure[output] = {"in_features": kept}
                states[output] = sliced_state(modules[output], keep_in=keep)
        apply_structure(reduced, structure)
        for path, state in states.items():
            reduced.get_submodule(path).load_state_dict(state, strict=True)
    reduced.requires_grad_(True)
    middle_after = sum(count_parameters(get_blocks(reduced, layout)[i]) for i in positions)
    assert middle_after == achieved, (middle_after, achieved)
    times["selection + build"] = time.perf_counter() - clock

    result = {
        "effective_lambda": {k: float(f"{v:.6g}") for k, v in lambdas.items()},  # in the curvature term's units
        "middle_parameters": middle_after,
        "original_middle_parameters": original_middle,
        "middle_fraction": round(middle_after / original_middle, 6),
        "attention_rank_kept": round(kept_rank / max(1, full_rank), 6),
        "mlp_channels_kept": round(kept_channels / max(1, all_channels), 6),
        "low_rank_matrices": sum(1 for c in structure.values() if "low_rank" in c),
    }
    print(f"[gradot] middle {middle_after:,} of {original_middle:,} parameters ({100 * result['middle_fraction']:.1f}%, "
          f"target {100 * config.target_fraction:.1f}%): {len(kept_middle)} of {len(config.middle_blocks(layout.num_blocks))} "
          f"middle blocks, attention rank kept {100 * result['attention_rank_kept']:.1f}% "
          f"({result['low_rank_matrices']} of {sum(u.kind == 'attn' for u in units)} matrices low-rank), MLP channels kept "
          f"{100 * result['mlp_channels_kept']:.1f}%", flush=True)
    times["total"] = time.perf_counter() - start
    print("[gradot] time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), flush=True)
    return Emulator(
        model=reduced,
        layout=layout,
        block_map=block_map,
        adapter_blocks=adapter,
        method="gradot",
        params=dataclasses.asdict(config) | {"result": result},
        structure=structure,
    )
