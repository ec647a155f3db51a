"""The shape of the package: layers import downwards only, no import cycles, every module
imports on its own, and the store's layout is spelt out in one module."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ocixfs"

# Lower layers first; a module may import its own layer and the ones before it.
LAYERS = [
    {"errors", "log", "progress", "config", "http", "safefs"},
    {"image"},
    {"store"},
    {"cache"},
    {"fetch"},
    {"mount", "build", "tools"},
    {"cli", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Every ocixfs module ``path`` imports, at any depth (lazy and type-only included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("ocixfs")}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; use absolute ocixfs.* names"
            if node.module and node.module.startswith("ocixfs"):
                known = modules()
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in known else node.module)
    return found


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module}: in no layer; add its package to LAYERS")


def test_layers_import_downwards_only() -> None:
    wrong = []
    for module, path in modules().items():
        if module == "ocixfs":
            continue
        for imported in imports_of(path):
            if imported != "ocixfs" and layer(imported) > layer(module):
                wrong.append(f"{module} imports {imported}")
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = {module: imports_of(path) - {module} for module, path in modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_every_module_imports_alone() -> None:
    """Each module in a fresh interpreter state (no other ocixfs module loaded first)."""
    names = [name for name in modules() if not name.endswith("__main__")]
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('ocixfs')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {exc!r}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *names],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_store_layout_is_spelt_out_in_one_module() -> None:
    """Names of the store's layout appear, as code, only in ``store.layout`` (prose such as
    docstrings and help texts may mention them)."""
    found = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            text = node.value
            if any(c.isspace() for c in text):
                continue  # prose
            if ("blobs/blake3" in text or "ocix-store.json" in text or text == ".zst"
                    or text.strip("/") == "blake3" or text.startswith("packs/")
                    or text.endswith(".pack")) and module != "ocixfs.store.layout":
                found.append(f"{module}: {text!r}")
    assert found == []
