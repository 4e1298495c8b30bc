"""The package's shape, read from its own source: one direction of imports, no private names across modules,
no import cycle, short functions, and a registry behind every plug-in point.

The layer contract itself is import-linter's (``lint-imports``, configured in pyproject.toml); this file
checks what it does not: names, cycles between modules, function length, and the registries.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fiberbench
from fiberbench.models import SOURCES
from fiberbench.sampling import SAMPLERS

PKG = Path(fiberbench.__file__).parent
MAX_LINES = 80
PLOTTING = {"plots.py"}  # figure-drawing code may run longer (one branch per trace type)


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(mod: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` of every import of ``mod`` (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, [a.name for a in node.names], node.lineno))
    return out


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for mod, path in _modules().items():
        for target, names, line in _imports(mod, path):
            if not target.startswith("fiberbench"):
                continue
            bad += [f"{mod}:{line} imports {target}.{n}" for n in names
                    if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
    assert not bad, "\n".join(bad)


def test_no_module_imports_the_package_root():
    """Inside the package, imports name the module they need: the root (the public API) imports them."""
    bad = []
    for mod, path in _modules().items():
        if mod == "fiberbench":
            continue
        for target, names, line in _imports(mod, path):
            if target == "fiberbench":
                mods = {m for m in _modules() if m.startswith("fiberbench.")}
                bad += [f"{mod}:{line} imports fiberbench.{n}" for n in names if f"fiberbench.{n}" not in mods]
    assert not bad, "\n".join(bad)


def test_the_module_import_graph_has_no_cycle():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, names, _ in _imports(mod, path):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in mods and cand != mod:
                    graph[mod].add(cand)
                    break
    # a package's __init__ re-exporting its own submodules is not a cycle of behaviour: drop child -> parent edges
    # only where the parent is that child's own package (Python runs the parent first by construction)
    for mod in graph:
        graph[mod] = {t for t in graph[mod] if not mod.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_no_function_outside_plotting_code_is_longer_than_80_lines():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name in PLOTTING:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_every_sampler_and_model_source_is_registered_once_with_its_contract():
    assert list(SAMPLERS)[:4] == ["ndtm", "dps", "metamer", "unguided"]
    assert "conditional" in SAMPLERS and SAMPLERS["conditional"].trained
    for name, s in SAMPLERS.items():
        assert s.name == name and callable(s.fn)
    assert set(SOURCES) == {"toy", "timm", "open_clip", "hf", "torch", "diffusers", "mix", "guided-diffusion"}
    for name, src in SOURCES.items():
        assert src.name == name and src.kinds


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    found = str(exe) if exe.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install fiberbench[test])")
    return found


def test_import_linter_layers_contract_is_kept():
    out = subprocess.run([_tool("lint-imports")], cwd=PKG.parent, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_ruff_passes():
    out = subprocess.run([_tool("ruff"), "check", "fiberbench", "tests", "scripts"], cwd=PKG.parent,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
