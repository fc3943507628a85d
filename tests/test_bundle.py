"""Bundle I/O: hashing, strict reading, atomic and non-clobbering writes."""

import json

import pytest

from offsite.bundle import MANIFEST, read_manifest, write_bundle
from offsite.errors import BundleError
from conftest import rehash


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
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"][path] = {"sha256": "0" * 64, "size": 1}
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unsafe path"):
        read_manifest(bundle)


def test_symlink_out_of_the_bundle_is_refused(tmp_path):
    bundle = make(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("owner's secret")
    (bundle / "weights.bin").unlink()
    (bundle / "weights.bin").symlink_to(secret)
    rehash(bundle)
    with pytest.raises(BundleError, match="outside the bundle"):
        read_manifest(bundle)


def test_wrong_kind_and_version(tmp_path):
    bundle = make(tmp_path)
    with pytest.raises(BundleError, match="expected an adapter bundle"):
        read_manifest(bundle, kind="adapter")
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["format_version"] = 99
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99"):
        read_manifest(bundle)
