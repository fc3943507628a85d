"""ScaleOT: harmonizers, importance estimation (stage a), Selective Rank Compression and the
emulator assembled from the artifact (stage b), declared harmonizer structure in the bundle,
and the two-party round trip on a ScaleOT emulator."""

import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offsite.adapter import load_adapter
from offsite.bundle import model_fingerprint
from offsite.emulator import compress_checkpoint, load_emulator, save_emulator
from offsite.errors import BundleError, ConfigError, OffsiteError, UnsupportedModelError
from offsite.methods import build_emulator, make_config
from offsite.methods.scaleot import (
    ImportanceConfig,
    cache_anchor_blocks,
    closest_layerdrop,
    estimate_importance,
    kept_rank,
    load_artifact,
    make_groups,
    middle_parameters,
    new_harmonizers,
    sample_replaced,
)
from offsite.plugin import plug_in, plug_into_emulator
from offsite.structure import Harmonizer, LowRankLinear, dense_weight, linear_shape
from offsite.surgery import attention_linear_names, build_reduced_model, discover_layout, get_blocks
from offsite.training import FinetuneConfig, finetune
from conftest import edit_manifest
from tiny import FAMILIES, VOCAB, block_io, save_tiny_checkpoint, tiny_model

TEXTS = [f"Passage {i}: the quick brown fox jumps over the lazy dog while science asks questions." for i in range(60)]
SMALL = dict(rank=4, steps=6, batch_size=4, block_size=16, checkpoint_every=0, log_every=2, device="cpu", policy_lr=0.2, lr=3e-2)
QUIET = dict(progress=False, log=lambda *_: None)


def stage_a(model, tokenizer, out, **params):
    return estimate_importance(model, tokenizer, out, ImportanceConfig(**(SMALL | params)), texts=TEXTS, **QUIET)


def scaleot(artifact, **params):
    """Selection by the ranking alone (most tests); the default protection of the adapter's neighbours has its own test."""
    return make_config("scaleot", artifact=str(artifact), **({"protect_adapter_neighbours": False} | params))


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer):
    """One stage-(a) artifact per family (made once): family -> (base model, artifact path)."""
    cache = {}

    def get(family):
        if family not in cache:
            base = tiny_model(family)
            cache[family] = (base, stage_a(base, tokenizer, tmp_path_factory.mktemp(family) / "artifact"))
        return cache[family]

    return get


# ---------------------------------------------------------------- harmonizers and stage (a)
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2", "bloom"])
def test_new_harmonizers_are_the_identity(family):
    """The mixed network with every middle block replaced by a fresh harmonizer computes exactly
    what the network with those blocks removed computes."""
    model = tiny_model(family)
    layout = discover_layout(model)
    skipped = build_reduced_model(model, layout, [0, 1, 6, 7])
    blocks = get_blocks(model, layout)
    for i, h in new_harmonizers(model, layout, [2, 3, 4, 5], rank=4).items():
        assert isinstance(h, Harmonizer) and torch.count_nonzero(h.down.weight) > 0
        blocks[int(i)] = h
    ids = torch.randint(3, VOCAB, (2, 10))
    torch.testing.assert_close(logits(model, ids), logits(skipped, ids), rtol=0, atol=0)


