"""Owner-side emulator distillation on a tiny model."""

import json

import pytest
import torch

from offsite.distill import DistillConfig, KDLoss, LiveTeacher, distill, pack_blocks
from offsite.emulator import compress_checkpoint, load_checkpoint, load_emulator
from offsite.errors import ConfigError
from offsite.methods import make_config
from offsite.surgery import discover_layout, get_blocks

TEXTS = [f"Passage {i}: the quick brown fox jumps over the lazy dog while science asks questions." for i in range(60)]


def batch_of(tokenizer, n=2, block=16):
    from offsite.data import pad_batch

    return pad_batch(pack_blocks(tokenizer, TEXTS, block)[:n], pad_id=0)


def test_kd_is_zero_when_nothing_was_dropped(base_dir, tmp_path, tokenizer):
    emu_dir = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=4))
    base, _ = load_checkpoint(base_dir)
    emulator = load_emulator(emu_dir)
    loss = KDLoss(LiveTeacher(base, 5), emulator.model, last_middle_emulator=5, config=DistillConfig(block_size=16, tokens=16))
    loss(emulator.model, batch_of(tokenizer), emulator.model.get_output_embeddings())
    loss.close()
    assert loss.last["kd"] == pytest.approx(0.0, abs=1e-12)


def test_teacher_is_not_run_without_kd(base_dir, tmp_path, tokenizer):
    emu_dir = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    base, _ = load_checkpoint(base_dir)
    calls = []
    base.register_forward_pre_hook(lambda m, a: calls.append(1))
    emulator = load_emulator(emu_dir)
    loss = KDLoss(None, emulator.model, 3, DistillConfig(kd_weight=0.0, block_size=16, tokens=16))
    loss(emulator.model, batch_of(tokenizer), emulator.model.get_output_embeddings())
    assert not calls and loss.last["kd"] == 0.0
    loss2 = KDLoss(LiveTeacher(base, 5), emulator.model, 3, DistillConfig(block_size=16, tokens=16))
    loss2(emulator.model, batch_of(tokenizer), emulator.model.get_output_embeddings())
    assert calls and loss2.last["kd"] > 0


def test_distillation_trains_the_middle_and_keeps_the_adapter(base_dir, tmp_path):
    emu_dir = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    config = DistillConfig(lr=3e-3, block_size=16, batch_size=4, tokens=16 * 4 * 12, eval_every=4, kd_weight=30.0)
    out = distill(base_dir, emu_dir, tmp_path / "distilled", TEXTS[:50], " ".join(TEXTS[50:]), config, progress=False, log=lambda *_: None)

    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["method"]["params"]["distillation"]
    assert record["steps"] == 12 and record["kd_weight"] == 30.0
    assert record["selected_step"] in (0, 4, 8, 12)
    assert manifest["blocks"]["map"] == [0, 1, 2, 5, 6, 7]

    before, after = load_emulator(emu_dir).model, load_emulator(out).model
    layout = discover_layout(before)
    for i in range(6):
        same = all(torch.equal(a, b) for a, b in zip(get_blocks(before, layout)[i].parameters(), get_blocks(after, layout)[i].parameters()))
        assert same == (i in (0, 1, 4, 5) or record["selected_step"] == 0), f"block {i}"
    assert torch.equal(before.get_input_embeddings().weight, after.get_input_embeddings().weight)


def test_refuses_a_foreign_base(base_dir, tmp_path):
    from tiny import save_tiny_checkpoint

    emu_dir = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    save_tiny_checkpoint("llama", tmp_path / "other", seed=3)
    with pytest.raises(ConfigError, match="was not made from"):
        distill(tmp_path / "other", emu_dir, tmp_path / "d", TEXTS, "x " * 50, DistillConfig(block_size=16, tokens=64), progress=False)


def test_bad_settings():
    with pytest.raises(ConfigError, match="not both 0"):
        DistillConfig(lm_weight=0, kd_weight=0)
    with pytest.raises(ConfigError, match="block_size"):
        DistillConfig(block_size=4)


def test_the_block_by_block_teacher_distils_as_the_live_one(base_dir, tmp_path):
    """#18: the teacher's targets from one base block in memory at a time train the same emulator as the
    whole base model run live, and the base is never loaded."""
    from unittest import mock

    import offsite.distill as distill_module

    emu_dir = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    config = DistillConfig(lr=3e-3, block_size=16, batch_size=4, tokens=16 * 4 * 6, eval_every=3, kd_weight=30.0)
    quiet = dict(progress=False, log=lambda *_: None)
    live = distill(base_dir, emu_dir, tmp_path / "live", TEXTS[:50], " ".join(TEXTS[50:]), config, stream_teacher=False, **quiet)
    with mock.patch.object(distill_module, "load_checkpoint", side_effect=AssertionError("the base model was loaded")):
        streamed = distill(base_dir, emu_dir, tmp_path / "streamed", TEXTS[:50], " ".join(TEXTS[50:]), config, **quiet)
    assert not (tmp_path / "streamed.teacher").exists()
    a, b = load_emulator(live).model.state_dict(), load_emulator(streamed).model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    record = lambda out: json.loads((out / "manifest.json").read_text())["method"]["params"]["distillation"]  # noqa: E731
    assert record(live)["selected_step"] == record(streamed)["selected_step"]
