"""The package's dependency order (README, Layout): a module imports only modules of its own layer or of the
layers before it, with no cycle, and importing the modules one by one in that order never pulls in a module
declared after the one imported."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import linearize

PACKAGE = Path(linearize.__file__).parent

# The layers, lowest first: config → kernels → architectures → distributed → data → convert → distill → evals →
# the orchestrator and the CLI.
LAYERS = [
    ["linearize.assets", "linearize.errors", "linearize.host", "linearize.registry"],
    ["linearize.config"],
    ["linearize.checkpoint"],
    ["linearize.kernels"],
    ["linearize.architectures"],
    ["linearize.distributed"],
    ["linearize.data", "linearize.teacher_text"],
    ["linearize.convert"],
    ["linearize.distill"],
    ["linearize.evals"],
    ["linearize.pipeline", "linearize.cli", "linearize.__main__"],
]
# `import linearize` registers the converted classes with transformers' Auto classes (no modeling code):
# every import of a linearize module starts with these.
ROOT = {
    "linearize",
    "linearize.architectures",
    "linearize.architectures.auto",
    "linearize.architectures.configuration_linearize",
    "linearize.registry",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
LAYERED = sorted(m for m in MODULES if m != "linearize")


def layer(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to the README's Layout section")


def imports(module: str) -> list[tuple[str, int]]:
    """(linearize module imported, line) for every import in `module`, function-level ones included."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: the modules a converted checkpoint carries import each other so
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            if not base.startswith("linearize"):
                continue
            targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES] or [base]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("linearize")]
        else:
            continue
        found += [(t, node.lineno) for t in targets if t in MODULES]
    return found


def declared_order() -> list[str]:
    """Every module, layer by layer, each layer's modules after those of its layer they import."""
    order: list[str] = []
    for i in range(len(LAYERS)):
        todo = {m for m in LAYERED if layer(m) == i}
        while todo:
            ready = sorted(
                m for m in todo if all(t in order or t == m or t not in todo for t, _ in imports(m))
            )
            assert ready, f"an import cycle among {sorted(todo)}"
            order += ready
            todo -= set(ready)
    return order


def test_every_import_points_down_the_layers():
    upward = [
        f"{m}:{line} imports {t}"
        for m in LAYERED
        for t, line in imports(m)
        if t != "linearize" and layer(t) > layer(m) and t not in ROOT
    ]
    assert not upward, "imports against the declared order:\n" + "\n".join(upward)


def test_no_import_cycle_and_importing_in_order_pulls_in_no_later_layer():
    order = declared_order()
    layers = {m: layer(m) for m in order}
    script = f"""
import importlib, json, sys
import linearize
root = sorted(m for m in sys.modules if m.split(".")[0] == "linearize")
order = {order!r}
layers = {layers!r}
late = {{}}
for i, name in enumerate(order):
    importlib.import_module(name)
    after = {{m for m in order[i + 1 :] if layers[m] > layers[name]}} - set(root)
    pulled = sorted(m for m in sys.modules if m in after)
    if pulled:
        late[name] = pulled
print(json.dumps({{"root": root, "late": late}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["root"]) == ROOT
    assert not {k: v for k, v in result["late"].items()}, result["late"]


def test_the_readme_lists_the_layers_in_this_order():
    text = (PACKAGE.parent / "README.md").read_text()
    layout = text[text.index("## Layout") :]
    layout = layout[layout.index("\n    linearize/") :]  # the listing
    positions = [layout.index(f"`{prefixes[0].removeprefix('linearize.')}") for prefixes in LAYERS[1:]]
    assert positions == sorted(positions)
