"""Reading the project's imports from its source (ast), for the tests that check the architecture.

Imports inside functions count too: stages import their heavy libraries lazily, and a lazy import is
still a dependency. `tests/test_dag.py` uses this to check dvc.yaml's deps, `tests/test_architecture.py`
to check who may import whom.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("tasks", "model", "serving", "flows")


def module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def is_package_marker(file: Path) -> bool:
    """An `__init__.py` that holds only its docstring: importing a module below it runs no code of it."""
    body = ast.parse(file.read_text()).body
    return file.name == "__init__.py" and all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                                              for node in body)


def imported_names(file: Path, module: str) -> list[str]:
    """Every module name `file` (the module `module`) imports, absolute, with `from x import y` giving both
    `x` and `x.y` (y may be a submodule)."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def project_modules(package: str) -> dict[str, Path]:
    """module name -> file for every .py file under a top-level package."""
    found = {}
    for file in sorted((ROOT / package).rglob("*.py")):
        parts = file.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def imported_project_files(module: str, skip=lambda relative: False) -> set[str]:
    """Every project file `module` can import, transitively (repo-relative paths). Files for which
    `skip(relative)` is true are listed but not followed, and neither are package markers."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        file = module_file(name)
        if file is None:
            continue
        relative = file.relative_to(ROOT).as_posix()
        if relative in seen:
            continue
        seen.add(relative)
        if skip(relative) or is_package_marker(file):
            continue
        found = [n for n in imported_names(file, name) if n.split(".")[0] in PROJECT_PACKAGES]
        todo += found + [".".join(n.split(".")[:i]) for n in found for i in range(1, n.count(".") + 1)]
    return seen
