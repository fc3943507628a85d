"""The house: no module imports another in a circle (function-level imports included), and the
lower layers never import the higher ones (README, Layout)."""

import ast
from pathlib import Path

import offsite

ROOT = Path(offsite.__file__).parent

# Lower layers and the higher ones they must never import, at any depth of a function.
FORBIDDEN = {
    "offsite.methods": ("offsite.emulator", "offsite.training", "offsite.distill", "offsite.report", "offsite.plugin",
                        "offsite.cli", "offsite.service", "offsite.pema"),
    "offsite.lm": ("offsite.methods", "offsite.emulator", "offsite.training", "offsite.distill", "offsite.adapter"),
    "offsite.surgery": ("offsite.methods", "offsite.emulator", "offsite.training"),
    "offsite.bundle": ("offsite.methods", "offsite.emulator", "offsite.training", "offsite.adapter", "offsite.plugin"),
    "offsite.stats": ("offsite.report", "offsite.evaluation", "offsite.training"),
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_lower_layers_do_not_import_higher_ones():
    graph = import_graph()
    bad = []
    for name, targets in graph.items():
        for layer, above in FORBIDDEN.items():
            if name == layer or name.startswith(layer + "."):
                bad += [f"{name} imports {t}" for t in targets if any(t == a or t.startswith(a + ".") for a in above)]
    assert not bad, bad


def test_one_name_per_meaning():
    """The training checkpoint's loader and the Hugging Face checkpoint loader no longer share a name."""
    import offsite.checkpoint as checkpoint
    import offsite.models as models

    assert hasattr(checkpoint, "restore_checkpoint") and not hasattr(checkpoint, "load_checkpoint")
    assert hasattr(models, "load_checkpoint")


def test_the_public_api_is_importable_from_offsite_and_light():
    import subprocess
    import sys

    code = ("import sys, offsite; assert 'torch' not in sys.modules, 'import offsite pulled in torch'; "
            "assert set(offsite.__all__) <= set(dir(offsite)); "
            "from offsite import finetune, plug_in, compress_checkpoint, load_adapter, save_adapter, OffsiteError; "
            "import offsite.training as t; assert finetune is t.finetune")
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in offsite.__all__:
        assert getattr(offsite, name) is not None, name


def test_the_torch_free_config_registry_matches_the_method_registry():
    """offsite.methods.configs (what the CLI's help reads) names the same config classes as the registry."""
    from offsite.methods import METHODS
    from offsite.methods.configs import ACTIVATION_NAMES, METHOD_CONFIGS
    from offsite.structure import ACTIVATIONS

    assert {name: m.config_class for name, m in METHODS.items()} == METHOD_CONFIGS
    assert tuple(sorted(ACTIVATIONS)) == ACTIVATION_NAMES
