"""No import cycles between pocketgpt's modules: the graph of their top-level imports of one another has no cycle,
and every module imports alone, first, in a fresh interpreter; the package stays within its line budget."""

import ast
import subprocess
import sys

from conftest import ROOT

PKG = ROOT / "src" / "pocketgpt"
MODULES = sorted(".".join(("pocketgpt", *p.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__")
                 for p in PKG.rglob("*.py") if "assets" not in p.parts)


def top_level_imports(module: str, tree: ast.Module) -> set[str]:
    """The pocketgpt modules ``module`` imports when it is imported (module and class bodies, not functions)."""
    package = module.split(".") if (PKG / "/".join(module.split(".")[1:]) / "__init__.py").exists() \
        else module.split(".")[:-1]
    out, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            subs = {f"{target}.{a.name}" for a in node.names} & set(MODULES)
            out |= subs or ({target} & set(MODULES))
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names} & set(MODULES)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return out - {module, "pocketgpt"}  # the package's __init__ imports nothing but importlib (names are lazy)


def module_graph() -> dict[str, set[str]]:
    def source(m):
        p = PKG.joinpath(*m.split(".")[1:])
        return (p / "__init__.py" if p.is_dir() else p.with_suffix(".py")).read_text(encoding="utf-8")

    return {m: top_level_imports(m, ast.parse(source(m))) for m in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(m: str, path: list[str]) -> None:
        for n in sorted(graph[m]):
            if n in path:
                found.append(path[path.index(n):] + [n])
            elif n not in done:
                visit(n, path + [n])
        done.add(m)

    for m in MODULES:
        visit(m, [m])
    return found


def test_the_module_graph_has_no_cycle():
    graph = module_graph()
    assert {"pocketgpt.model", "pocketgpt.hf"} <= graph["pocketgpt.checkpoint"]  # the parser sees the imports
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    graph = {m: set() for m in MODULES} | {"pocketgpt.model": {"pocketgpt.checkpoint"},
                                           "pocketgpt.checkpoint": {"pocketgpt.model"}}
    assert cycles(graph)


def test_every_module_imports_alone():
    """Each module first (pocketgpt's modules dropped from ``sys.modules`` between them; torch stays loaded)."""
    code = ("import importlib, sys\n"
            f"for name in {MODULES!r}:\n"
            "    for m in [m for m in sys.modules if m == 'pocketgpt' or m.startswith('pocketgpt.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]


def test_the_package_stays_within_its_line_budget():
    # issue 15: src/pocketgpt (Python, non-blank lines; bundled data and web files are not .py) at most 7,000 lines
    lines = sum(1 for p in PKG.rglob("*.py") if "assets" not in p.parts
                for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    assert 5000 < lines <= 7000, f"src/pocketgpt has {lines} non-blank Python lines (budget 7,000)"
