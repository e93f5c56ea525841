"""Reading a secret from a file, refusing files that others could read or swap.

A secret file must be a regular file owned by the running user or root, with no permission bits
for group or others. The path is followed one component at a time from `/`: a symlink on the way
must be root's (as `/var/run` -> `/run` is), and the file's own name may be a symlink that
stays in its own directory (as Kubernetes' secret volumes have: `name` -> `..data/name`,
`..data` -> `..2024_...`). Anything else is refused unless `allow_insecure_secret_files = true`.
systemd's credential directory is a real directory.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from pathlib import Path

# As the kernel's limit on the symlinks followed for one path.
MAX_SYMLINKS = 40
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


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


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + "/")


def _names(path: str) -> list[str]:
    return [n for n in path.split("/") if n not in ("", ".")]


def _open_walking(given: str) -> int:
    """A descriptor of the file `given` names, found one component at a time from `/`
    (each opened relative to the one before, never following a symlink it did not check)."""
    path = given if os.path.isabs(given) else os.path.join(os.getcwd(), given)
    names = _names(path)
    # (name, whether it is the file's own name or a component its symlink leads through)
    pending = deque((n, i == len(names) - 1) for i, n in enumerate(names))
    fd = os.open("/", _DIR_FLAGS)
    where = ""  # the physical path of fd ("" for /)
    own_dir: str | None = None  # where the file's own name is
    links = 0
    try:
        while pending:
            name, own = pending.popleft()
            if own and own_dir is None:
                own_dir = where
            if name == "..":
                parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd, where = parent, where.rpartition("/")[0]
                continue
            here = f"{where}/{name}"
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise SecretFileError(f"cannot read {given}: too many symlinks")
                in_own_dir = own and own_dir is not None and _within(where, own_dir)
                if st.st_uid != 0 and not in_own_dir:
                    raise SecretFileError(
                        f"{given} is reached through {here}, a symlink owned by uid "
                        f"{st.st_uid}: only root's symlinks (as /var/run) may lead to a secret "
                        "file; name it by its real path"
                    )
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    root = os.open("/", _DIR_FLAGS)
                    os.close(fd)
                    fd, where = root, ""
                pending.extendleft(reversed([(n, own) for n in _names(target)]))
                continue
            if not pending:
                assert own_dir is not None
                if not _within(where, own_dir):
                    raise SecretFileError(
                        f"{given} is a symlink to {here}, outside its own directory"
                    )
                # O_NONBLOCK: opening a FIFO would otherwise wait for a writer (forever, at
                # start); the file type is checked next, and it has no effect on a file.
                flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
                return os.open(name, flags, dir_fd=fd)
            sub = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            opened = os.fstat(sub)
            os.close(fd)
            fd, where = sub, here
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                raise SecretFileError(f"cannot read {given}: {here} changed while it was read")
        raise SecretFileError(f"cannot read {given}: not a file")  # "/" itself
    finally:
        os.close(fd)


def read_secret_file(path: str | os.PathLike[str], *, allow_insecure: bool = False) -> str:
    """The file's text, stripped; SecretFileError when it is unusable or empty."""
    given = Path(path)
    try:
        if allow_insecure:
            fd = os.open(given, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        else:
            fd = _open_walking(str(given))
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
