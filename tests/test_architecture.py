"""The shape of the code, checked: layers whose imports point only down, short functions, a thin
command line, a trainer that wires parts, and artifact names written in one module only
(docs/ARCHITECTURE.md has the map)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cnn_finetune"
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))

# Bottom to top. A module may import from its own layer and from the layers below it, never above.
LAYERS = [
    {"errors", "log"},
    {"runtime"},
    {"files"},
    {"data"},
    {"model"},
    {"config"},
    {"training"},
    {"tools"},
    {"pipeline"},
    {"cli"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def dotted(path: Path) -> str:
    """``cnn_finetune.training.step`` for src/cnn_finetune/training/step.py."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer unit of a dotted module: its sub-package, or the root module's own name."""
    return module.split(".")[1] if module.count(".") else ""


def _is_module(dotted_name: str) -> bool:
    where = PACKAGE.parent / dotted_name.replace(".", "/")
    return where.with_suffix(".py").exists() or where.is_dir()


def imports_in(text: str, package: str) -> list[tuple[int, str]]:
    """Every cnn_finetune module that source ``text`` placed in ``package`` imports (also inside
    functions), with the line; ``from x import name`` counts as ``x.name`` where that is a module."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                target = ".".join(base[: len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("cnn_finetune"):
                found += [(node.lineno, f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("cnn_finetune")]
    return found


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``imports_in`` for a module of the package."""
    here = dotted(path)
    return imports_in(path.read_text(), here if path.name == "__init__.py" else here.rpartition(".")[0])


def upward_imports(path: Path, text: str | None = None) -> list[str]:
    """The imports of ``path`` (or of ``text`` put in its place) that point to a higher layer."""
    here = dotted(path)
    mine = layer_of(here)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    upward = []
    for line, target in imports_in(path.read_text() if text is None else text, package):
        if target == "cnn_finetune":
            continue  # ``from cnn_finetune import __version__``
        theirs = layer_of(target)
        assert theirs is not None, f"{path.relative_to(ROOT)}:{line} imports {target}, which is in no layer"
        if theirs > mine:
            upward.append(f"{path.relative_to(ROOT)}:{line} ({'/'.join(sorted(LAYERS[mine]))}) imports {target}")
    return upward


def test_every_module_belongs_to_a_layer_and_the_root_stays_small():
    root_modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(root_modules) + 1 <= 8, root_modules  # + __init__.py
    for path in MODULES:
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        name = dotted(path)
        assert (unit(name) or name.split(".")[-1]) in RANK or unit(name) in RANK, f"{name} is in no layer"


def layer_of(module: str) -> int | None:
    u = unit(module)
    if module.count(".") == 1:  # a root module (cnn_finetune.config) or a sub-package (cnn_finetune.data)
        return RANK.get(module.split(".")[1])
    return RANK.get(u)


def test_imports_point_only_down_the_layers():
    # The package's face (cnn_finetune/__init__.py) lazily re-exports the Python API from every layer.
    upward = [hit for path in MODULES if dotted(path) != "cnn_finetune" for hit in upward_imports(path)]
    assert not upward, upward


def test_the_layer_check_sees_an_upward_import():
    loader = PACKAGE / "data" / "loader.py"
    planted = loader.read_text() + "\n\ndef _f():\n    from ..training.trainer import RobustTrainer\n"
    assert upward_imports(loader, planted) == [f"src/cnn_finetune/data/loader.py:{len(planted.splitlines())} (data) "
                                               "imports cnn_finetune.training.trainer"]


def test_the_micro_batch_split_has_one_home():
    # MicroBatcher and the split that respects ghost batch-norm groups live together.
    defined = {}
    for path in MODULES:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in ("MicroBatcher", "split_for_micro_batches", "ghost_groups"):
                defined[node.name] = dotted(path)
    assert set(defined.values()) == {"cnn_finetune.training.microbatch"}, defined


@pytest.mark.parametrize("name", ["train", "TrainConfig", "RunResult", "load_model_file", "predict_proba", "load_dataset"])
def test_the_python_api_imports_from_the_package(name: str):
    import cnn_finetune

    assert name in cnn_finetune.__all__
    assert callable(getattr(cnn_finetune, name))


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_a_page():
    long = [f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for path in MODULES for fn in functions(ast.parse(path.read_text()))
            if fn.end_lineno - fn.lineno + 1 > 60]
    assert not long, long


def test_the_command_line_is_thin_and_the_trainer_small():
    cli = ast.parse((PACKAGE / "cli.py").read_text())
    main = next(fn for fn in functions(cli) if fn.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 30
    assert len((PACKAGE / "training" / "trainer.py").read_text().splitlines()) < 400


def test_no_import_cycle_at_module_level():
    def top_level(path: Path) -> set[str]:
        keep = {t for line, t in imported_modules(path)
                if any(getattr(n, "lineno", None) == line for n in ast.parse(path.read_text()).body)}
        return {t for t in keep if t in graph_names}

    graph_names = {dotted(p) for p in MODULES}
    graph = {dotted(p): top_level(p) for p in MODULES}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail + [name]))
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            visit(dep, trail + [name])
        state[name] = 2

    for module in graph:
        visit(module, [])
    # The tools that use a trained model never import the training command line.
    for tool in ("evaluate", "predict", "export"):
        deps = graph[f"cnn_finetune.tools.{tool}"]
        assert "cnn_finetune.cli" not in deps and "cnn_finetune.pipeline" not in deps


def test_artifact_names_are_written_in_rundir_only():
    from cnn_finetune.files import rundir

    names = [rundir.LAST, rundir.PREV, rundir.BEST, rundir.HISTORY, rundir.CONFIG, rundir.DATA_REPORT, rundir.CURVES,
             rundir.EVALUATION, rundir.CONFUSION, rundir.MODEL_CARD]
    offenders = []
    for path in MODULES:
        if path.name == "rundir.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                offenders += [f"{path.relative_to(PACKAGE)}:{node.lineno} {name}" for name in names if name in node.value]
    assert not offenders, offenders
