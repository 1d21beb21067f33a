"""The packages' imports point one way: policies -> tiered_store -> zipf_analysis -> bench.

A module may import its own floor and the floors below it, never one above; only the CLI
(``tiered_store/cli.py``) sits on top of every floor. Tests never import ``bench``, and bench
scripts import library code only, never each other. Imports inside functions and in doctest
examples count too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"policies": 0, "tiered_store": 1, "zipf_analysis": 2, "bench": 3}
ON_TOP = {"tiered_store/cli.py"}  # the command line may import every floor
BENCH_MODULES = {p.stem for p in (REPO / "bench").glob("*.py")} | {"bench"}
DOCTEST_IMPORT = re.compile(r"^\s*(?:>>>|\.\.\.)\s+(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))")


def _imported(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file, doctest examples included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for line in node.value.splitlines():
                match = DOCTEST_IMPORT.match(line)
                if match:
                    names.add((match.group(1) or match.group(2)).split(".")[0])
    return names


def _files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", list(FLOORS))
def test_no_import_climbs_to_a_higher_floor(package):
    wrong = []
    for path in _files(package):
        rel = path.relative_to(REPO).as_posix()
        if rel in ON_TOP:
            continue
        for name in _imported(path):
            if package == "bench" and name in BENCH_MODULES:
                wrong.append(f"{rel} imports bench code ({name}); expected library code only")
            elif FLOORS.get(name, -1) > FLOORS[package]:
                wrong.append(f"{rel} imports {name}; expected {package} or a floor below it")
    assert not wrong, "\n".join(wrong)


def test_tests_never_import_bench():
    wrong = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in _files("tests")
        for name in _imported(path) & BENCH_MODULES
    ]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_imports_in_functions_and_doctests(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        'def f():\n    """\n    >>> from zipf_analysis.trace import X\n    """\n'
        "    import bench.bench_store\n    from policies import lru\n"
    )
    assert _imported(sample) == {"zipf_analysis", "bench", "policies"}
