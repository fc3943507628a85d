"""What every command module shares: flags generated from config dataclasses, YAML configs merged
with flags, taking options one by one, and the bundle summary the commands print.

`offsite.cli`, `offsite.pema.cli` and `offsite.service.commands` all import this; none of them
imports another.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

import yaml

from .configs import build_dataclass, typed_values  # noqa: F401  (re-exported: the command modules take them from here)
from .errors import BundleError, ConfigError, UsageError


# ---------------------------------------------------------------- dataclass <-> argparse / YAML
def _base_type(tp):
    """int for `int | None`, list[int] for `list[int] | None`, etc."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def field_docs(cls) -> dict[str, str]:
    """Each field's trailing comment in the class source (`lr: float | None = None  # the comment`), base
    classes included: what the flags' help says, so the comment beside a default is its documentation."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        for node in ast.parse(textwrap.dedent(source)).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.lineno in comments:
                docs[node.target.id] = comments[node.lineno]
    return docs


def _help(cls, field, doc: str | None) -> str:
    default = field.default if field.default is not dataclasses.MISSING else None
    if field.name in getattr(cls, "REQUIRED", ()):
        tail = "(required)"
    elif doc and "default" in doc:
        tail = ""  # the comment says what the default means
    else:
        tail = f"(default: {default!r})" if isinstance(default, str) else f"(default: {default})"
    return " ".join(part for part in (doc, tail) if part).replace("%", "%%")


def add_dataclass_flags(parser, cls, seen: set[str] | None = None) -> None:
    """One `--field-name` flag per dataclass field (on a parser or an argument group): the help is the
    field's comment and its default (or "required", for the names in `cls.REQUIRED`); the names in
    `cls.CHOICES` take only those values. Unset flags stay out of the namespace."""
    seen = seen if seen is not None else set()
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    choices = getattr(cls, "CHOICES", {})
    for field in dataclasses.fields(cls):
        if field.name in seen:
            continue
        seen.add(field.name)
        flag = "--" + field.name.replace("_", "-")
        tp = _base_type(hints[field.name])
        kw = dict(dest=field.name, default=argparse.SUPPRESS, help=_help(cls, field, docs.get(field.name)))
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, type=_int_list, metavar="I,J,...", **kw)
        else:
            parser.add_argument(flag, type=tp, choices=choices.get(field.name), **kw)


def suggest_option(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """ " (did you mean --lr?)" for the first unknown flag close to one of `parser`'s, else ""."""
    import difflib

    known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    for arg in unknown:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1, cutoff=0.6)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


