"""Model cards: the README.md (YAML front matter + a short account) every bundle carries, so an
emulator, an adapter or a plugged model is hub-ready and says what it is without offsite."""

from __future__ import annotations

import json


def _front_matter(fields: dict) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(v)}" for v in value]
        elif value not in (None, ""):
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---", ""])


def model_card(kind: str, manifest: dict) -> str:
    """The card of a bundle of `kind` (emulator, adapter, plugged) from its manifest's content."""
    base = manifest.get("base", {})
    method = (manifest.get("method") or manifest.get("emulator", {}).get("method") or {}).get("name", "")
    adapter = manifest.get("adapter", {})
    peft = kind == "adapter" and adapter.get("type") == "lora" or (kind == "plugged" and not adapter.get("merged", True))
    fields = {
        "library_name": "peft" if peft else "transformers",
        "base_model": base.get("name") or None,
        "pipeline_tag": "text-generation",
        "tags": ["offsite", "offsite-tuning", kind] + ([method] if method else []),
    }
    title = {"emulator": "Offsite-tuning emulator", "adapter": "Offsite-tuning adapter", "plugged": "Offsite-tuned model"}[kind]
    body = [f"# {title}", ""]
    if kind == "emulator":
        blocks = manifest.get("blocks", {})
        body += [
            f"A lossy stand-in for `{base.get('name') or 'the base model'}` ({base.get('model_type')}, {base.get('num_blocks')} blocks), "
            f"made by offsite with the `{method}` method. It holds {len(blocks.get('map', []))} blocks: emulator -> original "
            f"{blocks.get('map')}. Blocks {blocks.get('trainable')} (original {blocks.get('adapter')}) are the adapter a data owner "
            "fine-tunes; the others are the compressed middle and stay frozen. The full model is not in this bundle.",
            "",
            f"Method parameters: `{json.dumps({k: v for k, v in manifest.get('method', {}).get('params', {}).items() if k != 'result'})}`.",
        ]
        if "structure" in manifest:
            body += ["", f"{len(manifest['structure'])} middle modules are restructured (declared in manifest.json, rebuilt by "
                     "`offsite.emulator.load_emulator`); plain transformers cannot load this checkpoint."]
    elif kind == "adapter":
        training = manifest.get("training", {})
        metrics = manifest.get("metrics", {})
        body += [
            f"A {adapter.get('type')} adapter for the original blocks {adapter.get('blocks')} of `{base.get('name') or 'the base model'}`, "
            f"trained on an emulator made with `{method}`. Keys name the full model's blocks.",
            "",
            f"Training: lr {training.get('learning_rate')}, batch {training.get('batch_size')} x {training.get('grad_accum')}, "
            f"{metrics.get('steps')} steps, loss {metrics.get('first_loss')} -> {metrics.get('final_loss')}.",
        ]
        if adapter.get("type") == "lora":
            body += ["", "Load it with PEFT on the full model (`PeftModel.from_pretrained(model, this_dir)`), or on the emulator it "
                     "was trained on from `emulator/`."]
    else:
        body += [
            f"`{base.get('name') or 'The base model'}` with an offsite-tuned {adapter.get('type')} adapter plugged in"
            + (" (LoRA merged)." if adapter.get("merged", True) else " (kept as a PEFT adapter)."),
            "",
            f"Adapter fingerprint {str(adapter.get('fingerprint', ''))[:16]}.",
        ]
    body += ["", "Made with [offsite](https://pypi.org/project/offsite/); manifest.json records the details and the SHA-256 of every file."]
    return _front_matter(fields) + "\n".join(body) + "\n"
