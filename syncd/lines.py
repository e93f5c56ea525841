"""Text for a terminal: control characters escaped, lines cut to a width with an ellipsis.

Shared by what prints outside data for people to read: `syncd tail --format text`, the demo's
view and its log lines, `syncd dead`.
"""

from __future__ import annotations

import shutil
import unicodedata

ELLIPSIS = "…"
# Below this, a line cut to the terminal says too little: a narrower one wraps instead.
MIN_WIDTH = 40


def clean(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with control and formatting characters (ANSI escapes, bidi overrides, carriage
    returns) escaped as `\\xNN` / `\\uNNNN`, so that a terminal shows them instead of obeying
    them."""
    out = []
    for char in text:
        if char == "\n" and keep_newlines:
            out.append(char)
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def fit(text: str, width: int) -> str:
    """`text` cut to `width` characters, the last one an ellipsis when anything was cut."""
    width = max(width, 1)
    return text if len(text) <= width else text[: width - 1] + ELLIPSIS


def terminal_width() -> int:
    """The columns of the terminal (`COLUMNS` first, 80 when there is none), at least
    `MIN_WIDTH`."""
    return max(shutil.get_terminal_size().columns, MIN_WIDTH)
