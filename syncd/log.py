"""Logging: structlog JSON lines (console rendering on a terminal), to stderr, redacted; or
readable lines cut to the terminal's width (`text`: the demo's view, beside its events)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

from syncd import redact
from syncd.lines import clean, fit, terminal_width

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(
    level: str = "info", fmt: Literal["auto", "json", "console", "text"] = "auto"
) -> None:
    """Configure structlog once for the process."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    if fmt == "text":
        renderer = render_text
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            # Last before rendering: whatever an event carries (upstream text, tracebacks) is
            # stripped of secrets.
            redact.processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(renderer)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so that configuring again replaces it."""


def _route_stdlib(renderer: structlog.typing.Processor) -> None:
    """Records of libraries logging through the standard library (asyncio's "Task exception
    was never retrieved", aiohttp's server errors) become the same lines, redacted too."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact.processor,
            renderer,
        ],
    )
    handler = _Handler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def render_text(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    """A log event as one readable line: time, level, event name and its fields as `k=v`, cut
    to the terminal's width; a traceback follows on its own lines, whole."""
    when = str(event.pop("timestamp", ""))[:23].replace("T", " ")
    level = str(event.pop("level", ""))
    name = str(event.pop("event", ""))
    trace = event.pop("exception", None)
    fields = " ".join(f"{key}={_shown(value)}" for key, value in event.items())
    line = fit(clean(f"{when} {level:<7} {name}  {fields}".rstrip()), terminal_width())
    return line if trace is None else line + "\n" + clean(str(trace), keep_newlines=True)


def _shown(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\\'):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:  # a circular structure
        return repr(value)
