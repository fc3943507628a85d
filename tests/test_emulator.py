"""Emulator construction (uniform LayerDrop) and emulator bundles, on every family."""

import json

import pytest
import torch
from safetensors import safe_open

from offsite.bundle import model_fingerprint
from offsite.emulator import compress_checkpoint, load_emulator, save_emulator
from offsite.errors import BundleError, ConfigError
from offsite.methods import build_emulator, make_config
from offsite.methods.layerdrop import uniform_indices
from offsite.surgery import discover_layout, get_blocks
from tiny import FAMILIES, VOCAB, tiny_model


def test_uniform_stride_matches_the_paper():
    # OPT-1.3B (24 blocks), 2-8-2 keeps middle blocks 2,5,7,10,13,16,18,21.
    assert [2 + i for i in uniform_indices(20, 8)] == [2, 5, 7, 10, 13, 16, 18, 21]
    assert uniform_indices(4, 4) == [0, 1, 2, 3]
    assert uniform_indices(5, 2) == [0, 4]


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(num_kept=1), "at least 2"),
        (dict(num_kept=0), "at least 2"),
        (dict(num_kept=5), "more than the 4 middle"),
        (dict(num_bottom=4, num_top=4, num_kept=2), "leaves no middle"),
        (dict(num_bottom=5, num_top=3, num_kept=2), "leaves no middle"),
        (dict(num_bottom=0, num_top=0, num_kept=2), "at least one block"),
        (dict(), "exactly one of"),
        (dict(num_kept=2, kept_blocks=[2, 5]), "exactly one of"),
        (dict(kept_blocks=[1, 5]), "middle-block indices"),
        (dict(kept_blocks=[5, 3]), "ascending"),
    ],
)
def test_invalid_shapes_are_clear_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        build_emulator(tiny_model("llama"), "layerdrop", make_config("layerdrop", **params))


def test_unknown_method_and_parameter():
    with pytest.raises(ConfigError, match="unknown emulator method"):
        make_config("nope")
    with pytest.raises(ConfigError, match="no parameter"):
        make_config("layerdrop", num_kept=2, rank=3)


def test_explicit_block_list():
    emu = build_emulator(tiny_model("llama"), "layerdrop", make_config("layerdrop", kept_blocks=[3, 4]))
    assert emu.block_map == [0, 1, 3, 4, 6, 7]
    assert emu.trainable == [0, 1, 4, 5]


