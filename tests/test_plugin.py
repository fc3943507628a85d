"""The owner's plug-in accepts exactly the adapter it expects, and leaves the model alone otherwise."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from offsite.emulator import compress_checkpoint, load_checkpoint
from offsite.errors import BundleError, PluginError
from offsite.methods import make_config
from offsite.plugin import plug_in, plugin_checkpoint
from offsite.training import FinetuneConfig, finetune
from conftest import rehash
from tiny import tiny_model


@pytest.fixture
def trained(base_dir, examples, tmp_path):
    emu = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    full = finetune(emu, examples, tmp_path / "full", FinetuneConfig(max_steps=2, lr=1e-3), progress=False)
    lora = finetune(emu, examples, tmp_path / "lora", FinetuneConfig(lora=True, max_steps=2, lr=1e-2), progress=False)
    return {"full": full, "lora": lora}


def base_model(base_dir):
    return load_checkpoint(base_dir)[0]


def edit_tensors(adapter_dir, edit):
    name = "adapter.safetensors" if (adapter_dir / "adapter.safetensors").exists() else "adapter_model.safetensors"
    tensors = load_file(adapter_dir / name)
    edit(tensors)
    save_file(tensors, adapter_dir / name)
    rehash(adapter_dir)


def assert_rejected_and_untouched(base_dir, adapter_dir, match):
    model = base_model(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PluginError, match=match):
        plug_in(model, adapter_dir)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_base_model_is_refused(trained):
    other = tiny_model("llama", seed=1)
    with pytest.raises(PluginError, match="trained for base model"):
        plug_in(other, trained["full"])


def test_other_architecture_is_refused(trained):
    with pytest.raises(PluginError, match="blocks"):
        plug_in(tiny_model("gpt2"), trained["full"])


@pytest.mark.parametrize(
    "kind, edit, match",
    [
        ("full", lambda t: t.__setitem__("model.embed_tokens.weight", torch.zeros(300, 32)), "outside the allowed"),
        ("full", lambda t: t.__setitem__("model.layers.3.mlp.up_proj.weight", torch.zeros(64, 32)), "outside the allowed"),
        ("full", lambda t: t.pop("model.layers.0.mlp.up_proj.weight"), "lacks tensors"),
        ("full", lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(65, 32)), "shape"),
        ("full", lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", torch.full((64, 32), float("nan"))), "NaN"),
        ("full", lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", torch.zeros(64, 32, dtype=torch.int32)), "non-floating"),
        ("lora", lambda t: t.__setitem__("base_model.model.lm_head.lora_A.weight", torch.zeros(8, 32)), "outside the allowed"),
        ("lora", lambda t: t.__setitem__(next(iter(t)), torch.zeros(3, 3)), "shape"),
    ],
)
def test_tampered_tensors_are_refused(base_dir, trained, kind, edit, match):
    edit_tensors(trained[kind], edit)
    assert_rejected_and_untouched(base_dir, trained[kind], match)


def test_lora_targeting_the_head_is_refused(base_dir, trained):
    path = trained["lora"] / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_modules"] = config["target_modules"] + ["model.layers.3.mlp.up_proj"]
    path.write_text(json.dumps(config))
    rehash(trained["lora"])
    assert_rejected_and_untouched(base_dir, trained["lora"], "outside the adapter blocks")


def test_lora_modules_to_save_is_refused(base_dir, trained):
    path = trained["lora"] / "adapter_config.json"
    config = json.loads(path.read_text())
    config["modules_to_save"] = ["lm_head"]
    path.write_text(json.dumps(config))
    rehash(trained["lora"])
    with pytest.raises(BundleError, match="modules_to_save"):
        plug_in(base_model(base_dir), trained["lora"])


def test_tampered_byte_is_refused_with_the_file_named(base_dir, trained):
    path = trained["full"] / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="adapter.safetensors does not match its SHA-256"):
        plug_in(base_model(base_dir), trained["full"])


def test_emulator_bundle_is_not_an_adapter(base_dir, tmp_path, trained):
    with pytest.raises(BundleError, match="expected an adapter bundle, got an emulator"):
        plug_in(base_model(base_dir), tmp_path / "emu")


@pytest.mark.parametrize("merge", [True, False])
def test_plugin_checkpoint_writes_a_loadable_model(base_dir, trained, tmp_path, merge):
    out = plugin_checkpoint(base_dir, trained["lora"], tmp_path / "plugged", merge=merge)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "plugged" and manifest["adapter"]["merged"] is merge
    if merge:
        model, _ = load_checkpoint(out)
        reference = plug_in(base_model(base_dir), trained["lora"])
        for key, value in reference.state_dict().items():
            assert torch.equal(value, model.state_dict()[key]), key
    else:
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="already exists"):
        plugin_checkpoint(base_dir, trained["lora"], out, merge=merge)
    assert (out / "manifest.json").read_bytes() == before
