"""Property-based fuzzing of everything that crosses between the parties.

Valid emulator and adapter bundles (full and LoRA, signed) are built once; every example copies
one into a fresh directory, mutates it (truncation, bit flips, wrong JSON types, huge numbers,
NaN, deep nesting, missing and extra files, symbolic links out of the bundle, hostile
safetensors headers, NaN/huge tensor values), optionally rewrites the manifest's hashes as an
attacker who controls it would, and runs the real loaders: `read_manifest`, `load_emulator`,
`load_adapter`, `plug_in` and `offsite inspect`. Properties:

- the outcome is success or an `OffsiteError`, never another exception;
- with the signer's key configured, any change at all is rejected;
- an unchanged bundle loads;
- a rejected plug-in leaves the model untouched;
- nothing outside the mutated copy changes (owner outputs, the pristine bundles), and the
  loaders write nothing, not even into the copy.

The number of cases run is printed at the end of the session ("fuzz: N hypothesis cases").
Under CI (CI=true) the examples are derandomized, so a run is reproducible.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import FUZZ_CASES
from offsite.adapter import load_adapter
from offsite.bundle import MANIFEST, SIGNATURE, read_manifest
from offsite.cli import main as cli_main
from offsite.data import Example
from offsite.emulator import compress_checkpoint, load_checkpoint, load_emulator
from offsite.errors import OffsiteError
from offsite.methods import make_config
from offsite.plugin import plug_in
from offsite.signing import generate_keypair
from offsite.training import FinetuneConfig, finetune
from tiny import save_tiny_checkpoint

FUZZ = settings(
    max_examples=int(os.environ.get("OFFSITE_FUZZ_EXAMPLES", "200")),
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    owner_key, owner_pub = generate_keypair(root / "owner-keys")
    data_key, data_pub = generate_keypair(root / "data-keys")
    save_tiny_checkpoint("llama", root / "base")
    emu = compress_checkpoint(root / "base", root / "emu", "layerdrop", make_config("layerdrop", num_kept=2), sign_key=owner_key)
    examples = [Example(f"Question {i}: what is {i} plus one? Answer:", f" {i + 1}") for i in range(8)]
    bundles = {"emulator": emu}
    for name, config in {"full": FinetuneConfig(max_steps=2, lr=1e-3), "lora": FinetuneConfig(lora=True, max_steps=2, lr=1e-2)}.items():
        bundles[name] = finetune(emu, examples, root / name, config, progress=False, sign_key=data_key)
    outputs = root / "owner-outputs"  # what must never change: stands for everything else on disk
    shutil.copytree(root / "base", outputs / "base")
    (outputs / "secret.txt").write_text("owner's secret")
    model = load_checkpoint(root / "base")[0]
    return World({
        "root": root,
        "bundles": bundles,
        "keys": {"emulator": owner_pub, "full": data_pub, "lora": data_pub},
        "outputs": outputs,
        "model": model,
        "pristine_state": {k: v.clone() for k, v in model.state_dict().items()},
        "guarded": snapshot(root),
    })


class World(dict):
    def __repr__(self):  # hypothesis prints the arguments of a failing example
        return "world"


def snapshot(directory: Path, skip: str | None = None) -> dict[str, str]:
    """Relative path -> SHA-256 (or link target) of everything below `directory`, links not
    followed; top-level entries whose name starts with `skip` are left out."""
    out = {}
    for folder, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = Path(folder) / name
            rel = path.relative_to(directory).as_posix()
            if skip and rel.startswith(skip):
                continue
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------- mutations
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**31, 2**63, 2**64 + 1, -1, 0, 10**30, 10**200]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["../../owner-outputs/secret.txt", "/etc/passwd", "float64", "lora", "full", "adapter", "emulator", "a" * 5000]),
    st.lists(st.one_of(st.integers(-3, 2**40), st.text(max_size=3)), max_size=6),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=4), st.none()), max_size=4),
)


def json_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from json_paths(item, (*path, i))


def set_path(doc, path, value, delete=False):
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def mutate_json(path: Path, data) -> None:
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        return
    op = data.draw(st.sampled_from(["replace", "replace", "delete", "add", "deep"]), label="json op")
    if op == "deep":
        depth = data.draw(st.integers(1, 200_000), label="depth")
        path.write_text("[" * depth + "]" * depth)
        return
    if op == "add" and isinstance(doc, dict):
        doc[data.draw(st.text(max_size=12), label="new key")] = data.draw(JUNK, label="new value")
    else:
        where = data.draw(st.sampled_from(list(json_paths(doc))[:5000]), label="json path")
        doc = set_path(doc, where, data.draw(JUNK, label="value"), delete=op == "delete")
    path.write_text(json.dumps(doc, allow_nan=True))


def mutate_safetensors_header(path: Path, data) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    names = sorted(k for k in header if k != "__metadata__") if isinstance(header, dict) else []
    if not names or not all(isinstance(header[k], dict) for k in names):
        return
    name = data.draw(st.sampled_from(names), label="tensor")
    field = data.draw(st.sampled_from(["shape", "dtype", "data_offsets", "delete", "rename", "length"]), label="field")
    if field == "shape":
        header[name]["shape"] = data.draw(
            st.one_of(
                st.lists(st.integers(0, 2**64), min_size=1, max_size=9),
                st.sampled_from([[2**40, 2**40], [-1], [0], [2**63, 2**63, 2**63], "32", None]),
            ),
            label="shape",
        )
    elif field == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F64", "I64", "I32", "BOOL", "F8_E4M3", "F16", "BF16", "X", 7]), label="dtype")
    elif field == "data_offsets":
        header[name]["data_offsets"] = data.draw(
            st.one_of(st.lists(st.integers(-5, 2**64), min_size=0, max_size=3), st.sampled_from([[0, 2**62], [4, 0]])), label="offsets"
        )
    elif field == "delete":
        del header[name]
    elif field == "rename":
        header[data.draw(st.sampled_from(["model.embed_tokens.weight", "lm_head.weight", "model.layers.3.mlp.up_proj.weight"]))] = header.pop(name)
    encoded = json.dumps(header).encode()
    length = len(encoded) if field != "length" else data.draw(st.integers(0, 2**64 - 1), label="declared length")
    path.write_bytes(struct.pack("<Q", length) + encoded + body)


def mutate_tensor_values(path: Path, data) -> None:
    tensors = load_file(path)
    key = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    value = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, 1e4, 0.0]), label="value")
    flat = tensors[key].reshape(-1)
    flat[data.draw(st.integers(0, flat.numel() - 1), label="element")] = value
    if data.draw(st.booleans(), label="scale whole tensor"):
        tensors[key] = tensors[key] * data.draw(st.sampled_from([0.0, -1.0, 1e3, 1e6]), label="scale")
    save_file(tensors, path)


def regular_files(bundle: Path) -> list[str]:
    """The bundle's regular files, links neither listed nor followed (the harness must not write through them)."""
    out = []
    for folder, _, names in os.walk(bundle):
        out += [(Path(folder) / n).relative_to(bundle).as_posix() for n in names if not (Path(folder) / n).is_symlink()]
    return sorted(out)


