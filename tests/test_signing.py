"""Ed25519-signed bundles: keygen, sign on export, verification on load when a key is configured."""

import json
import stat

import pytest

from offsite.bundle import MANIFEST, SIGNATURE, read_manifest, write_bundle
from offsite.errors import BundleError, SigningError
from offsite.signing import TRUSTED_KEY_ENV, generate_keypair, key_id, load_private_key, load_public_key


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return {"owner": generate_keypair(root / "owner"), "data": generate_keypair(root / "data")}


def make(tmp_path, sign_key=None, name="b"):
    def write(tmp):
        (tmp / "weights.bin").write_bytes(b"\x00\x01\x02")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")

    return write_bundle(tmp_path / name, "emulator", {"base": {"fingerprint": "x"}}, write, sign_key=sign_key)


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path):
    private, public = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    assert key_id(load_private_key(private).public_key()) == key_id(load_public_key(public))
    before = private.read_bytes()
    with pytest.raises(SigningError, match="already exists, not overwriting"):
        generate_keypair(tmp_path / "k")
    assert private.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["offsite.key", "offsite.pub"]  # no temp files left


def test_bad_key_files_are_one_line_errors(tmp_path, keys):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(SigningError, match="not an unencrypted PEM private key"):
        load_private_key(junk)
    with pytest.raises(SigningError, match="not a PEM public key"):
        load_public_key(junk)
    with pytest.raises(SigningError, match="not a PEM public key"):
        load_public_key(keys["owner"][0])  # a private key where a public one belongs
    with pytest.raises(SigningError, match="not found"):
        load_public_key(tmp_path / "missing.pub")


def test_signed_bundle_verifies_with_its_key_only(tmp_path, keys):
    (owner_key, owner_pub), (_, data_pub) = keys["owner"], keys["data"]
    bundle = make(tmp_path, sign_key=owner_key)
    assert (bundle / SIGNATURE).is_file()
    assert set(read_manifest(bundle, trusted_key=owner_pub)["files"]) == {"weights.bin", "sub/config.json"}
    assert read_manifest(bundle, trusted_key=[data_pub, owner_pub])["kind"] == "emulator"  # any trusted key will do
    assert read_manifest(bundle, trusted_key=f"{data_pub}:{owner_pub}")["kind"] == "emulator"  # as $OFFSITE_TRUSTED_KEY
    with pytest.raises(BundleError, match=rf"bundle {bundle} is rejected: its signature does not verify"):
        read_manifest(bundle, trusted_key=data_pub)
    read_manifest(bundle)  # no key configured: the signature is not required


def test_unsigned_bundle_is_rejected_when_a_key_is_configured(tmp_path, keys, monkeypatch):
    bundle = make(tmp_path)
    with pytest.raises(BundleError, match="it is not signed"):
        read_manifest(bundle, trusted_key=keys["owner"][1])
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(keys["owner"][1]))
    with pytest.raises(BundleError, match="it is not signed"):
        read_manifest(bundle)
    read_manifest(bundle, trusted_key=False)  # explicitly off


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda b: (b / "weights.bin").write_bytes(b"\x00\x01\x03"), "weights.bin does not match its SHA-256"),
        (lambda b: (b / "sub" / "config.json").write_text('{"a": 1}'), "sub/config.json has size"),
        (lambda b: (b / MANIFEST).write_bytes((b / MANIFEST).read_bytes().replace(b'"x"', b'"y"')), "does not verify"),
        (lambda b: (b / MANIFEST).write_bytes((b / MANIFEST).read_bytes() + b" "), "does not verify"),
        (lambda b: (b / SIGNATURE).write_text("junk"), "signature file is malformed"),
        (lambda b: (b / SIGNATURE).write_bytes(b"\x00" * 10_000), "signature is too large"),
        (lambda b: (b / SIGNATURE).unlink(), "not signed"),
    ],
)
def test_a_tampered_byte_anywhere_is_rejected_with_the_file_named(tmp_path, keys, tamper, match):
    bundle = make(tmp_path, sign_key=keys["owner"][0])
    tamper(bundle)
    with pytest.raises(BundleError, match=match):
        read_manifest(bundle, trusted_key=keys["owner"][1])


def test_resigning_with_another_key_is_detected(tmp_path, keys):
    bundle = make(tmp_path, sign_key=keys["owner"][0])
    forged = make(tmp_path, sign_key=keys["data"][0], name="forged")
    (bundle / SIGNATURE).write_bytes((forged / SIGNATURE).read_bytes())
    claimed = json.loads((bundle / SIGNATURE).read_text())["key_id"]
    with pytest.raises(BundleError, match=f"signed by key {claimed}"):
        read_manifest(bundle, trusted_key=keys["owner"][1])


def test_bad_signing_key_fails_before_anything_is_written(tmp_path):
    junk = tmp_path / "junk.key"
    junk.write_text("nope")
    with pytest.raises(SigningError):
        make(tmp_path, sign_key=junk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.key"]
