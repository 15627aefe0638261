"""The repository's layering, read from the source: one import name per module, one module per
basename, packages that never import a root script, the engine free of the project, no import
cycle, no sys.path edits but the one bootstrap."""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "models", "training", "evaluation", "rewrite", "testkit")
# The root scripts and modules of the original layout (train.py, zeroshot.py, tokenizer.py, ...).
TOP_MODULES = tuple(sorted(p.stem for p in ROOT.glob("*.py")))
ENGINE_DEPS = {"torch", "fairscale", "sentencepiece", "tokenizers", "safetensors"}
BOOTSTRAP = ROOT / "rewrite" / "llama_rewrite.py"


def project_modules() -> dict[str, Path]:
    """Import name -> file, for every module of the project (tests and benchmarks aside)."""
    found = {name: ROOT / f"{name}.py" for name in TOP_MODULES}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(name: str, path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


MODULES = project_modules()


def project_imports(name: str) -> set[str]:
    return {n for n in imported_names(name, MODULES[name]) if n in MODULES and n != name}


def test_the_project_modules_are_found():
    assert {"rewrite.llama.model", "rewrite.cli_args", "common.distributed", "training.data",
            "testkit.tiny_llama", "train"} <= set(MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_by_its_one_name(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve() == MODULES[name].resolve()


def test_every_package_is_listed():
    assert {p.parent.name for p in ROOT.glob("*/__init__.py")} <= set(PACKAGES) | {"tests"}


def test_no_two_modules_share_a_basename():
    """A name says which module it is: `checkpoint.py` or `runner.py` twice is ambiguous in a
    traceback, a grep and a review. Tests and package `__init__.py` files aside."""
    files = [p for p in ROOT.rglob("*.py") if p.name != "__init__.py"
             and not any(part in ("tests", "build") or part.startswith(".") for part in p.relative_to(ROOT).parts)]
    by_name: dict[str, list[str]] = {}
    for path in files:
        by_name.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: sorted(paths) for name, paths in by_name.items() if len(paths) > 1} == {}


def test_no_package_imports_a_root_module():
    """Root scripts sit on top: a package importing one (zeroshot, tokenizer, train, ...) points up."""
    upward = {name: sorted(project_imports(name) & set(TOP_MODULES))
              for name in MODULES if name not in TOP_MODULES}
    assert {name: deps for name, deps in upward.items() if deps} == {}


def test_the_engine_imports_nothing_of_the_project():
    for name in (n for n in MODULES if n == "rewrite.llama" or n.startswith("rewrite.llama.")):
        for imp in imported_names(name, MODULES[name]):
            top = imp.split(".")[0]
            assert imp.startswith("rewrite.llama") or top in ENGINE_DEPS or top in sys.stdlib_module_names, \
                f"{name} imports {imp}"


def test_library_layers_point_down():
    """common/ is the bottom; nothing of the library imports the test and demo helpers."""
    for name in MODULES:
        deps = project_imports(name)
        if name.startswith("common"):
            assert all(d.startswith("common") for d in deps), (name, deps)
        if not name.startswith("testkit") and name != "demo":
            assert not any(d.startswith("testkit") for d in deps), (name, deps)


def test_no_import_cycle():
    graph = {name: {d for d in project_imports(name) if not name.startswith(d + ".")} for name in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_sys_path_edits_but_the_bootstrap():
    files = [p for p in ROOT.rglob("*.py") if ".git" not in p.parts and p != BOOTSTRAP]
    offenders = [str(p.relative_to(ROOT)) for p in files
                 if any(isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name)
                        and n.value.id == "sys" for n in ast.walk(ast.parse(p.read_text())))]
    assert offenders == []