def test_groups_and_sampling():
    assert make_groups(list(range(2, 28)), 4) == [[2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12, 13, 14, 15],
                                                 [16, 17, 18, 19], [20, 21, 22, 23], [24, 25, 26, 27]]
    assert make_groups([2, 3, 4], 4) == [[2, 3, 4]]
    groups = make_groups(list(range(2, 10)), 4)
    position = {b: i for i, b in enumerate(range(2, 10))}
    s = torch.tensor([5.0, -5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], requires_grad=True)
    torch.manual_seed(0)
    counts = torch.zeros(8)
    for _ in range(300):
        replaced, log_prob = sample_replaced(s, groups, position)
        assert len([b for b in replaced if b < 6]) == 2 and len(replaced) == 4  # half of each group of 4
        counts[[position[b] for b in replaced]] += 1
    # Plackett-Luce without replacement, weights 1 - sigmoid(s): the inclusion probability of each
    # block of the first group, by enumerating the ordered pairs of picks.
    w = torch.sigmoid(-s[:4].detach()).double()
    q = w / w.sum()
    inclusion = [sum(q[a] * q[b] / (1 - q[a]) for a in range(4) for b in range(4) if a != b and i in (a, b)) for i in range(4)]
    for i in range(4):
        assert abs(counts[i] / 300 - inclusion[i]) < 4 * math.sqrt(inclusion[i] * (1 - inclusion[i]) / 300) + 1e-3
    assert inclusion[0] < 0.01 and inclusion[1] > 0.8  # important blocks stay, unimportant ones are replaced
    log_prob.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_stage_a_learns_and_resumes_exactly(tokenizer, tmp_path):
    base = tiny_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    whole = stage_a(base, tokenizer, tmp_path / "whole", steps=8, checkpoint_every=3)
    # The base model is left as it was.
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert all(not isinstance(b, Harmonizer) for b in get_blocks(base, discover_layout(base)))
    art = load_artifact(whole)
    assert art.middle == [2, 3, 4, 5] and art.rank == 4
    assert len(set(art.logits.values())) == 4 and all(v != 0.0 for v in art.logits.values())  # importances moved
    assert all(torch.count_nonzero(h["up.weight"]) > 0 for h in art.harmonizers.values())  # harmonizers trained
    assert art.manifest["base"]["fingerprint"] == model_fingerprint(base)
    assert art.ranking() == sorted(art.logits, key=art.logits.get)

    class Stop(Exception):
        pass

    def stop_at_3(step):
        if step == 3:
            raise Stop

    config = ImportanceConfig(**(SMALL | dict(steps=8, checkpoint_every=3)))
    with pytest.raises(Stop):
        estimate_importance(base, tokenizer, tmp_path / "split", config, texts=TEXTS, callback=stop_at_3, **QUIET)
    assert not (tmp_path / "split").exists() and (tmp_path / "split.checkpoints").is_dir()
    with pytest.raises(ConfigError, match="--resume"):
        estimate_importance(base, tokenizer, tmp_path / "split", config, texts=TEXTS, **QUIET)
    other = ImportanceConfig(**(SMALL | dict(steps=8, checkpoint_every=3, lr=1e-3)))
    with pytest.raises(ConfigError, match="other settings"):
        estimate_importance(base, tokenizer, tmp_path / "split", other, texts=TEXTS, resume=True, **QUIET)
    resumed = estimate_importance(base, tokenizer, tmp_path / "split", config, texts=TEXTS, resume=True, **QUIET)

    a, b = load_artifact(whole), load_artifact(resumed)
    assert a.logits == b.logits
    for block in a.middle:
        for name, t in a.harmonizers[block].items():
            assert torch.equal(t, b.harmonizers[block][name]), (block, name)
    ta, tb = a.manifest["scaleot"]["training"], b.manifest["scaleot"]["training"]
    assert ta["history"] == tb["history"] and ta["steps"] == tb["steps"] == 8


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
@pytest.mark.parametrize("objective", ["match", "local"])
def test_harmonizer_objectives_train_and_resume_exactly(family, objective, tokenizer, tmp_path):
    """Every objective trains the harmonizers, leaves the base model alone, and resumes bit for bit
    (with K = 4 policy samples and the leave-one-out baseline)."""
    base = tiny_model(family)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    params = dict(steps=6, checkpoint_every=3, objective=objective, policy_samples=4)
    whole = stage_a(base, tokenizer, tmp_path / "whole", **params)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    art = load_artifact(whole)
    assert all(torch.count_nonzero(h["up.weight"]) > 0 for h in art.harmonizers.values())
    assert art.manifest["scaleot"]["config"]["objective"] == objective

    class Stop(Exception):
        pass

    def stop(step):
        raise Stop

    config = ImportanceConfig(**(SMALL | params))
    with pytest.raises(Stop):
        estimate_importance(base, tokenizer, tmp_path / "split", config, texts=TEXTS, callback=stop, **QUIET)
    resumed = load_artifact(estimate_importance(base, tokenizer, tmp_path / "split", config, texts=TEXTS, resume=True, **QUIET))
    assert art.logits == resumed.logits
    assert all(torch.equal(t, resumed.harmonizers[b][n]) for b in art.middle for n, t in art.harmonizers[b].items())


