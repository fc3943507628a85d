"""GradOT: closed forms of the gradient-preserving score, K-FAC statistics, selection to a size,
declared structure in the bundle, and the two-party round trip on a GradOT emulator."""

import json
import math

import pytest
import torch
from torch import nn

from offsite.adapter import load_adapter
from offsite.bundle import model_fingerprint
from offsite.emulator import compress_checkpoint, load_emulator, save_emulator
from offsite.errors import BundleError, ConfigError
from offsite.methods import build_emulator, make_config
from offsite.methods.gradot import (
    Stats,
    channel_scores,
    collect_statistics,
    find_sites,
    gcs_direct,
    svd_scores,
)
from offsite.plugin import plug_in, plug_into_emulator
from offsite.structure import LowRankLinear, apply_structure, dense_weight
from offsite.surgery import discover_layout, get_blocks
from offsite.training import FinetuneConfig, causal_lm_loss, finetune
from conftest import edit_manifest
from tiny import VOCAB, tiny_model

SMALL = dict(support_size=8, support_max_length=24, support_batch_size=4)


def gradot(**params):
    return make_config("gradot", **(SMALL | params))


def spd(n, gen):
    x = torch.randn(3 * n, n, generator=gen, dtype=torch.float64)
    return x.T @ x / (3 * n)


def random_stats(out_f, in_f, gen, A=None):
    return Stats(A=spd(in_f, gen) if A is None else A, G=spd(out_f, gen),
                 grad=torch.randn(out_f, in_f, generator=gen, dtype=torch.float64))


def kron_gcs(delta, stats, lam):
    """GCS with H written out as the Kronecker matrix: H vec(D) = (A^T (x) G) vec(D), column-major vec."""
    H = torch.kron(stats.A.T.contiguous(), stats.G)
    vec = delta.T.reshape(-1)
    return (H @ vec).abs().sum() - lam * (stats.grad * delta).sum()


