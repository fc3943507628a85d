"""The owner's plug-in accepts exactly the adapter it expects, and leaves the model alone otherwise."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from offsite.adapter import load_adapter
from offsite.bundle import read_manifest
from offsite.emulator import compress_checkpoint, load_checkpoint
from offsite.errors import BundleError, PluginError
from offsite.methods import make_config
from offsite.plugin import MAX_NORM_RATIO, plug_in, plugin_checkpoint
from offsite.signing import generate_keypair
from offsite.training import FinetuneConfig, finetune
from conftest import rehash
from tiny import tiny_model


@pytest.fixture
def trained(base_dir, examples, tmp_path):
    emu = compress_checkpoint(base_dir, tmp_path / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    full = finetune(emu, examples, tmp_path / "full", FinetuneConfig(max_steps=2, lr=1e-3), progress=False)
    lora = finetune(emu, examples, tmp_path / "lora", FinetuneConfig(lora=True, max_steps=2, lr=1e-2), progress=False)
    return {"full": full, "lora": lora, "emulator": emu}


def base_model(base_dir):
    return load_checkpoint(base_dir)[0]


def edit_tensors(adapter_dir, edit):
    name = "adapter.safetensors" if (adapter_dir / "adapter.safetensors").exists() else "adapter_model.safetensors"
    tensors = load_file(adapter_dir / name)
    edit(tensors)
    save_file(tensors, adapter_dir / name)
    rehash(adapter_dir)


def assert_rejected_and_untouched(base_dir, adapter_dir, match, emulator=None, error=PluginError, **kwargs):
    model = base_model(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        plug_in(model, adapter_dir, emulator=emulator or adapter_dir.parent.parent / "emu", **kwargs)
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
        ("full", lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", torch.full((64, 32), 1e6)), "over the bound"),
        ("full", lambda t: t.__setitem__("model.layers.0.input_layernorm.weight", torch.full((32,), 1e3)), "over the bound"),
        ("lora", lambda t: t.__setitem__("base_model.model.lm_head.lora_A.weight", torch.zeros(8, 32)), "outside the allowed"),
        ("lora", lambda t: t.__setitem__(next(iter(t)), torch.zeros(3, 3)), "shape"),
        ("lora", lambda t: [t.__setitem__(k, torch.full_like(v, 50.0)) for k, v in t.items()], "LoRA update.*over the bound"),
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
        plug_in(base_model(base_dir), trained["lora"], emulator=trained["emulator"])


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
    out = plugin_checkpoint(base_dir, trained["lora"], tmp_path / "plugged", merge=merge, emulator=trained["emulator"])
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
        plugin_checkpoint(base_dir, trained["lora"], out, merge=merge, emulator=trained["emulator"])
    assert (out / "manifest.json").read_bytes() == before


def test_dtypes_other_than_the_declared_floats_are_refused(base_dir, trained):
    edit_tensors(trained["full"], lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", torch.zeros(64, 32, dtype=torch.int32)))
    assert_rejected_and_untouched(base_dir, trained["full"], "holds tensors of dtype", error=BundleError)
    bundle = load_adapter(trained["lora"])
    bundle.tensors = {k: v.double() for k, v in bundle.tensors.items()}  # in memory: the plug-in's own check
    assert_rejected_and_untouched(base_dir, bundle, "dtype torch.float64", emulator=trained["emulator"])


def claim_every_block(adapter_dir, base_dir):
    """A malicious data owner: add tensors for a middle block and declare it an adapter block."""
    base = base_model(base_dir).state_dict()
    edit_tensors(adapter_dir, lambda t: t.update({k: v + 1.0 for k, v in base.items() if k.startswith("model.layers.3.")}))
    path = adapter_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["adapter"]["blocks"] = [0, 1, 3, 6, 7]
    path.write_text(json.dumps(manifest))


def test_an_adapter_cannot_claim_blocks_the_emulator_did_not_declare(base_dir, trained):
    claim_every_block(trained["full"], base_dir)
    assert_rejected_and_untouched(base_dir, trained["full"], r"claims blocks \[0, 1, 3, 6, 7\].*declared only blocks \[0, 1, 6, 7\]")
    with pytest.raises(PluginError, match="declared only blocks"):
        plugin_checkpoint(base_dir, trained["full"], base_dir.parent / "out", emulator=trained["emulator"])
    assert not (base_dir.parent / "out").exists()


def test_an_adapter_from_another_emulator_is_refused(base_dir, trained, examples, tmp_path):
    other = compress_checkpoint(base_dir, tmp_path / "emu3", "layerdrop", make_config("layerdrop", num_kept=3))
    assert_rejected_and_untouched(base_dir, trained["full"], "trained on a different emulator", emulator=other)


def test_the_emulator_record_is_just_its_manifest(base_dir, trained, tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    shutil.copy(trained["emulator"] / "manifest.json", record / "manifest.json")  # the owner kept only the manifest
    model = plug_in(base_model(base_dir), trained["full"], emulator=record)
    expected = load_adapter(trained["full"]).tensors
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_genuine_high_learning_rate_fine_tunes_stay_within_the_norm_bound(base_dir, trained, examples, tmp_path):
    """Full blocks at lr 0.1 (2000x the default) and LoRA at lr 0.03 (100x), 60 steps: accepted."""
    emu = trained["emulator"]
    for name, config in {"full": FinetuneConfig(lr=0.1, max_steps=60), "lora": FinetuneConfig(lora=True, lr=0.03, max_steps=60)}.items():
        adapter = finetune(emu, examples, tmp_path / f"hot-{name}", config, progress=False)
        plug_in(base_model(base_dir), adapter, emulator=emu)
    assert MAX_NORM_RATIO == 100.0


def test_the_norm_bound_is_configurable(base_dir, trained):
    edit_tensors(trained["full"], lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", torch.full((64, 32), 1e3)))
    assert_rejected_and_untouched(base_dir, trained["full"], "over the bound")
    plug_in(base_model(base_dir), trained["full"], emulator=trained["emulator"], max_norm_ratio=None)


def test_signed_adapter_is_verified_before_plug_in(base_dir, trained, examples, tmp_path):
    data_key, data_pub = generate_keypair(tmp_path / "keys")
    signed = finetune(trained["emulator"], examples, tmp_path / "signed", FinetuneConfig(max_steps=1), progress=False, sign_key=data_key)
    plug_in(base_model(base_dir), signed, emulator=trained["emulator"], trusted_key=data_pub)
    assert_rejected_and_untouched(base_dir, trained["full"], "is rejected: it is not signed", error=BundleError, trusted_key=data_pub)
    with pytest.raises(BundleError, match="not signed"):
        plugin_checkpoint(base_dir, trained["full"], tmp_path / "out", emulator=trained["emulator"], trusted_key=data_pub)
    out = plugin_checkpoint(base_dir, signed, tmp_path / "out", emulator=trained["emulator"], trusted_key=data_pub, sign_key=data_key)
    assert read_manifest(out, trusted_key=data_pub)["emulator"]["fingerprint"]


def test_a_file_swapped_after_verification_is_refused(base_dir, trained, monkeypatch):
    """Regression (#23.2): the file was hashed, then reopened by path: a writer swapping it in between
    got unhashed tensors loaded. Now the bytes parsed are the bytes hashed."""
    import offsite.bundle as B

    adapter = trained["full"]
    weights = adapter / "adapter.safetensors"
    poisoned = {k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}
    real_verify = B.verify_files

    def verify_then_swap(*args, **kwargs):
        real_verify(*args, **kwargs)
        save_file(poisoned, weights)  # same names, shapes and size: only the hash can tell

    monkeypatch.setattr(B, "verify_files", verify_then_swap)
    with pytest.raises(BundleError, match="changed while read"):
        load_adapter(adapter)


def test_loaded_tensors_are_not_views_of_the_file(base_dir, trained):
    """Regression (#23.2): memory-mapped tensors changed when the file was written after the checks."""
    adapter = trained["full"]
    weights = adapter / "adapter.safetensors"
    bundle = load_adapter(adapter)
    before = {k: v.clone() for k, v in bundle.tensors.items()}
    data = bytearray(weights.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8 + n:] = b"\xff" * (len(data) - 8 - n)  # NaN everywhere, written in place
    with open(weights, "r+b") as f:
        f.write(data)
    assert all(torch.equal(bundle.tensors[k], before[k]) for k in before)


def _edit_lora_config(adapter_dir, change):
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    rehash(adapter_dir)


def test_fan_in_fan_out_on_linear_layers_is_refused_before_the_model_changes(base_dir, trained):
    """Regression (#23.3): fan_in_fan_out=true on nn.Linear passed every check, then PEFT raised and
    left the model wrapped with its logits moved."""
    adapter = trained["lora"]
    _edit_lora_config(adapter, lambda c: c.update(fan_in_fan_out=True))
    model = base_model(base_dir)
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(PluginError, match="fan_in_fan_out=True"):
        plug_in(model, adapter, emulator=trained["emulator"])
    assert not any("lora" in name for name, _ in model.named_modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("ratio", [None, MAX_NORM_RATIO])
def test_lora_factors_that_merge_to_infinity_are_refused(base_dir, trained, ratio):
    """Regression (#23.4): with the norm bound off, finite factors merged to inf and the plugged model
    was written with inf tensors."""
    adapter = trained["lora"]

    def huge(tensors):
        for key in tensors:
            tensors[key] = torch.full_like(tensors[key], 1e20)

    edit_tensors(adapter, huge)
    match = "merges to infinite" if ratio is None else "over the bound"
    assert_rejected_and_untouched(base_dir, adapter, match, emulator=trained["emulator"], max_norm_ratio=ratio)


def test_a_peft_failure_leaves_the_model_unwrapped(base_dir, trained, monkeypatch):
    import offsite.plugin as P

    def broken(peft_model, tensors):
        raise RuntimeError("simulated PEFT failure\nsecond line")

    monkeypatch.setattr(P, "set_peft_model_state_dict", broken)
    model = base_model(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PluginError, match="could not be applied .RuntimeError: simulated PEFT failure.$"):
        plug_in(model, trained["lora"], emulator=trained["emulator"])
    assert not any("lora" in name for name, _ in model.named_modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
