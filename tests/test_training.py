"""Data-owner training: resume, refusal to clobber, data-owner isolation from the base checkpoint."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from offsite.checkpoint import list_checkpoints
from offsite.data import load_examples, save_examples
from offsite.emulator import compress_checkpoint
from offsite.errors import ConfigError
from offsite.methods import make_config
from offsite.training import FinetuneConfig, finetune


@pytest.fixture
def emulator_dir(base_dir, tmp_path):
    return compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))


@pytest.mark.parametrize("lora", [False, True])
def test_resume_reaches_the_same_adapter(emulator_dir, examples, tmp_path, lora):
    config = FinetuneConfig(lora=lora, batch_size=3, grad_accum=2, epochs=3, lr=1e-3, checkpoint_every=2, lora_dropout=0.1)
    straight = finetune(emulator_dir, examples, tmp_path / "a", config, progress=False)

    # Simulate a crash after step 8 of 12: the newer checkpoint and the export never happened.
    finetune(emulator_dir, examples, tmp_path / "b", config, progress=False)
    run_b = tmp_path / "b"
    shutil.rmtree(run_b / "adapter")
    ckpts = list_checkpoints(run_b / "checkpoints")
    assert [p.name for p in ckpts] == ["step-00000010", "step-00000012"]
    shutil.rmtree(ckpts[-1])
    (run_b / "checkpoints" / ".tmp-half-written").mkdir()  # an interrupted checkpoint write is ignored
    with pytest.raises(ConfigError, match="--resume"):
        finetune(emulator_dir, examples, run_b, config, progress=False)
    resumed = finetune(emulator_dir, examples, run_b, config, resume=True, progress=False)

    name = "adapter_model.safetensors" if lora else "adapter.safetensors"
    a, b = load_file(straight / name), load_file(resumed / name)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((resumed / "manifest.json").read_text())["metrics"]["steps"] == 12


def test_overwrite_then_crash_then_resume_never_resumes_the_old_run(emulator_dir, examples, tmp_path):
    """Regression: a longer run A, then `--overwrite` with a shorter run B that crashes, then `--resume`
    used to export A's weights under B's settings (pruning kept A's higher step numbers)."""
    run = tmp_path / "run"
    finetune(emulator_dir, examples, run, FinetuneConfig(batch_size=2, epochs=3, lr=1e-3, checkpoint_every=2), progress=False)
    short = FinetuneConfig(batch_size=2, max_steps=4, lr=5e-4, checkpoint_every=2)
    expected = load_file(finetune(emulator_dir, examples, tmp_path / "clean", short, progress=False) / "adapter.safetensors")

    import offsite.training as T

    real_save = T.save_adapter

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after its last checkpoint, before the export

    T.save_adapter = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(emulator_dir, examples, run, short, overwrite=True, progress=False)
    finally:
        T.save_adapter = real_save
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000004"]  # only B's
    resumed = finetune(emulator_dir, examples, run, short, resume=True, overwrite=True, progress=False)
    got = load_file(resumed / "adapter.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert json.loads((resumed / "manifest.json").read_text())["training"]["lr"] == 5e-4


def test_resume_refuses_checkpoints_of_another_run(emulator_dir, examples, tmp_path):
    run = tmp_path / "run"
    finetune(emulator_dir, examples, run, FinetuneConfig(batch_size=2, max_steps=4, lr=1e-3, checkpoint_every=2), progress=False)
    shutil.rmtree(run / "adapter")
    other = FinetuneConfig(batch_size=2, max_steps=4, lr=1e-2, checkpoint_every=2)
    with pytest.raises(ConfigError, match="belongs to another run"):
        finetune(emulator_dir, examples, run, other, resume=True, progress=False)
    with pytest.raises(ConfigError, match="belongs to another run"):  # same settings, other data
        finetune(emulator_dir, examples[:-1], run, FinetuneConfig(batch_size=2, max_steps=4, lr=1e-3, checkpoint_every=2),
                 resume=True, progress=False)
    # checkpoint_every and log_every may change on resume
    finetune(emulator_dir, examples, run, FinetuneConfig(batch_size=2, max_steps=4, lr=1e-3, checkpoint_every=1, log_every=3),
             resume=True, progress=False)


def test_existing_adapter_is_not_overwritten(emulator_dir, examples, tmp_path):
    config = FinetuneConfig(batch_size=8, max_steps=1)
    adapter = finetune(emulator_dir, examples, tmp_path / "run", config, progress=False)
    before = (adapter / "adapter.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        finetune(emulator_dir, examples, tmp_path / "run", FinetuneConfig(batch_size=8, max_steps=1, lr=1.0), progress=False)
    assert (adapter / "adapter.safetensors").read_bytes() == before


def test_context_is_masked_and_steps_count_accumulation(emulator_dir, examples, tmp_path):
    config = FinetuneConfig(batch_size=4, grad_accum=3, epochs=2)
    adapter = finetune(emulator_dir, examples, tmp_path / "run", config, progress=False)
    metrics = json.loads((adapter / "manifest.json").read_text())["metrics"]
    assert metrics["steps"] == 4  # 24 examples / 4 = 6 micro-batches = 2 optimizer steps per epoch


def test_data_owner_never_opens_the_base_checkpoint(base_dir, emulator_dir, examples, tmp_path):
    """Fine-tuning reads only the emulator bundle: every file open is audited, and the base
    checkpoint is moved away so that any attempt to load it would fail."""
    data = tmp_path / "train.jsonl"
    save_examples(examples, data)
    hidden = base_dir.with_name("base-hidden")
    base_dir.rename(hidden)
    opened = []
    active = [True]

    def audit(event, args):
        if active[0] and event == "open" and args and isinstance(args[0], (str, bytes)):
            opened.append(str(args[0]))

    sys.addaudithook(audit)
    try:
        finetune(emulator_dir, load_examples(data), tmp_path / "run", FinetuneConfig(lora=True, max_steps=2), progress=False)
    finally:
        active[0] = False
        hidden.rename(base_dir)
    touched = [p for p in opened if "base" in p.split("/")[-2:-1] or str(hidden) in p or str(base_dir) in p]
    assert not touched, f"data owner opened base files: {touched[:3]}"
    assert any(str(emulator_dir) in p for p in opened), "audit hook saw no bundle reads"


def test_bad_training_data_is_a_clear_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"context": "a"}\n')
    with pytest.raises(ConfigError, match="d.jsonl:1: needs string fields"):
        load_examples(path)
    path.write_text("not json\n")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_examples(path)
    with pytest.raises(ConfigError, match="not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_invalid_config_values():
    with pytest.raises(ConfigError, match="schedule"):
        FinetuneConfig(schedule="exotic")
    with pytest.raises(ConfigError, match="batch_size"):
        FinetuneConfig(batch_size=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt", "gpt_neox", "bloom", "phi"])
def test_answer_only_loss_equals_the_models_own_loss(family, tokenizer, examples):
    """The LM head runs on the answer positions only; the loss must not change."""
    from offsite.data import pad_batch, tokenize_example
    from offsite.training import causal_lm_loss
    from tiny import tiny_model

    model = tiny_model(family)
    batch = pad_batch([tokenize_example(tokenizer, ex, 64) for ex in examples[:5]], pad_id=0)
    expected = model(**batch).loss
    got = causal_lm_loss(model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got.backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_the_loss_curve_is_saved_and_tqdm_disable_is_honoured(emulator_dir, examples, tmp_path, monkeypatch, capsys):
    from offsite.progress import bars_disabled

    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert bars_disabled(True) and bars_disabled(False)
    monkeypatch.delenv("TQDM_DISABLE")
    assert not bars_disabled(True) and bars_disabled(False)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    finetune(emulator_dir, examples, tmp_path / "run", FinetuneConfig(batch_size=2, max_steps=6, log_every=2, lr=1e-3), progress=True)
    assert "finetune" not in capsys.readouterr().err  # no bar
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4, 6] and all(e["loss"] > 0 and e["lr"] >= 0 for e in log)


def test_the_manifest_records_processes_effective_batch_and_all_tokens(emulator_dir, examples, tmp_path):
    adapter = finetune(emulator_dir, examples, tmp_path / "run", FinetuneConfig(batch_size=2, grad_accum=2, max_steps=2, lr=1e-3),
                       progress=False)
    metrics = json.loads((adapter / "manifest.json").read_text())["metrics"]
    assert metrics["num_processes"] == 1 and metrics["effective_batch"] == 4
    assert metrics["train_tokens"] > 0


@pytest.mark.slow
def test_two_cpu_processes_train_as_one_run(emulator_dir, examples, tmp_path):
    """torchrun with 2 CPU processes (gloo): one distributed run, its manifest says so, one summary."""
    import subprocess

    data = tmp_path / "train.jsonl"
    save_examples(examples, data)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "offsite.cli", "finetune", "--bundle", str(emulator_dir),
                             "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("adapter bundle written") == 1
    metrics = json.loads((tmp_path / "run" / "adapter" / "manifest.json").read_text())["metrics"]
    assert metrics["num_processes"] == 2 and metrics["effective_batch"] == 4


def test_a_bf16_emulator_stays_bf16_under_mixed_precision_and_trains_float32_masters(tmp_path, examples):
    """#18: with bf16 autocast the frozen emulator keeps its stored dtype (half the memory); the trainable
    blocks are float32 master weights, and the adapter travels in the base's bf16 (what plug-in stores);
    without mixed precision (the CPU default) everything is float32."""
    from tiny import save_tiny_checkpoint

    from offsite.adapter import load_adapter
    from offsite.emulator import compress_checkpoint, load_checkpoint
    from offsite.methods import make_config
    from offsite.training import FinetuneConfig, finetune, frozen_dtype, make_trainable

    save_tiny_checkpoint("llama", tmp_path / "fp32")
    model, tokenizer = load_checkpoint(tmp_path / "fp32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    emulator_dir = compress_checkpoint(tmp_path / "base", tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    assert frozen_dtype(torch.bfloat16, "bf16") == torch.bfloat16 and frozen_dtype(torch.bfloat16, "no") == torch.float32

    from offsite.emulator import load_emulator

    emulator = load_emulator(emulator_dir, dtype=torch.bfloat16)
    trainable, _ = make_trainable(emulator, FinetuneConfig())
    dtypes = {p.requires_grad: {q.dtype for q in trainable.parameters() if q.requires_grad == p.requires_grad} for p in trainable.parameters()}
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}

    config = FinetuneConfig(epochs=1, batch_size=4, max_length=24, mixed_precision="bf16")
    adapter = finetune(emulator_dir, examples, tmp_path / "run", config, progress=False)
    bundle = load_adapter(adapter)
    assert {t.dtype for t in bundle.tensors.values()} == {torch.bfloat16}
    assert bundle.manifest["adapter"]["dtypes"] == ["bfloat16"] and bundle.manifest["training"]["precision"] == "bf16"
    assert all(torch.isfinite(t).all() for t in bundle.tensors.values())


def test_length_grouped_batches_pad_less_and_stay_deterministic(tmp_path):
    """#22 lever: batches of similar length; the same order for the same (seed, epoch), every example once."""
    from offsite.data import length_grouped_order
    from offsite.training import FinetuneConfig, train
    from tiny import tiny_model

    lengths = [3 + (i * 37) % 60 for i in range(200)]
    order = length_grouped_order(lengths, batch_size=4, seed=0, epoch=0)
    assert sorted(order) == list(range(200)) and order == length_grouped_order(lengths, 4, 0, 0)
    assert order != length_grouped_order(lengths, 4, 0, 1)

    def padding(o):
        return sum(4 * max(lengths[i] for i in o[s:s + 4]) - sum(lengths[i] for i in o[s:s + 4]) for s in range(0, len(o), 4))

    from offsite.data import epoch_order

    assert padding(order) < 0.2 * padding(epoch_order(200, 0, 0))
    torch.manual_seed(0)
    features = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in lengths[:48]]
    plain = train(tiny_model("llama"), features, 0, FinetuneConfig(epochs=1, batch_size=4, max_length=64, group_by_length=False),
                  progress=False)
    grouped = train(tiny_model("llama"), features, 0, FinetuneConfig(epochs=1, batch_size=4, max_length=64, group_by_length=True),
                    progress=False)
    assert grouped.metrics["train_tokens"] == plain.metrics["train_tokens"]
    assert grouped.metrics["padding_fraction"] < plain.metrics["padding_fraction"]
    assert FinetuneConfig().group_by_length  # the default: it doubled tokens/s on real task data (benchmarks/throughput.py)


def test_tensorboard_events_hold_the_logged_loss_curve(tmp_path, examples, base_dir):
    """#20: --report-to tensorboard writes accelerate's TensorBoard events beside train_log.jsonl, same values."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from offsite.emulator import compress_checkpoint
    from offsite.methods import make_config
    from offsite.training import TRAIN_LOG, FinetuneConfig, finetune

    emulator = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    config = FinetuneConfig(epochs=1, batch_size=4, max_length=24, log_every=2, report_to="tensorboard")
    finetune(emulator, examples, tmp_path / "run", config, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / TRAIN_LOG).read_text().splitlines()]
    files = list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert files
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in loss] == [e["step"] for e in logged]
    assert all(abs(v - e["loss"]) < 1e-5 for (_, v), e in zip(loss, logged))
    with pytest.raises(Exception, match="report_to must be one of"):
        FinetuneConfig(report_to="wandb")


def test_tensorboard_missing_is_one_clear_error_before_training(tmp_path, examples, base_dir, monkeypatch):
    import importlib.util

    from offsite.emulator import compress_checkpoint
    from offsite.errors import ConfigError
    from offsite.methods import make_config
    from offsite.training import FinetuneConfig, finetune

    emulator = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the tensorboard package: pip install tensorboard"):
        finetune(emulator, examples, tmp_path / "run", FinetuneConfig(max_steps=1, report_to="tensorboard"), progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_trains_the_same_adapter(emulator_dir, examples, tmp_path, lora):
    """#22's memory lever: recomputing activations in the backward pass changes nothing trained."""
    base = dict(lora=lora, batch_size=3, epochs=2, lr=1e-3, seed=3)
    plain = finetune(emulator_dir, examples, tmp_path / "plain", FinetuneConfig(**base), progress=False)
    from unittest import mock

    import transformers.modeling_utils as modeling_utils

    with mock.patch.object(modeling_utils, "checkpoint", wraps=modeling_utils.checkpoint) as recomputed:
        checkpointed = finetune(emulator_dir, examples, tmp_path / "ckpt", FinetuneConfig(**base, gradient_checkpointing=True),
                                progress=False)
    assert recomputed.call_count > 0  # the blocks ran under torch.utils.checkpoint
    name = "adapter_model.safetensors" if lora else "adapter.safetensors"
    a, b = load_file(plain / name), load_file(checkpointed / name)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert json.loads((checkpointed / "manifest.json").read_text())["training"]["gradient_checkpointing"] is True