def load_yaml(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option names to values")
    if data.get("format") == "offsite-bundle":
        data = manifest_options(data, p)
    return {k.replace("-", "_"): v for k, v in data.items()}


# What a manifest records beside the options themselves (derived or run facts), not fed back.
_RECORDED_ONLY = {"learning_rate", "precision", "federated", "result"}


def manifest_options(manifest: dict, where) -> dict:
    """The options a bundle was made with, as a config: an adapter's `training` section (finetune),
    an emulator's method and its parameters (compress). `--config run/adapter/manifest.json` reruns it."""
    if manifest.get("kind") == "adapter" and isinstance(manifest.get("training"), dict):
        return {k: v for k, v in manifest["training"].items() if k not in _RECORDED_ONLY}
    method = manifest.get("method")
    if manifest.get("kind") == "emulator" and isinstance(method, dict) and isinstance(method.get("params"), dict):
        return {"method": method.get("name"), **{k: v for k, v in method["params"].items() if k not in _RECORDED_ONLY}}
    raise ConfigError(f"{where} is an offsite {manifest.get('kind')!r} manifest; only adapter and emulator manifests "
                      "hold options to reuse")


NOT_OPTIONS = ("config", "command", "func", "quiet", "set")


def env_options(parser: argparse.ArgumentParser, path: list[str], environ=None) -> dict:
    """Option values from the environment: OFFSITE_<COMMAND>_<OPTION> (e.g. OFFSITE_FINETUNE_LR=1e-4,
    OFFSITE_FEDERATE_SERVER_ROUNDS=5), read as YAML scalars and then checked as YAML values are."""
    import os

    environ = os.environ if environ is None else environ
    prefix = "OFFSITE_" + "_".join(p.replace("-", "_").upper() for p in path) + "_"
    found = {}
    for action in parser._actions:
        if action.option_strings and action.dest not in NOT_OPTIONS + ("help", "print_config"):
            raw = environ.get(prefix + action.dest.upper())
            if raw is not None:
                found[action.dest] = _yaml_scalar(raw)
    return found


def _yaml_scalar(raw: str):
    """A value typed on a command line or in the environment, read as YAML (`1e-4`, `true`, `[a, b]`);
    text that is not YAML, or is blank, stays the string it is."""
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def set_nested(opts: dict, assignments: list[str]) -> None:
    """`--set finetune.lr=1e-4 --set method_params.num_kept=20`: a nested key of the YAML config,
    the value read as YAML (so lists and numbers stay what they are)."""
    for item in assignments:
        key, sep, raw = item.partition("=")
        path = [p.replace("-", "_") for p in key.split(".")]
        if not sep or not all(path):
            raise UsageError(f"--set takes KEY=VALUE or KEY.SUB=VALUE, got {item!r}")
        value = _yaml_scalar(raw)
        node = opts
        for name in path[:-1]:
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise UsageError(f"--set {key}: {name} is not a section of the config (it is {child!r})")
            node = child
        node[path[-1]] = value


def merged_options(args: argparse.Namespace, env: dict | None = None) -> dict:
    """Defaults < the --config YAML < the environment (`env_options`) < --set assignments < flags."""
    opts = load_yaml(getattr(args, "config", None))
    opts.update(env or {})
    set_nested(opts, getattr(args, "set", None) or [])
    opts.update({k: v for k, v in vars(args).items() if k not in NOT_OPTIONS})
    return opts


def take(opts: dict, name: str, default=dataclasses.MISSING):
    if name in opts:
        return opts.pop(name)
    if default is dataclasses.MISSING:
        raise UsageError(f"missing required option --{name.replace('_', '-')} (on the command line or in --config)")
    return default


def split_for(cls, opts: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: opts.pop(k) for k in list(opts) if k in names}


def reject_leftovers(opts: dict) -> None:
    if opts:
        raise UsageError(f"unknown option(s) {sorted(opts)}")


def terminal_safe(text: str) -> str:
    """`text` with every control or other non-printable character escaped (\\n, \\x1b, ...): a manifest
    value can then neither start a fake line nor send escape sequences to the user's terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def print_summary(bundle_dir) -> None:
    """Human-readable account of what a bundle holds (verifies it first)."""
    from .bundle import read_manifest

    m = read_manifest(bundle_dir)
    try:
        text = _summary(terminal_safe(str(bundle_dir)), _safe_values(m))
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, ZeroDivisionError) as e:
        raise BundleError(f"manifest of {bundle_dir} is malformed ({type(e).__name__}: {str(e)[:100]})") from None
    print(text)


def _safe_values(value):
    """The manifest with every string (keys too) passed through terminal_safe."""
    if isinstance(value, dict):
        return {terminal_safe(k) if isinstance(k, str) else k: _safe_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe_values(v) for v in value]
    return terminal_safe(value) if isinstance(value, str) else value


def _summary(bundle_dir, m: dict) -> str:
    from .bundle import SIGNATURE, bundle_fingerprint

    base = m.get("base", {})
    lines = [
        f"bundle      {bundle_dir}",
        f"kind        {m['kind']}   (offsite format v{m['format_version']}, {m.get('created_by', '?')})",
        f"fingerprint {bundle_fingerprint(m)[:16]}",
        f"base model  {base.get('name', '?')}  [{base.get('model_type', '?')}, {base.get('num_blocks', '?')} blocks, "
        f"{base.get('dtype', '?')}, fingerprint {str(base.get('fingerprint', '?'))[:16]}]",
    ]
    if m["kind"] == "emulator":
        blocks = m["blocks"]
        lines += [
            f"method      {m['method']['name']}  {json.dumps(m['method']['params'])}",
            f"blocks      {len(blocks['map'])} of {base.get('num_blocks')}: emulator -> original {blocks['map']}",
            f"adapter     original blocks {blocks['adapter']} (emulator blocks {blocks['trainable']}, trainable)",
        ]
        if "stats" in m:
            s = m["stats"]
            lines.append(
                f"parameters  emulator {s['emulator_parameters']:,} of base {s['base_parameters']:,} "
                f"({100 * s['emulator_parameters'] / s['base_parameters']:.1f}%)"
            )
    elif m["kind"] == "adapter":
        a, t = m["adapter"], m.get("training", {})
        lines += [
            f"adapter     {a['type']} on original blocks {a['blocks']}: {a.get('num_parameters', 0):,} parameters in {a.get('num_tensors')} tensors",
            f"emulator    {m['emulator']['fingerprint'][:16]} ({m['emulator']['method']['name']})",
            f"training    lr {t.get('learning_rate')}, batch {t.get('batch_size')}x{t.get('grad_accum')}, "
            f"schedule {t.get('schedule')}, precision {t.get('precision')}, seed {t.get('seed')}",
            f"metrics     {json.dumps(m.get('metrics', {}))}",
        ]
    elif m["kind"] == "scaleot-artifact":
        body = m["scaleot"]
        lines.append(f"harmonizer  rank {body['harmonizer']['rank']}, {body['harmonizer']['activation']}, one per middle block "
                     f"{body['middle'][0]}-{body['middle'][-1]}; {body['training']['steps']} steps")
        if body.get("importance") is not None:
            keep = {e["block"]: e["keep_probability"] for e in body["importance"]}
            lines.append("importance  keep probability, least important first: " + ", ".join(f"{b}: {keep[b]:.2f}" for b in body["ranking"]))
        else:  # made block by block: ranked by the direct swap measurement
            increase = body["direct"]["loss_increase"]
            lines.append("importance  held-out loss increase when swapped alone, least important first: "
                         + ", ".join(f"{b}: {increase[str(b)]:+.3f}" for b in body["ranking"]))
    elif m["kind"] == "plugged":
        lines.append(f"adapter     {m['adapter']['type']} {m['adapter']['fingerprint'][:16]}, merged: {m['adapter']['merged']}")
    elif m["kind"] == "pema-head":
        h = m["head"]
        lines.append(f"head        final norm {h['norm']['type']} + LM head {h['vocab_size']:,} x {h['hidden_size']}"
                     f"{' (tied: the input embeddings too)' if h.get('tied_embeddings') else ''}, {h['dtype']}")
    elif m["kind"] == "pema-adapter":
        a, mem = m["pema"], m["memory"]
        lines += [
            f"pema        rank {a['rank']} on representations of size {a['hidden_size']}; head bundle {m['head']['fingerprint'][:16]}",
            f"memory      {mem['rows']:,} rows from {mem['examples']:,} examples ({mem['contexts']} contexts), "
            f"mean target {mem['mean_target_length']:.2f} tokens",
            f"metrics     {json.dumps({k: v for k, v in m.get('metrics', {}).items() if not isinstance(v, dict)})}",
        ]
    signed = (Path(bundle_dir) / SIGNATURE).is_file()
    lines.append(f"signature   {SIGNATURE} present (check it: offsite verify BUNDLE --key PUB)" if signed else "signature   none")
    lines.append("files       (all SHA-256 verified)")
    lines += [f"  {name:<34} {meta['size']:>14,} B  {meta['sha256'][:16]}" for name, meta in m["files"].items()]
    return "\n".join(lines)


_reject_leftovers = reject_leftovers
