"""Reading a secret from a file, refusing files that others could read or swap.

A secret file must be a regular file owned by the running user or root, with no permission bits
for group or others, reached directly or through a symlink that stays in the same directory (as
systemd's credential directories and Kubernetes' secret volumes do). Anything else is refused
unless `allow_insecure_secret_files = true`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class SecretFileError(Exception):
    """The file cannot be used as a secret; the message names it and what is wrong."""


def check_mode(st: os.stat_result, uid: int) -> str | None:
    """What is wrong with a secret file's owner and mode, or None (a pure decision)."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid not in (uid, 0):
        return f"is owned by uid {st.st_uid}, not by the running user (uid {uid}) or root"
    if st.st_mode & 0o077:
        return (
            f"is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 0600 it"
        )
    return None


def _target(path: Path) -> Path:
    """The file to open: `path` itself, or the target of a symlink within the same directory."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise SecretFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISLNK(st.st_mode):
        return path
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise SecretFileError(f"cannot read {path}: broken symlink ({exc})") from None
    if target.parent != path.parent.resolve():
        raise SecretFileError(f"{path} is a symlink to {target}, outside its own directory")
    return target


def read_secret_file(path: str | os.PathLike[str], *, allow_insecure: bool = False) -> str:
    """The file's text, stripped; SecretFileError when it is unusable or empty."""
    given = Path(path)
    target = given if allow_insecure else _target(given)
    # O_NONBLOCK: opening a FIFO would otherwise wait for a writer (forever, at start); the
    # file type is checked right after, and it has no effect on a regular file.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if allow_insecure else os.O_NOFOLLOW)
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        raise SecretFileError(f"cannot read {given}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        problem = check_mode(st, os.geteuid())
        if not stat.S_ISREG(st.st_mode) or (problem is not None and not allow_insecure):
            raise SecretFileError(f"{given} {problem}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretFileError(f"{given} is not UTF-8 text") from None
    if not text:
        raise SecretFileError(f"{given} is empty")
    return text
