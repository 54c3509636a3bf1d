"""The package edges point one way, and functions stay short.

Every module of ``align`` and ``reward_models`` is parsed (``ast``, so function-local imports
count too, and nothing is imported): ``reward_models`` imports nothing from ``align``;
``align.data`` imports neither ``align.models`` nor ``align.sample`` nor ``align.training``;
``align.models.diffusers`` has no import cycle; and no function is longer than 80 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("align", "reward_models")
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The modules ``name`` imports anywhere in its file (``from a import b`` counts as ``a``
    and, when ``a.b`` is a module, as ``a.b``), relative imports resolved. Imports under
    ``if TYPE_CHECKING:`` count too: they are edges a reader follows."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _edges() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {i for i in _imports(m, f) if i in mods} for m, f in mods.items()}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(source: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{m} imports {i}"
        for m, imported in sorted(_edges().items())
        if _within(m, source)
        for i in sorted(imported)
        if any(_within(i, f) for f in forbidden)
    ]


def test_reward_models_imports_nothing_from_align():
    bad = _violations("reward_models", ("align",))
    assert not bad, "\n".join(bad)


def test_data_imports_neither_models_nor_sampling_nor_training():
    bad = _violations("align.data", ("align.models", "align.sample", "align.training"))
    assert not bad, "\n".join(bad)


def test_diffusers_adapters_have_no_import_cycle():
    pkg = "align.models.diffusers"
    graph = {m: {i for i in imp if _within(i, pkg) and i != m} for m, imp in _edges().items() if _within(m, pkg)}
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                cycles.append(" -> ".join([*path[path.index(n) :], n]))
            elif n not in state:
                visit(n, [*path, n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
