"""The README's install steps, run as written (under a temporary root instead of /), then
systemd's LoadCredential= emulated from the unit into a fake $CREDENTIALS_DIRECTORY: the
installed configuration passes `syncd check-config`. So does the README's configuration
example, and every TOML block of the README and of docs/ is valid TOML.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
UNIT = ROOT / "systemd" / "syncd.service"
# Steps that need root, systemd or the network; everything else runs as written.
NOT_HERE = (
    "python3 -m venv",  # the test runs from its own virtualenv
    "/opt/syncd/.venv/bin/pip install",
    "systemctl ",
)


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def install_block() -> str:
    found = [b for b in blocks("sh") if "/etc/syncd/credentials" in b and "install " in b]
    assert len(found) == 1, "expected one install block in the README"
    return found[0]


def runnable(block: str, root: Path) -> str:
    """The block with sudo dropped, paths moved under `root`, and the NOT_HERE steps skipped."""
    lines = []
    for line in block.splitlines():
        if not line.strip() or any(step in line for step in NOT_HERE):
            continue
        line = re.sub(r"^sudo ", "", line).replace("| sudo ", "| ")
        line = re.sub(r"(?<![\w.])/etc/", f"{root}/etc/", line)
        lines.append(line)
    return "\n".join(lines) + "\n"


def load_credentials(unit: Path, root: Path, into: Path) -> None:
    """What systemd does for LoadCredential=ID:PATH: a file becomes ID, and every file of a
    directory ID_<name>; each readable only by the service's user (mode 0400)."""
    into.mkdir(mode=0o700)
    for line in unit.read_text().splitlines():
        if not line.startswith("LoadCredential="):
            continue
        ident, _, path = line.removeprefix("LoadCredential=").partition(":")
        source = root / path.lstrip("/")
        files = (
            [(f"{ident}_{f.name}", f) for f in sorted(source.iterdir())]
            if source.is_dir()
            else [(ident, source)]
        )
        for name, src in files:
            shutil.copyfile(src, into / name)
            (into / name).chmod(0o400)


def check_config(path: Path, creds: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds)},
    )


@pytest.fixture
def installed(tmp_path: Path) -> tuple[Path, Path]:
    """The install steps run under tmp_path; (root, credentials directory)."""
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    script = runnable(install_block(), root)
    env = {**os.environ, "APP_KEY": "app-key-from-install", "SECRET": "tenant-secret-xyz"}
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert res.returncode == 0, f"{script}\n{res.stderr}"
    creds = tmp_path / "credentials"
    load_credentials(UNIT, root, creds)
    return root, creds


def test_install_steps_pass_check_config(installed: tuple[Path, Path]) -> None:
    root, creds = installed
    assert (root / "etc/syncd/credentials/app_key").stat().st_mode & 0o777 == 0o600
    assert (root / "etc/syncd/credentials").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/systemd/system/syncd.service").read_text() == UNIT.read_text()
    res = check_config(root / "etc/syncd/syncd.toml", creds)
    assert res.returncode == 0, res.stderr
    assert "ok (1 tenants" in res.stdout
    assert "tenant-secret-xyz" not in res.stdout + res.stderr


def test_readme_configuration_example_passes_check_config(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    _, creds = installed
    examples = [b for b in blocks("toml") if "[[tenants]]" in b]
    assert examples, "the README has no configuration example"
    for i, text in enumerate(examples):
        path = tmp_path / f"readme-{i}.toml"
        path.write_text(text)
        res = check_config(path, creds)
        assert res.returncode == 0, f"README example {i}: {res.stderr}"


def test_every_toml_block_of_the_docs_parses() -> None:
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for text in re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S):
            tomllib.loads(text)


def test_credential_names_agree() -> None:
    """The example configuration names the files the unit's LoadCredential= makes."""
    example = (ROOT / "config" / "example.toml").read_text()
    names = re.findall(r"\$\{CREDENTIALS_DIRECTORY\}/([\w.-]+)", example)
    assert "app_key" in names
    assert any(n.startswith("tenants_") for n in names)
    assert not [n for n in names if n.startswith("tenant-")]