def mutate(bundle: Path, world, data, manifest_only: bool = False) -> None:
    files = regular_files(bundle)
    if manifest_only:
        files = [f for f in files if f == MANIFEST]
    if not files:
        return
    ops = ["json", "json", "json", "flip", "truncate"] if manifest_only else ["truncate", "flip", "delete", "add", "symlink", "json", "header", "values", "noop"]
    op = data.draw(st.sampled_from(ops), label="mutation")
    target = bundle / data.draw(st.sampled_from(files), label="file")
    size = target.stat().st_size
    if op == "truncate" and size:
        with target.open("r+b") as f:
            f.truncate(data.draw(st.integers(0, size - 1), label="length"))
    elif op == "flip" and size:
        raw = bytearray(target.read_bytes())
        # Bias towards the first bytes, where the headers are.
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            where = data.draw(st.one_of(st.integers(0, min(size, 256) - 1), st.integers(0, size - 1)), label="offset")
            raw[where] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        target.write_bytes(bytes(raw))
    elif op == "delete":
        target.unlink()
    elif op == "add":
        name = data.draw(st.sampled_from(["extra.bin", "sub/evil.py", "manifest.json.bak", ".hidden", "model-00002.safetensors", "x/y/z.json"]))
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(data.draw(st.binary(max_size=64), label="content"))
    elif op == "symlink":
        outside = data.draw(
            st.sampled_from([world["outputs"] / "secret.txt", world["outputs"] / "base", world["outputs"] / "base" / "model.safetensors",
                             world["bundles"]["emulator"] / MANIFEST, Path("/etc/passwd"), bundle]),
            label="link target",
        )
        link = target if data.draw(st.booleans(), label="replace a file") else bundle / "linked"
        link.unlink(missing_ok=True)
        link.symlink_to(outside)
    elif op == "json" and target.suffix in (".json", ".sig"):
        mutate_json(target, data)
    elif op == "header" and target.suffix == ".safetensors":
        with contextlib.suppress(ValueError, KeyError, IndexError, struct.error, UnicodeDecodeError):  # already broken
            mutate_safetensors_header(target, data)
    elif op == "values" and target.suffix == ".safetensors" and "adapter" in target.name:
        with contextlib.suppress(Exception):  # not loadable any more: an earlier mutation broke it
            mutate_tensor_values(target, data)


