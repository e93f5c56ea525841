"""Reading the documentation as data: its files, fenced blocks, prose, headings, links, and the
`syncd` command lines of its `sh` blocks (tests/test_docs.py)."""

from __future__ import annotations

import ast
import re
import shlex
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
RULES = ROOT / "contrib" / "prometheus" / "syncd-rules.yml"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n?", re.S | re.M)


def blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(text) if lang == language]


def prose(text: str) -> str:
    """The text without its fenced blocks."""
    return _FENCE.sub("\n", text)


def headings(text: str) -> list[str]:
    return [m.group(2).strip() for m in re.finditer(r"^(#{1,6}) (.+)$", prose(text), re.M)]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = defaultdict(int)
    out = set()
    for heading in headings(path.read_text()):
        base = slug(heading)
        out.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return out


def links(text: str) -> list[str]:
    """The targets of the Markdown links in the prose (not in code)."""
    plain = re.sub(r"`[^`]*`", "", prose(text))
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", plain)


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(text))


# -- command lines -----------------------------------------------------------------------------

# What a synopsis' placeholders stand for; any other upper-case word is a plain string.
PLACEHOLDERS = {"T": "1001", "ID": "1714564800123-0", "N": "3"}


def shell_lines(block: str) -> Iterator[str]:
    """The block's commands: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            yield line


def _alternatives(line: str) -> list[str]:
    """A synopsis `(a | b)`, or a word `a|b`, as one line per alternative."""
    m = re.search(r"\(([^()]*\|[^()]*)\)", line) or re.search(r"(?<!\S)([\w-]+(?:\|[\w-]+)+)", line)
    if m is None:
        return [line]
    out = []
    for choice in m.group(1).split("|"):
        out.extend(_alternatives(line[: m.start()] + choice.strip() + line[m.end() :]))
    return out


def syncd_argvs(line: str) -> list[list[str]]:
    """The arguments of each `syncd` the line runs, a synopsis' optional parts (`[...]`) given
    and each of its alternatives taken; [] when it runs none."""
    out = []
    for variant in _alternatives(line):
        words = shlex.split(variant.replace("[", " ").replace("]", " "))
        # `syncd` running, not a unit named syncd (`systemctl status syncd`).
        starts = [
            i
            for i, w in enumerate(words)
            if w.endswith("/bin/syncd") or (w == "syncd" and words[:i] in ([], ["sudo"]))
        ]
        for start in starts:
            argv = []
            for word in words[start + 1 :]:
                if word in ("|", "||", "&&", ";", ">", ">>"):
                    break
                if word == "...":
                    continue
                argv.append(PLACEHOLDERS.get(word, "x") if re.fullmatch(r"[A-Z]+", word) else word)
            out.append(argv)
    return out


# -- what the code logs ------------------------------------------------------------------------

_LEVELS = {"warning": "warning", "error": "error", "exception": "error", "critical": "error"}


def logged_events() -> dict[str, set[str]]:
    """Every event name syncd logs at warning or error level, with those levels. The simulator
    and the test servers are tools of their own, not what an operator runs."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in sorted((ROOT / "syncd").rglob("*.py")):
        if path.relative_to(ROOT / "syncd").parts[0] in ("simulator", "testing"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            level = _LEVELS.get(node.func.attr)
            if level is None or not node.args:
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found[first.value].add(level)
    return dict(found)


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), re.M)


def table_rows(section: str) -> dict[str, list[str]]:
    """The rows of the Markdown tables in `section` whose first cell is one code span, by it."""
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([\w]+)` \|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [cell.strip() for cell in m.group(2).split("|")]
    return rows


def section(text: str, heading: str) -> str:
    """From the heading line to the next heading of the same or a higher level (fenced blocks
    are not headings)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == heading)
    fenced = False
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if line.startswith("```"):
            fenced = not fenced
        m = re.match(r"^(#{1,6}) ", line)
        if not fenced and m and len(m.group(1)) <= level:
            return "".join(lines[start:i])
    return "".join(lines[start:])


def literal(cell: str) -> object:
    """A table cell holding one Python value in a code span."""
    return ast.literal_eval(cell.strip().strip("`"))
