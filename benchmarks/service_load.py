"""Load test of the owner service on loopback: concurrent data owners download and upload.

    python benchmarks/service_load.py                          # 8 clients, 20 s
    taskset -c 1 python benchmarks/service_load.py --seconds 10  # a 1-core figure

Builds a random Llama (hidden 256, 8 blocks; the emulator bundle is about 19 MB) and a 2+2+2
emulator of it, starts `offsite serve` in a subprocess on 127.0.0.1 (any free port), and runs
`--clients` client threads (two data owners, alternating) for `--seconds`: each repeats a full
download of the bundle (resumable client, every file SHA-256 verified, written to disk) and an
upload of its own adapter bundle (strictly unpacked and verified by the server). Prints
requests/s, download MB/s (end to end, verification included) and uploads/s, then checks that
every upload is listed for its owner with the fingerprint that owner sent, and nothing else.
Traffic stays on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny import VOCAB, tiny_tokenizer  # noqa: E402

from offsite.adapter import FULL_WEIGHTS, load_adapter  # noqa: E402
from offsite.bundle import bundle_fingerprint, read_manifest, write_bundle  # noqa: E402
from offsite.data import Example  # noqa: E402
from offsite.emulator import compress_checkpoint  # noqa: E402
from offsite.methods import make_config  # noqa: E402
from offsite.service.client import Client  # noqa: E402
from offsite.service.store import Store  # noqa: E402
from offsite.training import FinetuneConfig, finetune  # noqa: E402

EMULATOR = "bench-2-2-2"


def build(work: Path, clients: int) -> list[Path]:
    """Base model, published emulator, and one distinct adapter bundle per client."""
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(work / "base")
    tiny_tokenizer().save_pretrained(work / "base")
    (work / "bundles").mkdir()
    emulator = compress_checkpoint(work / "base", work / "bundles" / EMULATOR, "layerdrop", make_config("layerdrop", num_kept=2))
    examples = [Example(f"Question {i}: what is {i} plus one? Answer:", f" {i + 1}") for i in range(8)]
    adapter = finetune(emulator, examples, work / "run", FinetuneConfig(batch_size=4, max_steps=1), progress=False)
    trained = load_adapter(adapter)
    manifest = {k: v for k, v in trained.manifest.items() if k not in ("format", "format_version", "kind", "created_by", "files")}
    variants = []
    for i in range(clients):
        tensors = {k: v + 1e-4 * i for k, v in trained.tensors.items()}
        variants.append(write_bundle(work / f"adapter-{i}", "adapter", manifest,
                                     lambda tmp, t=tensors: save_file(t, tmp / FULL_WEIGHTS, metadata={"format": "pt"})))
    return variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--work", default=None, help="working directory (default: a temporary one, removed afterwards)")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="offsite-service-load-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(work, args.clients, args.seconds)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, clients: int, seconds: float) -> None:
    variants = build(work, clients)
    expected = [bundle_fingerprint(read_manifest(v)) for v in variants]
    store = Store(work / "state")
    owners = ["owner-a", "owner-b"]
    secrets = {name: store.create_token(name) for name in owners}
    store.close()
    server = subprocess.Popen(
        [sys.executable, "-m", "offsite.cli", "serve", "--bundles", str(work / "bundles"), "--state", str(work / "state"),
         "--port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    try:
        line = server.stdout.readline()
        if "listening on" not in line:
            raise SystemExit(f"server did not start: {line!r}")
        url = line.split("listening on ")[1].split()[0]
        bundle_bytes = sum(m["size"] for m in read_manifest(work / "bundles" / EMULATOR)["files"].values())
        print(f"server {url}; bundle {EMULATOR}: {bundle_bytes / 1e6:.1f} MB; {clients} clients for {seconds:.0f} s "
              f"(cpu affinity {sorted(os.sched_getaffinity(0))})")

        requests, downloads, uploads, errors = [0] * clients, [0] * clients, [[] for _ in range(clients)], []
        deadline = time.monotonic() + seconds

        def work_loop(i: int) -> None:
            client = Client(url, secrets[owners[i % 2]])
            try:
                n = 0
                while time.monotonic() < deadline:
                    if n % 2 == 0:
                        out = client.download(EMULATOR, work / f"download-{i}")
                        downloads[i] += 1
                        shutil.rmtree(out)
                    else:
                        uploads[i].append(client.upload(variants[i])["id"])
                    n += 1
            except Exception as e:  # noqa: BLE001 - reported after the run
                errors.append(f"client {i}: {e!r}")
            finally:
                requests[i] = client.requests_sent
                client.close()

        start = time.monotonic()
        threads = [threading.Thread(target=work_loop, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        if errors:
            raise SystemExit("errors: " + "; ".join(errors))

        total_uploads = sum(len(u) for u in uploads)
        print(f"{sum(requests)} requests in {elapsed:.1f} s: {sum(requests) / elapsed:.1f} requests/s")
        print(f"downloads: {sum(downloads)} bundles, {sum(downloads) * bundle_bytes / elapsed / 1e6:.1f} MB/s (verified, on disk)")
        adapter_bytes = sum(m["size"] for m in read_manifest(variants[0])["files"].values())
        print(f"uploads:   {total_uploads} adapter bundles of {adapter_bytes / 1e6:.1f} MB, {total_uploads / elapsed:.1f} uploads/s, "
              f"{total_uploads * adapter_bytes / elapsed / 1e6:.1f} MB/s (unpacked and verified by the server)")
        for o, owner in enumerate(owners):
            listed = {u["id"]: u["fingerprint"] for u in Client(url, secrets[owner]).uploads()}
            mine = {uid: expected[i] for i in range(clients) if i % 2 == o for uid in uploads[i]}
            if listed != mine:
                raise SystemExit(f"{owner}: uploads lost or mixed up ({len(listed)} listed, {len(mine)} sent)")
        print(f"checked: all {total_uploads} uploads listed for their owner with the fingerprint sent, nothing else")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


if __name__ == "__main__":
    main()
