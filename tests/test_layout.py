"""The package's shape, checked from its source: the library (``fastgfn`` outside
``fastgfn.trainer``) never imports the engine, transformers, deepspeed or peft; no module
imports another that imports it back (no cycles, lazy imports included); engine modules stay
small enough to read (about 400 lines, functions about 60); no file refers to the shared
design notes that users do not have."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastgfn"
HEAVY = ("transformers", "deepspeed", "peft", "accelerate", "trl")
INTEGRATIONS = "fastgfn.trainer.integrations"  # imported only by their users (optional extras)
BASELINES = "fastgfn.trainer.baselines"  # the TRL baselines (SFT, RL): the same rule
OPTIONAL = (INTEGRATIONS, BASELINES)
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "kernels" not in p.parts}


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Every module ``path`` imports, at any depth of the code (lazy imports count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{a.name}"
                found.add(sub if sub in modules else base)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    modules = set(sources)
    return {m: _imports(p, m, modules) for m, p in sources.items()}


def _is_library(module: str) -> bool:
    return not (module.startswith("fastgfn.trainer") or module == "fastgfn.train")


def test_library_never_imports_the_engine_or_the_training_stack():
    bad = []
    for module, imports in _graph().items():
        if not _is_library(module):
            continue
        for imp in imports:
            if imp.startswith("fastgfn.trainer") or imp == "fastgfn.train" or \
                    imp.split(".")[0] in HEAVY:
                bad.append(f"{module} imports {imp}")
    assert not bad, bad


def test_integrations_are_imported_only_by_their_users():
    """``fastgfn.trainer.integrations`` and ``fastgfn.trainer.baselines`` (TRL, an optional
    extra) are never imported by the library or the engine, and TRL is imported nowhere else:
    ``import fastgfn`` and a ``python -m fastgfn.train`` run work without TRL installed."""
    bad = []
    for module, imports in _graph().items():
        if module.startswith(OPTIONAL):
            continue
        for imp in imports:
            if imp.startswith(OPTIONAL) or imp.split(".")[0] == "trl":
                bad.append(f"{module} imports {imp}")
    assert not bad, bad


def test_no_import_cycles():
    graph = {m: {i for i in imps if i in _sources()} for m, imps in _graph().items()}
    # a package's __init__ importing its own submodules is how packages re-export
    for m in graph:
        graph[m] = {i for i in graph[m] if not i.startswith(m + ".")}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_test_above_can_fail(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from fastgfn.trainer import Trainer\n")
    assert "fastgfn.trainer" in _imports(a, "fastgfn.a", {"fastgfn.trainer"})


ENGINE_FILES = sorted((PACKAGE / "trainer").rglob("*.py")) + [PACKAGE / "train.py"]
TEXT_SUFFIXES = (".py", ".md", ".yaml", ".json", ".sh", ".txt", ".cpp", ".h", ".toml")


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_engine_modules_and_functions_are_short(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{len(lines)} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{node.name}: {length} lines"


def test_no_file_refers_to_the_shared_folder():
    hits = []
    for path in ROOT.rglob("*"):
        if not path.is_file() or any(p in path.parts for p in (".git", ".venv", "build")):
            continue
        if path.suffix not in TEXT_SUFFIXES:
            continue
        text = path.read_text(errors="ignore")
        for needle in ("../shared", "DESIGN.md"):
            if needle in text and path.name != "test_layout.py":
                hits.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not hits, hits