def test_local_objective_fits_the_blocks(tokenizer, tmp_path):
    """Block-local regression: after training, the harmonizers map their blocks' inputs closer to the
    blocks' outputs than the identity they start as (normalised MSE on the original network's
    activations over the training text)."""
    from offsite.methods.scaleot import normalised_mse

    base = tiny_model("llama")
    art = load_artifact(stage_a(base, tokenizer, tmp_path / "art", steps=60, objective="local", lr=3e-3))
    inputs, outputs, mask = block_io(base, tokenizer, art.middle, TEXTS, 16)
    trained = new_harmonizers(base, discover_layout(base), art.middle, rank=4)
    fitted, identity = [], []
    for i in art.middle:
        trained[str(i)].load_state_dict(art.harmonizers[i])
        with torch.no_grad():
            fitted.append(float(normalised_mse(trained[str(i)](inputs[i]), outputs[i], mask)))
            identity.append(float(normalised_mse(inputs[i], outputs[i], mask)))
    assert sum(fitted) < 0.97 * sum(identity), (fitted, identity)


def test_match_objective_is_lm_plus_weighted_span_matching(tokenizer):
    from offsite.methods.scaleot import _batch, harmonizer_loss, normalised_mse, span_ends
    from offsite.training import causal_lm_loss

    assert span_ends([2, 3, 5]) == [3, 5] and span_ends([]) == []
    base = tiny_model("llama")
    layout = discover_layout(base)
    blocks = get_blocks(base, layout)
    originals = {i: blocks[i] for i in range(2, 6)}
    harmonizers = new_harmonizers(base, layout, [2, 3, 4, 5], rank=4)
    with torch.no_grad():
        for h in harmonizers.values():
            h.up.weight.normal_(0, 0.5)
    features = [{"input_ids": tokenizer(t)["input_ids"][:12], "labels": tokenizer(t)["input_ids"][:12]} for t in TEXTS[:2]]
    batch = _batch(features, [0, 1], "cpu")

    def use(replaced):
        for i in range(2, 6):
            blocks[i] = harmonizers[str(i)] if i in replaced else originals[i]

    config = ImportanceConfig(**(SMALL | {"objective": "match", "match_weight": 7.0}))
    seen = []
    handle = originals[4].register_forward_pre_hook(lambda m, args: seen.append(args[0]))  # block 4 reads block 3's output
    with torch.no_grad():
        loss = harmonizer_loss(base, blocks, originals, harmonizers, [2, 3, 4, 5], [3], batch, config, use)
        seen.clear()
        use([])
        base(input_ids=batch["input_ids"])
        use([3])
        base(input_ids=batch["input_ids"])
        teacher, mixed = seen
        lm = causal_lm_loss(base, batch)
    handle.remove()
    use([])
    expected = lm + 7.0 * normalised_mse(mixed, teacher, batch["attention_mask"])
    torch.testing.assert_close(loss, expected)


def test_normalised_mse_is_scale_free():
    from offsite.methods.scaleot import normalised_mse

    t, s = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(normalised_mse(100 * s, 100 * t, mask), normalised_mse(s, t, mask))
    assert normalised_mse(t, t, mask) == 0


def test_rank_fraction_sets_the_rank(tokenizer, tmp_path):
    art = load_artifact(stage_a(tiny_model("llama"), tokenizer, tmp_path / "a", rank_fraction=0.25, steps=2))
    assert art.rank == 8  # a quarter of d = 32


def test_direct_measurement_and_its_correlation(artifacts):
    from offsite.methods.scaleot import spearman

    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0) and spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)
    base, art_path = artifacts("llama")
    art = load_artifact(art_path)
    direct = art.manifest["scaleot"]["direct"]
    assert set(direct["loss_increase"]) == {"2", "3", "4", "5"} and -1 <= direct["spearman_with_learned"] <= 1
    assert art.ranking("direct") == sorted(art.direct, key=lambda b: (art.direct[b], b)) == direct["ranking"]
    emu = build_emulator(base, "scaleot", scaleot(art_path, alpha=0.5, ranking="direct"))
    assert emu.params["result"]["replaced_blocks"] == sorted(art.ranking("direct")[:2])


