"""The package's layering, read from its sources: each module imports only from its own
layer or below (lazy imports inside functions included), no module imports a private
name (``_x``) of another fastsel module but for the shared bottom utilities, and the
import graph has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fastsel"

# Layer of each module (a dotted prefix: the longest match wins). Lower layers never
# import higher ones.
LAYERS = {
    "fastsel._extension": 0, "fastsel._checks": 0, "fastsel._state": 0,
    "fastsel.contract": 0, "fastsel.reference": 0, "fastsel.triton": 0,
    "fastsel.backends": 1, "fastsel.registration": 1,  # backends; the ops' registrations
    "fastsel.ops": 2,                                  # scoring
    "fastsel.selection": 3,                            # selection ops
    "fastsel.costs": 4, "fastsel.forward": 4, "fastsel.data": 4, "fastsel.strategies": 4,
    "fastsel.sampler": 5, "fastsel.selector": 5, "fastsel.queue": 5,    # the training layer
    "fastsel": 6,                                      # the public API (fastsel/__init__.py)
    "fastsel.integrations": 7, "fastsel.experiments": 7,                # its clients, optional
}
SHARED_PRIVATE = {"fastsel._checks", "fastsel._state", "fastsel._extension",
                  "fastsel.triton._launch"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{module} has no layer in tests/test_layout.py: place it"
    return LAYERS[best]


def imports(path: Path):
    """(imported module, imported names, line) of every fastsel import in the file."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "fastsel" or mod.startswith("fastsel."):
                names = [a.name for a in node.names]
                def is_module(n):
                    stem = PKG.parent / f"{mod}.{n}".replace(".", "/")
                    return stem.is_dir() or stem.with_suffix(".py").exists() or f"{mod}.{n}" == "fastsel._C"

                submodules = [f"{mod}.{n}" for n in names if is_module(n)]
                if submodules:
                    for sub in submodules:
                        yield sub, [], node.lineno
                else:
                    yield mod, names, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fastsel"):
                    yield a.name, [], node.lineno


SOURCES = sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_down_and_touch_no_private_name(path):
    me = module_name(path)
    for mod, names, line in imports(path):
        if mod == "fastsel._C":
            continue  # the compiled extension, loaded by the bottom layer
        assert layer(mod) <= layer(me), f"{me}:{line} imports {mod}, a higher layer"
        if mod != me and not mod.startswith(me + ".") and mod not in SHARED_PRIVATE:
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{me}:{line} imports private names {private} of {mod}"


def test_no_import_cycle():
    graph = {module_name(p): {m for m, _, _ in imports(p) if m != "fastsel._C"} for p in SOURCES}
    graph = {m: {d for d in deps if d in graph and d != m and not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_every_subpackage_is_installed():
    """pyproject.toml lists the packages explicitly: a subpackage missing there would be
    absent from a wheel while the editable install of the tests still finds it."""
    import tomllib

    listed = set(tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p) for p in PKG.rglob("__init__.py")}
    assert found == listed
