"""README's benchmark figures are what bench/results/*.json say (bench/figures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import figures


def test_readme_blocks_match_the_committed_results() -> None:
    readme = figures.README.read_text()
    assert figures.render(readme, figures.load_results()) == readme, (
        "README.md's benchmark figures differ from bench/results/*.json: "
        "run `.venv/bin/python -m bench.figures`"
    )


def _readme_with(body: str) -> str:
    blocks = "".join(
        f"<!-- bench:begin {name} -->\n{body}<!-- bench:end {name} -->\n\n"
        for name in figures.BLOCKS
    )
    return f"# Benchmarks\n\nBefore.\n\n{blocks}After.\n"


def test_a_hand_edit_is_replaced_and_the_text_around_kept() -> None:
    results = figures.load_results()
    fresh = figures.render(_readme_with(""), results)
    edited = fresh.replace("| first sync, records/s |", "| first sync, records/s | 1 |", 1)
    assert edited != fresh
    assert figures.render(edited, results) == fresh
    assert fresh.startswith("# Benchmarks\n\nBefore.\n\n<!-- bench:begin results -->\n")
    assert fresh.endswith("<!-- bench:end mirror -->\n\nAfter.\n")


def test_check_fails_on_a_stale_readme_and_the_writer_fixes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(_readme_with("| typed | by hand |\n"))
    monkeypatch.setattr(figures, "README", readme)
    assert figures.main(["--check"]) == 1
    assert figures.main([]) == 0
    assert figures.main(["--check"]) == 0
    assert "typed | by hand" not in readme.read_text()


@pytest.mark.parametrize(
    ("readme", "message"),
    [
        ("<!-- bench:begin results -->\n<!-- bench:end results -->\n", "missing"),
        (_readme_with("") + "<!-- bench:begin other -->\n<!-- bench:end other -->\n", "unknown"),
    ],
)
def test_blocks_missing_or_unknown_are_refused(readme: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        figures.render(readme, figures.load_results())


def test_a_missing_result_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match=r"bench/results/backfill\.json"):
        figures.render(_readme_with(""), figures.load_results(tmp_path))
