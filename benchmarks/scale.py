"""Owner-side work on a checkpoint of real size: peak memory and wall time of streamed LayerDrop compress
and plug-in on a random-weight, Mistral-7B-shaped bf16 checkpoint, against one read of its files.

    python benchmarks/scale.py                       # writes ~15 GB under runs/scale, measures, deletes it
    python benchmarks/scale.py --keep                # keep the checkpoint for another run
    python benchmarks/scale.py --layers 6            # a quick look (a 6-block model of the same width)
    python benchmarks/scale.py --update-readme       # also rewrite the README's scale table

The checkpoint is Llama-architecture with Mistral-7B's shape (hidden 4096, MLP 14336, 32 blocks, 32
heads, 8 KV heads) and SmolLM2's tokenizer (vocabulary 49,152): 7.4B parameters, bf16, written in
5 GB shards with transformers' index. Its weights are random (the figures are about bytes, not
quality) and are written one tensor at a time, so writing it needs no memory either.

Each stage runs in a fresh process that reports its peak resident set size (ru_maxrss, imports
included) and its wall time; the page cache is dropped before each (when this process may: root on
Linux), so every stage reads the files from disk as the first read does. Stages:
- read once: every shard file read sequentially into a reusable buffer (the yardstick);
- copy once: every shard read and written to a new file, then fsynced (what a plug-in, which
  rewrites the whole model, cannot beat);
- compress: `offsite compress --method layerdrop` 2-14-2 (streamed, the default for LayerDrop);
- GradOT: its support pass, scores and selection on the 2-14-2 blocks LayerDrop keeps, which are all
  it loads (one tensor at a time from the checkpoint), K-FAC statistics one middle block per pass;
- plug-in: the merged plug-in of a 2+2 full-block adapter, and of a LoRA adapter (r 16 on every
  linear layer of the 2+2 blocks), both streamed (the default for a merged plug-in). The adapters are
  what the data owner's code writes (`save_adapter` on the loaded emulator, weights perturbed in
  place of training), made in a process that is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from record import ROOT, update_readme

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
             rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def stage(name: str, args: argparse.Namespace) -> dict:
    """Run one stage in a fresh process; its result plus peak RSS and wall time."""
    cold = drop_page_cache()
    out = subprocess.run([sys.executable, __file__, "--stage", name, "--dir", str(args.dir), "--layers", str(args.layers)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"stage {name} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cold_cache"] = cold
    print(f"{name}: {result}", flush=True)
    return result


def run_stage(name: str, directory: Path, layers: int) -> dict:
    import psutil
    import torch  # noqa: F401  (imports are part of every real command's footprint, and are counted)

    import offsite.emulator  # noqa: F401
    import offsite.plugin  # noqa: F401

    after_imports = psutil.Process().memory_info().rss
    start = time.perf_counter()
    detail = STAGES[name](directory, layers)
    if name in ("gradot", "scaleot"):  # usually run on their own (an hour); their ratio is to the read of the same run
        previous = ROOT / "benchmarks" / "results" / "scale" / f"scale-{layers}.json"
        if previous.exists() and "read" in json.loads(previous.read_text()):
            detail["read_seconds"] = json.loads(previous.read_text())["read"]["seconds"]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20), "rss_after_imports_mb": round(after_imports / 2**20), **detail}


# ---------------------------------------------------------------- stages
def write_checkpoint(directory: Path, layers: int) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from offsite.models import resolve_model
    from offsite.streaming import ShardedWriter

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")[0], local_files_only=True)
    config = LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **SHAPE)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = meta.state_dict()
    path = directory / "base"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    plan = [(name, torch.bfloat16, tuple(t.shape)) for name, t in state.items()]
    writer = ShardedWriter(path, plan)
    generator = torch.Generator().manual_seed(0)
    for name, t in state.items():
        value = torch.randn(t.shape, generator=generator, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        if name.endswith("norm.weight"):
            value.fill_(1.0)
        writer.write(name, value.reshape(-1).view(torch.uint8).numpy().tobytes())
        del value
    writer.close()
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"parameters": sum(t.numel() for t in state.values()), "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))}


def read_once(directory: Path, layers: int) -> dict:
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    total = 0
    for file in sorted((directory / "base").glob("*.safetensors")):
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return {"bytes": total}


def copy_once(directory: Path, layers: int) -> dict:
    """The files read and written once, as `cp` does and then synced: what a plug-in, which rewrites the
    whole model, cannot beat."""
    out = directory / "copy"
    out.mkdir(exist_ok=True)
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    total = 0
    for file in sorted((directory / "base").glob("*.safetensors")):
        with open(file, "rb", buffering=0) as src, open(out / file.name, "wb", buffering=0) as dst:
            while n := src.readinto(view):
                dst.write(view[:n])
                total += n
            os.fsync(dst.fileno())
    shutil.rmtree(out)
    return {"bytes": total}


def compress(directory: Path, layers: int) -> dict:
    from offsite.emulator import compress_checkpoint
    from offsite.methods import make_config

    out = directory / "emulator"
    kept = max(2, (layers - 4) // 2)
    compress_checkpoint(directory / "base", out, "layerdrop", make_config("layerdrop", num_kept=kept), overwrite=out.exists())
    return {"kept_middle": kept, "bytes_written": sum(f.stat().st_size for f in out.glob("*.safetensors"))}


def gradot(directory: Path, layers: int) -> dict:
    """GradOT on the blocks LayerDrop keeps (2-14-2 of 32), loaded from the checkpoint tensor by tensor, one
    middle block's K-FAC statistics per support pass; a small support set (the figures are memory and time)."""
    from offsite.emulator import compress_checkpoint
    from offsite.methods import make_config

    out = directory / "emulator-gradot"
    kept = max(2, (layers - 4) // 2)
    middle = layers - 4
    config = make_config("gradot", num_kept=kept, target_fraction=round(0.8 * kept / middle, 4), support_size=GRADOT_SUPPORT[0],
                         support_max_length=GRADOT_SUPPORT[1], support_batch_size=GRADOT_SUPPORT[0], blocks_per_pass=1)
    compress_checkpoint(directory / "base", out, "gradot", config, overwrite=out.exists())
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shutil.rmtree(out)
    return {"kept_middle": kept, "target_fraction": config.target_fraction, "support": list(GRADOT_SUPPORT), "bytes_written": written}


GRADOT_SUPPORT = (4, 64)  # sequences, tokens each


def scaleot(directory: Path, layers: int) -> dict:
    """ScaleOT stage (a) block by block (offsite.methods.scaleot_onload): every middle block's harmonizer fitted
    on its own input -> output, then the direct swap measurement that ranks the blocks; a small data set (the
    figures are memory and time: both grow with the rows carried, not with the model's size in memory)."""
    from offsite.methods.scaleot import ImportanceConfig
    from offsite.methods.scaleot_onload import onload_importance

    out = directory / "scaleot-artifact"
    config = ImportanceConfig(objective="local", onload=True, steps=SCALEOT["steps"], batch_size=4, block_size=SCALEOT["tokens"],
                              data_chars=SCALEOT["chars"], heldout_fraction=0.2, direct_sequences=SCALEOT["direct"], device="cpu")
    onload_importance(directory / "base", out, config, overwrite=out.exists(), progress=False, log=lambda *_: None, work_dir=directory)
    manifest = json.loads((out / "manifest.json").read_text())["scaleot"]
    shutil.rmtree(out)
    return {"middle": len(manifest["middle"]), "train_blocks": manifest["training"]["train_blocks"], **SCALEOT}


SCALEOT = {"steps": 20, "tokens": 64, "chars": 6000, "direct": 2}  # per harmonizer; tokens per sequence; generic text; held-out sequences


def make_adapters(directory: Path, layers: int) -> dict:
    """The data owner's side, not measured: the trainable parts made as `offsite finetune` makes them,
    perturbed in place of training, and saved as it saves them."""
    import torch

    from offsite.adapter import save_adapter
    from offsite.emulator import load_emulator
    from offsite.training import FinetuneConfig, make_trainable

    generator = torch.Generator().manual_seed(1)
    training = {"note": "benchmarks/scale.py: weights perturbed, not trained"}
    for kind, config in (("full", FinetuneConfig()), ("lora", FinetuneConfig(lora=True, lora_r=16, lora_alpha=32.0))):
        emulator = load_emulator(directory / "emulator")
        model, lora = make_trainable(emulator, config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator).mul_(1e-3).to(p.dtype))
        out = directory / f"adapter-{kind}"
        save_adapter(model, emulator, out, training, lora=lora, overwrite=out.exists())
        del model, emulator
    return {}


