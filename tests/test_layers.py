"""The layer order of sparsec's modules (DESIGN.md, "Layers"), checked from the source.

Each module may import modules of its own layer or of layers below it, never above; and no
two modules import each other, directly or around a circle. Imports under `if TYPE_CHECKING:`
are annotations only and do not count. A new module must be placed in `LAYERS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "sparsec"

LAYERS: list[tuple[str, ...]] = [  # lowest first; a name covers a module or a package
    ("_version", "_util", "errors", "compare", "data", "optim", "memory", "hf_source"),
    ("program", "devices", "trainable"),
    ("layouts", "ops", "kernels"),
    ("passes", "joint"),
    ("pipeline", "recipe", "frontend", "sources"),
    ("backends",),
    ("outputs", "report", "fsdp", "memory_plot"),  # outputs, artifacts, placement
    ("training",),
    ("api", "export"),
    ("cli", "cli_options", "cli_layout", "progress", "__main__", "testing", ""),  # "": __init__
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The sparsec modules `name` imports (anywhere in the file, call-time imports too)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(n.test)
                   for c in n.body for x in ast.walk(c)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("sparsec"):
                stem = node.module.removeprefix("sparsec").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{stem}.{alias.name}" if stem else alias.name
                found.add(sub if sub in modules else stem)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("sparsec").lstrip(".") for a in node.names
                      if a.name.split(".")[0] == "sparsec"}
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"sparsec/{module.replace('.', '/')}: not in any layer; add it to "
                         f"LAYERS in tests/test_layers.py (and DESIGN.md)")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, if there is one."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_module_imports_a_layer_above_its_own():
    graph = _graph()
    upward = [f"{m} (layer {_layer(m)}) imports {n} (layer {_layer(n)})"
              for m, deps in sorted(graph.items()) for n in sorted(deps)
              if _layer(n) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    circle = _cycle(_graph())
    assert circle is None, " -> ".join(circle or [])


def test_the_checks_see_a_circle_and_an_upward_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"] and _cycle({"a": {"b"}, "b": set()}) is None
    assert _layer("program") < _layer("passes.attention") < _layer("api")
    edges = _graph()
    assert "passes.base" in edges["pipeline"] and "program" in edges["passes.base"]
