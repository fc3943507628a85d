"""Training speed and memory: offsite's data-owner loop against a plain Hugging Face loop, side by side.

    python benchmarks/throughput.py                    # SmolLM2-135M shape, batch 1 x 512, 4 timed steps per mode
    python benchmarks/throughput.py --batch 8 --seq 256
    python benchmarks/throughput.py --tiny --steps 1   # a quick check of the whole path
    THROUGHPUT_SHAPE=opt-1.3b python benchmarks/throughput.py   # on a GPU: the anchor's shapes (opt-1.3b, llama-1b)
    python benchmarks/throughput.py --data sciq --batch 8 --seq 256 --steps 8 --levers   # real task data; each lever alone

Two workloads. The default is the anchor's: random tokens with labels = inputs, every position
a target, one fixed-length sequence per step. `--data TASK` is what a data owner trains on: the
task's real training examples (prompt + answer, loss on the answer only), tokenised by
SmolLM2's own tokenizer, batches right-padded to their longest member; both loops see the same
examples in the same shuffled order. Tokens/s counts real (unpadded) tokens.

`--levers` (with --data) adds runs of offsite's loop on the OT 2-22-2 emulator with one setting
changed at a time: length-grouped batches, the LM head on every position (as a `labels=` loss
computes it), eager attention instead of SDPA, activation checkpointing.

Modes (as the OT paper's efficiency table and ../shared/tools/anchor_efficiency_cpu.py): full
fine-tuning, full + LoRA r 8, OT 2-22-2 (full adapter blocks), OT 2-22-2 + LoRA, OT 2-13-2 + LoRA,
on random weights of the SmolLM2-135M shape (Llama, 30 blocks, d 576, vocab 49,152, tied head).
Every (mode, loop) runs in a fresh process: "plain" is the shared anchor's loop (a forward with
labels, backward, AdamW), "offsite" is offsite's own path, the emulator built by
`offsite.methods` and trained by `offsite.training.train` (answer-only loss head, accelerate,
AdamW over the trainable tensors only). Same model, same random tokens (labels = inputs), same
batch, lr 1e-5, fp32 on CPU. Tokens/s counts the timed steps after one warm-up step; memory is the
process's peak RSS (ru_maxrss), imports included for both. Ratios are only meaningful within one
run on an otherwise idle machine: the script prints a warning when the load average says otherwise.

The OT paper reports OT + LoRA against full fine-tuning at 6.5x the tokens/s and 5.6x less memory
(GPT2-XL, one GPU). A 135M model differs: its embedding and head (28 M of 135 M parameters, the
head's logits over 49,152 tokens) are computed in every mode, so removing middle blocks saves a
smaller share of the work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("full", "full+lora", "ot-22", "ot-22+lora", "ot-13+lora")
PAPER = {"tokens_per_s": 6.5, "memory": 5.6}


# The anchor's GPU shapes (../shared/tools/anchor_efficiency.py); "smollm2" is the CPU record's.
SHAPES = {
    "opt-1.3b": dict(model_type="opt", hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32, vocab_size=50272,
                     max_position_embeddings=2048, word_embed_proj_dim=2048, do_layer_norm_before=True),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True),
    "opt-tiny": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=8, num_attention_heads=4, vocab_size=1000,
                     max_position_embeddings=1024, word_embed_proj_dim=64),  # checks the OPT path on a CPU
}
SHAPE = os.environ.get("THROUGHPUT_SHAPE", "smollm2")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    """Wait for queued GPU work, so a clock read means what it says (no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(tiny: bool, attention: str = "sdpa"):
    """The random-weight model of the chosen shape, SDPA attention unless told, no KV cache."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if SHAPE in SHAPES:
        kw = dict(SHAPES[SHAPE])
        config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    else:
        config = model_config(tiny)
    config._attn_implementation = attention
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model.to(device()), config


def model_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2,
                           vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True)
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


LEVERS = ("group_by_length", "full_head", "eager", "checkpointing")


def features_for(args, vocab_size: int) -> list[dict]:
    """The training features, (steps + 1) batches' worth; both loops shuffle them with `epoch_order` (seed 0)."""
    import torch

    n = args.batch * (args.steps + 1)
    if not args.data:
        ids = torch.randint(0, vocab_size, (n, args.seq), generator=torch.Generator().manual_seed(1)).tolist()
        return [{"input_ids": row, "labels": row} for row in ids]
    from transformers import AutoTokenizer

    from offsite.lm import tokenize_examples
    from offsite.models import resolve_model
    from offsite.tasks import load_train_examples

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")[0], local_files_only=True)
    features = tokenize_examples(tokenizer, load_train_examples(args.data, limit=n, seed=0), args.seq)
    if args.tiny:  # the tiny model's vocabulary is smaller than the tokenizer's
        features = [{k: [t % vocab_size if t >= 0 else t for t in v] for k, v in f.items()} for f in features]
    return features


def full_head_loss(model, batch, head=None):
    """The loss as `labels=` computes it: logits (and their gradient) at every position."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False).loss


def run_offsite(mode: str, args, lever: str | None = None) -> dict:
    import torch

    from offsite.adapter import LoraSettings
    from offsite.methods import build_emulator, make_config
    from offsite.surgery import discover_layout, get_blocks, linear_module_names
    from offsite.training import FinetuneConfig, train

    torch.manual_seed(0)
    model, config = build_model(args.tiny, "eager" if lever == "eager" else "sdpa")
    if mode.startswith("ot"):
        k = min(int(mode.split("-")[1].split("+")[0]), config.num_hidden_layers - 4)
        emulator = build_emulator(model, "layerdrop", make_config("layerdrop", num_kept=k))
        model, trainable, layout = emulator.model, emulator.trainable, emulator.layout
    else:
        layout = discover_layout(model)
        trainable = list(range(layout.num_blocks))
    model.requires_grad_(False)
    lora = mode.endswith("+lora")
    if lora:
        from peft import get_peft_model

        targets = linear_module_names(model, layout, trainable)
        model = get_peft_model(model, LoraSettings(8, 16.0, targets).to_peft())
    elif mode.startswith("ot"):
        for i in trainable:
            get_blocks(model, layout)[i].requires_grad_(True)
    else:
        model.requires_grad_(True)
    features = features_for(args, config.vocab_size)
    settings = FinetuneConfig(lora=lora, lr=1e-5, batch_size=args.batch, max_steps=args.steps + 1, max_length=args.seq,
                              warmup_ratio=0.0, schedule="constant_with_warmup", max_grad_norm=0.0, log_every=10**6,
                              group_by_length=lever == "group_by_length", gradient_checkpointing=lever == "checkpointing",
                              mixed_precision="no" if device() == "cpu" else "auto")  # fp32 on CPU, bf16 autocast on a GPU
    timings, tokens = [], []

    def timed_loss(model_, batch_, head):
        from offsite.lm import causal_lm_loss

        sync()
        timings.append(time.perf_counter())
        tokens.append(int(batch_["attention_mask"].sum()))
        return (full_head_loss if lever == "full_head" else causal_lm_loss)(model_, batch_, head)

    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = train(model, features, 0, settings, progress=False, loss_fn=timed_loss)
    sync()
    end = time.perf_counter()
    return {"tok_s": round(sum(tokens[1:]) / (end - timings[1]), 1), "trainable_m": round(trainable_params / 1e6, 2),
            "padding_fraction": result.metrics["padding_fraction"]}


def run_plain(mode: str, args) -> dict:
    """The shared anchor's plain loop, at this batch and length (the anchor itself runs 1 x 512)."""
    import torch

    from offsite.data import epoch_order, pad_batch

    torch.manual_seed(0)
    m, config = build_model(args.tiny)
    layers = config.num_hidden_layers
    container = m.model.decoder if hasattr(m.model, "decoder") else m.model  # OPT keeps its blocks in model.decoder
    if mode.startswith("ot"):
        k = min(int(mode.split("-")[1].split("+")[0]), layers - 4)
        mid = list(range(2, layers - 2))
        keep = [mid[round(i * (len(mid) - 1) / (k - 1))] for i in range(k)]
        idx = [0, 1] + keep + [layers - 2, layers - 1]
        container.layers = torch.nn.ModuleList([container.layers[i] for i in idx])
        for i, layer in enumerate(container.layers):
            if hasattr(layer.self_attn, "layer_idx"):
                layer.self_attn.layer_idx = i
        m.config.num_hidden_layers = len(idx)
        if getattr(m.config, "layer_types", None):
            m.config.layer_types = m.config.layer_types[: len(idx)]
        train_blocks = [0, 1, len(idx) - 2, len(idx) - 1]
    else:
        train_blocks = list(range(layers))
    m.requires_grad_(False)
    if mode.endswith("+lora"):
        from peft import LoraConfig, get_peft_model

        prefix = "model.decoder.layers." if hasattr(m.model, "decoder") else "model.layers."
        targets = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n.startswith(prefix)
                   and int(n[len(prefix):].split(".")[0]) in train_blocks]
        m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    elif mode.startswith("ot"):
        for i in train_blocks:
            container.layers[i].requires_grad_(True)
    else:
        m.requires_grad_(True)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    features = features_for(args, config.vocab_size)
    features = [features[i] for i in epoch_order(len(features), 0, 0)]  # the order offsite's loop draws (seed 0, epoch 0)
    batches = [pad_batch(features[i : i + args.batch], 0) for i in range(0, len(features), args.batch)]
    m.train()
    tokens = 0
    for s, b in enumerate(batches):
        if s == 1:
            sync()
            t0 = time.perf_counter()
        if s >= 1:
            tokens += int(b["attention_mask"].sum())
        b = {k: v.to(device()) for k, v in b.items()}
        loss = m(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    padded = sum(b["attention_mask"].numel() for b in batches)
    return {"tok_s": round(tokens / (time.perf_counter() - t0), 1), "trainable_m": round(sum(p.numel() for p in params) / 1e6, 2),
            "padding_fraction": round(1 - sum(int(b["attention_mask"].sum()) for b in batches) / padded, 4)}


def one(loop: str, mode: str, args) -> dict:
    import torch

    lever = None
    if loop.startswith("offsite+"):
        loop, lever = loop.split("+", 1)
    result = run_offsite(mode, args, lever) if loop == "offsite" else run_plain(mode, args)
    loop = f"offsite+{lever}" if lever else loop
    if device() == "cuda":  # the accelerator's own peak, as the paper measures it
        torch.cuda.synchronize()
        return {"loop": loop, "mode": mode, **result, "peak_rss_mb": round(torch.cuda.max_memory_allocated() / 2**20),
                "memory": "torch.cuda.max_memory_allocated", "device": torch.cuda.get_device_name()}
    return {"loop": loop, "mode": mode, **result, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "memory": "ru_maxrss", "device": "cpu"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode (after one warm-up step)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512, help="sequence length (with --data: the truncation length)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--data", default=None, help="train on this task's real examples (e.g. sciq) instead of random tokens")
    p.add_argument("--levers", action="store_true", help="with --data: also offsite's loop on ot-22 with each lever alone")
    p.add_argument("--repeats", type=int, default=1, help="run the whole list this many times, interleaved; report the median")
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same depth (checks the path in seconds)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--update-readme", metavar="MARKER", default=None,
                   help="also put the table between README.md's <!-- MARKER:start/end --> (throughput-data, throughput-random)")
    p.add_argument("--one", nargs=2, metavar=("LOOP", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.levers and not args.data:
        raise SystemExit("--levers needs --data: padding and the answer-only head only matter on real examples")
    if args.one:
        print(json.dumps(one(*args.one, args)))
        return
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f}: other work shares the CPU, the ratios below are not reliable", file=sys.stderr)
    modes = args.modes.split(",")
    runs = [(loop, mode) for mode in modes for loop in ("plain", "offsite")]
    if args.levers:
        runs += [(f"offsite+{lever}", "ot-22") for lever in LEVERS]
    passthrough = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)] + \
        (["--tiny"] if args.tiny else []) + (["--data", args.data] if args.data else [])
    samples: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):  # rounds, so slow drift in the machine's load hits every run alike
        for loop, mode in runs:
            out = subprocess.run([sys.executable, __file__, "--one", loop, mode, *passthrough], capture_output=True, text=True,
                                 cwd=Path(__file__).parent)
            if out.returncode != 0:
                raise SystemExit(f"{loop} {mode} failed:\n{out.stderr[-3000:]}")
            samples.setdefault((loop, mode), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(samples[(loop, mode)][-1]), flush=True)
    results = [median_of(runs_) for runs_ in samples.values()]
    table = tables(results, modes, args)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "load_average": load, "results": results, "table": table}, indent=1))
    if args.update_readme:
        sys.path.insert(0, str(Path(__file__).parent))
        from record import update_readme

        update_readme(args.update_readme, table)


