"""Every third-party import of the package is declared in pyproject.toml.

A fresh machine installs only what is declared: an import that works here because a package was
installed by hand fails for a user. Imports inside functions count too (they run later, and fail
later). A distribution that only an extra declares may be imported by the package only lazily
(inside a function), never at module level, so ``import infercc`` works with the core install.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "infercc"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _norm(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project.get("dependencies", [])}
    extras = {e: {_requirement_name(r) for r in reqs} for e, reqs in project.get("optional-dependencies", {}).items()}
    return core, extras


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, at module level) for every absolute import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(n) for n in tree.body}
    for node in tree.body:  # `try: import x` and `if TYPE_CHECKING:` blocks at module level count as top level
        if isinstance(node, (ast.Try, ast.If)):
            top_level |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], node.lineno, id(node) in top_level) for name in names]
    return found


def _third_party(module: str) -> bool:
    return module not in sys.stdlib_module_names and module != "infercc" and module != "__future__"


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_every_import_of_the_package_is_declared():
    core, extras = _declared()
    extra_names = set().union(*extras.values()) if extras else set()
    distributions = md.packages_distributions()
    undeclared, eager_extras = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, line, at_top in _imports(path):
            if not _third_party(module):
                continue
            where = f"{path.relative_to(ROOT)}:{line}"
            for dist in {_norm(d) for d in distributions.get(module, [module])}:
                if dist in core:
                    continue
                if dist in extra_names:
                    if at_top:
                        eager_extras.append(f"{dist} ({where}): only an extra declares it, import it inside a function")
                    continue
                undeclared.append(f"{dist} ({where})")
    assert not undeclared, "imports that pyproject.toml declares nowhere: " + ", ".join(undeclared)
    assert not eager_extras, "; ".join(eager_extras)


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_every_core_dependency_is_installed():
    """The README's install brings every core dependency (a name typo in pyproject would not)."""
    core, _ = _declared()
    installed = {_norm(d.metadata["Name"]) for d in md.distributions()}
    assert core <= installed, f"declared but not installed: {sorted(core - installed)}"


def test_the_checker_sees_imports_inside_functions(tmp_path: Path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    import gguf\n    from safetensors import safe_open\n")
    found = _imports(source)
    assert ("gguf", 4, False) in found and ("safetensors", 5, False) in found and ("os", 1, True) in found
    assert not _third_party("os") and _third_party("gguf")