@pytest.mark.parametrize("lam", [0.0, 0.7, -2.0])
def test_svd_component_score_closed_form(lam):
    """GCS_k = s_k (||G u_k||_1 ||A v_k||_1 + lam u_k^T grad v_k) for delta_k = -s_k u_k v_k^T."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    stats = random_stats(7, 5, gen)
    U, S, Vh, cost = svd_scores(W, stats, lam)
    assert cost.shape == (5,)
    for k in range(5):
        delta = -S[k] * torch.outer(U[:, k], Vh[k])
        direct = kron_gcs(delta, stats, lam)
        torch.testing.assert_close(gcs_direct(delta, stats, lam), direct)
        torch.testing.assert_close(cost[k].double(), direct, rtol=1e-4, atol=1e-6)
    # Sign: removing component k changes the loss by <grad, delta_k> = -s_k u_k^T grad v_k to first
    # order. With grad = u_0 v_0^T that is -s_0 (the loss falls), which GCS penalises by +lam s_0;
    # removals that raise the loss (privacy) are the cheap ones.
    stats.grad = torch.outer(U[:, 0], Vh[0])
    _, _, _, c1 = svd_scores(W, stats, 1.0)
    _, _, _, c0 = svd_scores(W, stats, 0.0)
    torch.testing.assert_close((c1 - c0)[0].double(), S[0].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 1.3])
def test_channel_score_closed_form(lam):
    """The channel's GCS is the sum over up, gate (row j) and down (column j) of the per-layer GCS,
    and equals the L1 norm of the block-diagonal K-FAC H applied to the joint perturbation."""
    gen = torch.Generator().manual_seed(1)
    d, inter = 4, 6
    A_x = spd(d, gen)
    up, gate, down = (torch.randn(inter, d, generator=gen, dtype=torch.float64),
                      torch.randn(inter, d, generator=gen, dtype=torch.float64),
                      torch.randn(d, inter, generator=gen, dtype=torch.float64))
    s_up, s_gate, s_down = random_stats(inter, d, gen, A_x), random_stats(inter, d, gen, A_x), random_stats(d, inter, gen)
    cost = channel_scores([(up, s_up), (gate, s_gate)], (down, s_down), lam)
    for j in range(inter):
        deltas = []
        for P in (up, gate):
            delta = torch.zeros_like(P)
            delta[j] = -P[j]
            deltas.append(delta)
        delta_down = torch.zeros_like(down)
        delta_down[:, j] = -down[:, j]
        deltas.append(delta_down)
        per_layer = sum(kron_gcs(dl, s, lam) for dl, s in zip(deltas, (s_up, s_gate, s_down)))
        torch.testing.assert_close(cost[j].double(), per_layer, rtol=1e-4, atol=1e-6)
        H = torch.block_diag(*(torch.kron(s.A, s.G) for s in (s_up, s_gate, s_down)))
        joint = torch.cat([dl.T.reshape(-1) for dl in deltas])
        linear = sum((s.grad * dl).sum() for dl, s in zip(deltas, (s_up, s_gate, s_down)))
        torch.testing.assert_close((H @ joint).abs().sum() - lam * linear, per_layer)


def test_kfac_statistics_match_a_direct_computation(tokenizer):
    """Hooks (streaming, padding masked) give A = sum x x^T / N, G = sum g g^T / N with g the gradient
    of the summed loss, and the gradient of the mean token loss."""
    from offsite.data import pad_batch
    from offsite.training import tokenize_examples
    from offsite.data import Example

    model = tiny_model("llama")
    layout = discover_layout(model)
    attn, mlps = find_sites(model, layout, [3, 4])
    names = [attn[0], attn[1], mlps[0].output]  # q_proj, k_proj (same input), down_proj
    modules = dict(model.named_modules())
    features = tokenize_examples(tokenizer, [Example("Question: what is " + "x " * i, " an answer") for i in range(6)], 64)
    stats = collect_statistics(model, {n: modules[n] for n in names}, features, 0, batch_size=4)
    assert stats[names[0]].A is stats[names[1]].A  # q and k read the same tensor: one A

    xs, gs = {}, {}

    def capture(name):
        def hook(module, args, out):
            xs.setdefault(name, []).append(args[0].detach())
            out.register_hook(lambda g: gs.setdefault(name, []).append(g))
        return hook

    handles = [modules[n].register_forward_hook(capture(n)) for n in names]
    model.requires_grad_(False)
    for n in names:
        modules[n].weight.requires_grad_(True)
    labelled, masks = 0, []
    for start in (0, 4):
        batch = pad_batch(features[start : start + 4], 0)
        n_lab = int((batch["labels"][:, 1:] != -100).sum())
        (causal_lm_loss(model, batch) * n_lab).backward()
        labelled += n_lab
        masks.append(batch["attention_mask"].reshape(-1).bool())
    for h in handles:
        h.remove()
    tokens = sum(int(m.sum()) for m in masks)
    for n in names:
        x = torch.cat([t.reshape(-1, t.shape[-1])[m] for t, m in zip(xs[n], masks)])
        g = torch.cat([t.reshape(-1, t.shape[-1])[m] for t, m in zip(gs[n], masks)])
        torch.testing.assert_close(stats[n].A, x.T @ x / tokens, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats[n].G, g.T @ g / tokens, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(stats[n].grad, modules[n].weight.grad / labelled, rtol=1e-4, atol=1e-9)


def middle_params(model, blocks):
    layout = discover_layout(model)
    return sum(p.numel() for i in blocks for p in get_blocks(model, layout)[i].parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("target, extra", [(0.7, {}), (0.45, {}), (0.5, {"num_kept": 3}), (0.6, {"score": "magnitude"})])
def test_selection_meets_the_target_size(family, target, extra, tokenizer):
    base = tiny_model(family)
    original = middle_params(base, range(2, 6))
    emu = build_emulator(base, "gradot", gradot(target_fraction=target, **extra), tokenizer=tokenizer)
    positions = [i for i, orig in enumerate(emu.block_map) if orig not in emu.adapter_blocks]
    achieved = middle_params(emu.model, positions)
    assert achieved <= target * original
    assert achieved >= (target - 0.05) * original  # the budget is used, not undershot by much
    assert emu.params["result"]["middle_parameters"] == achieved
    assert emu.structure  # something was restructured
    # Adapter blocks are verbatim copies of the original ones.
    layout = discover_layout(base)
    for i in emu.trainable:
        for (n, a), b in zip(get_blocks(emu.model, layout)[i].named_parameters(), get_blocks(base, layout)[emu.block_map[i]].parameters()):
            assert torch.equal(a, b), n


def test_layerdrop_alone_may_meet_the_target(tokenizer):
    emu = build_emulator(tiny_model("llama"), "gradot", gradot(target_fraction=0.6, kept_blocks=[2, 5]), tokenizer=tokenizer)
    assert emu.block_map == [0, 1, 2, 5, 6, 7] and emu.structure == {}


def test_top_ranks_are_always_kept(tokenizer):
    """Even at the smallest size, every low-rank matrix keeps its top min_rank_fraction components exactly."""
    base = tiny_model("llama")
    with pytest.raises(ConfigError, match="cannot reach the target"):
        build_emulator(base, "gradot", gradot(target_fraction=0.05, min_rank_fraction=0.25), tokenizer=tokenizer)
    emu = build_emulator(base, "gradot", gradot(target_fraction=0.4, min_rank_fraction=0.25), tokenizer=tokenizer)
    low_rank = {p: c["low_rank"] for p, c in emu.structure.items() if "low_rank" in c}
    assert low_rank
    modules = dict(base.named_modules())
    for path, rank in low_rank.items():
        orig_index, rest = discover_layout(base).parse_block_key(path)
        original = dense_weight(modules[f"model.layers.{emu.block_map[orig_index]}.{rest}"]).detach()
        full_rank = min(original.shape)
        assert rank >= math.ceil(0.25 * full_rank)
        module = emu.model.get_submodule(path)
        assert isinstance(module, LowRankLinear)
        approx = (module.up.weight @ module.down.weight).detach()
        top = torch.linalg.svdvals(original)[: math.ceil(0.25 * full_rank)]
        torch.testing.assert_close(torch.linalg.svdvals(approx)[: len(top)], top, rtol=1e-4, atol=1e-5)


def test_gradient_and_magnitude_scores_choose_differently(tokenizer):
    base = tiny_model("llama")
    a = build_emulator(base, "gradot", gradot(target_fraction=0.6), tokenizer=tokenizer)
    b = build_emulator(base, "gradot", gradot(target_fraction=0.6, score="magnitude"))  # data-free: no tokenizer needed
    assert a.params["score"] == "gradient" and b.params["score"] == "magnitude"
    assert a.structure != b.structure or any(
        not torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values())
    )


def test_support_set_from_a_task(tokenizer):
    emu = build_emulator(tiny_model("llama"), "gradot", gradot(target_fraction=0.6, support_task="piqa"), tokenizer=tokenizer)
    assert emu.params["support_task"] == "piqa"


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(target_fraction=0.0), "target_fraction"),
        (dict(target_fraction=1.5), "target_fraction"),
        (dict(score="random"), "score must be"),
        (dict(support_task="nope"), "support_task"),
        (dict(support_size=0), "support_size"),
        (dict(min_rank_fraction=0.0), "min_rank_fraction"),
        (dict(lambda_attn=math.inf), "finite"),
    ],
)
def test_invalid_settings(params, message):
    with pytest.raises(ConfigError, match=message):
        make_config("gradot", **params)


def test_unsupported_block_is_a_clear_error():
    from offsite.errors import UnsupportedModelError

    model = tiny_model("llama")
    layout = discover_layout(model)
    model.model.layers[3].mlp.extra = nn.Linear(64, 5)  # a linear that is neither MLP input nor output
    with pytest.raises(UnsupportedModelError, match="block 3 has no plain MLP"):
        find_sites(model, layout, [2, 3])
    model.model.layers[4].self_attn2 = nn.Linear(32, 32)
    with pytest.raises(UnsupportedModelError, match="attention module of block 4"):
        find_sites(model, layout, [4])


# ---------------------------------------------------------------- the bundle: declared structure
@pytest.fixture
def gradot_bundle(tmp_path, tokenizer):
    base = tiny_model("llama")
    emu = build_emulator(base, "gradot", gradot(target_fraction=0.55), tokenizer=tokenizer)
    save_emulator(emu, tokenizer, tmp_path / "emu", model_fingerprint(base), "llama")
    return base, emu, tmp_path / "emu"


def test_bundle_declares_the_structure_and_is_smaller(gradot_bundle, tmp_path, tokenizer):
    base, emu, path = gradot_bundle
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["structure"] == emu.structure
    assert {"low_rank"} in [set(c) for c in emu.structure.values()]
    assert {"out_features"} in [set(c) for c in emu.structure.values()]
    dropped = build_emulator(base, "layerdrop", make_config("layerdrop", num_kept=4))  # same blocks, original shapes
    save_emulator(dropped, tokenizer, tmp_path / "plain", model_fingerprint(base))
    saved = (tmp_path / "plain" / "model.safetensors").stat().st_size - (path / "model.safetensors").stat().st_size
    result = emu.params["result"]
    assert saved >= 0.95 * 4 * (result["original_middle_parameters"] - result["middle_parameters"])  # float32 bytes

    loaded = load_emulator(path)
    assert type(loaded.model) is type(base)
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids, use_cache=False).logits, emu.model(ids, use_cache=False).logits, rtol=0, atol=0)
    out = loaded.model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    seq = ids[:1, :6]
    for _ in range(4):
        with torch.no_grad():
            seq = torch.cat([seq, loaded.model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: {"model.layers.2.self_attn.nope": {"low_rank": 2}}, "not a module"),
        (lambda s: {"model.layers.0.self_attn.q_proj": {"low_rank": 2}}, "outside the blocks"),
        (lambda s: {"model.embed_tokens": {"out_features": 2}}, "outside the blocks"),
        (lambda s: {"model.layers.2.mlp": {"out_features": 2}}, "not a linear layer"),
        (lambda s: {"model.layers.2.self_attn.q_proj": {"low_rank": 0}}, "integer in"),
        (lambda s: {"model.layers.2.self_attn.q_proj": {"low_rank": 33}}, "integer in"),
        (lambda s: {"model.layers.2.self_attn.q_proj": {"low_rank": True}}, "integer in"),
        (lambda s: {"model.layers.2.self_attn.q_proj": {"low_rank": 2.0}}, "integer in"),
        (lambda s: {"model.layers.2.mlp.up_proj": {"out_features": 65}}, "integer in"),
        (lambda s: {"model.layers.2.self_attn.q_proj": {"rank": 2}}, "expected 'low_rank'"),
        (lambda s: {"model.layers.2.self_attn.q_proj": {"low_rank": 2, "out_features": 3}}, "expected 'low_rank'"),
        (lambda s: {"model.layers.2.self_attn.q_proj": {}}, "non-empty"),
        (lambda s: ["model.layers.2.self_attn.q_proj"], "mapping"),
        # Well-formed, but not what the weights hold: transformers' strict load refuses it.
        (lambda s: {k: ({"low_rank": v["low_rank"] + 1} if "low_rank" in v else v) for k, v in s.items()}, "cannot be loaded"),
        (lambda s: {}, "cannot be loaded"),
    ],
)
def test_declared_structure_is_validated_strictly(gradot_bundle, edit, message):
    _, emu, path = gradot_bundle
    edit_manifest(path, lambda m: m.__setitem__("structure", edit(emu.structure)))
    with pytest.raises(BundleError, match=message):
        load_emulator(path)


def test_apply_structure_checks_everything_before_changing_anything():
    model = tiny_model("llama")
    before = [type(m) for m in model.modules()]
    with pytest.raises(BundleError):
        apply_structure(model, {"model.layers.2.self_attn.q_proj": {"low_rank": 4}, "model.layers.2.mlp.up_proj": {"out_features": 0}})
    assert [type(m) for m in model.modules()] == before


# ---------------------------------------------------------------- two parties, end to end
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("lora", [False, True])
def test_round_trip_on_a_gradot_emulator(family, lora, tmp_path, examples):
    from tiny import save_tiny_checkpoint

    save_tiny_checkpoint(family, tmp_path / "base")
    # compress_checkpoint hands the checkpoint's tokenizer to the method (the support set needs it).
    emu_dir = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "gradot", gradot(target_fraction=0.6, num_kept=3))
    emulator = load_emulator(emu_dir)
    assert emulator.manifest["structure"]
    config = FinetuneConfig(lora=lora, lora_r=4, batch_size=4, lr=1e-2 if lora else 1e-3, max_steps=3)
    adapter_dir = finetune(emu_dir, examples, tmp_path / "run", config, progress=False)

    base = tiny_model(family)
    layout = discover_layout(base)
    bundle = load_adapter(adapter_dir)
    blocks = {layout.parse_block_key(k.removeprefix("base_model.model."))[0] for k in bundle.tensors}
    assert blocks == {0, 1, 6, 7}
    before = {k: v.clone() for k, v in base.state_dict().items()}
    plugged = plug_in(base, adapter_dir, emulator=emu_dir)
    changed = [k for k, v in plugged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(layout.parse_block_key(k)[0] in (0, 1, 6, 7) for k in changed)
    # The "emulator fine-tuned" setting works on the restructured emulator too.
    tuned = plug_into_emulator(load_emulator(emu_dir), adapter_dir)
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(tuned(ids).logits).all() and torch.isfinite(plugged(ids).logits).all()


def test_compress_from_the_cli(base_dir, tmp_path, capsys):
    from offsite.cli import main

    code = main(["compress", "--model", str(base_dir), "--out", str(tmp_path / "emu"), "--method", "gradot",
                 "--target-fraction", "0.6", "--num-kept", "3", "--support-size", "8", "--support-max-length", "24",
                 "--lambda-mlp", "0.5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[gradot] support pass" in out and "emulator -> original [0, 1, 2, 4, 5, 6, 7]" in out
    manifest = json.loads((tmp_path / "emu" / "manifest.json").read_text())
    params = manifest["method"]["params"]
    assert manifest["method"]["name"] == "gradot" and params["lambda_mlp"] == 0.5 and params["num_kept"] == 3
    assert params["result"]["middle_fraction"] <= 0.6 and manifest["structure"]
    assert load_emulator(tmp_path / "emu").model.config.num_hidden_layers == 7


def test_distilling_a_gradot_emulator_keeps_its_structure(base_dir, tmp_path):
    from offsite.distill import DistillConfig, distill

    emu_dir = compress_checkpoint(base_dir, tmp_path / "emu", "gradot", gradot(target_fraction=0.6))
    texts = [f"Passage {i}: the quick brown fox jumps over the lazy dog while science asks." for i in range(40)]
    config = DistillConfig(lr=3e-3, block_size=16, batch_size=4, tokens=16 * 4 * 2, eval_every=1)
    out = distill(base_dir, emu_dir, tmp_path / "distilled", texts, " ".join(texts[:10]), config, progress=False, log=lambda *_: None)
    structure = json.loads((emu_dir / "manifest.json").read_text())["structure"]
    assert structure and json.loads((out / "manifest.json").read_text())["structure"] == structure
    assert isinstance(load_emulator(out).model.get_submodule(next(p for p, c in structure.items() if "low_rank" in c)), LowRankLinear)


def test_statistics_in_several_passes_give_the_same_emulator(tokenizer):
    """blocks_per_pass bounds the K-FAC memory to a group of blocks; the scores do not depend on it."""
    base = tiny_model("qwen2")
    one = build_emulator(base, "gradot", gradot(target_fraction=0.6), tokenizer=tokenizer)
    two = build_emulator(base, "gradot", gradot(target_fraction=0.6, blocks_per_pass=1), tokenizer=tokenizer)
    assert one.structure == two.structure
    for (k, a), b in zip(one.model.state_dict().items(), two.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)


def test_balanced_lambda_weighs_both_terms_equally(tokenizer):
    """lambda_scale='balanced' multiplies lambda by mean|curvature| / mean|loss term| per kind; 0 is still 0."""
    from offsite.methods.gradot import Unit, balance

    units = [Unit("attn", ["a"], torch.tensor([2.0, 4.0]), torch.tensor([-0.5, 0.5]), 1, 2, 0),
             Unit("mlp", ["m"], torch.tensor([1.0]), torch.tensor([0.0]), 1, 1, 0)]
    assert balance(units, "attn") == pytest.approx(6.0)  # mean 3 / mean 0.5
    assert balance(units, "mlp") == 0.0  # no loss signal: the term stays off
    base = tiny_model("llama")
    zero_abs = build_emulator(base, "gradot", gradot(target_fraction=0.6, lambda_attn=0.0, lambda_mlp=0.0), tokenizer=tokenizer)
    zero_bal = build_emulator(base, "gradot", gradot(target_fraction=0.6, lambda_attn=0.0, lambda_mlp=0.0, lambda_scale="balanced"),
                              tokenizer=tokenizer)
    assert zero_abs.structure == zero_bal.structure
    one = build_emulator(base, "gradot", gradot(target_fraction=0.6, lambda_scale="balanced"), tokenizer=tokenizer)
    effective = one.params["result"]["effective_lambda"]
    assert effective["attn"] > 0 and effective["mlp"] > 0 and one.params["lambda_scale"] == "balanced"
    strong = build_emulator(base, "gradot", gradot(target_fraction=0.6, lambda_attn=50.0, lambda_mlp=50.0, lambda_scale="balanced"),
                            tokenizer=tokenizer)
    assert strong.structure != zero_abs.structure  # the loss term now decides
    with pytest.raises(ConfigError, match="lambda_scale must be one of"):
        gradot(lambda_scale="relative")


def test_a_structure_that_loads_but_cannot_compute_is_refused_on_load(base_dir, tmp_path):
    """Regression (#23): a declared structure whose parts each load (the up projection pruned, the gate
    not) broke later, in fine-tuning. One token through the model on load refuses it with one line."""
    from safetensors.torch import load_file, save_file

    from conftest import rehash

    emu = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    tensors = load_file(emu / "model.safetensors")
    key = "model.layers.2.mlp.up_proj.weight"
    tensors[key] = tensors[key][:60].contiguous()
    save_file(tensors, emu / "model.safetensors", metadata={"format": "pt"})
    edit_manifest(emu, lambda m: m.update(structure={"model.layers.2.mlp.up_proj": {"out_features": 60}}))
    rehash(emu)
    with pytest.raises(BundleError, match="declared structure does not compute") as error:
        load_emulator(emu)
    assert "\n" not in str(error.value)


def test_plain_transformers_refuses_a_restructured_emulator_by_name_and_offsite_loads_it(tmp_path):
    """#20: a GradOT bundle's middle has smaller modules than its family's config implies; plain transformers and
    lm-eval's hf loader must refuse it by name (not with a shape-mismatch report), offsite must load it."""
    from tiny import save_tiny_checkpoint
    from transformers import AutoModelForCausalLM

    from offsite.emulator import STRUCTURED_MODEL_TYPE, compress_checkpoint, load_emulator
    from offsite.methods import make_config

    save_tiny_checkpoint("llama", tmp_path / "base")
    bundle = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "gradot",
                                 make_config("gradot", target_fraction=0.5, support_size=8, support_max_length=32))
    with pytest.raises(ValueError, match="offsite_structured_emulator__load_with_offsite_emulator_load_emulator"):
        AutoModelForCausalLM.from_pretrained(bundle)
    emulator = load_emulator(bundle)
    assert emulator.model.config.model_type == "llama" and STRUCTURED_MODEL_TYPE not in str(emulator.model.config.to_dict())
    assert "load_emulator" in (bundle / "README.md").read_text()
