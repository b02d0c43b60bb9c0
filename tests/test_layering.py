"""The layering rules (DESIGN.md), checked where they matter, at import time.

- The core (`codegen_repl.core.*`), the remote decoder and SampleParams load none of JAX, Flax or
  a front end's library: a REPL or a kernel that talks to a decoder server never pays for them.
- Importing the kernel module loads no JAX (the kernel loads its model in the background).
- No module of the package imports itself back through others (no import cycle).

Each module is imported in a fresh interpreter, which says who first imported each library, so a
failure names the module, the library and the import that brought it in.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import codegen_repl.core

ROOT = Path(__file__).resolve().parents[1]
FRONT_END_AND_JAX = ("jax", "flax", "prompt_toolkit", "rich", "starlette", "uvicorn")
JAX = ("jax", "flax")
CORE = sorted(
    f"codegen_repl.core.{m.name}" for m in pkgutil.iter_modules(codegen_repl.core.__path__)
)
RULES = [
    *[(module, FRONT_END_AND_JAX) for module in CORE],
    ("codegen_repl.decoders.remote", FRONT_END_AND_JAX),
    ("codegen_repl.model.sample_params", FRONT_END_AND_JAX),
    ("codegen_repl.kernel.kernel", JAX),
]
# The package's folders: model/, kernel/ and train/ are installed as codegen_repl.<name>.
PACKAGE_DIRS = {
    "codegen_repl": ROOT / "codegen_repl",
    "codegen_repl.model": ROOT / "model",
    "codegen_repl.kernel": ROOT / "kernel",
    "codegen_repl.train": ROOT / "train",
}

# Run in a fresh interpreter: import argv[1], print {library: the module that first imported it}
# for each library of argv[2] that got loaded. httpx imports its optional command-line client
# (which uses rich) whenever rich is installed; we never use that client, so it is switched off
# here, and what is checked is what our modules import.
_PROBE = r"""
import json, sys
sys.modules["httpx._main"] = None
watched, importers = set(sys.argv[2].split(",")), {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in watched and top not in importers:
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(
                ("importlib", "_frozen_importlib")
            ):
                frame = frame.f_back
            importers[top] = "?" if frame is None else frame.f_globals.get("__name__", "?")
        return None

sys.meta_path.insert(0, Watch())
__import__(sys.argv[1])
print(json.dumps({lib: importers.get(lib, "?") for lib in sorted(watched) if lib in sys.modules}))
"""


def test_every_core_module_is_covered() -> None:
    assert {"codegen_repl.core.decoding", "codegen_repl.core.settings"} <= set(CORE)


@pytest.mark.parametrize(("module", "forbidden"), RULES, ids=[module for module, _ in RULES])
def test_importing_loads_no_forbidden_library(module: str, forbidden: tuple[str, ...]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, module, ",".join(forbidden)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    problems = [f"importing {module} loads {lib} (imported by {by})" for lib, by in loaded.items()]
    assert not problems, "; ".join(problems)


def test_there_is_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 50  # the walk found the package
    cycles = [sorted(group) for group in strongly_connected(graph) if len(group) > 1]
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# ----------------------------------------------------------------------------- the static graph


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports when it is imported (module-level imports,
    not those in functions or under `if TYPE_CHECKING`)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets: set[str] = set()
        for target in imported_names(tree.body, name, path.name == "__init__.py"):
            while target and target not in known:  # `from pkg.mod import name` -> pkg.mod
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def imported_names(body: list[ast.stmt], module: str, is_package: bool) -> Iterator[str]:
    """The dotted names a block of module-level statements imports (`from a import b`: a.b)."""
    for statement in body:
        if isinstance(statement, ast.Import):
            yield from (alias.name for alias in statement.names)
        elif isinstance(statement, ast.ImportFrom):
            base = statement.module or ""
            if statement.level:
                anchor = module if is_package else module.rpartition(".")[0]
                for _ in range(statement.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}".rstrip(".")
            yield from (f"{base}.{alias.name}" for alias in statement.names)
        elif isinstance(statement, ast.If) and "TYPE_CHECKING" not in ast.unparse(statement.test):
            yield from imported_names(statement.body + statement.orelse, module, is_package)
        elif isinstance(statement, ast.Try):
            blocks = [statement.body, statement.orelse, statement.finalbody]
            blocks += [handler.body for handler in statement.handlers]
            for block in blocks:
                yield from imported_names(block, module, is_package)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups
