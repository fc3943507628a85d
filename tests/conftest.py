import collections
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import FAMILIES, save_tiny_checkpoint, tiny_model, tiny_tokenizer  # noqa: E402

from offsite.bundle import MANIFEST, SIGNATURE  # noqa: E402
from offsite.data import Example  # noqa: E402

# Tiny models run fastest single-threaded, and CI has two cores.
torch.set_num_threads(1)

# Hypothesis cases run by tests/test_fuzz.py, by bundle kind and outcome; printed at the end.
FUZZ_CASES: collections.Counter = collections.Counter()


def pytest_terminal_summary(terminalreporter):
    if FUZZ_CASES:
        detail = ", ".join(f"{k} {v}" for k, v in sorted(FUZZ_CASES.items()))
        terminalreporter.write_line(f"fuzz: {sum(FUZZ_CASES.values())} hypothesis cases ({detail})")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def examples():
    return [Example(f"Question {i}: what is {i} plus one? Answer:", f" {i + 1}") for i in range(24)]


@pytest.fixture
def base_dir(tmp_path):
    """A saved tiny Llama checkpoint, as the model owner holds it."""
    path = tmp_path / "base"
    save_tiny_checkpoint("llama", path)
    return path


def edit_manifest(bundle_dir: Path, change) -> None:
    """Apply `change(manifest)` to a bundle's manifest.json in place (a test tampering on purpose)."""
    path = Path(bundle_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def rehash(bundle_dir: Path) -> None:
    """Rewrite a bundle manifest's file table after a test edits files on purpose, as an attacker
    who controls the manifest would, so the check under test (not the hash check) is the one
    that fires. Follows symbolic links (the bundle reader must not) and drops any signature's
    validity, as any edit of the manifest does."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    manifest = json.loads(path.read_text())
    files = {}
    for p in sorted(bundle_dir.rglob("*")):
        rel = p.relative_to(bundle_dir).as_posix()
        if p.is_file() and rel not in (MANIFEST, SIGNATURE):
            files[rel] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
    manifest["files"] = files
    path.write_text(json.dumps(manifest))


__all__ = ["FAMILIES", "tiny_model", "tiny_tokenizer", "save_tiny_checkpoint", "rehash", "edit_manifest"]
