"""CRaSh: linear CKA, exact contiguous clustering, kept/shared blocks, and the two-party round trip."""

import itertools
import json

import pytest
import torch

from offsite.emulator import compress_checkpoint, load_emulator
from offsite.errors import ConfigError
from offsite.methods import build_emulator, make_config
from offsite.methods.crash import contiguous_clusters, linear_cka, representative
from offsite.plugin import plug_in, plug_into_emulator
from offsite.surgery import discover_layout, get_blocks
from offsite.training import FinetuneConfig, finetune
from tiny import FAMILIES, VOCAB, tiny_model

SMALL = dict(support_size=4, support_max_length=24, support_batch_size=2, max_tokens=64)


def crash(**params):
    return make_config("crash", **(SMALL | params))


def test_linear_cka_is_one_on_itself_and_invariant_to_rotation_and_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    noise = torch.randn(200, 6, generator=gen)
    cka = linear_cka([x, 3.0 * x @ q + 1.0, noise])
    assert cka[0, 0] == 1 and torch.allclose(cka[0, 1], torch.tensor(1.0, dtype=torch.float64))
    assert cka[0, 2] < 0.2 and torch.equal(cka, cka.T)


def _scatter(runs, sim):
    return sum(sum(1 - sim[i, j] for i in r for j in r) / len(r) for r in runs)


def test_contiguous_clustering_is_exact():
    """The dynamic programme finds the best cut, checked against every possible cut."""
    gen = torch.Generator().manual_seed(1)
    m, k = 7, 3
    a = torch.rand(m, m, generator=gen, dtype=torch.float64)
    sim = (a + a.T) / 2
    sim.fill_diagonal_(1)
    runs = contiguous_clusters(sim, k)
    assert [i for r in runs for i in r] == list(range(m)) and len(runs) == k
    best = min(_scatter([list(range(s, e)) for s, e in zip((0,) + c, c + (m,))], sim)
               for c in itertools.combinations(range(1, m), k - 1))
    assert abs(_scatter(runs, sim) - best) < 1e-12


def test_clear_block_structure_is_recovered():
    sim = torch.full((6, 6), 0.1, dtype=torch.float64)
    for run in ([0, 1], [2, 3, 4], [5]):
        for i in run:
            for j in run:
                sim[i, j] = 0.95 if i != j else 1.0
    assert contiguous_clusters(sim, 3) == [[0, 1], [2, 3, 4], [5]]
    sim[2, 4] = sim[4, 2] = 0.99  # 3 is the least typical block of its run
    assert representative([2, 3, 4], sim, "medoid") in (2, 4)
    assert representative([2, 3, 4], sim, "first") == 2 and representative([2, 3, 4], sim, "last") == 4


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("share", [True, False])
def test_crash_keeps_one_block_per_cluster(family, share, tokenizer):
    base = tiny_model(family)
    layout = discover_layout(base)
    emu = build_emulator(base, "crash", crash(num_clusters=2, share=share), tokenizer=tokenizer)
    result = emu.params["result"]
    clusters, kept = result["clusters"], result["kept_blocks"]
    assert [i for c in clusters for i in c] == [2, 3, 4, 5] and len(clusters) == 2
    assert all(k in c for k, c in zip(kept, clusters))
    middle = [k for k, c in zip(kept, clusters) for _ in c] if share else kept
    assert emu.block_map == [0, 1] + middle + [6, 7]
    assert emu.model.config.num_hidden_layers == len(emu.block_map)
    # every position holds an exact copy of the original block it maps to
    for pos, orig in enumerate(emu.block_map):
        for a, b in zip(get_blocks(emu.model, layout)[pos].parameters(), get_blocks(base, layout)[orig].parameters()):
            assert torch.equal(a, b)
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.isfinite(emu.model(ids).logits).all()
        out = emu.model.generate(ids[:1], max_new_tokens=3, do_sample=False)  # KV cache: one layer_idx per position
    assert out.shape == (1, 12)


@pytest.mark.parametrize("params, message", [
    ({}, "needs num_clusters"),
    ({"num_clusters": 0}, "at least 1"),
    ({"num_clusters": 2.5}, "needs num_clusters"),
    ({"num_clusters": 2, "keep": "random"}, "keep must be"),
    ({"num_clusters": 2, "support_max_length": 1}, "at least 2"),
])
def test_invalid_settings(params, message):
    with pytest.raises(ConfigError, match=message):
        make_config("crash", **params)


def test_more_clusters_than_middle_blocks_is_an_error(tokenizer):
    with pytest.raises(ConfigError, match="more than the 4 middle blocks"):
        build_emulator(tiny_model("llama"), "crash", crash(num_clusters=5), tokenizer=tokenizer)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_round_trip_on_a_shared_crash_emulator(family, tmp_path, examples):
    from tiny import save_tiny_checkpoint

    save_tiny_checkpoint(family, tmp_path / "base")
    emu_dir = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "crash", crash(num_clusters=2))
    emulator = load_emulator(emu_dir)
    assert len(emulator.block_map) == 8 and len(set(emulator.block_map[2:6])) == 2
    adapter_dir = finetune(emu_dir, examples, tmp_path / "run", FinetuneConfig(batch_size=4, lr=1e-3, max_steps=2), progress=False)
    base = tiny_model(family)
    layout = discover_layout(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    plugged = plug_in(base, adapter_dir, emulator=emu_dir)
    changed = [k for k, v in plugged.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(layout.parse_block_key(k)[0] in (0, 1, 6, 7) for k in changed)
    tuned = plug_into_emulator(load_emulator(emu_dir), adapter_dir)
    with torch.no_grad():
        assert torch.isfinite(tuned(torch.randint(3, VOCAB, (1, 8))).logits).all()


def test_compress_from_the_cli(base_dir, tmp_path, capsys):
    from offsite.cli import main

    code = main(["compress", "--model", str(base_dir), "--out", str(tmp_path / "emu"), "--method", "crash",
                 "--num-clusters", "2", "--no-share", "--support-size", "4", "--support-max-length", "24"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[crash] 2 clusters of the 4 middle blocks" in out
    manifest = json.loads((tmp_path / "emu" / "manifest.json").read_text())
    assert manifest["method"]["name"] == "crash" and manifest["method"]["params"]["share"] is False
    assert len(manifest["blocks"]["map"]) == 6