def skip_blocks_reference(model, dropped, ids):
    """The base model with the dropped blocks turned into identities by forward hooks:
    kept blocks keep their original index, layer type and weights."""
    layout = discover_layout(model)

    def identity(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x

    hooks = [get_blocks(model, layout)[i].register_forward_hook(identity, with_kwargs=True) for i in dropped]
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_emulator_is_the_model_without_dropped_blocks(family, tokenizer, tmp_path):
    model = tiny_model(family)
    emu = build_emulator(model, "layerdrop", make_config("layerdrop", num_kept=2))
    assert emu.block_map == [0, 1, 2, 5, 6, 7]
    ids = torch.randint(3, VOCAB, (2, 12))  # longer than the sliding window (4) of qwen2/mistral/gemma3
    reference = skip_blocks_reference(model, [3, 4], ids)
    with torch.no_grad():
        direct = emu.model(ids, use_cache=False).logits
    torch.testing.assert_close(direct, reference, rtol=0, atol=0)

    save_emulator(emu, tokenizer, tmp_path / "emu", model_fingerprint(model), family)
    loaded = load_emulator(tmp_path / "emu")
    assert loaded.model.config.num_hidden_layers == 6
    for key in ("layer_types",):
        if hasattr(model.config, key) and getattr(model.config, key) is not None:
            assert getattr(loaded.model.config, key) == [getattr(model.config, key)[i] for i in emu.block_map]
    idx = [m.layer_idx for n, m in loaded.model.named_modules() if hasattr(m, "layer_idx") and n.count(".") <= 4]
    assert sorted(set(idx)) == list(range(6))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids, use_cache=False).logits, reference, rtol=0, atol=0)
    # Generation with the KV cache runs and matches a cache-free greedy decode.
    out = loaded.model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    seq = ids[:1, :6]
    for _ in range(4):
        with torch.no_grad():
            nxt = loaded.model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_bundle_holds_no_dropped_block_weights(family, tokenizer, tmp_path):
    model = tiny_model(family)
    with torch.no_grad():  # no two tensors alike (fresh norms are all ones/zeros)
        for p in model.parameters():
            p.normal_()
    layout = discover_layout(model)
    emu = build_emulator(model, "layerdrop", make_config("layerdrop", kept_blocks=[2, 5]))
    save_emulator(emu, tokenizer, tmp_path / "emu", model_fingerprint(model))
    dropped = {
        bytes(p.detach().numpy().tobytes())
        for i in (3, 4)
        for p in get_blocks(model, layout)[i].parameters()
        if p.numel() > 1
    }
    kept_keys = set()
    with safe_open(tmp_path / "emu" / "model.safetensors", "pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            assert tensor.numpy().tobytes() not in dropped, f"{key} is a dropped block's weight"
            parsed = layout.parse_block_key(key)
            if parsed:
                kept_keys.add(parsed[0])
    assert kept_keys == set(range(6))
    manifest = json.loads((tmp_path / "emu" / "manifest.json").read_text())
    assert manifest["blocks"]["map"] == [0, 1, 2, 5, 6, 7]
    assert manifest["base"]["fingerprint"] == model_fingerprint(model)
    assert manifest["method"] == {"name": "layerdrop", "params": {"num_bottom": 2, "num_top": 2, "num_kept": None, "kept_blocks": [2, 5]}}


def test_fingerprint_sees_every_weight():
    a, b = tiny_model("llama"), tiny_model("llama")
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[4].mlp.down_proj.weight[0, 0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(tiny_model("llama").to(torch.bfloat16))


def test_loading_a_non_emulator_is_refused(tmp_path, base_dir):
    with pytest.raises(BundleError, match="no manifest.json"):
        load_emulator(base_dir)
    with pytest.raises(BundleError, match="no such directory"):
        load_emulator(tmp_path / "missing")


def _edit_config(bundle_dir, change):
    import json as _json

    from conftest import rehash

    path = bundle_dir / "config.json"
    config = _json.loads(path.read_text())
    change(config)
    path.write_text(_json.dumps(config))
    rehash(bundle_dir)


@pytest.mark.parametrize("family, change", [
    ("gpt2", {"n_positions": 10**9}),  # position embeddings of 1e9 x d
    ("llama", {"vocab_size": 10**8}),  # an embedding far beyond the shipped weights
    ("llama", {"intermediate_size": 10**7}),
])
def test_a_config_size_bomb_is_refused_before_anything_is_allocated(family, change, tmp_path):
    """Regression (#23.6): a bundle under 1 MB could ask the loader for hundreds of GB through config numbers."""
    from tiny import save_tiny_checkpoint

    from offsite.errors import BundleError

    save_tiny_checkpoint(family, tmp_path / "base")
    emu = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    _edit_config(emu, lambda c: c.update(change))
    with pytest.raises(BundleError, match="far more than its"):
        load_emulator(emu)


def test_an_unsupported_model_type_is_refused(tmp_path):
    from tiny import save_tiny_checkpoint

    from offsite.errors import BundleError

    save_tiny_checkpoint("gpt2", tmp_path / "base")
    emu = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    _edit_config(emu, lambda c: c.update(model_type="gptj"))
    with pytest.raises(BundleError, match="model_type 'gptj', not one of the supported"):
        load_emulator(emu)


def test_a_mismatched_checkpoint_is_one_line_without_the_load_report(tmp_path, capsys, monkeypatch):
    """Regression (#23): transformers printed its multi-line load report before offsite's one-line error."""
    from safetensors.torch import load_file, save_file
    from tiny import save_tiny_checkpoint

    from conftest import rehash
    from offsite.cli import main

    save_tiny_checkpoint("llama", tmp_path / "base")
    emu = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    tensors = load_file(emu / "model.safetensors")
    tensors.pop(next(k for k in tensors if "layers.3." in k))
    save_file(tensors, emu / "model.safetensors", metadata={"format": "pt"})
    rehash(emu)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    capsys.readouterr()
    code = main(["evaluate", "--bundle", str(emu), "--tasks", "arc_easy", "--limit", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "does not match its config" in err and err.count("\n") == 1, err


def test_compress_keeps_the_checkpoint_dtype_and_checks_cheap_things_first(tmp_path, monkeypatch):
    """#18: a bf16 checkpoint gives a bf16 bundle by default; a missing tokenizer is reported before any weight is read."""
    from tiny import save_tiny_checkpoint

    import offsite.emulator as E
    from offsite.errors import BundleError

    save_tiny_checkpoint("llama", tmp_path / "base")
    base, tok = E.load_checkpoint(tmp_path / "base")
    base.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    emu = compress_checkpoint(tmp_path / "bf16", tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    assert load_emulator(emu).manifest["base"]["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bf16" / name).unlink(missing_ok=True)
    loaded = []
    monkeypatch.setattr(E, "load_checkpoint", lambda *a, **k: loaded.append(1))
    with pytest.raises(BundleError, match="tokenizer cannot be loaded"):
        compress_checkpoint(tmp_path / "bf16", tmp_path / "emu2", "layerdrop", make_config("layerdrop", num_kept=2))
    assert loaded == []