def test_ranking_direct_needs_the_measurement(tokenizer, tmp_path):
    base = tiny_model("llama")
    path = stage_a(base, tokenizer, tmp_path / "a", direct_sequences=0, steps=2)
    assert "direct" not in load_artifact(path).manifest["scaleot"]
    with pytest.raises(ConfigError, match="no direct swap measurement"):
        build_emulator(base, "scaleot", scaleot(path, alpha=0.5, ranking="direct"))


def test_adapter_neighbours_are_protected_by_default(artifacts):
    base, art = artifacts("llama")
    emu = build_emulator(base, "scaleot", make_config("scaleot", artifact=str(art), alpha=0.5))
    assert emu.params["result"]["replaced_blocks"] == [3, 4]  # never 2 or 5, next to the adapter
    with pytest.raises(ConfigError, match="adapter's neighbours"):
        build_emulator(base, "scaleot", make_config("scaleot", artifact=str(art), alpha=0.75))


def test_replaced_blocks_override_the_ranking(artifacts):
    base, art = artifacts("llama")
    emu = build_emulator(base, "scaleot", scaleot(art, replaced_blocks=[2, 5]))
    assert emu.params["result"]["replaced_blocks"] == [2, 5]
    with pytest.raises(ConfigError, match="not replaceable"):
        build_emulator(base, "scaleot", scaleot(art, replaced_blocks=[0, 3]))
    with pytest.raises(ConfigError, match="distinct ascending"):
        scaleot(art, replaced_blocks=[4, 3])


# ---------------------------------------------------------------- stage (b): the emulator
def test_alpha_0_beta_1_is_the_base_model(artifacts):
    base, art = artifacts("llama")
    emu = build_emulator(base, "scaleot", scaleot(art, alpha=0.0, beta=1.0))
    assert emu.structure == {} and emu.block_map == list(range(8)) and emu.trainable == [0, 1, 6, 7]
    for (k, a), b in zip(emu.model.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), k
    ids = torch.randint(3, VOCAB, (2, 10))
    torch.testing.assert_close(logits(emu.model, ids), logits(base, ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(artifact=None), "needs an artifact"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=math.nan), "alpha"),
        (dict(alpha=True), "alpha"),
        (dict(beta=0.0), "fraction of attention rank kept"),
        (dict(beta=1.2), "beta"),
        (dict(beta=math.nan), "beta"),
    ],
)
def test_invalid_emulator_settings(params, message):
    with pytest.raises(ConfigError, match=message):
        make_config("scaleot", **({"artifact": "x"} | params))


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(group_size=1), "group_size"),
        (dict(rank=0), "rank"),
        (dict(activation="tanh"), "activation"),
        (dict(heldout_fraction=1.0), "heldout_fraction"),
        (dict(baseline_decay=1.0), "baseline_decay"),
        (dict(policy_lr=0.0), "policy_lr"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(objective="kd"), "objective must be one of"),
        (dict(rank_fraction=1.5), "rank_fraction"),
        (dict(match_weight=-1.0), "match_weight"),
        (dict(policy_samples=0), "policy_samples"),
    ],
)
def test_invalid_importance_settings(params, message):
    with pytest.raises(ConfigError, match=message):
        ImportanceConfig(**params)


def test_importance_needs_enough_text_and_middle(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="only 1 block"):
        estimate_importance(tiny_model("llama"), tokenizer, tmp_path / "a", ImportanceConfig(**(SMALL | {"block_size": 40})), texts=TEXTS[:1], **QUIET)
    with pytest.raises(ConfigError, match="at least 2 middle blocks"):
        stage_a(tiny_model("llama"), tokenizer, tmp_path / "b", num_bottom=3, num_top=4)
    with pytest.raises(ConfigError, match="data must be"):
        estimate_importance(tiny_model("llama"), tokenizer, tmp_path / "c", ImportanceConfig(**(SMALL | {"data": "nope.txt"})), **QUIET)


