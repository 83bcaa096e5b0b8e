"""Tests of the package's shape: no import cycle, libraries never import stages, nothing imports benchmark code,
and nothing in the repository sends a reader outside it."""

import ast
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "puzzle_jax"


def _modules() -> dict[str, str]:
    """Module name -> file, for every module of the package."""
    modules = {}
    for folder, _, files in os.walk(os.path.join(REPO, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """Every module of the package that ``module`` imports, at module level or inside functions.

    ``from a import b`` imports ``a.b`` when that is a module, else ``a``; a module's own parent packages are not
    counted (Python imports them first in any case, and a package's ``__init__`` importing its submodules is no
    cycle).
    """
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    ancestors = {".".join(module.split(".")[:i]) for i in range(1, len(module.split(".")))}
    return {name for name in found if name in modules and name != module and name not in ancestors}


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {module: _imports(module, path, modules) for module, path in modules.items()}
    assert len(graph) > 40 and graph["puzzle_jax.driver"] >= {"puzzle_jax.training", "puzzle_jax.checkpointing"}
    state: dict[str, str] = {}

    def visit(module, trail):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycle = trail[trail.index(imported):] + [imported]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, trail + [imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_libraries_never_import_stages_and_nothing_imports_benchmarks():
    modules = _modules()
    for module, path in modules.items():
        imported = _imports(module, path, modules)
        if not module.startswith("puzzle_jax.stages"):
            assert not {name for name in imported if name.startswith("puzzle_jax.stages")}, module
        source = open(path).read()
        assert "import benchmarks" not in source and "from benchmarks" not in source, module


def test_nothing_in_the_repository_points_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in tracked:
        if name.startswith(".ci/") or name.endswith((".jpg", ".png")):
            continue
        path = os.path.join(REPO, name)
        if not os.path.isfile(path):
            continue
        text = open(path, errors="replace").read()
        # Spelled in pieces, so that this file does not match itself.
        if "../" + "shared" in text or "DESIGN" + ".md" in text:
            offenders.append(name)
    assert offenders == [], offenders
