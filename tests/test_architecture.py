"""The shape of the code, checked: short functions, a thin command line, a trainer that wires parts,
no import cycle, and artifact names written in one module only (docs/ARCHITECTURE.md has the map)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cnn_finetune"
MODULES = sorted(PACKAGE.glob("*.py"))


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_a_page():
    long = [f"{path.name}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for path in MODULES for fn in functions(ast.parse(path.read_text()))
            if fn.end_lineno - fn.lineno + 1 > 60]
    assert not long, long


def test_the_command_line_is_thin_and_the_trainer_small():
    cli = ast.parse((PACKAGE / "cli.py").read_text())
    main = next(fn for fn in functions(cli) if fn.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 30
    assert len((PACKAGE / "trainer.py").read_text().splitlines()) < 400


def imports_at_module_level(path: Path) -> set[str]:
    """Sibling modules imported when ``path`` is imported (not those imported inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found & {p.stem for p in MODULES}


def test_no_import_cycle():
    graph = {p.stem: imports_at_module_level(p) for p in MODULES}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail + [name]))
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in sorted(graph[name]):
            visit(dep, trail + [name])
        state[name] = 2

    for module in graph:
        visit(module, [])
    # The tools that use a trained model never import the training command line.
    for tool in ("evaluate", "predict", "export"):
        assert "cli" not in graph[tool] and "pipeline" not in graph[tool]


def test_artifact_names_are_written_in_rundir_only():
    from cnn_finetune import rundir

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
                offenders += [f"{path.name}:{node.lineno} {name}" for name in names if name in node.value]
    assert not offenders, offenders
