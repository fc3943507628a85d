"""ScaleOT stage (a) block by block (offsite.methods.scaleot_onload): the same direct measurement as in
memory, harmonizers that fit their blocks, an artifact stage (b) uses with ranking='direct' only."""

import json

import pytest
import torch

from offsite.bundle import model_fingerprint
from offsite.emulator import compress_checkpoint
from offsite.errors import ConfigError
from offsite.methods import make_config
from offsite.methods.scaleot import ImportanceConfig, importance_checkpoint, load_artifact, measure_swaps, new_harmonizers
from offsite.methods.scaleot_onload import onload_importance
from offsite.models import load_checkpoint
from offsite.surgery import discover_layout, get_blocks
from tiny import block_io, save_tiny_checkpoint

TEXTS = [f"Passage {i}: the quick brown fox jumps over the lazy dog while science asks questions." for i in range(60)]
SMALL = dict(rank=4, steps=40, batch_size=4, block_size=16, checkpoint_every=0, device="cpu", lr=3e-3, objective="local",
             onload=True, direct_sequences=6)
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_onloaded_direct_measurement_equals_the_in_memory_one(family, tmp_path):
    save_tiny_checkpoint(family, tmp_path / "base")
    art = load_artifact(onload_importance(tmp_path / "base", tmp_path / "art", ImportanceConfig(**SMALL), texts=TEXTS,
                                          work_dir=tmp_path, **QUIET))
    assert art.logits is None and art.direct is not None and list(tmp_path.glob("offsite-scaleot-*")) == []  # scratch removed

    # The same swaps measured on the whole model in memory, with the artifact's harmonizers.
    from offsite.methods.scaleot import split_features

    model, tokenizer = load_checkpoint(tmp_path / "base")
    assert art.base_fingerprint == model_fingerprint(model)  # what stage (b) checks the model against
    layout = discover_layout(model)
    _, heldout = split_features(tokenizer, TEXTS, ImportanceConfig(**SMALL))
    harmonizers = new_harmonizers(model, layout, art.middle, rank=4)
    for i in art.middle:
        harmonizers[str(i)].load_state_dict(art.harmonizers[i])
    blocks = get_blocks(model, layout)
    originals = {i: blocks[i] for i in art.middle}
    expected = measure_swaps(model, blocks, originals, harmonizers, art.middle, heldout[:6], 4, torch.device("cpu"),
                             lambda: torch.autocast("cpu", enabled=False))
    body = art.manifest["scaleot"]["direct"]
    assert body["base_loss"] == pytest.approx(expected["base_loss"], abs=1e-4)
    for b in art.middle:
        assert art.direct[b] == pytest.approx(expected["loss_increase"][str(b)], abs=1e-4)


def test_onloaded_harmonizers_fit_their_blocks_and_stage_b_ranks_directly(tmp_path):
    save_tiny_checkpoint("llama", tmp_path / "base")
    path = onload_importance(tmp_path / "base", tmp_path / "art", ImportanceConfig(**SMALL), texts=TEXTS, **QUIET)
    manifest = json.loads((path / "manifest.json").read_text())
    training = manifest["scaleot"]["training"]
    assert training["onloaded"] and manifest["scaleot"]["importance"] is None
    # Each harmonizer fits better than the identity it starts as: the normalised MSE of the identity on
    # the same activations (block input vs output) is what it began at.
    from offsite.methods.scaleot import normalised_mse

    model, tokenizer = load_checkpoint(tmp_path / "base")
    art = load_artifact(path)
    inputs, outputs, mask = block_io(model, tokenizer, art.middle, TEXTS, 16)
    for i in art.middle:
        identity = float(normalised_mse(inputs[i], outputs[i], mask))
        assert training["final_local_loss"][str(i)] < 0.97 * identity, (i, training["final_local_loss"], identity)

    emulator = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "scaleot",
                                   make_config("scaleot", artifact=str(path), alpha=0.5, ranking="direct"))
    replaced = json.loads((emulator / "manifest.json").read_text())["method"]["params"]["result"]
    assert replaced["num_replaced"] == 2
    with pytest.raises(ConfigError, match="block by block .* use ranking='direct'"):
        compress_checkpoint(tmp_path / "base", tmp_path / "emu2", "scaleot", make_config("scaleot", artifact=str(path), alpha=0.5))
    assert not (tmp_path / "emu2").exists()


def test_onload_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="onload runs the 'local' objective"):
        ImportanceConfig(onload=True, objective="lm")
    with pytest.raises(ConfigError, match="direct_sequences >= 1"):
        ImportanceConfig(onload=True, objective="local", direct_sequences=0)
    save_tiny_checkpoint("llama", tmp_path / "base")
    with pytest.raises(ConfigError, match="scaleot_onload"):
        importance_checkpoint(tmp_path / "base", tmp_path / "art", ImportanceConfig(**SMALL))
    with pytest.raises(ConfigError, match="one bottom and one top"):
        onload_importance(tmp_path / "base", tmp_path / "art", ImportanceConfig(**(SMALL | {"num_top": 0})), texts=TEXTS, **QUIET)
    assert not (tmp_path / "art").exists()


def test_onload_from_the_cli(base_dir, tmp_path, capsys):
    from offsite.cli import main

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    code = main(["scaleot-importance", "--model", str(base_dir), "--out", str(tmp_path / "art"), "--data", str(data), "--onload",
                 "--objective", "local", "--rank", "4", "--steps", "4", "--batch-size", "4", "--block-size", "16", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "importance  held-out loss increase when swapped alone, least important first" in out
    code = main(["scaleot-importance", "--model", str(base_dir), "--out", str(tmp_path / "art2"), "--onload", "--objective", "lm"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "local" in err and not (tmp_path / "art2").exists()
