"""The development lock: how `make lock` writes it and how `make` checks it is fresh.

`lock/dev.txt` pins every package of the development and test environment (the runtime
dependencies, the `test`, `bench` and `postgres` extras and the build backend) to one version
with the hash of every file PyPI serves for it, for every supported Python and platform (uv's
universal resolution). Its first line records a digest of what it was compiled from: the dependency
ranges, `requires-python` and the build requirements of `pyproject.toml`. `check` recomputes the
digest and fails when `pyproject.toml` changed without `make lock`, and checks that every pin
satisfies the range it was resolved for.

    python lock/lockfile.py check            # exit 1 with what is stale
    python lock/lockfile.py lock UV          # lock/dev.txt for pyproject.toml, with the uv binary
                                             # UV; pins still allowed are kept
    python lock/lockfile.py lock UV upgrade  # the same, every pin the newest allowed
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "lock" / "dev.txt"
EXTRAS = ("test", "bench", "postgres")
DIGEST_LINE = re.compile(r"^# inputs-sha256: ([0-9a-f]{64})$")
PIN_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def inputs(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """What the lock is compiled from; nothing else in pyproject.toml changes it."""
    doc = tomllib.loads(pyproject.read_text())
    project = doc["project"]
    extras = project.get("optional-dependencies", {})
    return {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "extras": {name: extras.get(name, []) for name in EXTRAS},
        "build-requires": doc.get("build-system", {}).get("requires", []),
    }


def digest(pyproject: Path = PYPROJECT) -> str:
    canonical = json.dumps(inputs(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def recorded_digest(lock: Path = LOCK) -> str | None:
    first = lock.read_text().splitlines()[:1] if lock.exists() else []
    match = DIGEST_LINE.match(first[0]) if first else None
    return match.group(1) if match else None


def pins(lock: Path = LOCK) -> dict[str, list[str]]:
    """Normalised package name -> the versions the lock pins (one per marker branch)."""
    found: dict[str, list[str]] = {}
    for line in lock.read_text().splitlines():
        match = PIN_LINE.match(line)
        if match:
            found.setdefault(normalise(match.group(1)), []).append(match.group(2))
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def problems(pyproject: Path | None = None, lock: Path | None = None) -> list[str]:
    """Why the lock does not match pyproject.toml; empty when it does."""
    from packaging.requirements import Requirement

    pyproject = pyproject or PYPROJECT
    lock = lock or LOCK

    rel = lock.relative_to(ROOT) if lock.is_relative_to(ROOT) else lock
    if not lock.exists():
        return [f"{rel} is missing: run `make lock`"]
    found: list[str] = []
    if recorded_digest(lock) != digest(pyproject):
        found.append(
            f"{rel} was compiled from other dependency ranges than pyproject.toml's "
            "(dependencies, optional-dependencies, requires-python or build-system.requires "
            "changed): run `make lock`"
        )
    pinned = pins(lock)
    wanted = inputs(pyproject)
    specs = [*wanted["dependencies"], *wanted["build-requires"]]
    for extra in wanted["extras"].values():
        specs.extend(extra)
    for spec in specs:
        req = Requirement(spec)
        versions = pinned.get(normalise(req.name))
        if not versions:
            found.append(f"{rel} pins no version of {req.name} ({spec})")
            continue
        bad = [v for v in versions if not req.specifier.contains(v, prereleases=True)]
        if bad:
            found.append(
                f"{rel} pins {req.name}=={bad[0]}, outside {req.specifier} (pyproject.toml)"
            )
    return found


def python_floor(pyproject: Path = PYPROJECT) -> str:
    """The oldest supported Python, from `requires-python` (">=3.11"): the universal resolution
    covers it and every newer one."""
    wanted = inputs(pyproject)["requires-python"] or ""
    match = re.fullmatch(r"\s*>=\s*(3\.\d+)\s*(,.*)?", wanted)
    if not match:
        raise SystemExit(f"pyproject.toml: requires-python: expected '>=3.N...', got {wanted!r}")
    return match.group(1)


def lock(uv: str, upgrade: bool, pyproject: Path = PYPROJECT, out: Path = LOCK) -> None:
    """Resolve the ranges and write the pins, hashed, to `out`: the newest versions allowed with
    `upgrade`, else the current pins wherever the ranges still allow them."""
    build = inputs(pyproject)["build-requires"]
    with tempfile.TemporaryDirectory() as tmp:
        build_in = Path(tmp) / "build-requires.in"
        build_in.write_text("".join(f"{r}\n" for r in build))
        compiled = Path(tmp) / "dev.txt"
        if out.exists() and not upgrade:
            compiled.write_text(out.read_text())  # uv prefers the pins of an existing output
        # --no-config and no UV_* variables: only pyproject.toml's ranges (which the digest
        # covers) decide what is locked, not a uv.toml, [tool.uv] or the caller's environment.
        cmd = [uv, "pip", "compile", "--quiet", "--no-config", "--universal", "--generate-hashes"]
        if upgrade:
            cmd.append("--upgrade")
        floor = python_floor(pyproject)
        cmd += ["--python-version", floor, "--no-header", "--no-annotate"]
        for extra in EXTRAS:
            cmd += ["--extra", extra]
        cmd += [str(pyproject), str(build_in), "-o", str(compiled)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
        subprocess.run(cmd, check=True, env=env)
        body = compiled.read_text()
    header = (
        f"# inputs-sha256: {digest(pyproject)}\n"
        "# The development and test environment of syncd, every file hashed: `make` installs\n"
        "# exactly this (pip --require-hashes). Do not edit: `make lock` writes it from\n"
        f"# pyproject.toml (extras {', '.join(EXTRAS)} and the build backend), for Python\n"
        f"# {floor} and newer, every platform with wheels for all of it (installed binary-only).\n"
    )
    out.write_text(header + body)


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"]:
        found = problems()
        for problem in found:
            print(problem, file=sys.stderr)
        return 1 if found else 0
    if argv[:1] == ["lock"] and len(argv) in (2, 3) and argv[2:] in ([], ["upgrade"]):
        lock(argv[1], upgrade=argv[2:] == ["upgrade"])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
