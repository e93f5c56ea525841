"""sd_notify: environment parsing as tables, datagrams checked on real AF_UNIX sockets."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from syncd.ops.sdnotify import Notifier, format_message, notify_address, watchdog_interval


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@syncd/notify", "\0syncd/notify"),
        ("@", None),
        ("relative/notify", None),
        ("vsock:2:1234", None),
    ],
)
def test_notify_address(value: str | None, expected: str | None) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    assert notify_address(env) == expected


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 15.0),
        ("30000000", "4242", 15.0),
        ("30000000", "4243", None),
        ("30000000", "not-a-pid", None),
        ("1000000", None, 0.5),
        ("0", None, None),
        ("-30000000", None, None),
        ("", None, None),
        ("30s", None, None),
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None) -> None:
    env = {}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = pid
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_defaults_to_this_process() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 1.0


def test_format_message_keeps_one_assignment_per_line() -> None:
    assert format_message({"READY": 1, "STATUS": "two\nlines"}) == "READY=1\nSTATUS=two lines"


@pytest.mark.parametrize("key", ["", "A=B", "A\nB"])
def test_format_message_rejects_bad_names(key: str) -> None:
    with pytest.raises(ValueError, match="invalid sd_notify field name"):
        format_message({key: 1})


@pytest.fixture
def fs_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, {"NOTIFY_SOCKET": str(path)}
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, dict[str, str]]]:
    name = f"syncd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    yield sock, {"NOTIFY_SOCKET": "@" + name}
    sock.close()


def test_messages_on_a_filesystem_socket(fs_socket: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = fs_socket
    notifier = Notifier(env)
    assert notifier.enabled
    try:
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        assert notifier.ready("syncing 3 tenants")
        assert sock.recv(4096) == b"READY=1\nSTATUS=syncing 3 tenants"
        assert notifier.status("paused: 429 from tenant 1")
        assert sock.recv(4096) == b"STATUS=paused: 429 from tenant 1"
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
        assert notifier.notify(EXTEND_TIMEOUT_USEC=5000000)
        assert sock.recv(4096) == b"EXTEND_TIMEOUT_USEC=5000000"
        assert notifier.send("FDSTORE=0")
        assert sock.recv(4096) == b"FDSTORE=0"
    finally:
        notifier.close()


def test_reloading_carries_the_monotonic_clock(
    fs_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = fs_socket
    notifier = Notifier(env)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    try:
        assert notifier.reloading()
    finally:
        notifier.close()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, usec = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after


def test_messages_on_an_abstract_socket(
    abstract_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = abstract_socket
    notifier = Notifier(env)
    try:
        assert notifier.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    finally:
        notifier.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()
    notifier.close()


def test_send_errors_are_logged_not_raised(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "absent")})
    with capture_logs() as logs:
        assert not notifier.ready()
    notifier.close()
    assert [(e["event"], e["log_level"]) for e in logs] == [("sd_notify_failed", "debug")]
