"""The layout is the architecture: the import contract in setup.cfg, and no borrowed private names.

import-linter holds the layers (errors < net < cluster < {compute, code} < {peer, client} <
{cli, __main__}), compute's independence from code, and the absence of import cycles.
The AST check below holds the house rule that no module of grid or sim imports another
module's ``_private`` name: a piece two files need has a public home below both.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("grid", "sim")


def test_import_contracts_are_kept():
    result = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as run; run()", "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "0 broken" in report and "layers import only downwards KEPT" in report, report


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_names(path: pathlib.Path):
    """(line, module imported from, name) for every ``from grid... import name`` (or sim) in ``path``."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module.partition(".")[0] in PACKAGES:
            for alias in node.names:
                yield node.lineno, module, alias.name


def private_imports(*roots: pathlib.Path) -> list[str]:
    found = []
    for path in sorted(path for root in roots or [ROOT / name for name in PACKAGES] for path in root.rglob("*.py")):
        for line, module, name in _imported_names(path):
            if name.startswith("_") and not name.startswith("__"):
                found.append(f"{path.relative_to(ROOT)}:{line}: {name} from {module}")
            elif module.rpartition(".")[2].startswith("_") and not module.endswith("__"):
                found.append(f"{path.relative_to(ROOT)}:{line}: {name} from the private module {module}")
    return found


def test_no_module_imports_another_modules_private_name():
    assert private_imports() == []


def test_the_private_name_check_can_fail(tmp_path):
    package = tmp_path / "grid"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lower.py").write_text("_secret = 1\npublic = 2\n")
    (package / "upper.py").write_text("from .lower import public\nfrom grid.lower import _secret\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert private_imports(package) == ["grid/upper.py:2: _secret from grid.lower"]
    finally:
        ROOT = saved
