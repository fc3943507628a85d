"""Crash safety: `kill -9` during fine-tuning, checkpointing or bundle export, then resume/retry.

Properties: a killed process never leaves a corrupt artifact where a finished one is expected
(no `adapter/` or emulator bundle until it is complete; every `step-N` checkpoint that
`--resume` would consider is complete), leftover temp dirs break nothing and are cleaned up by
the next run, and a resumed run reaches bit-for-bit the adapter of an uninterrupted run with
the same seed. Every run is a real `offsite` process killed with SIGKILL, either from outside
or by itself at an exact point (a patched writer, see KILLER).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from offsite.bundle import read_manifest
from offsite.checkpoint import FILES, list_checkpoints
from offsite.data import Example, save_examples
from offsite.emulator import compress_checkpoint
from offsite.methods import make_config
from offsite.signing import generate_keypair
from tiny import save_tiny_checkpoint

pytestmark = pytest.mark.slow

# Runs `offsite ARGS...`, after patching one writer to SIGKILL the process at the point named
# by $OFFSITE_TEST_KILL.
KILLER = r'''
import os, signal, sys

def die():
    os.kill(os.getpid(), signal.SIGKILL)

point = os.environ.get("OFFSITE_TEST_KILL", "")
if point == "checkpoint-3":  # after the first file of checkpoint step 3
    import offsite.checkpoint as c
    real, calls = c.save_file, [0]
    def save_file(tensors, path, *a, **k):
        real(tensors, path, *a, **k)
        calls[0] += 1
        if calls[0] == 7:
            die()
    c.save_file = save_file
elif point == "adapter-weights":  # half-way through writing the adapter's weights
    import offsite.adapter as a
    def save_file(tensors, path, *args, **kwargs):
        from safetensors.torch import save_file as real
        real(tensors, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        die()
    a.save_file = save_file
elif point == "bundle-files":  # every file written, nothing hashed yet
    import offsite.bundle as b
    b._listed_files = lambda *a, **k: die()
elif point == "bundle-manifest":  # half of manifest.json written
    import offsite.bundle as b
    def write(path, data):
        with open(path, "xb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        die()
    b.write_synced = write
elif point == "bundle-rename":  # complete and signed, not yet renamed into place
    import offsite.bundle as b
    b._replace_dir = lambda *a, **k: die()

from offsite.cli import main
sys.exit(main(sys.argv[1:]))
'''

STEPS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    save_tiny_checkpoint("llama", root / "base")
    compress_checkpoint(root / "base", root / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    save_examples([Example(f"Question {i}: what is {i} plus one? Answer:", f" {i + 1}") for i in range(24)], root / "train.jsonl")
    (root / "killer.py").write_text(KILLER)
    return root


def offsite(root, *args, kill=None, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OFFSITE_TEST_KILL": kill or ""}
    env.pop("OFFSITE_TRUSTED_KEY", None)
    cmd = [sys.executable, str(root / "killer.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        proc.output = proc.communicate(timeout=300)[0]
    return proc


def finetune_args(root, out, *extra):
    return ("finetune", "--bundle", root / "emu", "--data", root / "train.jsonl", "--out", out, "--max-steps", STEPS,
            "--batch-size", 4, "--lr", "1e-3", "--checkpoint-every", 1, "--seed", 3, *extra)


def assert_only_complete_checkpoints(run):
    for ckpt in list_checkpoints(run / "checkpoints"):
        for name in FILES:
            if name.endswith(".safetensors"):
                load_file(ckpt / name)  # complete and readable
            else:
                assert (ckpt / name).read_text().startswith("{")


def test_killed_fine_tuning_resumes_to_the_same_adapter(setup):
    root = setup
    reference = offsite(root, *finetune_args(root, root / "reference"), wait=False)  # runs alongside
    run = root / "run"

    # 1. killed in the middle of writing checkpoint 3: steps 1-2 are the only checkpoints.
    proc = offsite(root, *finetune_args(root, run), kill="checkpoint-3")
    assert proc.returncode == -signal.SIGKILL, proc.output[-2000:]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000001", "step-00000002"]
    assert [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")], "expected the torn temp dir"
    assert not (run / "adapter").exists()
    assert_only_complete_checkpoints(run)

    # 2. resumed, then killed from outside at an arbitrary moment after checkpoint 6.
    proc = offsite(root, *finetune_args(root, run, "--resume"), wait=False)
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "step-00000006").exists():
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "adapter").exists()
    assert_only_complete_checkpoints(run)

    # 3. resumed, then killed half-way through writing the adapter bundle.
    proc = offsite(root, *finetune_args(root, run, "--resume"), kill="adapter-weights")
    assert proc.returncode == -signal.SIGKILL, proc.output[-2000:]
    assert not (run / "adapter").exists(), "a half-written adapter is where the finished one belongs"
    assert [p for p in run.iterdir() if p.name.startswith(".adapter.tmp-")]
    assert list_checkpoints(run / "checkpoints")[-1].name == f"step-{STEPS:08d}"

    # 4. resumed once more: exports from the last checkpoint; leftovers are cleaned up.
    proc = offsite(root, *finetune_args(root, run, "--resume"))
    assert proc.returncode == 0, proc.output[-2000:]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert read_manifest(run / "adapter")["kind"] == "adapter"

    reference.output = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, reference.output[-2000:]
    expected, got = load_file(root / "reference" / "adapter" / "adapter.safetensors"), load_file(run / "adapter" / "adapter.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_killed_export_leaves_nothing_and_the_retry_succeeds(setup, tmp_path):
    root = setup
    out = tmp_path / "emu"
    key, pub = generate_keypair(tmp_path / "keys")
    args = ("compress", "--model", root / "base", "--out", out, "--num-kept", 2, "--sign-key", key)
    for point in ("bundle-files", "bundle-manifest", "bundle-rename"):
        proc = offsite(root, *args, kill=point)
        assert proc.returncode == -signal.SIGKILL, proc.output[-2000:]
        assert not out.exists(), f"killed at {point}: something is where the finished bundle belongs"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".emu.tmp-")]
        assert len(leftovers) == 1, leftovers  # this run's; the previous killed run's was cleaned up

    proc = offsite(root, *args)
    assert proc.returncode == 0, proc.output[-2000:]
    assert read_manifest(out, trusted_key=pub)["kind"] == "emulator"  # complete, every hash and the signature verify
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".emu.")], "leftovers of the killed runs remain"
