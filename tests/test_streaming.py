"""#18: LayerDrop compress and merged plug-in stream tensors from safetensors, never building the model,
and give exactly what the in-memory paths give, tensor for tensor, on every family and dtype."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import FAMILIES, tiny_model, tiny_tokenizer

import offsite.emulator as E
import offsite.plugin as P
from offsite.bundle import model_fingerprint, read_manifest
from offsite.data import Example
from offsite.emulator import compress_checkpoint, load_checkpoint, load_emulator
from offsite.errors import BundleError, PluginError
from offsite.methods import make_config
from offsite.plugin import plugin_checkpoint
from offsite.streaming import INDEX_FILE, ShardedWriter, StoredCheckpoint
from offsite.training import FinetuneConfig, finetune

DTYPES = [torch.float32, torch.bfloat16]
EXAMPLES = [Example("The quick brown", " fox jumps over the lazy dog."), Example("Question: capital of France?", " Paris")] * 2


def save_base(path, family="llama", dtype=torch.float32, seed=0):
    model = tiny_model(family, seed).to(dtype)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


def assert_same_weights(a, b, dtype):
    sa, sb = load_checkpoint(a, dtype)[0].state_dict(), load_checkpoint(b, dtype)[0].state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def no_model_loads(monkeypatch):
    """Make any load of the whole model an error: the streamed paths must not need one."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(E, "load_checkpoint", refuse)
    monkeypatch.setattr(P, "load_checkpoint", refuse)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_layerdrop_equals_the_in_memory_emulator(family, dtype, tmp_path, monkeypatch):
    base = save_base(tmp_path / "base", family, dtype)
    config = make_config("layerdrop", num_kept=3)
    reference = compress_checkpoint(tmp_path / "base", tmp_path / "mem", "layerdrop", config, stream=False)
    with monkeypatch.context() as m:
        no_model_loads(m)
        streamed = compress_checkpoint(tmp_path / "base", tmp_path / "str", "layerdrop", config, max_shard_bytes=16_000)
    a, b = load_emulator(reference), load_emulator(streamed)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype == dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert b.manifest["base"]["fingerprint"] == a.manifest["base"]["fingerprint"] == model_fingerprint(base)
    for section in ("blocks", "method"):
        assert b.manifest[section] == a.manifest[section]
    assert b.manifest["base"] == a.manifest["base"]
    # several shards and the index transformers writes, each shard naming only its own tensors
    index = json.loads((streamed / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_all(streamed).values())
    for shard in shards:
        assert set(load_file(streamed / shard)) == {k for k, v in index["weight_map"].items() if v == shard}


def load_all(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_plugin_equals_the_in_memory_plugin(family, lora, tmp_path, monkeypatch):
    dtype = torch.bfloat16 if family in ("llama", "gpt2", "opt") else torch.float32  # both dtypes, families spread
    save_base(tmp_path / "base", family, dtype)
    emulator = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    adapter = finetune(emulator, EXAMPLES, tmp_path / "run", FinetuneConfig(lora=lora, epochs=1, batch_size=2, lr=1e-2, max_length=16),
                       progress=False)
    reference = plugin_checkpoint(tmp_path / "base", adapter, tmp_path / "mem", stream=False)
    with monkeypatch.context() as m:
        no_model_loads(m)
        streamed = plugin_checkpoint(tmp_path / "base", adapter, tmp_path / "str", max_shard_bytes=30_000)
    assert_same_weights(reference, streamed, dtype)
    base = load_checkpoint(tmp_path / "base", dtype)[0].state_dict()
    plugged = load_checkpoint(streamed, dtype)[0].state_dict()
    assert any(not torch.equal(base[k], plugged[k]) for k in base)  # the adapter did change something
    assert read_manifest(streamed, kind="plugged")["adapter"] == read_manifest(reference, kind="plugged")["adapter"]


def test_streamed_plugin_into_the_wrong_base_publishes_nothing(tmp_path):
    save_base(tmp_path / "base")
    save_base(tmp_path / "other", seed=1)
    emulator = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    adapter = finetune(emulator, EXAMPLES, tmp_path / "run", FinetuneConfig(epochs=1, batch_size=2, max_length=16), progress=False)
    with pytest.raises(PluginError, match="trained for base model"):
        plugin_checkpoint(tmp_path / "other", adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temp directory left behind


def test_streamed_plugin_checks_norms_before_writing(tmp_path, monkeypatch):
    save_base(tmp_path / "base")
    emulator = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    adapter = finetune(emulator, EXAMPLES, tmp_path / "run", FinetuneConfig(epochs=1, batch_size=2, max_length=16), progress=False)
    writes = []
    monkeypatch.setattr(P.ShardedWriter, "write", lambda self, *a: writes.append(a))
    with pytest.raises(PluginError, match="over the bound"):
        plugin_checkpoint(tmp_path / "base", adapter, tmp_path / "out", max_norm_ratio=1e-6)
    assert writes == [] and not (tmp_path / "out").exists()


def test_a_checkpoint_missing_a_tensor_or_with_a_wrong_shape_is_one_clear_error(tmp_path):
    save_base(tmp_path / "base")
    file = tmp_path / "base" / "model.safetensors"
    tensors = load_file(file)
    key = "model.layers.3.mlp.up_proj.weight"
    value = tensors.pop(key)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(BundleError, match=r"no tensor for \['model.layers.3.mlp.up_proj.weight'\]"):
        StoredCheckpoint(tmp_path / "base", torch.float32)
    tensors[key] = value[:, :-1].contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(BundleError, match="has shape .* its config implies"):
        compress_checkpoint(tmp_path / "base", tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    assert not (tmp_path / "emu").exists()


def test_a_hub_style_checkpoint_without_the_base_prefix_streams(tmp_path):
    """GPT-2 on the hub stores `h.0.attn...`, not `transformer.h.0.attn...`; transformers maps it, and so do we."""
    model = save_base(tmp_path / "base", "gpt2")
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    (tmp_path / "base" / "model.safetensors").unlink()
    save_file(state, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    config = make_config("layerdrop", num_kept=2)
    a = compress_checkpoint(tmp_path / "base", tmp_path / "mem", "layerdrop", config, stream=False)
    b = compress_checkpoint(tmp_path / "base", tmp_path / "str", "layerdrop", config, stream=True)
    sa, sb = load_emulator(a).model.state_dict(), load_emulator(b).model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and sa.keys() == sb.keys()
    assert load_emulator(a).fingerprint != "" and read_manifest(b, kind="emulator")["base"]["fingerprint"] == model_fingerprint(model)


def test_chunks_are_bounded_and_convert_dtype(tmp_path):
    model = save_base(tmp_path / "base")
    with StoredCheckpoint(tmp_path / "base", torch.bfloat16) as stored:
        name = "model.embed_tokens.weight"
        pieces = list(stored.chunks(name, chunk_bytes=1000))
        assert len(pieces) > 1 and all(len(p) <= 1000 for p in pieces)
        assert torch.equal(stored.tensor(name), model.state_dict()[name].to(torch.bfloat16))
        assert stored.source["lm_head.weight"] == name  # tied: stored once, read for both names
        written = [stored.source[n] for n in stored.primary_names()]
        assert written.count(name) == 1 and len(written) == len(set(written))


def test_sharded_writer_refuses_out_of_plan_writes(tmp_path):
    writer = ShardedWriter(tmp_path, [("a", torch.float32, (2,)), ("b", torch.float32, (0,)), ("c", torch.float16, (3,))])
    with pytest.raises(RuntimeError, match="next tensor is a"):
        writer.write("c", b"\0" * 6)
    writer.write("a", b"\0" * 8)
    with pytest.raises(RuntimeError, match="before every planned tensor"):
        writer.close()
    writer.write("c", bytes(range(6)))
    hashed = writer.close()
    assert hashed == {"model.safetensors": hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()}
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded["b"].shape == (0,) and loaded["c"].dtype == torch.float16 and loaded["a"].tolist() == [0.0, 0.0]


def test_read_ahead_gives_the_chunks_in_order_and_stops_cleanly(tmp_path):
    save_base(tmp_path / "base")
    with StoredCheckpoint(tmp_path / "base", torch.float32) as stored:
        names = sorted(stored.source)
        with stored.read_ahead(names, depth=1, chunk_bytes=512) as reader:
            for name in names:
                assert b"".join(reader.chunks(name)) == b"".join(stored.chunks(name))
        with stored.read_ahead(names, depth=1, chunk_bytes=512) as reader:  # abandoned half-way: close() returns
            next(iter(reader.chunks(names[0])))
            with pytest.raises(RuntimeError, match="the next tensor is"):
                next(iter(reader.chunks(names[5])))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_blocks_equals_build_reduced_model(family, tmp_path):
    from offsite.surgery import build_reduced_model, discover_layout

    model = save_base(tmp_path / "base", family, torch.bfloat16)
    kept = [0, 1, 3, 6, 7]
    expected = build_reduced_model(model, discover_layout(model), kept).state_dict()
    with StoredCheckpoint(tmp_path / "base", torch.bfloat16) as stored:
        got = stored.load_blocks(kept).state_dict()
        assert stored.fingerprint() == model_fingerprint(model)
    assert got.keys() == expected.keys() and all(got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]) for k in got)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_gradot_on_the_kept_blocks_only_equals_the_in_memory_emulator(family, dtype, tmp_path, monkeypatch):
    """#18: GradOT's support pass and selection run on the blocks LayerDrop keeps, loaded from the checkpoint
    one tensor at a time; the whole model is never built, and the emulator is the same."""
    save_base(tmp_path / "base", family, dtype)
    config = make_config("gradot", num_kept=3, target_fraction=0.5, support_size=8, support_max_length=32)
    reference = compress_checkpoint(tmp_path / "base", tmp_path / "mem", "gradot", config, stream=False)
    with monkeypatch.context() as m:
        no_model_loads(m)
        streamed = compress_checkpoint(tmp_path / "base", tmp_path / "str", "gradot", config)
    a, b = load_emulator(reference), load_emulator(streamed)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for section in ("base", "blocks", "method", "structure"):
        assert a.manifest[section] == b.manifest[section]


def test_methods_that_need_the_whole_model_refuse_stream_true(tmp_path):
    from offsite.errors import ConfigError

    save_base(tmp_path / "base")
    with pytest.raises(ConfigError, match="needs the whole model"):
        compress_checkpoint(tmp_path / "base", tmp_path / "emu", "crash", make_config("crash", num_clusters=2), stream=True)
    assert not (tmp_path / "emu").exists()


def test_a_streamed_lora_merge_to_infinity_publishes_nothing(tmp_path):
    """With the norm bound off, the streamed plug-in finds a non-finite merge as it computes it and writes no bundle."""
    from conftest import rehash

    save_base(tmp_path / "base", dtype=torch.bfloat16)
    emulator = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    adapter = finetune(emulator, EXAMPLES, tmp_path / "run", FinetuneConfig(lora=True, epochs=1, batch_size=2, max_length=16), progress=False)
    file = adapter / "adapter_model.safetensors"
    tensors = {k: torch.full_like(v, 1e20) for k, v in load_file(file).items()}
    save_file(tensors, file)
    rehash(adapter)
    with pytest.raises(PluginError, match="merges to infinite"):
        plugin_checkpoint(tmp_path / "base", adapter, tmp_path / "out", max_norm_ratio=None)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_lazy_adapter_reads_tensors_from_a_private_verified_copy(tmp_path):
    """#18: the owner's plug-in never holds a multi-GB full-block adapter whole; what it reads is what was hashed,
    even if the bundle's file changes afterwards."""
    from offsite.adapter import FULL_WEIGHTS, load_adapter

    save_base(tmp_path / "base")
    emulator = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    adapter = finetune(emulator, EXAMPLES, tmp_path / "run", FinetuneConfig(epochs=1, batch_size=2, max_length=16), progress=False)
    eager, lazy = load_adapter(adapter), load_adapter(adapter, lazy=True)
    assert set(lazy.tensors) == set(eager.tensors) and len(lazy.tensors) == len(eager.tensors)
    original = {k: v.clone() for k, v in eager.tensors.items()}
    tensors = load_file(adapter / FULL_WEIGHTS)
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, adapter / FULL_WEIGHTS)  # swapped after verification
    assert all(torch.equal(lazy.tensors[k], original[k]) for k in original)
    assert "no such tensor" not in lazy.tensors
    with pytest.raises(BundleError, match="has size|does not match its SHA-256"):
        load_adapter(adapter, lazy=True)


def test_cli_stream_flags(tmp_path, capsys):
    from offsite.cli import main

    save_base(tmp_path / "base", dtype=torch.bfloat16)
    assert main(["compress", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "emu"), "--num-kept", "2",
                 "--max-shard-size", "20KB"]) in (0, None)
    assert json.loads((tmp_path / "emu" / INDEX_FILE).read_text())["weight_map"]
    assert main(["compress", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "emu2"), "--num-kept", "2", "--no-stream"]) in (0, None)
    assert (tmp_path / "emu2" / "model.safetensors").exists()
    assert main(["compress", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "emu3"), "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size must be a size" in capsys.readouterr().err and not (tmp_path / "emu3").exists()


def test_a_same_size_tampered_adapter_is_still_refused_when_read_lazily(tmp_path):
    """The lazy path skips the manifest-time hash of the weights (the private copy hashes them): a tampered file
    of the right size must still fail, before any tensor is used."""
    from offsite.adapter import FULL_WEIGHTS, load_adapter

    save_base(tmp_path / "base")
    emulator = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    adapter = finetune(emulator, EXAMPLES, tmp_path / "run", FinetuneConfig(epochs=1, batch_size=2, max_length=16), progress=False)
    data = bytearray((adapter / FULL_WEIGHTS).read_bytes())
    data[-1] ^= 0xFF  # same size, one byte of the last tensor flipped
    (adapter / FULL_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its SHA-256"):
        load_adapter(adapter, lazy=True)
    with pytest.raises(BundleError, match="does not match its SHA-256"):
        load_adapter(adapter)


def test_sharded_writer_left_on_an_error_closes_its_open_shard(tmp_path):
    with pytest.raises(ValueError, match="elsewhere"):
        with ShardedWriter(tmp_path, [("a", torch.float32, (2,)), ("c", torch.float16, (3,))]) as writer:
            writer.write("a", b"\0" * 8)
            handle = writer._handle.handle
            raise ValueError("a failure elsewhere")
    assert handle.closed and writer._handle is None


def test_read_ahead_without_fingerprint_only_reads(tmp_path):
    save_base(tmp_path / "base")
    with StoredCheckpoint(tmp_path / "base", torch.float32) as stored:
        names = sorted(stored.source)[:3]
        with stored.read_ahead(names, fingerprint=False) as reader:
            for name in names:
                assert b"".join(reader.chunks(name)) == b"".join(stored.chunks(name))
            with pytest.raises(RuntimeError, match="fingerprint=False"):
                reader.fingerprint()