def median_of(samples: list[dict]) -> dict:
    """One run's figures from its repeats: the median tokens/s, the largest peak memory, every sample kept."""
    import statistics

    return {**samples[0], "tok_s": round(statistics.median(r["tok_s"] for r in samples), 1),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in samples), "tok_s_samples": [r["tok_s"] for r in samples]}


def tables(results: list[dict], modes: list[str], args) -> str:
    by = {(r["loop"], r["mode"]): r for r in results}
    workload = f"{args.data} train examples (answer-only loss), batch {args.batch}, truncated at {args.seq}" if args.data \
        else f"random tokens, every position a target, batch {args.batch} x {args.seq}"
    lines = [f"Workload: {workload}; {args.steps} timed steps; median of {args.repeats} interleaved run(s).", "",
             "| mode | plain tokens/s | offsite tokens/s | offsite / plain | plain peak MB | offsite peak MB | offsite / plain memory |",
             "|---|---|---|---|---|---|---|"]
    for mode in modes:
        a, b = by[("plain", mode)], by[("offsite", mode)]
        lines.append(f"| {mode} | {a['tok_s']:,.0f} | {b['tok_s']:,.0f} | {b['tok_s'] / a['tok_s']:.2f}x | {a['peak_rss_mb']:,} | "
                     f"{b['peak_rss_mb']:,} | {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x |")
    for loop in ("plain", "offsite"):
        if (loop, "full") in by and (loop, "ot-22+lora") in by:
            f, o = by[(loop, "full")], by[(loop, "ot-22+lora")]
            lines += ["", f"OT 2-22-2 + LoRA against full fine-tuning ({loop} loop): {o['tok_s'] / f['tok_s']:.2f}x the tokens/s, "
                          f"{f['peak_rss_mb'] / o['peak_rss_mb']:.2f}x less peak memory (paper, GPT2-XL on a GPU: "
                          f"{PAPER['tokens_per_s']}x and {PAPER['memory']}x)."]
    base = by.get(("offsite", "ot-22"))
    levers = [r for r in results if r["loop"].startswith("offsite+")]
    if base and levers:
        lines += ["", "Each lever alone, offsite's loop on OT 2-22-2 (full adapter blocks):", "",
                  "| setting | tokens/s | vs offsite default | peak MB | vs offsite default | padding share |", "|---|---|---|---|---|---|",
                  f"| offsite default (answer-only head, SDPA, shuffled batches) | {base['tok_s']:,.0f} | 1.00x | {base['peak_rss_mb']:,} | "
                  f"1.00x | {base.get('padding_fraction', 0):.1%} |"]
        names = {"group_by_length": "+ length-grouped batches", "full_head": "LM head on every position (labels= loss)",
                 "eager": "eager attention instead of SDPA", "checkpointing": "+ activation checkpointing"}
        for r in levers:
            lever = r["loop"].split("+", 1)[1]
            lines.append(f"| {names[lever]} | {r['tok_s']:,.0f} | {r['tok_s'] / base['tok_s']:.2f}x | {r['peak_rss_mb']:,} | "
                         f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x | {r.get('padding_fraction', 0):.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
