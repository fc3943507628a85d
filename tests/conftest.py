import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import FAMILIES, save_tiny_checkpoint, tiny_model, tiny_tokenizer  # noqa: E402

from offsite.bundle import MANIFEST, _listed_files  # noqa: E402
from offsite.data import Example  # noqa: E402

# Tiny models run fastest single-threaded, and CI has two cores.
torch.set_num_threads(1)


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


def rehash(bundle_dir: Path) -> None:
    """Rewrite a bundle manifest's file table after a test edits files on purpose,
    so the check under test (not the hash check) is the one that fires."""
    path = Path(bundle_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["files"] = _listed_files(Path(bundle_dir))
    path.write_text(json.dumps(manifest))


__all__ = ["FAMILIES", "tiny_model", "tiny_tokenizer", "save_tiny_checkpoint", "rehash"]