def rehash(bundle: Path) -> None:
    """What an attacker who controls the manifest does after an edit: list what is there now."""
    path = bundle / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return
    if not isinstance(manifest, dict):
        return
    files = {}
    for folder, dirs, names in os.walk(bundle):
        for name in names + dirs:
            p = Path(folder) / name
            rel = p.relative_to(bundle).as_posix()
            if rel not in (MANIFEST, SIGNATURE) and p.is_file():
                files[rel] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
    manifest["files"] = files
    path.unlink()
    path.write_text(json.dumps(manifest, allow_nan=True))


# ---------------------------------------------------------------- the property
OPENED: list[str] = []
_AUDITING = [False]


def _audit(event, args):
    if _AUDITING[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextlib.contextmanager
def audited_opens():
    """Every file path opened inside the block, resolved (a followed link shows its target)."""
    OPENED.clear()
    _AUDITING[0] = True
    try:
        yield OPENED
    finally:
        _AUDITING[0] = False


def load(kind: str, bundle: Path, world, trusted):
    if kind == "emulator":
        load_emulator(bundle, trusted_key=trusted)
    else:
        model = world["model"]
        try:
            plug_in(model, load_adapter(bundle, trusted_key=trusted), emulator=world["bundles"]["emulator"])
        except OffsiteError:
            state = model.state_dict()
            assert all(torch.equal(state[k], v) for k, v in world["pristine_state"].items()), "rejected plug-in changed the model"
            raise
        model.load_state_dict(world["pristine_state"])  # accepted: put the base weights back for the next case


def check_case(kind: str, world, data, manifest_only: bool = False) -> None:
    pristine = world["bundles"][kind]
    with tempfile.TemporaryDirectory(dir=world["root"], prefix="scratch-") as scratch:
        bundle = Path(scratch) / "bundle"
        shutil.copytree(pristine, bundle)
        for _ in range(data.draw(st.integers(1, 3), label="number of mutations")):
            mutate(bundle, world, data, manifest_only)
        if not manifest_only and data.draw(st.booleans(), label="attacker rewrites the hashes"):
            rehash(bundle)
        trusted = world["keys"][kind] if data.draw(st.booleans(), label="signature required") else False
        unchanged = snapshot(bundle) == snapshot(pristine)
        before = snapshot(bundle)

        with audited_opens() as opened:
            try:
                read_manifest(bundle, trusted_key=trusted)
                load(kind, bundle, world, trusted)
                outcome = "loaded"
            except OffsiteError as e:
                assert "\n" not in str(e), f"multi-line error: {e!r}"
                outcome = "rejected"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                code = cli_main(["inspect", str(bundle)])
            assert code in (0, 1)  # 1: refused with one line
        # The owner's emulator record is read by the plug-in on purpose; nothing else outside.
        forbidden = (str(world["outputs"]), "/etc/passwd") + ((str(pristine),) if kind == "emulator" else ())
        escaped = [p for p in opened if os.path.realpath(p).startswith(forbidden)]
        assert not escaped, f"a loader opened files outside the bundle: {escaped[:3]}"

        assert snapshot(bundle) == before, "a loader wrote into the bundle"
        now = snapshot(world["root"], skip="scratch-")
        changed = sorted(k for k in set(now) | set(world["guarded"]) if now.get(k) != world["guarded"].get(k))
        assert not changed, f"something outside the bundle changed: {changed[:5]}"
        if unchanged:
            assert outcome == "loaded", "an unchanged bundle was rejected"
        elif trusted:
            assert outcome == "rejected", "a changed bundle passed signature verification"
        FUZZ_CASES[f"{kind} {outcome}"] += 1


@FUZZ
@given(data=st.data())
def test_fuzz_adapter_bundle_full(world, data):
    check_case("full", world, data)


@FUZZ
@given(data=st.data())
def test_fuzz_adapter_bundle_lora(world, data):
    check_case("lora", world, data)


@FUZZ
@given(data=st.data())
def test_fuzz_manifests(world, data):
    """Wrong JSON types, huge numbers, NaN, deep nesting, deleted keys in the manifest of each kind."""
    check_case(data.draw(st.sampled_from(["emulator", "full", "lora"]), label="kind"), world, data, manifest_only=True)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzz_emulator_bundle(world, data):
    check_case("emulator", world, data)


# ---------------------------------------------------------------- config-size bombs
SIZE_KEYS = {  # per family: the config numbers that decide how much memory a model needs
    "llama": ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings", "num_attention_heads"),
    "gpt2": ("vocab_size", "n_embd", "n_positions", "n_inner", "n_head"),
    "opt": ("vocab_size", "hidden_size", "ffn_dim", "max_position_embeddings", "word_embed_proj_dim"),
}


@pytest.fixture(scope="module")
def bomb_bundles(tmp_path_factory):
    from tiny import save_tiny_checkpoint

    from offsite.emulator import compress_checkpoint
    from offsite.methods import make_config

    root = tmp_path_factory.mktemp("bombs")
    out = {}
    for family in SIZE_KEYS:
        save_tiny_checkpoint(family, root / f"{family}-base")
        out[family] = compress_checkpoint(root / f"{family}-base", root / family, "layerdrop", make_config("layerdrop", num_kept=2))
    return out


@settings(max_examples=int(os.environ.get("OFFSITE_FUZZ_EXAMPLES", 200)) // 4, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_config_size_bombs_are_refused_before_allocation(bomb_bundles, tmp_path_factory, data):
    """Huge size numbers in an emulator's config (the hashes rewritten, as an attacker holding the
    manifest would) end in a one-line OffsiteError, never an allocation: the meta-device estimate
    runs first (the process would run out of memory otherwise)."""
    from conftest import rehash

    from offsite.emulator import load_emulator
    from offsite.errors import OffsiteError

    family = data.draw(st.sampled_from(sorted(SIZE_KEYS)))
    keys = data.draw(st.lists(st.sampled_from(SIZE_KEYS[family]), min_size=1, max_size=3, unique=True))
    values = {k: data.draw(st.integers(min_value=10**6, max_value=10**12)) for k in keys}
    bundle = tmp_path_factory.mktemp("bomb") / family
    shutil.copytree(bomb_bundles[family], bundle)
    config = json.loads((bundle / "config.json").read_text())
    config.update(values)
    (bundle / "config.json").write_text(json.dumps(config))
    rehash(bundle)
    try:
        loaded = load_emulator(bundle)
    except OffsiteError as error:
        assert "\n" not in str(error)
        FUZZ_CASES["config bomb: rejected"] += 1
        return
    # Some numbers cost nothing (Llama's rotary buffer does not grow with max_position_embeddings): a load is
    # fine as long as what was built is small.
    size = sum(t.numel() * t.element_size() for t in list(loaded.model.parameters()) + list(loaded.model.buffers()))
    assert size < 1 << 30, (values, size)
    FUZZ_CASES["config bomb: loaded, small"] += 1
