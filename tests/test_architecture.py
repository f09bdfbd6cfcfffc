"""The package layering the README's "Module contracts" promise, checked on the source.

Imports point one way, down: the command line root (`serving/cli_root.py`) → `serving` → `moe_adapters`
→ `registry` → nothing of ours. Every import counts, including ones inside functions and under
TYPE_CHECKING: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("registry", "moe_adapters", "serving")  # bottom to top
CLI_ROOT = "serving.cli_root"
MAX_MODULE_LINES = 500
# Modules allowed over MAX_MODULE_LINES, each with the reason; a new big module has to argue here.
LARGE_MODULES: dict[str, str] = {}


def layer(module: str) -> int:
    """0 registry, 1 moe_adapters, 2 serving, 3 the command line root."""
    return len(PACKAGES) if module == CLI_ROOT else PACKAGES.index(module.split(".")[0])


def source_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:  # alembic scripts, loaded by alembic from files
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = source_modules()


def imported_names(module: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of ours in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] in PACKAGES:
                yield target, [alias.name for alias in node.names], node.lineno


def dependencies(module: str) -> set[str]:
    """The modules of ours that `module` imports (`from pkg import submodule` counts the submodule)."""
    found: set[str] = set()
    for target, names, _ in imported_names(module, MODULES[module]):
        submodules = [f"{target}.{name}" for name in names if f"{target}.{name}" in MODULES]
        found.update(submodules or [target])
    found.discard(module)
    return {name for name in found if name in MODULES}


GRAPH = {module: dependencies(module) for module in MODULES}


def test_every_import_points_down() -> None:
    upward = [
        f"{module}:{line} imports {target}"
        for module, path in MODULES.items()
        for target, _, line in imported_names(module, path)
        if target in MODULES and layer(target) > layer(module)
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components: any component of two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_no_package_uses_another_packages_private_names() -> None:
    reaching = [
        f"{module}:{line} takes {name} from {target}"
        for module, path in MODULES.items()
        for target, names, line in imported_names(module, path)
        if target.split(".")[0] != module.split(".")[0]
        for name in names
        if name.startswith("_")
    ]
    assert not reaching, "\n".join(reaching)


def test_modules_stay_small() -> None:
    big = {
        module: n
        for module, path in MODULES.items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    unexplained = {module: n for module, n in big.items() if module not in LARGE_MODULES}
    assert not unexplained, (
        f"modules over {MAX_MODULE_LINES} lines without a reason in LARGE_MODULES: {unexplained}"
    )
    stale = sorted(set(LARGE_MODULES) - set(big))
    assert not stale, f"LARGE_MODULES lists modules that are no longer large: {stale}"


MAX_FUNCTION_LINES = 60


def test_long_functions_say_why() -> None:
    """A function over MAX_FUNCTION_LINES has a comment saying why, above it (or its
    decorators) or on its `def` line."""
    unexplained = []
    for module, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                said = lines[first - 2].lstrip().startswith("#") or "  # " in lines[node.lineno - 1]
                if length > MAX_FUNCTION_LINES and not said:
                    unexplained.append(f"{module}.{node.name} ({length} lines, line {node.lineno})")
    assert not unexplained, "long functions without a reason comment above them: " + ", ".join(unexplained)


def test_the_layering_test_sees_a_violation(tmp_path: Path) -> None:
    """The checks above read what they should: an upward import in a copy of a module is found."""
    path = tmp_path / "train_copy.py"
    path.write_text("from serving.gateway import Gateway\n\ndef f():\n    from registry import _hidden\n")
    found = list(imported_names("moe_adapters.train_copy", path))
    assert ("serving.gateway", ["Gateway"], 1) in found and ("registry", ["_hidden"], 4) in found
    assert layer("serving.gateway") > layer("moe_adapters.train_copy")


def _import_in_subprocess(code: str, pythonpath: list[Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath)}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _our_path() -> list[Path]:
    """Keep a PYTHONPATH the test runner was given (a checkout tested without installing)."""
    return [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


@pytest.mark.parametrize("shadowed", ["registry", "serving"])
def test_a_foreign_package_with_our_name_is_refused_in_one_line(tmp_path: Path, shadowed: str) -> None:
    """Another distribution's top-level `registry`/`serving` found first on sys.path: a clear error."""
    foreign = tmp_path / "site" / shadowed
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text('"""Some other project\'s package."""\n')
    done = _import_in_subprocess("import moe_adapters", [tmp_path / "site", *_our_path(), ROOT], tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "PackageConflictError" in last and str(foreign / "__init__.py") in last and "not moea's" in last


def test_our_own_packages_pass_the_check(tmp_path: Path) -> None:
    done = _import_in_subprocess(
        "import serving, registry, moe_adapters; print(serving.MOEA_PACKAGE, registry.MOEA_PACKAGE)",
        [*_our_path(), ROOT],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["serving", "registry"]
