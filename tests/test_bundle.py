"""Bundle I/O: hashing, strict reading, atomic and non-clobbering writes."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from offsite import bundle as bundle_module
from offsite.bundle import MANIFEST, Limits, read_manifest, safetensors_header, write_bundle
from offsite.errors import BundleError
from conftest import edit_manifest, rehash


def make(tmp_path, name="b", files=None):
    files = files or {"weights.bin": b"\x00\x01\x02", "sub/config.json": b"{}"}

    def write(tmp):
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)

    return write_bundle(tmp_path / name, "emulator", {"base": {"fingerprint": "x"}}, write)


def test_round_trip_lists_every_file(tmp_path):
    bundle = make(tmp_path)
    manifest = read_manifest(bundle, kind="emulator")
    assert set(manifest["files"]) == {"weights.bin", "sub/config.json"}
    assert manifest["files"]["weights.bin"]["size"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_refuses_to_overwrite_and_keeps_the_original(tmp_path):
    bundle = make(tmp_path)
    before = (bundle / MANIFEST).read_bytes()
    with pytest.raises(BundleError, match="already exists"):
        make(tmp_path, files={"other.bin": b"1"})
    assert (bundle / MANIFEST).read_bytes() == before


def test_failed_write_leaves_nothing(tmp_path):
    def write(tmp):
        (tmp / "partial.bin").write_bytes(b"1")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_bundle(tmp_path / "b", "emulator", {}, write)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda b: (b / "weights.bin").write_bytes(b"\x00\x01\x03"), "weights.bin does not match its SHA-256"),
        (lambda b: (b / "weights.bin").write_bytes(b"\x00"), "weights.bin has size 1"),
        (lambda b: (b / "weights.bin").unlink(), "bundle file missing: weights.bin"),
        (lambda b: (b / "extra.py").write_text("import os"), "does not list"),
        (lambda b: (b / MANIFEST).write_text("{not json"), "not valid JSON"),
        (lambda b: (b / MANIFEST).write_text("[]"), "not an offsite bundle manifest"),
        (lambda b: (b / MANIFEST).unlink(), "no manifest.json"),
    ],
)
def test_corruption_is_named(tmp_path, corrupt, match):
    bundle = make(tmp_path)
    corrupt(bundle)
    with pytest.raises(BundleError, match=match):
        read_manifest(bundle)


@pytest.mark.parametrize("path", ["../outside.bin", "/etc/passwd", "a/../../x"])
def test_manifest_paths_cannot_escape(tmp_path, path):
    bundle = make(tmp_path)
    edit_manifest(bundle, lambda m: m["files"].__setitem__(path, {"sha256": "0" * 64, "size": 1}))
    with pytest.raises(BundleError, match="unsafe path"):
        read_manifest(bundle)


def test_symlink_out_of_the_bundle_is_refused(tmp_path):
    bundle = make(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("owner's secret")
    (bundle / "weights.bin").unlink()
    (bundle / "weights.bin").symlink_to(secret)
    rehash(bundle)
    with pytest.raises(BundleError, match="symbolic link, which could point outside the bundle"):
        read_manifest(bundle)


def test_wrong_kind_and_version(tmp_path):
    bundle = make(tmp_path)
    with pytest.raises(BundleError, match="expected an adapter bundle"):
        read_manifest(bundle, kind="adapter")
    edit_manifest(bundle, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(BundleError, match="format version 99"):
        read_manifest(bundle)


def test_symlinked_folder_and_special_files_are_refused(tmp_path):
    bundle = make(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("x")
    (bundle / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BundleError, match="linked is a symbolic link"):
        read_manifest(bundle)
    (bundle / "linked").unlink()
    os.mkfifo(bundle / "pipe")
    with pytest.raises(BundleError, match="pipe is not a regular file"):
        read_manifest(bundle)


def test_a_nested_manifest_is_an_ordinary_file_that_must_be_listed(tmp_path):
    bundle = make(tmp_path)
    (bundle / "sub" / MANIFEST).write_text("{}")
    with pytest.raises(BundleError, match="does not list"):
        read_manifest(bundle)


def test_size_limits_are_checked_before_anything_is_read(tmp_path, monkeypatch):
    bundle = make(tmp_path, files={"weights.bin": b"\x00" * 1000, "small.json": b"{}"})

    def no_hashing(*a, **k):
        raise AssertionError("hashed a file before checking the limits")

    monkeypatch.setattr(bundle_module, "sha256_file", no_hashing)
    with pytest.raises(BundleError, match="weights.bin with 1000 bytes, over the limit of 999"):
        read_manifest(bundle, limits=Limits(max_file_bytes=999))
    with pytest.raises(BundleError, match="over the bundle limit of 1001"):
        read_manifest(bundle, limits=Limits(max_bundle_bytes=1001))
    with pytest.raises(BundleError, match="more than 1 files"):
        read_manifest(bundle, limits=Limits(max_files=1))
    monkeypatch.setenv("OFFSITE_MAX_MANIFEST_BYTES", "10")
    with pytest.raises(BundleError, match="manifest is too large"):
        read_manifest(bundle)


def test_a_file_larger_on_disk_than_listed_is_refused_unread(tmp_path, monkeypatch):
    bundle = make(tmp_path)
    (bundle / "weights.bin").write_bytes(b"\x00" * 5000)
    monkeypatch.setattr(bundle_module, "sha256_file", lambda *a, **k: pytest.fail("hashed an oversized file"))
    with pytest.raises(BundleError, match="weights.bin is too large"):
        read_manifest(bundle, limits=Limits(max_file_bytes=4096))


def test_leftovers_of_a_killed_writer_are_cleaned_up(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".b.tmp-{dead}-abc"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"1")
    live = tmp_path / f".b.tmp-{os.getpid()}-xyz"  # a writer that is still running
    live.mkdir()
    make(tmp_path)
    assert not stale.exists() and live.exists()


def test_a_bundle_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path):
    bundle = make(tmp_path)
    backup = tmp_path / f".b.old-{_dead_pid()}"
    os.replace(bundle, backup)  # killed between the two renames of an overwrite
    with pytest.raises(BundleError, match="already exists"):
        make(tmp_path)
    assert read_manifest(bundle)["kind"] == "emulator" and not backup.exists()


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _raw_safetensors(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_safetensors_header_is_checked_against_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, good)
    assert safetensors_header(good) == {"a": ("F32", (2, 3)), "b": ("BF16", (4,))}

    cases = {
        "huge dims": ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 24]}}, b"\0" * 24, "does not fit"),
        "overflowing dims": ({"a": {"dtype": "F32", "shape": [2**63] * 4, "data_offsets": [0, 0]}}, b"", "does not fit"),
        "negative dim": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "malformed entry"),
        "past the end": ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, b"\0" * 8, "does not fit"),
        "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
        "gap at the end": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "do not cover"),
        "unknown dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16, "malformed entry"),
        "not a dict": ([1, 2], b"", "not a JSON object"),
    }
    for name, (header, data, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        _raw_safetensors(path, header, data)
        with pytest.raises(BundleError, match=match):
            safetensors_header(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:5])
    with pytest.raises(BundleError, match="truncated header"):
        safetensors_header(truncated)
    huge = tmp_path / "huge-header.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(BundleError, match="declares a header of"):
        safetensors_header(huge)