def test_rank_rule():
    assert kept_rank(0.3, 10) == 3  # not 4 from 0.3 * 10 = 3.0000000000000004
    assert kept_rank(0.25, 32) == 8 and kept_rank(0.26, 32) == 9 and kept_rank(1e-6, 32) == 1 and kept_rank(1.0, 32) == 32


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("alpha, beta", [(0.0, 0.25), (0.5, 0.3), (0.5, 0.6), (0.25, 1.0), (1.0, 0.5)])
def test_selective_rank_compression(family, alpha, beta, artifacts):
    """rank = ceil(beta * min(in, out)) in every attention linear of the kept middle blocks; stored
    low-rank when that is smaller, else as the dense rank-r matrix; FFN and adapter untouched; the
    count from shapes matches the built emulator and shrinks."""
    base, art = artifacts(family)
    config = scaleot(art, alpha=alpha, beta=beta)
    emu = build_emulator(base, "scaleot", config)
    layout = discover_layout(base)
    replaced = emu.params["result"]["replaced_blocks"]
    assert len(replaced) == math.floor(alpha * 4 + 0.5)
    assert replaced == sorted(load_artifact(art).ranking()[: len(replaced)])
    base_blocks, emu_blocks = get_blocks(base, layout), get_blocks(emu.model, layout)
    for i in [2, 3, 4, 5]:
        if i in replaced:
            assert isinstance(emu_blocks[i], Harmonizer) and emu.structure[f"{layout.blocks}.{i}"] == {"harmonizer": {"rank": 4, "activation": "relu"}}
            continue
        attn = attention_linear_names(base, layout, i)
        for name, p in base_blocks[i].named_parameters():  # everything outside the attention projections is verbatim
            if not any(f"{layout.blocks}.{i}.{name}".startswith(a + ".") for a in attn):
                assert torch.equal(p, emu_blocks[i].get_parameter(name)), name
        for path in attn:
            original = dense_weight(base.get_submodule(path)).detach()
            in_f, out_f = linear_shape(base.get_submodule(path))
            rank = math.ceil(beta * min(in_f, out_f) - 1e-9)
            module = emu.model.get_submodule(path)
            if beta == 1.0:
                assert torch.equal(dense_weight(module), original)
                continue
            if rank * (in_f + out_f) < in_f * out_f:
                assert emu.structure[path] == {"low_rank": rank} and isinstance(module, LowRankLinear)
                approx = (module.up.weight @ module.down.weight).detach()
            else:
                assert path not in emu.structure and not isinstance(module, LowRankLinear)
                approx = dense_weight(module).detach()
            values = torch.linalg.svdvals(approx)
            top = torch.linalg.svdvals(original)[:rank]
            torch.testing.assert_close(values[:rank], top, rtol=1e-4, atol=1e-5)
            assert torch.all(values[rank:] < 1e-4 * values[0])  # exactly rank r
    for i in [0, 1, 6, 7]:
        assert all(torch.equal(a, b) for a, b in zip(emu_blocks[i].parameters(), base_blocks[i].parameters()))
    actual = sum(p.numel() for i in [2, 3, 4, 5] for p in emu_blocks[i].parameters())
    assert middle_parameters(base, layout, config) == actual == emu.params["result"]["middle_parameters"]
    original = sum(p.numel() for i in [2, 3, 4, 5] for p in base_blocks[i].parameters())
    if alpha > 0 or beta < 0.5:
        assert actual < original


def test_closest_layerdrop(artifacts):
    base, art = artifacts("llama")
    layout = discover_layout(base)
    block = sum(p.numel() for p in get_blocks(base, layout)[2].parameters())
    target = middle_parameters(base, layout, scaleot(art, alpha=0.5, beta=1.0))  # 2 blocks + 2 harmonizers
    assert closest_layerdrop(base, layout, target) == (2, 2 * block)
    assert closest_layerdrop(base, layout, 3.4 * block) == (3, 3 * block)
    assert closest_layerdrop(base, layout, 10 * block) == (4, 4 * block)


def test_artifact_must_match_the_base_model(artifacts, base_dir, tmp_path, capsys):
    base, art = artifacts("llama")
    with pytest.raises(ConfigError, match="made from another base model"):
        build_emulator(tiny_model("llama", seed=1), "scaleot", scaleot(art))
    from offsite.cli import main

    code = main(["compress", "--model", str(base_dir), "--out", str(tmp_path / "e"), "--method", "scaleot",
                 "--artifact", str(art), "--alpha", "0.5"])  # base_dir is a tiny llama of seed 0, a saved copy: same weights
    assert code == 0
    save_tiny_checkpoint("llama", tmp_path / "other", seed=2)
    code = main(["compress", "--model", str(tmp_path / "other"), "--out", str(tmp_path / "e2"), "--method", "scaleot",
                 "--artifact", str(art)])
    err = capsys.readouterr().err
    error = err[err.index("offsite: error: "):]  # after the weight-loading progress bar
    assert code == 1 and error.count("\n") == 1 and "made from another base model" in error and not (tmp_path / "e2").exists()


