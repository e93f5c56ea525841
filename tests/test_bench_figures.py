"""docs/benchmarks.md's figures are what bench/results/*.json say (bench/figures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import figures


def test_doc_blocks_match_the_committed_results() -> None:
    assert figures.DOC == figures.ROOT / "docs" / "benchmarks.md"
    doc = figures.DOC.read_text()
    assert figures.render(doc, figures.load_results()) == doc, (
        "docs/benchmarks.md's figures differ from bench/results/*.json: "
        "run `.venv/bin/python -m bench.figures`"
    )


def test_no_figures_block_left_elsewhere() -> None:
    """The blocks live in one file: one left behind in another would never be refreshed."""
    docs = [figures.ROOT / "README.md", *sorted((figures.ROOT / "docs").glob("*.md"))]
    holding = [p.name for p in docs if "<!-- bench:begin" in p.read_text()]
    assert holding == ["benchmarks.md"]


def _doc_with(body: str) -> str:
    blocks = "".join(
        f"<!-- bench:begin {name} -->\n{body}<!-- bench:end {name} -->\n\n"
        for name in figures.BLOCKS
    )
    return f"# Benchmarks\n\nBefore.\n\n{blocks}After.\n"


def test_a_hand_edit_is_replaced_and_the_text_around_kept() -> None:
    results = figures.load_results()
    fresh = figures.render(_doc_with(""), results)
    edited = fresh.replace("| first sync, records/s |", "| first sync, records/s | 1 |", 1)
    assert edited != fresh
    assert figures.render(edited, results) == fresh
    assert fresh.startswith("# Benchmarks\n\nBefore.\n\n<!-- bench:begin results -->\n")
    assert fresh.endswith("<!-- bench:end peer -->\n\nAfter.\n")


def test_check_fails_on_a_stale_doc_and_the_writer_fixes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(_doc_with("| typed | by hand |\n"))
    monkeypatch.setattr(figures, "DOC", doc)
    assert figures.main(["--check"]) == 1
    assert figures.main([]) == 0
    assert figures.main(["--check"]) == 0
    assert "typed | by hand" not in doc.read_text()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("<!-- bench:begin results -->\n<!-- bench:end results -->\n", "missing"),
        (_doc_with("") + "<!-- bench:begin other -->\n<!-- bench:end other -->\n", "unknown"),
    ],
)
def test_blocks_missing_or_unknown_are_refused(doc: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        figures.render(doc, figures.load_results())


def test_a_missing_result_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match=r"bench/results/backfill\.json"):
        figures.render(_doc_with(""), figures.load_results(tmp_path))