def plugin(kind: str):
    def run(directory: Path, layers: int) -> dict:
        from offsite.plugin import plugin_checkpoint

        out = directory / f"plugged-{kind}"
        plugin_checkpoint(directory / "base", directory / f"adapter-{kind}", out, overwrite=out.exists())
        adapter_bytes = sum(f.stat().st_size for f in (directory / f"adapter-{kind}").rglob("*.safetensors"))
        written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        shutil.rmtree(out)  # after the clock stops: two plugged 7B copies need not share the disk
        return {"bytes_written": written, "adapter_bytes": adapter_bytes}

    return run


STAGES = {"write": write_checkpoint, "read": read_once, "compress": compress, "adapters": make_adapters,
          "plugin-full": plugin("full"), "plugin-lora": plugin("lora"), "gradot": gradot,
          "copy": copy_once, "scaleot": scaleot}
ORDER = ["write", "read", "copy", "compress", "adapters", "plugin-full", "plugin-lora", "gradot", "scaleot"]


# ---------------------------------------------------------------- the record
def table(results: dict, args) -> str:
    read = results["read"]["seconds"]
    gb = results["write"]["bytes"] / 1e9
    cold = "page cache dropped before each stage" if results["read"]["cold_cache"] else "page cache NOT dropped (not root): warm reads"
    lines = [
        f"Random-weight Llama checkpoint of Mistral-7B's shape, {args.layers} blocks, {results['write']['parameters'] / 1e9:.2f}B "
        f"parameters, bf16, {gb:.1f} GB in 5 GB shards; this machine (2 cores, 24 GiB, {cold}). Peak RSS is the whole "
        f"process (ru_maxrss; {results['read']['rss_after_imports_mb']:,} MB of it is Python, torch and transformers after imports).",
        "",
        "| stage | wall time (s) | × one read | × one copy | peak RSS (MB) | written (GB) |",
        "|---|---|---|---|---|---|",
    ]
    rows = [("read the checkpoint files once", "read"), ("copy the checkpoint files once (read, write, fsync)", "copy"), (f"LayerDrop compress 2-{results['compress']['kept_middle']}-2 (streamed)", "compress"),
            ("plug-in, 2+2 full blocks merged (streamed)", "plugin-full"), ("plug-in, LoRA r 16 merged (streamed)", "plugin-lora")]
    if "gradot" in results:
        g = results["gradot"]
        rows.append((f"GradOT on the kept 2-{g['kept_middle']}-2 blocks, middle to {100 * g['target_fraction']:.0f}% "
                     f"(support {g['support'][0]} x {g['support'][1]} tokens, 1 block per pass)", "gradot"))
    if "scaleot" in results:
        g = results["scaleot"]
        rows.append((f"ScaleOT stage (a) block by block: {g['middle']} harmonizers fitted locally ({g['steps']} steps each) and the "
                     f"direct swap ranking ({g['train_blocks']} training x {g['tokens']} tokens, {g['direct']} held-out)", "scaleot"))
    for label, key in rows:
        if key not in results:
            continue
        r = results[key]
        written = f"{r['bytes_written'] / 1e9:.1f}" if "bytes_written" in r else f"{r['bytes'] / 1e9:.1f}" if key == "copy" else "–"
        yardstick = r.get("read_seconds", read)  # a stage measured in another run is compared with that run's read
        copy = f"{r['seconds'] / results['copy']['seconds']:.2f}" if "copy" in results and "read_seconds" not in r else "–"
        lines.append(f"| {label} | {r['seconds']:.1f} | {r['seconds'] / yardstick:.2f} | {copy} | {r['peak_rss_mb']:,} | {written} |")
    if "plugin-full" in results:
        full = results["plugin-full"]
        lines += ["", f"The full-block adapter is {full['adapter_bytes'] / 1e9:.2f} GB (bf16); plug-in reads it one tensor at a time "
                  "from a private verified copy, and never holds the base model."]
    for key, name in (("gradot", "GradOT"), ("scaleot", "ScaleOT's stage (a)")):
        if key in results and "read_seconds" in results[key]:
            lines += [f"{name} ran in a separate run; its ratio is to the read measured before it ({results[key]['read_seconds']:.1f} s)."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=ROOT / "runs" / "scale")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    p.add_argument("--skip", nargs="*", default=[], choices=ORDER[1:], help="stages to leave out (e.g. gradot: ~1 h on 2 cores)")
    p.add_argument("--update-readme", action="store_true")
    p.add_argument("--table", action="store_true", help="only rebuild the table from the recorded figures")
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.layers < 6:
        p.error("--layers must be at least 6 (2 + 2 adapter blocks and a middle of 2 or more)")
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.dir, args.layers)))
        return
    if args.table:
        out = ROOT / "benchmarks" / "results" / "scale"
        text = table(json.loads((out / f"scale-{args.layers}.json").read_text()), args)
        (out / f"table-{args.layers}.md").write_text(text + "\n")
        print(text)
        if args.update_readme and args.layers == 32:
            update_readme("scale", text)
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    out = ROOT / "benchmarks" / "results" / "scale"
    out.mkdir(parents=True, exist_ok=True)
    out_json = out / f"scale-{args.layers}.json"
    # Stages left out keep their earlier figures (a later run may measure only GradOT, say).
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    try:
        for name in ORDER:
            if name in args.skip:
                continue
            results[name] = stage(name, args)
            out_json.write_text(json.dumps(results, indent=1) + "\n")  # what is measured survives a later failure
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    text = table(results, args)
    (out / f"table-{args.layers}.md").write_text(text + "\n")
    print("\n" + text)
    if args.update_readme and args.layers == 32:
        update_readme("scale", text)


if __name__ == "__main__":
    main()
