"""The repository's layering, read from the source: one import name per module, one module per
basename, packages that never import a root script, the engine free of the project, no import
cycle, no sys.path edits but the one bootstrap; one parser module per CLI, each helper defined
once, a README under 15 KB."""
from __future__ import annotations

import ast
import importlib
import re
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


# ---------------------------------------------------------------- one place per decision (issue 24)
def top_level_functions(name: str) -> list[str]:
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def import_closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(project_imports(current))
    return seen


def uses(name: str, attr: str, called: bool = False) -> bool:
    """The module names `attr` (parser.add_argument, add = p.add_argument), or with called=True
    calls it (argparse.ArgumentParser(...); an annotation does not count)."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    nodes = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)] if called else ast.walk(tree)
    return any((isinstance(n, ast.Attribute) and n.attr == attr) or (isinstance(n, ast.Name) and n.id == attr)
               for n in nodes)


# The argparse CLIs: scripts that define get_args_parser or take it from their flags module (train.py)
CLIS = tuple(name for name in TOP_MODULES if "get_args_parser" in MODULES[name].read_text())
# Modules that declare flags for more than one CLI, each flag once: the two ImageNet scripts' shared flags.
SHARED_FLAG_MODULES = {"evaluation.imagenet_eval"}


def test_each_cli_builds_its_parser_in_one_module():
    """One `argparse.ArgumentParser(` per CLI, in one module of what the script imports (its own
    file or the flags module under its package), so a flag is looked up in one place."""
    assert set(CLIS) >= {"train", "eval_zeroshot_imagenet", "eval_zeroshot_imagenet_laion", "eval_benchmark"}
    builders = {cli: sorted(m for m in import_closure(cli) if uses(m, "ArgumentParser", called=True)) for cli in CLIS}
    assert {cli: found for cli, found in builders.items() if len(found) != 1} == {}
    assert len({found[0] for found in builders.values()}) == len(CLIS)  # no parser module serves two CLIs
    for cli, (builder,) in builders.items():
        declaring = {m for m in import_closure(cli) if uses(m, "add_argument")}
        assert declaring - {builder} <= SHARED_FLAG_MODULES, (cli, sorted(declaring))


# Top-level function names that several modules define on purpose. Conventions: each CLI's entry
# points (docs/design.md: argparse `get_args_parser()` + `main(argv)`, fire's `cli`). Homonyms: the
# same word for different jobs, module by module.
CONVENTIONS = {"main", "get_args_parser", "cli", "run"}
HOMONYMS = {
    "describe": {"common.storage", "common.claims"},  # a storage error / a claim's holder, in one line
    "join": {"common.storage", "training.rewrite_join"},  # a path under a location / rewrites onto a sample
    "load_model": {"eval_zeroshot_imagenet", "eval_zeroshot_imagenet_laion", "rewrite.llama.checkpoint"},
}


def test_no_helper_is_defined_twice():
    """A helper copied into a second module drifts from the first: each job's function once.
    (Tests, benchmarks and the engine's own classes aside: functions at module level only.)"""
    where: dict[str, set[str]] = {}
    for name in MODULES:
        for fn in top_level_functions(name):
            where.setdefault(fn, set()).add(name)
    twice = {fn: mods for fn, mods in where.items() if len(mods) > 1 and fn not in CONVENTIONS}
    assert twice == {fn: mods for fn, mods in HOMONYMS.items() if len(where.get(fn, ())) > 1}


def test_the_readme_stays_a_users_page():
    """README.md: commands, release tables, a paragraph per task; depth lives in docs/."""
    assert (ROOT / "README.md").stat().st_size <= 15_000


def test_one_open_clip_factory_and_one_rewrite_format():
    """open_clip models are created in one module (models/open_clip_arch.py), and the rewriter's
    output format (its parquet metadata key) is defined in one (common/rewrite_format.py)."""
    creating = {n for n, p in MODULES.items() if re.search(r"create_model(_and_transforms)?\(", p.read_text())}
    assert creating == {"models.open_clip_arch"}
    assert {n for n, p in MODULES.items() if 'b"laclip_rewrite"' in p.read_text()} == {"common.rewrite_format"}
