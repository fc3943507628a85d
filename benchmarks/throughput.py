"""Training speed and memory: offsite's data-owner loop against a plain Hugging Face loop, side by side.

    python benchmarks/throughput.py                    # SmolLM2-135M shape, batch 1 x 512, 4 timed steps per mode
    python benchmarks/throughput.py --batch 8 --seq 256
    python benchmarks/throughput.py --tiny --steps 1   # a quick check of the whole path
    THROUGHPUT_SHAPE=opt-1.3b python benchmarks/throughput.py   # on a GPU: the anchor's shapes (opt-1.3b, llama-1b)

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


def build_model(tiny: bool):
    """The random-weight model of the chosen shape, SDPA attention, no KV cache."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if SHAPE in SHAPES:
        kw = dict(SHAPES[SHAPE])
        config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    else:
        config = model_config(tiny)
    config._attn_implementation = "sdpa"
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


def run_offsite(mode: str, steps: int, batch: int, seq: int, tiny: bool) -> dict:
    import torch

    from offsite.adapter import LoraSettings
    from offsite.methods import build_emulator, make_config
    from offsite.surgery import discover_layout, get_blocks, linear_module_names
    from offsite.training import FinetuneConfig, train

    torch.manual_seed(0)
    model, config = build_model(tiny)
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
    ids = torch.randint(0, config.vocab_size, (batch * (steps + 1), seq), generator=torch.Generator().manual_seed(1)).tolist()
    features = [{"input_ids": row, "labels": row} for row in ids]
    settings = FinetuneConfig(lora=lora, lr=1e-5, batch_size=batch, max_steps=steps + 1, max_length=seq, warmup_ratio=0.0,
                              schedule="constant_with_warmup", max_grad_norm=0.0, log_every=10**6,
                              mixed_precision="no" if device() == "cpu" else "auto")  # fp32 on CPU, bf16 autocast on a GPU
    timings = []

    def timed_loss(model_, batch_, head):
        from offsite.lm import causal_lm_loss

        sync()
        timings.append(time.perf_counter())
        return causal_lm_loss(model_, batch_, head)

    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train(model, features, 0, settings, progress=False, loss_fn=timed_loss)
    sync()
    end = time.perf_counter()
    return {"tok_s": round(batch * seq * steps / (end - timings[1]), 1), "trainable_m": round(trainable_params / 1e6, 2)}


def run_plain(mode: str, steps: int, batch: int, seq: int, tiny: bool) -> dict:
    """The shared anchor's plain loop, at this batch and length (the anchor itself runs 1 x 512)."""
    import torch

    torch.manual_seed(0)
    m, config = build_model(tiny)
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
    x = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device())
    m.train()
    for s in range(steps + 1):
        if s == 1:
            sync()
            t0 = time.perf_counter()
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return {"tok_s": round(batch * seq * steps / (time.perf_counter() - t0), 1), "trainable_m": round(sum(p.numel() for p in params) / 1e6, 2)}


def one(loop: str, mode: str, steps: int, batch: int, seq: int, tiny: bool) -> dict:
    import torch

    result = (run_offsite if loop == "offsite" else run_plain)(mode, steps, batch, seq, tiny)
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
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same depth (checks the path in seconds)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--one", nargs=2, metavar=("LOOP", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.steps, args.batch, args.seq, args.tiny)))
        return
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f}: other work shares the CPU, the ratios below are not reliable", file=sys.stderr)
    results = []
    for mode in args.modes.split(","):
        for loop in ("plain", "offsite"):
            cmd = [sys.executable, __file__, "--one", loop, mode, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--seq", str(args.seq)] + (["--tiny"] if args.tiny else [])
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
            if out.returncode != 0:
                raise SystemExit(f"{loop} {mode} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    by = {(r["loop"], r["mode"]): r for r in results}
    lines = ["| mode | plain tokens/s | offsite tokens/s | offsite / plain | plain peak MB | offsite peak MB | offsite / plain memory |",
             "|---|---|---|---|---|---|---|"]
    for mode in args.modes.split(","):
        a, b = by[("plain", mode)], by[("offsite", mode)]
        lines.append(f"| {mode} | {a['tok_s']:,.0f} | {b['tok_s']:,.0f} | {b['tok_s'] / a['tok_s']:.2f}x | {a['peak_rss_mb']:,} | "
                     f"{b['peak_rss_mb']:,} | {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x |")
    if ("offsite", "full") in by and ("offsite", "ot-22+lora") in by:
        f, o = by[("offsite", "full")], by[("offsite", "ot-22+lora")]
        lines.append("")
        lines.append(f"OT 2-22-2 + LoRA against full fine-tuning (offsite loop): {o['tok_s'] / f['tok_s']:.2f}x the tokens/s, "
                     f"{f['peak_rss_mb'] / o['peak_rss_mb']:.2f}x less peak memory (paper, GPT2-XL on a GPU: "
                     f"{PAPER['tokens_per_s']}x and {PAPER['memory']}x).")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "load_average": load, "results": results, "table": table}, indent=1))


if __name__ == "__main__":
    main()
