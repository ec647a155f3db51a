"""The README's Reliability section cannot drift from the tests: every test it names
exists, and every test of the reliability files is named in it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).parent.parent
README = REPO / "README.md"
RELIABILITY_FILES = ["test_network.py", "test_hostile.py", "test_daemon_faults.py",
                     "test_stress.py"]
NAMED = re.compile(r"tests/(test_\w+\.py)::(test_\w+)")


def _reliability_section() -> str:
    text = README.read_text()
    start = text.index("\n## Reliability\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_named_in_the_doc_exists() -> None:
    named = NAMED.findall(_reliability_section())
    assert len(named) > 50
    missing = [
        f"{module}::{name}"
        for module, name in named
        if not (REPO / "tests" / module).exists() or name not in _tests_in(REPO / "tests" / module)
    ]
    assert missing == []


def test_every_reliability_test_is_in_the_doc() -> None:
    named = set(NAMED.findall(_reliability_section()))
    absent = [
        f"{module}::{name}"
        for module in RELIABILITY_FILES
        for name in sorted(_tests_in(REPO / "tests" / module))
        if (module, name) not in named
    ]
    assert absent == []
