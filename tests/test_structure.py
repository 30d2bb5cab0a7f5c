"""The package's shape: no import cycles, small functions, a cheap ``import jaxnet``, tests apart from bench."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxnet"


def _imports(path: Path) -> set[str]:
    """The jaxnet modules that ``path`` imports at module level (TYPE_CHECKING blocks aside)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxnet":
            parts = node.module.split(".")
            found |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("jaxnet.")}
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_the_package_has_no_import_cycle():
    graph = {p.stem: _imports(p) - {p.stem} for p in PACKAGE.glob("*.py")}
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module) :] + [module])}"
        if module in done:
            return
        path.append(module)
        for other in sorted(graph[module]):
            visit(other)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_only_the_command_line_imports_inside_functions():
    # The command line imports the library lazily (its --help must not import jax); elsewhere a
    # function-level import of jaxnet would be hiding a cycle.
    for path in PACKAGE.glob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("jaxnet"):
                        raise AssertionError(f"{path.name}:{inner.lineno} imports jaxnet inside {node.name}")


def test_no_function_is_longer_than_60_lines_of_code():
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                if body and body[-1].end_lineno - body[0].lineno + 1 > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name}")
    assert not long, long


def test_import_jaxnet_does_not_import_jax_until_used():
    code = "import sys, jaxnet; a = 'jax' in sys.modules; jaxnet.fit; print(a, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["False", "True"]


def test_tests_do_not_import_bench():
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.split(".")[0] == "bench" for n in names), path.name
