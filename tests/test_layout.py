"""The package's layout: packages by concern with one-way imports, modules of a readable size,
the consumer library's public surface, and a version that follows the changelog."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import syncd
import syncd.consumer

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "syncd"
# A module past this many lines is holding more than one concern: split it.
MAX_MODULE_LINES = 500
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_past_the_size_of_one_concern() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_every_package_says_what_it_owns_and_what_it_may_import() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(ROOT)} has no docstring"
        if init.parent.name != "simulator":
            assert re.search(r"\b(may use|may import|imports? it|imported by)\b", doc, re.I), (
                f"{init.relative_to(ROOT)} does not say what it may use"
            )


def test_every_module_opens_with_a_docstring() -> None:
    missing = [
        str(p.relative_to(ROOT))
        for p in _modules()
        if p.name not in ("__init__.py", "__main__.py")
        and not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert missing == []


def test_no_module_waits_with_asyncio_wait_for() -> None:
    """On Python 3.11, asyncio.wait_for returns the awaited result, swallowing a cancellation,
    when both come in one step: a task cancelled then runs on. asyncio.timeout does not."""
    calls = [
        f"{p.relative_to(ROOT)}:{node.lineno}"
        for p in _modules()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "wait_for"
    ]
    assert calls == []


def test_the_map_names_every_package() -> None:
    doc = (ROOT / "docs" / "development.md").read_text()
    start = doc.index("## The code: a map\n")
    section = doc[start : doc.index("\n## ", start + 1)]
    for package in sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")):
        assert f"`{package}/`" in section, package


def test_the_map_names_every_module_of_the_library() -> None:
    # Each in its package's row; the simulator and the test servers are mapped as a whole.
    doc = (ROOT / "docs" / "development.md").read_text()
    start = doc.index("## The code: a map\n")
    section = doc[start : doc.index("\n## ", start + 1)]
    rows = {
        line.split("|")[1].strip().strip("`/"): line
        for line in section.splitlines()
        if line.startswith("| ")
    }
    missing = [
        str(p.relative_to(ROOT))
        for p in _modules()
        if p.name not in ("__init__.py", "__main__.py")
        and p.parent.name not in ("simulator", "testing")
        and f"`{p.stem}`" not in rows[p.parent.name if p.parent != PACKAGE else "shared"]
    ]
    assert missing == []


def test_the_consumer_api_is_the_documented_surface() -> None:
    readme = (ROOT / "README.md").read_text()
    stable = readme[readme.index("The names `syncd.consumer` exports") :][:400]
    documented = set(re.findall(r"`(\w+)`", stable.split("are the stable")[0]))
    assert set(syncd.consumer.__all__) == documented
    for name in syncd.consumer.__all__:
        assert getattr(syncd.consumer, name) is not None
    from syncd.consumer import Consumer, Event, Subscription, is_newer_or_same

    assert Consumer.__module__.startswith("syncd.consumer")
    assert Event.__module__.startswith("syncd.consumer")
    assert Subscription.__module__.startswith("syncd.consumer")
    assert is_newer_or_same("2024-01-02T00:00:00Z", "2024-01-01T00:00:00Z")


def test_the_version_follows_the_changelog() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    top = re.search(r"^## (\d+\.\d+\.\d+)", changelog, re.M)
    assert top is not None
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version == top.group(1)
    assert syncd.__version__ == version


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")],
        cwd=tree,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not LINT_IMPORTS.exists():
        pytest.skip("lint-imports is not installed beside this Python")
    tree = tmp_path_factory.mktemp("layout")
    shutil.copytree(PACKAGE, tree / "syncd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _with_import(tree: Path, module: str, statement: str) -> None:
    path = tree / "syncd" / module
    text = path.read_text()
    future = "from __future__ import annotations\n"
    at = text.index(future) + len(future) if future in text else text.index("\nimport ") + 1
    path.write_text(text[:at] + statement + "\n" + text[at:])


def test_the_contract_holds_for_the_tree(tree_copy: Path) -> None:
    done = _lint_imports(tree_copy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "statement", "named"),
    [
        # An upward import: the configuration reaching into the engine.
        ("config/model.py", "import syncd.engine.due", "syncd.config is not allowed"),
        # Two independent siblings: the consumer library importing the fleet.
        ("consumer/events.py", "import syncd.fleet.assign", "syncd.consumer is not allowed"),
        # A circle inside one package.
        ("engine/due.py", "import syncd.engine.scheduler", "No cycles are allowed"),
        # The simulator importing what it is there to test.
        ("simulator/cursor.py", "import syncd.servicetitan.page", "syncd.simulator"),
        # The consumer library pulling in the HTTP client's library.
        (
            "consumer/delivery.py",
            "import aiohttp",
            "syncd.consumer is not allowed to import aiohttp",
        ),
        # The ServiceTitan edge reaching for Redis.
        ("servicetitan/page.py", "import syncd.redis.conn", "syncd.servicetitan is not allowed"),
        # The mirror reaching into the engine, and the daemon (its sibling) into the mirror.
        ("mirror/rows.py", "import syncd.engine.due", "syncd.mirror is not allowed"),
        ("daemon/state.py", "import syncd.mirror.rows", "syncd.daemon is not allowed"),
        # PostgreSQL's driver, an optional extra, outside the mirror.
        ("consumer/events.py", "import psycopg", "syncd.consumer is not allowed to import psycopg"),
    ],
)
def test_the_contract_fails_an_import_against_the_arrows(
    tmp_path: Path, tree_copy: Path, module: str, statement: str, named: str
) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(tree_copy, tree)
    _with_import(tree, module, statement)
    done = _lint_imports(tree)
    assert done.returncode != 0
    assert named in done.stdout, done.stdout
