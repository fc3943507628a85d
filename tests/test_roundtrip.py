"""compress -> finetune -> plugin on every family, with full blocks and with LoRA."""

import pytest
import torch
from peft import PeftModel

from offsite.adapter import load_adapter
from offsite.bundle import model_fingerprint
from offsite.emulator import save_emulator
from offsite.methods import build_emulator, make_config
from offsite.plugin import plug_in
from offsite.surgery import discover_layout
from offsite.training import FinetuneConfig, finetune
from tiny import FAMILIES, VOCAB, tiny_model

ADAPTER_BLOCKS = [0, 1, 6, 7]


def owner_compress(family, tokenizer, tmp_path):
    base = tiny_model(family)
    emu = build_emulator(base, "layerdrop", make_config("layerdrop", num_kept=2))
    save_emulator(emu, tokenizer, tmp_path / "emu", model_fingerprint(base), family)
    return base


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_block_round_trip(family, tokenizer, examples, tmp_path):
    base = owner_compress(family, tokenizer, tmp_path)
    before = state(base)
    adapter_dir = finetune(tmp_path / "emu", examples, tmp_path / "run", FinetuneConfig(batch_size=4, lr=1e-3), progress=False)

    trained = load_adapter(adapter_dir).tensors
    layout = discover_layout(base)
    assert {layout.parse_block_key(k)[0] for k in trained} == set(ADAPTER_BLOCKS)
    plugged = plug_in(base, adapter_dir)
    after = plugged.state_dict()
    changed = 0
    for key, value in after.items():
        parsed = layout.parse_block_key(key)
        if parsed and parsed[0] in ADAPTER_BLOCKS:
            assert torch.equal(value, trained[key]), key
            changed += int(not torch.equal(value, before[key]))
        else:
            assert torch.equal(value, before[key]), f"{key} changed but is not an adapter weight"
    assert changed > 0, "training changed no adapter weight"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_round_trip(family, tokenizer, examples, tmp_path):
    base = owner_compress(family, tokenizer, tmp_path)
    before = state(base)
    config = FinetuneConfig(lora=True, lora_r=4, batch_size=4, lr=1e-2)
    adapter_dir = finetune(tmp_path / "emu", examples, tmp_path / "run", config, progress=False)

    layout = discover_layout(base)
    bundle = load_adapter(adapter_dir)
    assert bundle.lora is not None and bundle.lora.r == 4
    assert {layout.parse_block_key(t)[0] for t in bundle.lora.target_modules} == set(ADAPTER_BLOCKS)

    kept = plug_in(tiny_model(family), adapter_dir, merge=False)
    assert isinstance(kept, PeftModel)
    merged = plug_in(base, adapter_dir, merge=True)
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(kept(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-5)
    after = merged.state_dict()
    changed = 0
    for key, value in after.items():
        parsed = layout.parse_block_key(key)
        if parsed and parsed[0] in ADAPTER_BLOCKS:
            changed += int(not torch.equal(value, before[key]))
        else:
            assert torch.equal(value, before[key]), f"{key} changed but is not an adapter weight"
    assert changed > 0
    # Every merged adapter weight is exactly base + (alpha / r) * B @ A of the trained tensors.
    scale = bundle.lora.lora_alpha / bundle.lora.r
    for target in bundle.lora.target_modules:
        a = bundle.tensors[f"base_model.model.{target}.lora_A.weight"]
        b = bundle.tensors[f"base_model.model.{target}.lora_B.weight"]
        delta = scale * (b @ a)
        if bundle.lora.fan_in_fan_out:
            delta = delta.T
        torch.testing.assert_close(after[target + ".weight"], before[target + ".weight"] + delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lora", [False, True])
def test_adapter_applies_to_its_emulator(tokenizer, examples, tmp_path, lora):
    """The "emulator fine-tuned" setting: the emulator with the returned adapter is the model the
    data owner trained (same logits as the trained model in memory)."""
    from offsite.emulator import load_emulator
    from offsite.plugin import plug_into_emulator
    from offsite.training import make_trainable, pad_token_id, tokenize_examples, train
    from offsite.errors import PluginError

    owner_compress("qwen2", tokenizer, tmp_path)
    config = FinetuneConfig(lora=lora, batch_size=4, lr=1e-2, max_steps=3)
    adapter_dir = finetune(tmp_path / "emu", examples, tmp_path / "run", config, progress=False)

    emu = load_emulator(tmp_path / "emu")
    model, _ = make_trainable(emu, config)
    features = tokenize_examples(emu.tokenizer, examples, config.max_length)
    trained = train(model, features, pad_token_id(emu.tokenizer), config, progress=False).model
    ids = torch.randint(3, VOCAB, (2, 10))
    applied = plug_into_emulator(load_emulator(tmp_path / "emu"), adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(applied(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-5)

    owner_compress("llama", tokenizer, tmp_path / "other")
    with pytest.raises(PluginError, match="different emulator"):
        plug_into_emulator(load_emulator(tmp_path / "other" / "emu"), adapter_dir)


def test_peft_loads_each_view_right_where_it_belongs(base_dir, tmp_path, examples):
    """Regression (#20): PEFT loaded the LoRA bundle onto the emulator silently wrong (only blocks whose
    indices agree). The bundle's top level is for the full model, its emulator/ view for the emulator."""
    import json as _json

    from peft import PeftModel

    from offsite.emulator import compress_checkpoint, load_checkpoint, load_emulator
    from offsite.methods import make_config
    from offsite.plugin import plug_in, plug_into_emulator
    from offsite.training import FinetuneConfig, finetune

    emu = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    adapter = finetune(emu, examples, tmp_path / "run", FinetuneConfig(lora=True, lora_r=4, max_steps=3, lr=5e-2), progress=False)
    ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        ours = plug_into_emulator(load_emulator(emu), adapter, merge=False)(ids).logits
        peft_view = PeftModel.from_pretrained(load_emulator(emu).model, adapter / "emulator")(ids).logits
        full_ours = plug_in(load_checkpoint(base_dir)[0], adapter, emulator=emu, merge=False)(ids).logits
        full_peft = PeftModel.from_pretrained(load_checkpoint(base_dir)[0], adapter)(ids).logits
    torch.testing.assert_close(peft_view, ours)
    torch.testing.assert_close(full_peft, full_ours)
    config = _json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())  # portable: absolute, not as typed
    assert _json.loads((adapter / "emulator" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(emu.resolve())


def test_every_bundle_carries_a_model_card(base_dir, tmp_path, examples):
    import yaml

    from offsite.emulator import compress_checkpoint
    from offsite.methods import make_config
    from offsite.plugin import plugin_checkpoint
    from offsite.training import FinetuneConfig, finetune

    emu = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    adapter = finetune(emu, examples, tmp_path / "run", FinetuneConfig(lora=True, lora_r=4, max_steps=2), progress=False)
    plugged = plugin_checkpoint(base_dir, adapter, tmp_path / "plugged", emulator=emu)
    for path, kind, library in ((emu, "emulator", "transformers"), (adapter, "adapter", "peft"), (plugged, "plugged", "transformers")):
        text = (path / "README.md").read_text()
        front = yaml.safe_load(text.split("---")[1])
        assert front["library_name"] == library and front["base_model"] == str(base_dir.resolve()), (kind, front)
        assert kind in front["tags"] and "offsite" in front["tags"] and "# " in text
