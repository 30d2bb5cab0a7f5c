"""The package's shape: the library apart from the application, no import cycles, one meaning per name,
small functions, a cheap ``import jaxnet``, tests apart from bench."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxnet"


MODULES = sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    """A module's dotted name below ``jaxnet``: ``loop``, ``_feed``, ``app.cli``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


NAMES = {_name(p) for p in MODULES}


def _imports(path: Path, top_level: bool = True) -> set[str]:
    """The jaxnet modules that ``path`` imports (at module level, TYPE_CHECKING blocks aside, unless
    ``top_level`` is False: then every import, inside functions too)."""
    nodes = ast.parse(path.read_text()).body if top_level else list(ast.walk(ast.parse(path.read_text())))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxnet":
            base = node.module.split(".", 1)[1] if "." in node.module else ""
            for alias in node.names:  # `from jaxnet.app import run` imports the module app.run
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if candidate in NAMES else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("jaxnet.")}
    return {f for f in found if f in NAMES}


def _is_app(module: str) -> bool:
    return module == "app" or module.startswith("app.")


def test_the_package_has_no_import_cycle():
    graph = {_name(p): _imports(p) - {_name(p)} for p in MODULES if _name(p) != "__init__"}
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module) :] + [module])}"
        if module in done:
            return
        path.append(module)
        for other in sorted(graph.get(module, ())):
            visit(other)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_library_never_imports_the_application():
    crossing = [
        f"{_name(p)} -> {m}"
        for p in MODULES
        if not _is_app(_name(p))
        for m in _imports(p, top_level=False)
        if _is_app(m)
    ]
    assert not crossing, crossing


def test_import_jaxnet_loads_no_application_module():
    code = (
        "import sys, jaxnet; jaxnet.fit; jaxnet.summary; jaxnet.evaluate; import jaxnet.callbacks, jaxnet.loggers;"
        "print(sorted(m for m in sys.modules if m.startswith('jaxnet.app')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_internal_library_modules_are_marked_with_an_underscore():
    # The public modules are those a user imports or reads about; every other library module is
    # internal and named _like_this, so `ls jaxnet/` says which is which.
    public = {
        "adapters", "averaging", "base", "callbacks", "checkpoint", "decoding", "epoch", "forward", "groups", "hooks",
        "inference", "layers", "lm", "loggers", "loop", "losses", "lowrank", "members", "metrics", "parallel", "parts",
        "sharding", "shuffle", "sources", "step", "summaries", "text", "transfer",
    }  # fmt: skip
    library = {_name(p) for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert {m for m in library if not m.startswith("_")} == public
    exported = {module for module in importlib.import_module("jaxnet")._EXPORTS.values()}
    assert exported <= public, exported - public


def test_the_exports_are_listed_once_and_the_static_imports_agree():
    init = PACKAGE / "__init__.py"
    static = {}
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxnet."):
            for alias in node.names:
                assert alias.asname == alias.name, f"{alias.name}: re-export it as itself"
                static[alias.name] = node.module.removeprefix("jaxnet.")
    exports = importlib.import_module("jaxnet")._EXPORTS
    assert static == exports
    for name, module in exports.items():
        assert hasattr(importlib.import_module(f"jaxnet.{module}"), name), f"jaxnet.{module} lacks {name}"


def _public_definitions() -> dict[str, list[str]]:
    """Public top-level names (functions, classes, assigned constants) -> the modules defining them."""
    found: dict[str, list[str]] = {}
    for path in MODULES:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                names = []
            for name in names:
                if not name.startswith("_") and _name(path) != "__init__":
                    found.setdefault(name, []).append(_name(path))
    return found


def test_a_public_name_means_one_thing_in_the_package():
    twice = {name: modules for name, modules in _public_definitions().items() if len(modules) > 1}
    assert not twice, twice


def test_only_the_command_line_imports_inside_functions():
    # The command line imports the library lazily (its --help must not import jax); elsewhere a
    # function-level import of jaxnet would be hiding a cycle.
    for path in MODULES:
        if _name(path) == "app.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("jaxnet"):
                        raise AssertionError(f"{_name(path)}:{inner.lineno} imports jaxnet inside {node.name}")


def test_no_function_is_longer_than_60_lines_of_code():
    long = []
    for path in MODULES:
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


def test_modules_with_shapes_point_at_the_one_legend_of_axis_letters():
    shapes = re.compile(r"\((K|S|nb|n|b|T|V)[,)]")
    missing = [
        _name(p)
        for p in MODULES
        if p.name not in ("base.py", "__init__.py")
        and shapes.search(p.read_text())
        and "Axis letters in shapes: :mod:`jaxnet.base`" not in (ast.get_docstring(ast.parse(p.read_text())) or "")
    ]
    assert not missing, missing
    legend = ast.get_docstring(ast.parse((PACKAGE / "base.py").read_text()))
    for letter in ("K", "n", "b", "nb", "S", "T", "V", "C", "d"):
        assert f"``{letter}``" in legend, letter
