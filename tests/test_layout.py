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
        for needle in ("/".join(("..", "shared")), "DESIGN.md"):  # not spelt out here
            if needle in text and path.name != "test_layout.py":
                hits.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not hits, hits


# the engine's rules: task keys stay in their task, one way to sample --------------------
TASKS_DIR = PACKAGE / "trainer" / "tasks"
EVALUATION_DIR = PACKAGE / "trainer" / "evaluation"


def _declared_task_keys() -> dict[str, dict[type, str]]:
    """Every key a task's ``Options`` declares itself (not inherited from the shared
    ``tasks/options.py``): key -> {each Options class that declares it: a task's name}."""
    import dataclasses

    from fastgfn.trainer.tasks import TASKS, task_class

    out = {}
    for name in TASKS:
        options = task_class(name).Options
        for cls in options.__mro__:
            if not dataclasses.is_dataclass(cls) or cls.__module__.endswith("tasks.options"):
                continue
            inherited = set()
            for base in cls.__bases__:
                if dataclasses.is_dataclass(base):
                    inherited |= {f.name for f in dataclasses.fields(base)}
            for f in dataclasses.fields(cls):
                if f.name not in inherited:
                    out.setdefault(f.name, {}).setdefault(cls, name)
    return out


def _owners(options_cls) -> set[Path]:
    """The files that may read a key of ``options_cls``: the module that declares it, the
    modules of the tasks whose options extend it, and those tasks' evaluation commands."""
    import sys

    from fastgfn.trainer.tasks import TASKS, task_class

    files = {Path(sys.modules[options_cls.__module__].__file__)}
    for name in TASKS:
        task = task_class(name)
        if issubclass(task.Options, options_cls):
            files.add(Path(sys.modules[task.__module__].__file__))
            files |= set((EVALUATION_DIR / name).rglob("*.py"))
    return files


def _task_key_reads(path: Path, keys) -> list[tuple[int, str]]:
    """``(line, key)`` of every ``<x>.task.<key>`` and ``getattr(<x>.task, "<key>")``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in keys and \
                isinstance(node.value, ast.Attribute) and node.value.attr == "task":
            found.append((node.lineno, node.attr))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and \
                len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and \
                node.args[1].value in keys:
            found.append((node.lineno, node.args[1].value))
    return found


def test_no_task_key_is_read_outside_its_task():
    """A key a task declares in its ``Options`` is read only by that task's module (and the
    tasks built on it) and its evaluation command: a new task is one file and its registry
    line, and no other module learns its keys."""
    keys = _declared_task_keys()
    assert {"question_key", "story_columns", "task_low", "fewshot_examples"} <= set(keys)
    bad, seen = [], 0
    for path in ENGINE_FILES:
        for line, key in _task_key_reads(path, keys):
            seen += 1
            if not any(path in _owners(cls) for cls in keys[key]):
                bad.append(f"{path.relative_to(ROOT)}:{line} reads {key} "
                           f"(of task {', '.join(keys[key].values())})")
    assert seen > 20  # the tasks read their keys where they may
    assert not bad, bad


def test_the_task_key_rule_can_fail(tmp_path):
    leak = tmp_path / "leak.py"
    leak.write_text("def f(cfg):\n"
                    "    return cfg.task.question_key, getattr(cfg.task, 'infill_column')\n")
    assert _task_key_reads(leak, {"question_key", "infill_column"}) == [
        (2, "question_key"), (2, "infill_column")]


SAMPLER = "fastgfn.trainer.sampling.sampler"
ENTRY_POINT = PACKAGE / "trainer" / "sampling" / "policy.py"


def _calls_the_sampler(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "") == SAMPLER and \
                any(a.name == "sample" for a in node.names):
            return True
        if isinstance(node, ast.Attribute) and node.attr == "sample" and \
                getattr(node.value, "id", None) == "sampler":
            return True
    return False


def test_one_sampling_entry_point():
    """Only ``sampling/policy.py`` calls the token sampler; the rollout, the evaluation, the
    evaluation commands, the baselines and the TRL trainer sample through
    ``sample_policy``."""
    callers = sorted(str(p.relative_to(ROOT)) for p in ENGINE_FILES if _calls_the_sampler(p))
    assert callers == [str(ENTRY_POINT.relative_to(ROOT))]


def test_the_sampling_rule_can_fail(tmp_path):
    other = tmp_path / "other.py"
    other.write_text("from fastgfn.trainer.sampling.sampler import draw_temperatures, sample\n")
    assert _calls_the_sampler(other)
    other.write_text("from fastgfn.trainer.sampling.sampler import draw_temperatures\n")
    assert not _calls_the_sampler(other)
