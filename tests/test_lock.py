"""The development lock: fresh for pyproject.toml, every package pinned and hashed."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lockfile", ROOT / "lock" / "lockfile.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("lockfile", module)
    spec.loader.exec_module(module)
    return module


lockfile = _load()


def test_the_committed_lock_is_fresh_for_pyproject() -> None:
    assert lockfile.problems() == []


def _requirements(path: Path) -> list[str]:
    """One entry per requirement: continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


@pytest.mark.parametrize("name", ["dev.txt", "uv.txt"])
def test_every_locked_package_has_one_version_and_its_hashes(name: str) -> None:
    entries = _requirements(ROOT / "lock" / name)
    assert entries
    for entry in entries:
        assert re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[^\s;]+", entry), entry
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), entry
        assert "-e " not in entry
        assert "git+" not in entry
        assert "file:" not in entry


def test_the_lock_holds_the_build_backend_and_every_extra() -> None:
    pinned = lockfile.pins()
    extras = ("pytest", "mypy", "ruff", "pyinstrument", "psycopg")
    for name in ("setuptools", *extras, "redis", "msgspec"):
        assert name in pinned, name


def _project(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "pyproject.toml").read_text()
    assert old in text
    changed = tmp_path / "pyproject.toml"
    changed.write_text(text.replace(old, new))
    return changed


def test_a_changed_range_makes_the_lock_stale(tmp_path: Path) -> None:
    changed = _project(tmp_path, '"anyio>=4.4,<5"', '"anyio>=4.4,<4.5"')
    found = lockfile.problems(changed)
    assert any("run `make lock`" in p and "dependency ranges" in p for p in found), found
    # The pin is also named as outside the new range.
    assert any("anyio==" in p and "outside" in p for p in found), found


def test_a_new_dependency_is_named_as_missing_from_the_lock(tmp_path: Path) -> None:
    changed = _project(tmp_path, '"anyio>=4.4,<5",', '"anyio>=4.4,<5",\n    "attrs-extra>=1",')
    found = lockfile.problems(changed)
    assert any("pins no version of attrs-extra" in p for p in found), found


def test_a_new_python_floor_or_build_backend_makes_the_lock_stale(tmp_path: Path) -> None:
    for old, new in (
        ('requires-python = ">=3.11"', 'requires-python = ">=3.12"'),
        ('requires = ["setuptools>=70.1"]', 'requires = ["setuptools>=70.1", "wheel"]'),
    ):
        found = lockfile.problems(_project(tmp_path, old, new))
        assert any("run `make lock`" in p for p in found), (old, found)


def test_what_does_not_feed_the_lock_does_not_make_it_stale(tmp_path: Path) -> None:
    changed = _project(tmp_path, 'version = "', 'version = "9')
    assert lockfile.problems(changed) == []


def test_a_missing_lock_says_how_to_make_one(tmp_path: Path) -> None:
    assert lockfile.problems(lock=tmp_path / "dev.txt") == [
        f"{tmp_path / 'dev.txt'} is missing: run `make lock`"
    ]


def test_the_check_command_exits_non_zero_on_a_stale_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(lockfile, "PYPROJECT", _project(tmp_path, '">=3.11"', '">=3.12"'))
    assert lockfile.main(["check"]) == 1
    assert "run `make lock`" in capsys.readouterr().err


def test_the_mypy_of_other_versions_checks_what_the_locked_one_does() -> None:
    import configparser
    import tomllib

    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    ranges = configparser.ConfigParser()
    ranges.read(ROOT / "lock" / "mypy-ranges.ini")
    assert ranges.getboolean("mypy", "strict") is ours["strict"]
    assert ranges.get("mypy", "python_version") == ours["python_version"]
    assert ranges.get("mypy", "packages").split(",") == ours["packages"]
    # Only redis-py differs: every other override of pyproject.toml is there too.
    for override in ours.get("overrides", []):
        for module in override["module"]:
            assert ranges.has_section(f"mypy-{module}"), module


def test_the_python_floor_comes_from_requires_python(tmp_path: Path) -> None:
    assert lockfile.python_floor() == "3.11"
    assert lockfile.python_floor(_project(tmp_path, '">=3.11"', '">=3.12,<4"')) == "3.12"
    with pytest.raises(SystemExit, match="requires-python"):
        lockfile.python_floor(_project(tmp_path, '">=3.11"', '"~=3.11"'))
