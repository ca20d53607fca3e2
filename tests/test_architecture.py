"""The layers of the library, checked from the source: the arrows only point down.

    front door   minillm.cli, minillm.__main__, minillm.pipeline          parse flags, call stages
    stages       minillm.stages.*                                          wire math into the loop, write runs
    run store    minillm.runs, minillm.train, minillm.config               checkpoints, the loop, presets
    math         model, sampling, tokenizer, bpe, hf_gpt2, align/, peft/, quant/, eval/,
                 and the plain helpers world, datasets, memory, plots, utils

The import graph is read with `ast` (imports inside functions included), so a cycle cannot hide in a
function body.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minillm"
FRONT = {"minillm.cli", "minillm.__main__", "minillm.pipeline"}
STORE = {"minillm.runs", "minillm.train", "minillm.config"}
# Function-local imports are allowed only for optional dependencies, each with a comment saying why.
OPTIONAL = {"matplotlib", "transformers", "peft", "bitsandbytes", "trl", "lm_eval"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> str:
    if name in FRONT:
        return "front"
    if name == "minillm.stages" or name.startswith("minillm.stages."):
        return "stages"
    if name in STORE:
        return "store"
    return "math"


RANK = {"math": 0, "store": 1, "stages": 2, "front": 3}


def imported_modules(path: Path, modules: set[str]) -> list[tuple[str, ast.AST, bool]]:
    """(imported minillm module, node, inside a function) for every import in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from minillm.stages import sft` imports the module minillm.stages.sft
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules and "." in t:
                t = t.rpartition(".")[0]
            if t in modules and t != name:
                found.append((t, node, id(node) in in_function))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t, _, _ in imported_modules(path, set(files))} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle(graph):
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_imports_point_down(graph):
    upward = sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, targets in graph.items() for b in targets
                    if RANK[layer(b)] > RANK[layer(a)])
    assert upward == []


def test_the_library_never_imports_the_front_door(graph):
    assert sorted(a for a, targets in graph.items() if targets & FRONT and a not in FRONT) == []


def test_quant_sits_below_peft(graph):
    """QLoRA is a PEFT method on a quantized base: peft/ may use quant/, never the reverse."""
    assert sorted((a, b) for a, targets in graph.items() for b in targets
                  if a.startswith("minillm.quant") and b.startswith("minillm.peft")) == []


def test_function_local_imports_only_for_optional_dependencies():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                top = (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name) or ""
                commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if top.split(".")[0] not in OPTIONAL or not commented:
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert bad == [], "imports inside functions (move them to the top of the module):\n" + "\n".join(bad)
    assert "minillm.stages" in modules and "minillm.runs" in modules