def test_artifact_is_verified(artifacts, tmp_path):
    import shutil

    base, art = artifacts("llama")
    with pytest.raises(ConfigError, match="has harmonizers for blocks 2-5 only, not for middle blocks \\[1\\]"):
        build_emulator(base, "scaleot", scaleot(art, num_bottom=1))
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    edit_manifest(copy, lambda m: m["scaleot"]["importance"][0].__setitem__("logit", "high"))
    with pytest.raises(BundleError, match="malformed"):
        load_artifact(copy)
    shutil.rmtree(copy)
    shutil.copytree(art, copy)
    data = bytearray((copy / "harmonizers.safetensors").read_bytes())
    data[-3] ^= 0x40
    (copy / "harmonizers.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):
        load_artifact(copy)
    with pytest.raises(BundleError, match="expected an scaleot-artifact bundle"):
        load_artifact(compress_checkpoint_like(base, tmp_path))


def compress_checkpoint_like(base, tmp_path):
    from tiny import tiny_tokenizer

    emu = build_emulator(base, "layerdrop", make_config("layerdrop", num_kept=2))
    return save_emulator(emu, tiny_tokenizer(), tmp_path / "ld", model_fingerprint(base))


def test_harmonizers_never_replace_cache_anchors(artifacts):
    """Block 0 and the first block of each attention type hold the KV cache transformers reads for
    all blocks; they stay, and generation with a cache matches the uncached computation."""
    base, art = artifacts("qwen2")  # layer_types: blocks 0-3 full attention, 4-7 sliding
    assert cache_anchor_blocks(base.config, 8) == {0, 4}
    with pytest.raises(ConfigError, match="KV-cache anchors"):
        build_emulator(base, "scaleot", scaleot(art, alpha=1.0))
    emu = build_emulator(base, "scaleot", scaleot(art, alpha=0.75))
    assert 4 not in emu.params["result"]["replaced_blocks"] and len(emu.params["result"]["replaced_blocks"]) == 3
    ids = torch.randint(3, VOCAB, (1, 9))
    with torch.no_grad():
        full = emu.model(ids, use_cache=False).logits
        first = emu.model(ids[:, :6], use_cache=True)
        step = emu.model(ids[:, 6:9], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits, full[:, 6:9], rtol=1e-5, atol=1e-5)


def test_block_output_form_is_checked(artifacts, monkeypatch):
    import offsite.methods.scaleot as S

    base, art = artifacts("llama")
    monkeypatch.setattr(S, "TUPLE_OUTPUT_BLOCKS", frozenset({"llama"}))
    with pytest.raises(UnsupportedModelError, match="llama: its blocks return a Tensor"):
        build_emulator(base, "scaleot", scaleot(art, alpha=0.5))


# ---------------------------------------------------------------- the bundle: declared harmonizers
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bundle_round_trip_gives_the_same_logits(family, artifacts, tokenizer, tmp_path):
    base, art = artifacts(family)
    emu = build_emulator(base, "scaleot", scaleot(art, alpha=0.5, beta=0.3))
    assert any("harmonizer" in c for c in emu.structure.values()) and any("low_rank" in c for c in emu.structure.values())
    path = save_emulator(emu, tokenizer, tmp_path / "emu", model_fingerprint(base), family)
    loaded = load_emulator(path)
    assert type(loaded.model) is type(base)
    layout = discover_layout(base)
    for i in emu.params["result"]["replaced_blocks"]:
        assert isinstance(get_blocks(loaded.model, layout)[i], Harmonizer)
    ids = torch.randint(3, VOCAB, (2, 12))
    torch.testing.assert_close(logits(loaded.model, ids), logits(emu.model, ids), rtol=0, atol=0)
    # The replaced blocks' original weights are not in the bundle.
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    for i in emu.params["result"]["replaced_blocks"]:
        assert sorted(k.split(f"{layout.blocks}.{i}.")[1] for k in keys if k.startswith(f"{layout.blocks}.{i}.")) == \
            ["down.bias", "down.weight", "up.bias", "up.weight"]


@pytest.fixture
def scaleot_bundle(artifacts, tokenizer, tmp_path):
    base, art = artifacts("llama")
    emu = build_emulator(base, "scaleot", scaleot(art, alpha=0.5, beta=0.3))
    save_emulator(emu, tokenizer, tmp_path / "emu", model_fingerprint(base), "llama")
    return emu, tmp_path / "emu"


def _one_replaced(structure):
    return next(p for p, c in structure.items() if "harmonizer" in c)


def _one_kept(structure):
    return next(p for p, c in structure.items() if "low_rank" in c).rsplit(".self_attn.", 1)[0]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s | {"model.layers.0": {"harmonizer": {"rank": 4}}}, "outside the blocks"),
        (lambda s: s | {_one_replaced(s): {"harmonizer": {"rank": 0}}}, "integer in"),
        (lambda s: s | {_one_replaced(s): {"harmonizer": {"rank": 33}}}, "integer in"),
        (lambda s: s | {_one_replaced(s): {"harmonizer": {"rank": True}}}, "integer in"),
        (lambda s: s | {_one_replaced(s): {"harmonizer": {"rank": 4, "activation": "tanh"}}}, "must be one of"),
        (lambda s: s | {_one_replaced(s): {"harmonizer": {"rank": 4, "activation": ["relu"]}}}, "must be one of"),
        (lambda s: s | {_one_replaced(s): {"harmonizer": {"rank": 4, "bias": False}}}, "expected"),
        (lambda s: s | {_one_replaced(s): {"harmonizer": 4}}, "expected"),
        (lambda s: s | {_one_replaced(s): {"harmonizer": {"rank": 4}, "low_rank": 2}}, "stands alone"),
        (lambda s: s | {_one_kept(s) + ".mlp": {"harmonizer": {"rank": 4}}}, "not a transformer block"),
        (lambda s: s | {_one_kept(s) + ".mlp.up_proj": {"harmonizer": {"rank": 4}}}, "not a transformer block"),
        (lambda s: s | {_one_replaced(s) + ".self_attn.q_proj": {"low_rank": 2}}, "lies inside block"),
        (lambda s: s | {_one_kept(s): {"low_rank": 2}}, "not a linear layer"),
        # Well-formed, but not what the weights hold: transformers' strict load refuses it.
        (lambda s: s | {_one_replaced(s): {"harmonizer": {"rank": 5}}}, "cannot be loaded"),
        (lambda s: {k: v for k, v in s.items() if "harmonizer" not in v}, "does not match its config"),
    ],
)
def test_declared_harmonizers_are_validated_strictly(scaleot_bundle, edit, message):
    emu, path = scaleot_bundle
    edit_manifest(path, lambda m: m.__setitem__("structure", edit(emu.structure)))
    with pytest.raises(BundleError, match=message):
        load_emulator(path)


def test_nothing_may_be_declared_inside_a_harmonizer():
    from offsite.structure import apply_structure

    model = tiny_model("llama")
    before = [type(m) for m in model.modules()]
    with pytest.raises(BundleError, match="lies inside block 'model.layers.3'"):
        apply_structure(model, {"model.layers.3": {"harmonizer": {"rank": 4}}, "model.layers.3.self_attn.q_proj": {"low_rank": 2}})
    assert [type(m) for m in model.modules()] == before


# ---------------------------------------------------------------- two parties, end to end
@pytest.mark.parametrize("family, lora", [("llama", False), ("gpt2", True), ("opt", False)])
def test_round_trip_on_a_scaleot_emulator(family, lora, tokenizer, tmp_path, examples):
    save_tiny_checkpoint(family, tmp_path / "base")
    art = stage_a(tiny_model(family), tokenizer, tmp_path / "artifact")
    emu_dir = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "scaleot", scaleot(art, alpha=0.5, beta=0.3))
    emulator = load_emulator(emu_dir)
    assert any("harmonizer" in c for c in emulator.manifest["structure"].values())
    config = FinetuneConfig(lora=lora, lora_r=4, batch_size=4, lr=1e-2 if lora else 1e-3, max_steps=3)
    adapter_dir = finetune(emu_dir, examples, tmp_path / "run", config, progress=False)

    base = tiny_model(family)
    layout = discover_layout(base)
    bundle = load_adapter(adapter_dir)
    assert {layout.parse_block_key(k.removeprefix("base_model.model."))[0] for k in bundle.tensors} == {0, 1, 6, 7}
    before = {k: v.clone() for k, v in base.state_dict().items()}
    plugged = plug_in(base, adapter_dir, emulator=emu_dir)
    changed = [k for k, v in plugged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(layout.parse_block_key(k)[0] in (0, 1, 6, 7) for k in changed)
    tuned = plug_into_emulator(load_emulator(emu_dir), adapter_dir)
    ids = torch.randint(3, VOCAB, (1, 8))
    assert not torch.equal(logits(tuned, ids), logits(load_emulator(emu_dir).model, ids))
    assert torch.isfinite(logits(plugged, ids)).all()


def test_distilling_a_scaleot_emulator_keeps_its_harmonizers(base_dir, tokenizer, tmp_path):
    from offsite.distill import DistillConfig, distill

    art = stage_a(tiny_model("llama"), tokenizer, tmp_path / "artifact")
    emu_dir = compress_checkpoint(base_dir, tmp_path / "emu", "scaleot", scaleot(art, alpha=0.5, beta=0.3))
    config = DistillConfig(lr=3e-3, block_size=16, batch_size=4, tokens=16 * 4 * 2, eval_every=1)
    out = distill(base_dir, emu_dir, tmp_path / "distilled", TEXTS, " ".join(TEXTS[:10]), config, progress=False, log=lambda *_: None)
    structure = json.loads((emu_dir / "manifest.json").read_text())["structure"]
    assert json.loads((out / "manifest.json").read_text())["structure"] == structure
    assert isinstance(load_emulator(out).model.get_submodule(_one_replaced(structure)), Harmonizer)


def test_both_stages_from_the_cli(base_dir, tmp_path, capsys):
    from offsite.cli import main

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    code = main(["scaleot-importance", "--model", str(base_dir), "--out", str(tmp_path / "art"), "--data", str(data),
                 "--rank", "4", "--steps", "4", "--batch-size", "4", "--block-size", "16", "--device", "cpu", "--group-size", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "kind        scaleot-artifact" in out and "importance  keep probability, least important first" in out
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["scaleot"]["config"]["group_size"] == 2 and manifest["scaleot"]["groups"] == [[2, 3], [4, 5]]
    code = main(["compress", "--model", str(base_dir), "--out", str(tmp_path / "emu"), "--method", "scaleot",
                 "--artifact", str(tmp_path / "art"), "--alpha", "0.5", "--beta", "0.25"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[scaleot] alpha 0.5: 2 of 4 middle blocks replaced" in out and "emulator -> original [0, 1, 2, 3, 4, 5, 6, 7]" in out
    params = json.loads((tmp_path / "emu" / "manifest.json").read_text())["method"]["params"]
    assert params["alpha"] == 0.5 and params["beta"] == 0.25 and params["result"]["num_replaced"] == 2
    code = main(["compress", "--model", str(base_dir), "--out", str(tmp_path / "emu2"), "--method", "scaleot",
                 "--artifact", str(tmp_path / "art"), "--beta", "0"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "beta" in err


# Arbitrary JSON where a structure entry or a harmonizer spec goes.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["rank", "activation", "harmonizer", "low_rank", "x"]) | st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=int(os.environ.get("OFFSITE_FUZZ_EXAMPLES", "60")) // 2 or 1, deadline=None,
          derandomize=bool(os.environ.get("CI")), suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(where=st.sampled_from(["entry", "spec", "new"]), value=JSON, index=st.integers(0, 20))
def test_fuzzed_harmonizer_declarations_fail_cleanly(scaleot_bundle, where, value, index):
    """Whatever a hostile manifest declares, loading ends in success or one OffsiteError."""
    from conftest import FUZZ_CASES

    emu, path = scaleot_bundle
    structure = json.loads(json.dumps(emu.structure))
    target = _one_replaced(structure)
    if where == "entry":
        structure[target] = value
    elif where == "spec":
        structure[target] = {"harmonizer": value}
    else:
        structure[f"model.layers.{index}"] = value
    edit_manifest(path, lambda m: m.__setitem__("structure", structure))
    try:
        load_emulator(path)
        FUZZ_CASES["scaleot structure: loaded"] += 1
    except OffsiteError:
        FUZZ_CASES["scaleot structure: rejected"] += 1
